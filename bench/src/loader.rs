//! `knn-diffusion bench scale loader`: the trainer's data loader against tables of growing
//! size, to show its memory does not grow with the rows.
//!
//! For each size the bench writes (once, then reuses) an embeddings table of synthetic rows
//! (id, 32 px PNG, d-dim embedding) and a kNN table in precompute-knn's schema whose
//! neighbours are random rows (the worst case for locality), 5% of rows held out. A fresh
//! process ([`probe`], so its peak RSS is its own) opens both with [`TrainingData::open`],
//! loads `--batches` micro-batches as fast as it can (time per batch), then as many again
//! with a consumer that spends `--step-ms` per step (data wait, as `train` reports it).
//! The peer, measured after the loader in the same process, is the id → row map the loader
//! kept before it read rows by address: the `id` column scanned into sorted
//! (id, row) pairs.

use super::{build_profile, machine, write_section};
use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::{
    ArrayRef, BinaryArray, BooleanArray, FixedSizeListArray, Float32Array, RecordBatch,
    RecordBatchIterator, StringArray, UInt64Array,
};
use clap::Args;
use futures::StreamExt;
use knn_datasets::{SplitConfig, StorageConfig};
use knn_indexer::embed::proc_status_mib;
use knn_indexer::knn::precompute::{knn_schema, KnnOutputMeta};
use knn_indexer::knn::synthetic::synthetic_id;
use knn_trainer::data::{build_batch, DataLayout, Loader, SampleSpec, TrainingData};
use lance::dataset::{WriteMode, WriteParams};
use lance::deps::arrow_schema::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Flags of `bench scale loader`.
#[derive(Debug, Args)]
pub struct BenchScaleLoaderArgs {
    /// Rows of the tables at which to measure, increasing.
    #[arg(long, value_delimiter = ',', default_value = "250000,1000000,4000000")]
    pub sizes: Vec<usize>,
    /// Micro-batch size.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Batches the loader reads ahead (`train.data.prefetch_batches`).
    #[arg(long, default_value_t = 2)]
    pub prefetch: usize,
    /// Micro-batches timed in each of the two passes.
    #[arg(long, default_value_t = 100)]
    pub batches: usize,
    /// The consumer's time per step in the second pass, ms (a tiny U-Net step at 32 px,
    /// batch 16, on 2 cores, is about this).
    #[arg(long, default_value_t = 250)]
    pub step_ms: u64,
    /// Neighbours per row.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Where the synthetic tables are written (kept, and reused by a later run).
    #[arg(long, default_value = "target/bench-scale-loader")]
    pub dir: PathBuf,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// Flags of the hidden `bench scale loader-probe`.
#[derive(Debug, Args)]
pub struct BenchScaleLoaderProbeArgs {
    /// Embeddings table URI.
    #[arg(long)]
    pub embeddings: String,
    /// kNN table URI.
    #[arg(long)]
    pub knn: String,
    /// Neighbours used.
    #[arg(long)]
    pub k: usize,
    /// Micro-batch size.
    #[arg(long)]
    pub batch_size: usize,
    /// Batches read ahead.
    #[arg(long)]
    pub prefetch: usize,
    /// Micro-batches timed in each pass.
    #[arg(long)]
    pub batches: usize,
    /// The consumer's time per step, ms.
    #[arg(long)]
    pub step_ms: u64,
}

/// Side of the synthetic images.
const SIDE_PX: u32 = 32;
/// Distinct images cycled through the rows (each row still stores its own bytes).
const POOL: usize = 256;
/// Rows per written batch.
const WRITE_ROWS: usize = 65_536;

/// What one probe process measured.
#[derive(Debug, Serialize, Deserialize)]
struct ProbeResult {
    rows: u64,
    open_s: f64,
    rss_before_open_mib: f64,
    rss_after_open_mib: f64,
    /// Peak RSS after opening and loading every batch.
    peak_rss_mib: f64,
    /// Loading as fast as the loader goes: ms per micro-batch.
    batch_ms: f64,
    /// With a consumer spending `step_ms` a step: the fraction of time spent waiting.
    data_wait: f64,
    /// Peer: building the old id → row map (s) and the peak RSS after it.
    id_map_s: f64,
    id_map_peak_rss_mib: f64,
}

/// A `/proc/self/status` size field (`VmRSS:`, `VmHWM:`) in MiB; NaN where there is none.
fn status_mib(field: &str) -> f64 {
    proc_status_mib(field).unwrap_or(f64::NAN)
}

/// A pseudo-random u64 (63 bits) for counter `i` of stream `stream`: the generator's ids
/// (stream 0, as `synthetic_id` makes them elsewhere), pixels, embeddings and neighbours.
fn draw(i: usize, stream: u64) -> u64 {
    synthetic_id(i as u64, stream)
}

fn png_pool() -> Result<Vec<Vec<u8>>> {
    (0..POOL)
        .map(|i| {
            let (a, b) = (draw(i, 3), draw(i, 4));
            let img = image::RgbImage::from_fn(SIDE_PX, SIDE_PX, |x, y| {
                let c = |s: u32| ((a >> s) as u32 % 256) as u8;
                let t = ((x + y) * 255 / (2 * SIDE_PX)) as u8;
                if (x / 8 + y / 8) as u64 % 3 == b % 3 {
                    image::Rgb([c(0), c(8), t])
                } else {
                    image::Rgb([t, c(16), c(24)])
                }
            });
            let mut out = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
                .context("encoding a synthetic PNG")?;
            Ok(out)
        })
        .collect()
}

fn create() -> WriteParams {
    WriteParams {
        mode: WriteMode::Create,
        ..Default::default()
    }
}

/// Writes the embeddings and kNN tables for `rows` rows under `dir` (kept: a later run with
/// the same size reuses them). Returns their URIs.
async fn make_tables(dir: &Path, rows: usize, k: usize, dim: usize) -> Result<(String, String)> {
    let emb_uri = dir.join(format!("emb-{rows}.lance")).display().to_string();
    let knn_uri = dir
        .join(format!("knn-{rows}-k{k}.lance"))
        .display()
        .to_string();
    let done = dir.join(format!("done-{rows}-k{k}-d{dim}"));
    if done.is_file() {
        return Ok((emb_uri, knn_uri));
    }
    let _ = std::fs::remove_dir_all(&emb_uri);
    let _ = std::fs::remove_dir_all(&knn_uri);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = Instant::now();
    let emb = write_embeddings(&emb_uri, rows, dim).await?;
    let addrs = row_addresses(&emb, &emb_uri, rows).await?;
    write_knn(&knn_uri, (&emb_uri, emb.version().version), addrs, k, dim).await?;
    std::fs::write(&done, "")?;
    tracing::info!(
        rows,
        seconds = started.elapsed().as_secs_f64(),
        "bench tables written"
    );
    Ok((emb_uri, knn_uri))
}

/// The embeddings table: id, key, a 32 px PNG from the pool, a `dim`-float embedding.
async fn write_embeddings(uri: &str, rows: usize, dim: usize) -> Result<lance::Dataset> {
    let pool = Arc::new(png_pool()?);
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let emb_schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
        Field::new(
            "emb",
            DataType::FixedSizeList(item.clone(), dim as i32),
            false,
        ),
    ]));
    let batch = {
        let schema = emb_schema.clone();
        move |start: usize| {
            let n = WRITE_ROWS.min(rows - start);
            let emb: Vec<f32> = (0..n * dim)
                .map(|j| (draw(start * dim + j, 1) >> 39) as f32 / (1u64 << 23) as f32 - 1.0)
                .collect();
            let columns: Vec<ArrayRef> = vec![
                Arc::new(UInt64Array::from_iter_values(
                    (start..start + n).map(|i| draw(i, 0)),
                )),
                Arc::new(StringArray::from_iter_values(
                    (start..start + n).map(|i| format!("img-{i}.png")),
                )),
                Arc::new(BinaryArray::from_iter_values(
                    (start..start + n).map(|i| pool[i % POOL].as_slice()),
                )),
                Arc::new(FixedSizeListArray::new(
                    item.clone(),
                    dim as i32,
                    Arc::new(Float32Array::from(emb)),
                    None,
                )),
            ];
            RecordBatch::try_new(schema.clone(), columns)
        }
    };
    let reader = RecordBatchIterator::new((0..rows).step_by(WRITE_ROWS).map(batch), emb_schema);
    lance::Dataset::write(reader, uri, Some(create()))
        .await
        .with_context(|| format!("writing {uri}"))
}

