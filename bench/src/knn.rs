//! `knn-diffusion bench knn`: precompute-knn against its peers on generated clustered data,
//! all measured in one run on this machine, written into BENCHMARKS.md:
//! - ours: `knn-diffusion precompute-knn` in a fresh process (default settings; its own
//!   peak RSS), all rows as queries; time includes making the plan (k-means, calibration);
//! - faiss-cpu: `python/bench_knn_faiss.py`, IVF-Flat batch search of all rows, nprobe tuned
//!   to recall@10 ≥ 0.99 on the same sample;
//! - Lance per-query ANN: `build-index` (IVF_PQ) then the [`Retriever`] one query at a time,
//!   nprobes raised until recall@10 ≥ 0.99 on the sample; also its p50 / p99 latency.
//!
//! recall@10 of each is measured on the same sample of rows against exact brute force
//! (self excluded).

use super::{machine, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use knn_cluster::job::Stage;
use knn_datasets::StorageConfig;
use knn_indexer::knn::quantizer::sample_offsets;
use knn_indexer::knn::search::{exact_knn, Exclusion};
use knn_indexer::knn::synthetic::{clustered, write_vectors, Clustered};
use knn_indexer::knn::{build_index, IndexConfig, KnnSummary, Retriever, RetrieverOptions};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Flags of `bench knn`.
#[derive(Debug, Args)]
pub struct BenchKnnArgs {
    /// Table sizes, e.g. `100000,1000000`.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub rows: Vec<usize>,
    /// Dimension.
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    /// Clusters in the generated data (0: rows / 100).
    #[arg(long, default_value_t = 0)]
    pub clusters: usize,
    /// Spread of points around their cluster centre, relative to the centres' spread.
    #[arg(long, default_value_t = 0.5)]
    pub noise: f64,
    /// Sample queries for recall (exact neighbours by brute force).
    #[arg(long, default_value_t = 1000)]
    pub recall_queries: usize,
    /// Queries timed for the per-query Lance peer.
    #[arg(long, default_value_t = 1000)]
    pub lance_queries: usize,
    /// Skip the faiss-cpu peer.
    #[arg(long)]
    pub no_faiss: bool,
    /// Skip the per-query Lance peer.
    #[arg(long)]
    pub no_lance: bool,
    /// Where generated tables go.
    #[arg(long, default_value = "target/bench-knn")]
    pub workdir: PathBuf,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

const K: usize = 10;

/// One size's results.
struct Row {
    n: usize,
    ours: KnnSummary,
    ours_recall: f64,
    faiss: Option<Value>,
    lance: Option<LancePeer>,
}

struct LancePeer {
    build_s: f64,
    nprobes: usize,
    recall: f64,
    qps: f64,
    p50_ms: f64,
    p99_ms: f64,
    tuning: Vec<(usize, f64)>,
}

/// Writes `x` [n, d] f32 as a .npy file.
fn write_npy_f32(path: &Path, x: &Tensor) -> Result<()> {
    let (n, d) = (x.size()[0], x.size()[1]);
    let flat: Vec<f32> = Vec::try_from(&x.contiguous().view([-1]))?;
    let bytes: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path, "<f4", &format!("({n}, {d})"), &bytes)
}

fn write_npy_i64(path: &Path, values: &[i64], shape: &str) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path, "<i8", shape, &bytes)
}

