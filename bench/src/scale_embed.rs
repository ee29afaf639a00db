//! `knn-diffusion bench scale embed`: the embed stage at growing input, from the loopback S3
//! server, with several worker processes and the tiny random CLIP.
//!
//! The input is img2dataset-style parquet shards (`key`, `jpg`) of photo-like JPEGs (a pool
//! of distinct generated images, longest side 256–512 at five aspect ratios, 4:2:0), written
//! straight into the directory `s3s-fs` serves. Each size runs `knn-diffusion embed` in
//! `--workers` processes at once into a table on the same server, and reports images a
//! second over the wall time, each worker's peak RSS, and the S3 requests per record,
//! counted from the server's own log, by operation. Growth is judged between the smallest
//! and the largest size: a cost that is flat does not grow with the input.

use super::{build_profile, machine, write_section};
use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use clap::Args;
use knn_cluster::job::Stage;
use knn_indexer::EmbedSummary;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use super::s3_server;

/// Flags of `bench scale embed`.
#[derive(Debug, Args)]
pub struct BenchScaleEmbedArgs {
    /// Records at which to measure, increasing.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub sizes: Vec<usize>,
    /// Embed worker processes at once.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Records a parquet shard.
    #[arg(long, default_value_t = 2000)]
    pub shard_rows: usize,
    /// Distinct generated JPEGs, cycled through the records.
    #[arg(long, default_value_t = 500)]
    pub pool: usize,
    /// JPEG quality of the generated images.
    #[arg(long, default_value_t = 85)]
    pub quality: u8,
    /// Where the image pool, the configs and the workers' logs go.
    #[arg(long, default_value = "target/bench-scale-embed")]
    pub work: PathBuf,
    /// Markdown file whose section for this benchmark is replaced; `-` prints it only.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// What one size measured.
struct Point {
    records: usize,
    shards: usize,
    wall_s: f64,
    rss_mib: Vec<f64>,
    requests: BTreeMap<String, u64>,
}

impl Point {
    fn img_per_s(&self) -> f64 {
        self.records as f64 / self.wall_s
    }
    fn requests_per_record(&self) -> f64 {
        self.requests.values().sum::<u64>() as f64 / self.records as f64
    }
    fn max_rss(&self) -> f64 {
        self.rss_mib.iter().copied().fold(0.0, f64::max)
    }
}

/// The pool of distinct JPEGs, cached under `dir`.
fn pool(dir: &Path, n: usize, quality: u8) -> Result<Vec<Vec<u8>>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    let sides = [256u32, 320, 384, 448, 512];
    let aspects = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3)];
    (0..n)
        .map(|i| {
            let side = sides[i % sides.len()];
            let (a, b) = aspects[(i / sides.len()) % aspects.len()];
            let (w, h) = if a >= b {
                (side, side * b / a)
            } else {
                (side * a / b, side)
            };
            let path = dir.join(format!("{i:06}_{w}x{h}_q{quality}.jpg"));
            if let Ok(bytes) = std::fs::read(&path) {
                return Ok(bytes);
            }
            let bytes = super::image_path::photo_jpeg(w, h, 1_000_000 + i as u64, quality)?;
            std::fs::write(&path, &bytes)
                .with_context(|| format!("writing `{}`", path.display()))?;
            Ok(bytes)
        })
        .collect()
}

/// Writes `records` rows as parquet shards of `shard_rows` under `dir`; returns the shards.
fn write_shards(dir: &Path, records: usize, shard_rows: usize, pool: &[Vec<u8>]) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("key", arrow_schema::DataType::Utf8, false),
        arrow_schema::Field::new("jpg", arrow_schema::DataType::Binary, false),
    ]));
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(256))
        .build();
    let shards = records.div_ceil(shard_rows);
    for s in 0..shards {
        let rows = (s * shard_rows..((s + 1) * shard_rows).min(records)).collect::<Vec<_>>();
        let keys: ArrayRef = Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| format!("{r:010}")),
        ));
        // A prime stride spreads the pool's sizes over every shard.
        let jpgs: ArrayRef = Arc::new(BinaryArray::from_iter_values(
            rows.iter()
                .map(|r| pool[(r * 7919) % pool.len()].as_slice()),
        ));
        let batch = RecordBatch::try_new(schema.clone(), vec![keys, jpgs])?;
        let path = dir.join(format!("part-{s:05}.parquet"));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("creating `{}`", path.display()))?;
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props.clone()))?;
        writer.write(&batch)?;
        writer.close()?;
    }
    Ok(shards)
}