/// Row addresses in scan order (row i of the generator is row i of the scan).
async fn row_addresses(emb: &lance::Dataset, uri: &str, rows: usize) -> Result<Vec<u64>> {
    let mut addrs = Vec::with_capacity(rows);
    let mut scanner = emb.scan();
    scanner.project(&["id"])?;
    scanner.with_row_address();
    let mut stream = scanner.try_into_stream().await?;
    while let Some(b) = stream.next().await {
        let b = b?;
        addrs.extend_from_slice(
            b.column_by_name("_rowaddr")
                .context("scan without _rowaddr")?
                .as_primitive::<UInt64Type>()
                .values(),
        );
    }
    if addrs.len() != rows {
        bail!("{uri}: scanned {} rows, wrote {rows}", addrs.len());
    }
    Ok(addrs)
}

/// A kNN table in precompute-knn's schema over the embeddings table `(uri, version)` whose
/// rows are at `addrs`: k random other rows a row, 5% held out by the default split.
async fn write_knn(
    uri: &str,
    (emb_uri, version): (&str, u64),
    addrs: Vec<u64>,
    k: usize,
    dim: usize,
) -> Result<()> {
    let rows = addrs.len();
    let split = SplitConfig::default();
    let meta = KnnOutputMeta {
        source: emb_uri.to_string(),
        source_version: version,
        source_rows: rows,
        dim,
        k,
        duplicate_similarity: None,
        shards: 1,
        id_min: 0,
        id_max: u64::MAX >> 1,
        plan: "synthetic: bench scale loader (random neighbours)".into(),
        plan_sha: String::new(),
        partitions: 0,
        nprobe: 0,
        calibration: None,
        split: Some(split.clone()),
    };
    let schema = knn_schema(k, &meta);
    let u64_item = Arc::new(Field::new("item", DataType::UInt64, true));
    let batch = {
        let schema = schema.clone();
        move |start: usize| {
            let n = WRITE_ROWS.min(rows - start);
            let nbrs: Vec<usize> = (start..start + n)
                .flat_map(|i| {
                    (0..k).map(move |j| {
                        let r = (draw(i * k + j, 2) % (rows as u64 - 1)) as usize;
                        if r >= i {
                            r + 1
                        } else {
                            r
                        }
                    })
                })
                .collect();
            let list = |values: Vec<u64>| {
                FixedSizeListArray::new(
                    u64_item.clone(),
                    k as i32,
                    Arc::new(UInt64Array::from(values)),
                    None,
                )
            };
            let sims: Vec<f32> = (0..n * k).map(|j| 0.9 - (j % k) as f32 * 0.01).collect();
            let columns: Vec<ArrayRef> = vec![
                Arc::new(UInt64Array::from_iter_values(
                    (start..start + n).map(|i| draw(i, 0)),
                )),
                Arc::new(list(nbrs.iter().map(|&r| draw(r, 0)).collect())),
                Arc::new(FixedSizeListArray::new(
                    Arc::new(Field::new("item", DataType::Float32, true)),
                    k as i32,
                    Arc::new(Float32Array::from(sims)),
                    None,
                )),
                Arc::new(BooleanArray::from_iter(
                    (start..start + n).map(|i| Some(split.is_holdout(&format!("img-{i}.png")))),
                )),
                Arc::new(UInt64Array::from_iter_values(
                    (start..start + n).map(|i| addrs[i]),
                )),
                Arc::new(list(nbrs.iter().map(|&r| addrs[r]).collect())),
            ];
            RecordBatch::try_new(schema.clone(), columns)
        }
    };
    let reader = RecordBatchIterator::new((0..rows).step_by(WRITE_ROWS).map(batch), schema);
    lance::Dataset::write(reader, uri, Some(create()))
        .await
        .with_context(|| format!("writing {uri}"))?;
    Ok(())
}