/// NPY format 1.0: magic, version, header length, a padded dict literal, raw data.
fn write_npy(path: &Path, dtype: &str, shape: &str, data: &[u8]) -> Result<()> {
    let mut header = format!("{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.div_ceil(64) * 64 - unpadded));
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    f.write_all(data)?;
    f.flush()?;
    Ok(())
}

/// recall@k of `got` against `want`, per query lists of ids.
fn recall(got: &[Vec<u64>], want: &[Vec<u64>]) -> f64 {
    let (mut hit, mut all) = (0usize, 0usize);
    for (g, w) in got.iter().zip(want) {
        let g: HashSet<_> = g.iter().collect();
        hit += w.iter().filter(|x| g.contains(x)).count();
        all += w.len();
    }
    hit as f64 / all.max(1) as f64
}

fn run_ours(table: &str, output: &str, work: &Path) -> Result<KnnSummary> {
    let config = work.join("knn.toml");
    std::fs::write(
        &config,
        format!("[knn]\ntable = \"{table}\"\noutput = \"{output}\"\nk = {K}\n"),
    )?;
    let summary_path = work.join("knn-summary.json");
    let exe = std::env::current_exe()?;
    let status = Command::new(exe)
        .args([Stage::PrecomputeKnn.command(), "--config"])
        .arg(&config)
        .arg("--summary-json")
        .arg(&summary_path)
        .status()
        .context("running precompute-knn")?;
    if !status.success() {
        bail!("precompute-knn failed ({status})");
    }
    Ok(serde_json::from_slice(&std::fs::read(&summary_path)?)?)
}

async fn read_knn(output: &str, want: &HashSet<u64>) -> Result<HashMap<u64, Vec<u64>>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    use futures::TryStreamExt;
    let ds = lance::Dataset::open(output).await?;
    let mut scanner = ds.scan();
    scanner.project(&["id", "knn_ids"])?;
    let batches: Vec<arrow_array::RecordBatch> =
        scanner.try_into_stream().await?.try_collect().await?;
    let mut out = HashMap::new();
    for b in batches {
        let ids = b.column(0).as_primitive::<UInt64Type>();
        let knn = b.column(1).as_fixed_size_list();
        for i in 0..b.num_rows() {
            if want.contains(&ids.value(i)) {
                let v = knn.value(i);
                out.insert(
                    ids.value(i),
                    v.as_primitive::<UInt64Type>().values().to_vec(),
                );
            }
        }
    }
    Ok(out)
}

async fn run_lance(
    table: &str,
    sample_q: &[Vec<f32>],
    sample_ids: &[u64],
    truth: &[Vec<u64>],
    timed: usize,
) -> Result<LancePeer> {
    let started = Instant::now();
    let cfg = IndexConfig {
        table: Some(table.to_string()),
        ..Default::default()
    };
    build_index(&cfg, &StorageConfig::default()).await?;
    let build_s = started.elapsed().as_secs_f64();
    let search = |r: Retriever, n: usize| async move {
        let mut got = Vec::with_capacity(n);
        let mut lat = Vec::with_capacity(n);
        for (q, id) in sample_q.iter().zip(sample_ids).take(n) {
            let t = Instant::now();
            let nb = r.search(q, K + 1).await?;
            lat.push(t.elapsed().as_secs_f64());
            got.push(
                nb.ids
                    .into_iter()
                    .filter(|x| x != id)
                    .take(K)
                    .collect::<Vec<_>>(),
            );
        }
        anyhow::Ok((got, lat))
    };
    let tune_n = 200.min(sample_q.len());
    let mut tuning = Vec::new();
    let mut chosen = 0;
    for nprobes in [8, 16, 32, 64, 128, 256, 512] {
        let options = RetrieverOptions {
            require_index: true,
            nprobes,
            refine_factor: Some(10),
        };
        let r = Retriever::open_with(table, &StorageConfig::default(), None, options).await?;
        let (got, _) = search(r, tune_n).await?;
        let rec = recall(&got, &truth[..tune_n]);
        tuning.push((nprobes, rec));
        chosen = nprobes;
        if rec >= 0.99 {
            break;
        }
    }
    let options = RetrieverOptions {
        require_index: true,
        nprobes: chosen,
        refine_factor: Some(10),
    };
    let r = Retriever::open_with(table, &StorageConfig::default(), None, options).await?;
    let n = timed.min(sample_q.len());
    let t = Instant::now();
    let (got, mut lat) = search(r, n).await?;
    let total = t.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1] * 1e3;
    Ok(LancePeer {
        build_s,
        nprobes: chosen,
        recall: recall(&got, &truth[..n]),
        qps: n as f64 / total,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        tuning,
    })
}