/// Requests in the server's log so far, by S3 operation.
fn count_requests(log: &Path) -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("reading the S3 server's log `{}`", log.display()))?;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.split("resolved route, op: ").nth(1) {
            let op = rest.split(',').next().unwrap_or(rest).trim().to_string();
            *counts.entry(op).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// One size: shards written, `workers` embed processes run to the end, what they cost.
fn measure(
    args: &BenchScaleEmbedArgs,
    server: &s3_server::S3Server,
    log: &Path,
    records: usize,
    pool: &[Vec<u8>],
) -> Result<Point> {
    let src = server.root.path().join(format!("bench/src-{records}"));
    let shards = write_shards(&src, records, args.shard_rows, pool)?;
    let work = args.work.join(format!("n{records}"));
    std::fs::create_dir_all(&work)?;
    let cfg = work.join("embed.toml");
    std::fs::write(
        &cfg,
        format!(
            "[storage]\nendpoint = \"{}\"\nregion = \"us-east-1\"\nallow_http = true\n\
             access_key_id = \"{}\"\n\
             [embed.source]\nurl = \"s3://bench/src-{records}/\"\nformat = \"parquet\"\n\
             [embed.output]\ntable = \"s3://bench/emb-{records}.lance\"\nimage_size_px = 64\n\
             image_format = \"jpeg\"\n\
             [embed.clip]\nbatch_size = 64\nrandom_preset = \"tiny\"\n",
            server.endpoint, server.access_key
        ),
    )?;
    let before = count_requests(log)?;
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let children = (0..args.workers)
        .map(|i| {
            let err = std::fs::File::create(work.join(format!("worker-{i}.log")))?;
            Command::new(&exe)
                .args([Stage::Embed.command(), "--config"])
                .arg(&cfg)
                .args(["--worker", &i.to_string(), "--workers"])
                .arg(args.workers.to_string())
                .arg("--summary-json")
                .arg(work.join(format!("summary-{i}.json")))
                .env("AWS_SECRET_ACCESS_KEY", &server.secret_key)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(err)
                .spawn()
                .context("starting an embed worker")
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, mut child) in children.into_iter().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "embed worker {i} failed ({status}); its log: {}",
                work.join(format!("worker-{i}.log")).display()
            );
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let after = count_requests(log)?;
    let mut ok = 0;
    let mut rss_mib = Vec::new();
    for i in 0..args.workers {
        let path = work.join(format!("summary-{i}.json"));
        let s: EmbedSummary = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("reading `{}`", path.display()))?;
        ok += s.images_ok;
        rss_mib.push(s.peak_rss_mib.unwrap_or(f64::NAN));
    }
    if ok != records as u64 {
        bail!("the workers embedded {ok} records of {records}");
    }
    let requests = after
        .into_iter()
        .map(|(op, n)| {
            let was = before.get(&op).copied().unwrap_or(0);
            (op, n - was)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    // Free the disk for the next size.
    std::fs::remove_dir_all(&src).ok();
    std::fs::remove_dir_all(
        server
            .root
            .path()
            .join(format!("bench/emb-{records}.lance")),
    )
    .ok();
    std::fs::remove_dir_all(
        server
            .root
            .path()
            .join(format!("bench/emb-{records}-rejects.lance")),
    )
    .ok();
    Ok(Point {
        records,
        shards,
        wall_s,
        rss_mib,
        requests,
    })
}

/// Runs the benchmark and returns the markdown section.
pub fn run(args: &BenchScaleEmbedArgs) -> Result<String> {
    if !Path::new(".tools/bin/s3s-fs").is_file() {
        bail!(".tools/bin/s3s-fs is missing: run `bash scripts/setup.sh --tests` from the repository root");
    }
    if args.sizes.is_empty() || args.workers == 0 || args.shard_rows == 0 {
        bail!("--sizes, --workers and --shard-rows must be non-empty and positive");
    }
    eprintln!("generating a pool of {} JPEGs...", args.pool);
    let pool = pool(&args.work.join("pool"), args.pool, args.quality)?;
    let mean_kib = pool.iter().map(Vec::len).sum::<usize>() as f64 / pool.len() as f64 / 1024.0;
    let log: PathBuf = args.work.join("s3-requests.log");
    let server = s3_server::S3Server::start_logged(&["bench"], Some(&log));
    let mut points = Vec::new();
    for &n in &args.sizes {
        eprintln!(
            "{n} records: writing {} shards of {} rows, then {} workers...",
            n.div_ceil(args.shard_rows),
            args.shard_rows,
            args.workers
        );
        let p = measure(args, &server, &log, n, &pool)?;
        eprintln!(
            "{n} records: {:.1} s, {:.1} img/s, peak RSS {:.0} MiB, {:.3} requests a record",
            p.wall_s,
            p.img_per_s(),
            p.max_rss(),
            p.requests_per_record()
        );
        points.push(p);
    }
    let md = render(args, &points, mean_kib)?;
    if args.out.as_os_str() != "-" {
        write_section(&args.out, "scale:embed", &md)?;
    }
    Ok(md)
}

fn render(args: &BenchScaleEmbedArgs, points: &[Point], mean_kib: f64) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "### embed at scale: {} worker processes, tiny random CLIP, from the loopback S3 server",
        args.workers
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "Machine: {}. Build: {}. Input: parquet shards of {} rows (`key`, `jpg`) cycling a \
         pool of {} generated photo-like JPEGs (longest side 256–512, five aspect ratios, \
         quality {}, 4:2:0, {mean_kib:.1} KiB on average); stored image 64 px JPEG; the table \
         on the same `s3s-fs` server. Requests counted from the server's log.",
        machine(),
        build_profile(),
        args.shard_rows,
        args.pool,
        args.quality
    )?;
    writeln!(md)?;
    let ops: Vec<String> = points
        .iter()
        .flat_map(|p| p.requests.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    writeln!(
        md,
        "| records | shards | wall s | img/s | peak RSS per worker MiB | requests / record | {} |",
        ops.iter()
            .map(|o| format!("{o} / 1k records"))
            .collect::<Vec<_>>()
            .join(" | ")
    )?;
    writeln!(
        md,
        "|---:|---:|---:|---:|---|---:|{}",
        "---:|".repeat(ops.len())
    )?;
    for p in points {
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {} | {:.4} | {} |",
            p.records,
            p.shards,
            p.wall_s,
            p.img_per_s(),
            p.rss_mib
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            p.requests_per_record(),
            ops.iter()
                .map(|o| format!(
                    "{:.2}",
                    *p.requests.get(o).unwrap_or(&0) as f64 * 1000.0 / p.records as f64
                ))
                .collect::<Vec<_>>()
                .join(" | ")
        )?;
    }
    if let (Some(a), Some(b)) = (points.first(), points.last()) {
        if b.records > a.records {
            let ratio = |x: f64, y: f64| y / x;
            let exponent = (b.wall_s / a.wall_s).ln() / (b.records as f64 / a.records as f64).ln();
            writeln!(md)?;
            writeln!(
                md,
                "From {} to {} records: wall time grows as n^{exponent:.2}; img/s ×{:.2}, \
                 peak RSS per worker ×{:.2}, requests per record ×{:.2} (flat: within ±15 %).",
                a.records,
                b.records,
                ratio(a.img_per_s(), b.img_per_s()),
                ratio(a.max_rss(), b.max_rss()),
                ratio(a.requests_per_record(), b.requests_per_record())
            )?;
        }
    }
    Ok(md)
}