/// One measurement in this process: see the module doc. Prints a JSON line.
pub async fn probe(args: &BenchScaleLoaderProbeArgs) -> Result<()> {
    let storage = StorageConfig::default();
    let rss_before_open_mib = status_mib("VmRSS:");
    let started = Instant::now();
    let data = Arc::new(TrainingData::open(&args.embeddings, &args.knn, &storage, args.k).await?);
    let open_s = started.elapsed().as_secs_f64();
    let rss_after_open_mib = status_mib("VmRSS:");
    let layout = DataLayout::new(data.split_rows.train_rows(), args.batch_size, 0, 1)?;
    let spec = SampleSpec {
        seed: 0,
        timesteps: 1000,
        cond_drop_prob: 0.1,
        flip: false,
        knn_dropout: 0.0,
    };
    let loader = |start: u64| {
        let data = data.clone();
        Loader::start(
            move |m| {
                let data = data.clone();
                async move { build_batch(&data, &layout, &spec, m).await }
            },
            start..u64::MAX,
            args.prefetch,
        )
    };
    // As fast as it goes.
    let mut fast = loader(0)?;
    fast.next_batch()?; // the first batch includes the thread's start
    let t0 = Instant::now();
    for _ in 0..args.batches {
        fast.next_batch()?;
    }
    let batch_ms = t0.elapsed().as_secs_f64() * 1e3 / args.batches as f64;
    drop(fast);
    // Against a consumer that computes for step_ms a step.
    let mut paced = loader(args.batches as u64 + 1)?;
    paced.next_batch()?;
    let _ = paced.take_waited();
    let t0 = Instant::now();
    for _ in 0..args.batches {
        paced.next_batch()?;
        std::thread::sleep(Duration::from_millis(args.step_ms));
    }
    let data_wait = paced.take_waited().as_secs_f64() / t0.elapsed().as_secs_f64();
    drop(paced);
    let peak_rss_mib = status_mib("VmHWM:");
    // The peer: the map the loader kept before (sorted (id, row) pairs of the whole table).
    let started = Instant::now();
    let emb = lance::Dataset::open(&args.embeddings).await?;
    let mut scanner = emb.scan();
    scanner.project(&["id"])?;
    let mut stream = scanner.try_into_stream().await?;
    let mut pairs: Vec<(u64, u64)> = Vec::new();
    while let Some(b) = stream.next().await {
        for &id in b?.column(0).as_primitive::<UInt64Type>().values() {
            pairs.push((id, pairs.len() as u64));
        }
    }
    pairs.sort_unstable();
    let id_map_s = started.elapsed().as_secs_f64();
    let id_map_peak_rss_mib = status_mib("VmHWM:");
    std::hint::black_box(&pairs);
    let result = ProbeResult {
        rows: data.rows(),
        open_s,
        rss_before_open_mib,
        rss_after_open_mib,
        peak_rss_mib,
        batch_ms,
        data_wait,
        id_map_s,
        id_map_peak_rss_mib,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// Runs the probe for each size in a fresh process and writes the section.
pub async fn run(args: &BenchScaleLoaderArgs) -> Result<String> {
    if args.sizes.is_empty() || args.sizes.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--sizes must be increasing row counts, e.g. 250000,1000000,4000000");
    }
    if args.sizes[0] <= args.k {
        bail!("every size must have more rows than --k {}", args.k);
    }
    if args.batches == 0 || args.batch_size == 0 {
        bail!("--batches and --batch-size must be at least 1");
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut results = Vec::new();
    for &rows in &args.sizes {
        let (emb, knn) = make_tables(&args.dir, rows, args.k, args.dim).await?;
        let out = std::process::Command::new(&exe)
            .args([
                "bench",
                "scale",
                "loader-probe",
                "--embeddings",
                &emb,
                "--knn",
                &knn,
            ])
            .args(["--k", &args.k.to_string()])
            .args(["--batch-size", &args.batch_size.to_string()])
            .args(["--prefetch", &args.prefetch.to_string()])
            .args(["--batches", &args.batches.to_string()])
            .args(["--step-ms", &args.step_ms.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running the loader probe")?;
        if !out.status.success() {
            bail!("the loader probe for {rows} rows failed ({})", out.status);
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let r: ProbeResult = serde_json::from_str(line.lines().last().unwrap_or_default())
            .with_context(|| format!("reading the probe's result: {line}"))?;
        tracing::info!(?r, "loader probe");
        results.push(r);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## scale: the trainer's data loader against table size\n"
    );
    let _ = writeln!(
        md,
        "Machine: {}. Build: {}. Command: `knn-diffusion bench scale loader --sizes {} \
         --batch-size {} --prefetch {} --batches {} --step-ms {} --k {} --dim {}`. Synthetic \
         tables: {SIDE_PX} px PNGs, d = {}, k = {} random neighbours a row (no locality), 5% \
         held out. Each size in a fresh process: open the tables (`TrainingData::open`), \
         load {} micro-batches as fast as the loader goes, then {} more against a consumer \
         that spends {} ms a step (the data wait `train` reports). The peer, in the same \
         process after the loader, is the id → row map the loader kept before reading rows \
         by address: the `id` column scanned into sorted (id, row) pairs.\n",
        machine(),
        build_profile(),
        args.sizes
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(","),
        args.batch_size,
        args.prefetch,
        args.batches,
        args.step_ms,
        args.k,
        args.dim,
        args.dim,
        args.k,
        args.batches,
        args.batches,
        args.step_ms,
    );
    let _ = writeln!(
        md,
        "| rows | open (s) | RSS after open (MiB) | peak RSS, loader (MiB) | ms / batch | data wait at {} ms/step | peer: id map build (s) | peer: peak RSS with the map (MiB) |",
        args.step_ms
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for r in &results {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.0} | {:.0} | {:.1} | {:.2}% | {:.2} | {:.0} |",
            r.rows,
            r.open_s,
            r.rss_after_open_mib,
            r.peak_rss_mib,
            r.batch_ms,
            100.0 * r.data_wait,
            r.id_map_s,
            r.id_map_peak_rss_mib,
        );
    }
    if let (Some(a), Some(b)) = (results.first(), results.last()) {
        let growth = |x: f64, y: f64| (y / x).ln() / (b.rows as f64 / a.rows as f64).ln();
        let _ = writeln!(
            md,
            "\nFrom {} to {} rows: the loader's peak RSS grew ×{:.2} (exponent {:.2}), its \
             time per batch ×{:.2}; the peer's peak RSS ×{:.2} (exponent {:.2}).",
            a.rows,
            b.rows,
            b.peak_rss_mib / a.peak_rss_mib,
            growth(a.peak_rss_mib, b.peak_rss_mib),
            b.batch_ms / a.batch_ms,
            b.id_map_peak_rss_mib / a.id_map_peak_rss_mib,
            growth(a.id_map_peak_rss_mib, b.id_map_peak_rss_mib),
        );
    }
    write_section(&args.out, "scale:loader", &md)?;
    Ok(md)
}