async fn one_size(args: &BenchKnnArgs, n: usize) -> Result<Row> {
    let work = args.workdir.join(format!("n{n}"));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let work = work.canonicalize()?;
    let clusters = if args.clusters == 0 {
        (n / 100).max(1)
    } else {
        args.clusters
    };
    eprintln!(
        "bench knn: generating {n} x {} ({clusters} clusters)",
        args.dim
    );
    let data = clustered(n, args.dim, clusters, args.noise, 42);
    let table = work.join("vectors.lance").to_string_lossy().to_string();
    write_vectors(&table, &data.ids, &data.emb, false).await?;

    // Ground truth for a sample of rows, by brute force.
    let sample: Vec<i64> = sample_offsets(n as u64, args.recall_queries as u64, 7)
        .into_iter()
        .map(|o| o as i64)
        .collect();
    let all_ids = Tensor::from_slice(&data.ids.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let idx = Tensor::from_slice(&sample);
    let q = data.emb.index_select(0, &idx);
    let q_ids = all_ids.index_select(0, &idx);
    eprintln!(
        "bench knn: exact neighbours of {} sample rows",
        sample.len()
    );
    let truth = exact_knn(
        &q,
        &q_ids,
        &data.emb,
        &all_ids,
        K as i64,
        Exclusion::default(),
    );
    let truth_ids: Vec<i64> = Vec::try_from(&truth.ids.contiguous().view([-1]))?;
    let truth: Vec<Vec<u64>> = truth_ids
        .chunks(K)
        .map(|c| c.iter().map(|&x| x as u64).collect())
        .collect();
    let sample_ids: Vec<u64> = sample.iter().map(|&i| data.ids[i as usize]).collect();

    eprintln!("bench knn: ours (precompute-knn)");
    let output = work.join("knn.lance").to_string_lossy().to_string();
    let ours = run_ours(&table, &output, &work)?;
    let got = read_knn(&output, &sample_ids.iter().copied().collect()).await?;
    let got: Vec<Vec<u64>> = sample_ids
        .iter()
        .map(|id| got.get(id).cloned().unwrap_or_default())
        .collect();
    let ours_recall = recall(&got, &truth);

    let faiss = if args.no_faiss {
        None
    } else {
        eprintln!("bench knn: faiss-cpu IVF-Flat");
        Some(run_faiss(&work, &data, &sample, &truth)?)
    };

    let lance = if args.no_lance {
        None
    } else {
        eprintln!("bench knn: Lance IVF_PQ per-query");
        let qv: Vec<f32> = Vec::try_from(
            &q.contiguous()
                .view([-1])
                .to_kind(Kind::Float)
                .to_device(Device::Cpu),
        )?;
        let sample_q: Vec<Vec<f32>> = qv.chunks(args.dim).map(<[f32]>::to_vec).collect();
        Some(run_lance(&table, &sample_q, &sample_ids, &truth, args.lance_queries).await?)
    };
    Ok(Row {
        n,
        ours,
        ours_recall,
        faiss,
        lance,
    })
}

/// The faiss-cpu IVF-Flat peer on the same vectors, tuned to the same recall of the exact
/// neighbours `truth` of the rows `sample`.
fn run_faiss(work: &Path, data: &Clustered, sample: &[i64], truth: &[Vec<u64>]) -> Result<Value> {
    let row_of: HashMap<u64, i64> = data
        .ids
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i as i64))
        .collect();
    write_npy_f32(&work.join("vectors.npy"), &data.emb)?;
    write_npy_i64(
        &work.join("gt_queries.npy"),
        sample,
        &format!("({},)", sample.len()),
    )?;
    let gt_rows: Vec<i64> = truth.iter().flatten().map(|id| row_of[id]).collect();
    write_npy_i64(
        &work.join("gt.npy"),
        &gt_rows,
        &format!("({}, {K})", sample.len()),
    )?;
    let out = Command::new(".venv/bin/python")
        .arg("python/bench_knn_faiss.py")
        .arg("--vectors")
        .arg(work.join("vectors.npy"))
        .arg("--gt-queries")
        .arg(work.join("gt_queries.npy"))
        .arg("--gt")
        .arg(work.join("gt.npy"))
        .args([
            "--k",
            &K.to_string(),
            "--target-recall",
            "0.99",
            "--threads",
        ])
        .arg(
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .to_string(),
        )
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running .venv/bin/python python/bench_knn_faiss.py (from the repository root)")?;
    if !out.status.success() {
        bail!("faiss peer failed ({})", out.status);
    }
    std::fs::remove_file(work.join("vectors.npy"))?;
    serde_json::from_slice::<Value>(&out.stdout).context("faiss peer output")
}

/// Runs the benchmark and returns the markdown section.
pub async fn run(args: &BenchKnnArgs) -> Result<String> {
    let mut rows = Vec::new();
    for &n in &args.rows {
        rows.push(one_size(args, n).await?);
    }
    let mut md = String::new();
    writeln!(
        md,
        "## precompute-knn (batch kNN, k = {K}) vs faiss-cpu and per-query Lance\n"
    )?;
    writeln!(
        md,
        "Machine: {}. Data: clustered, normalised, d = {}, rows / 100 clusters (noise {}), \
         all rows are queries (self excluded). recall@{K} on {} sample rows against exact \
         brute force. Measured by `knn-diffusion bench knn` on {}.\n",
        machine(),
        args.dim,
        args.noise,
        args.recall_queries,
        chrono_free_date()
    )?;
    writeln!(
        md,
        "| rows | peer | settings | recall@{K} | queries/s | time (s) | notes |"
    )?;
    writeln!(md, "|---:|---|---|---:|---:|---:|---|")?;
    for r in &rows {
        let m = r.ours.meta.as_ref();
        writeln!(
            md,
            "| {} | **ours** precompute-knn | {} partitions, nprobe {} (calibrated) | {:.4} | {:.0} | {:.1} | plan {:.1} s incl.; peak RSS {:.0} MiB |",
            r.n,
            m.map_or(0, |m| m.partitions),
            m.map_or(0, |m| m.nprobe),
            r.ours_recall,
            r.ours.queries_per_s(),
            r.ours.elapsed_s,
            r.ours.plan_s,
            r.ours.peak_rss_mib.unwrap_or(f64::NAN)
        )?;
        if let Some(f) = &r.faiss {
            writeln!(
                md,
                "| {} | faiss-cpu {} IVF-Flat | nlist {}, nprobe {} | {:.4} | {:.0} search, {:.0} with train+add | {:.1} | train {:.1} s, add {:.1} s, search {:.1} s |",
                r.n,
                f["faiss_version"].as_str().unwrap_or("?"),
                f["nlist"],
                f["nprobe"],
                f["recall_full"].as_f64().unwrap_or(f64::NAN),
                f["qps_search"].as_f64().unwrap_or(f64::NAN),
                f["qps_total"].as_f64().unwrap_or(f64::NAN),
                f["total_s"].as_f64().unwrap_or(f64::NAN),
                f["train_s"].as_f64().unwrap_or(f64::NAN),
                f["add_s"].as_f64().unwrap_or(f64::NAN),
                f["search_s"].as_f64().unwrap_or(f64::NAN),
            )?;
        }
        if let Some(l) = &r.lance {
            writeln!(
                md,
                "| {} | Lance IVF_PQ per query (Retriever) | nprobes {}, refine 10 | {:.4} | {:.0} | build {:.1} | p50 {:.2} ms, p99 {:.2} ms; tuning {:?} |",
                r.n, l.nprobes, l.recall, l.qps, l.build_s, l.p50_ms, l.p99_ms, l.tuning
            )?;
        }
    }
    writeln!(md)?;
    for r in &rows {
        let ours = r.ours.queries_per_s();
        let search_only = r.ours.queries as f64 / (r.ours.elapsed_s - r.ours.plan_s).max(1e-9);
        let mut ratios = vec![format!(
            "{ours:.0} rows/s end to end, {search_only:.0} rows/s after the plan"
        )];
        if let Some(f) = &r.faiss {
            let fq = f["qps_search"].as_f64().unwrap_or(f64::NAN);
            let ft = f["qps_total"].as_f64().unwrap_or(f64::NAN);
            ratios.push(format!(
                "{:.2}x faiss end to end (train + add + search), {:.2}x faiss search alone \
                 (ours after the plan)",
                ours / ft,
                search_only / fq
            ));
        }
        if let Some(l) = &r.lance {
            ratios.push(format!("{:.0}x per-query Lance", ours / l.qps));
        }
        writeln!(md, "- {} rows: ours {}.", r.n, ratios.join("; "))?;
    }
    write_section(&args.write, "knn", &md)?;
    Ok(md)
}

/// Today's date (UTC) from the system clock, without a date crate.
pub(crate) fn chrono_free_date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
