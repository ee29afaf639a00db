//! `knn-diffusion bench scale`: what a stage costs as the table grows, measured at several
//! sizes so that each cost gets a growth exponent.
//!
//! `bench scale commits`: the cost of one more shard commit, and of a new worker's start-up,
//! against a table holding 1k, 10k and 50k committed shards. The table is grown by real
//! workers (each its own [`ShardedTable`], committing one-row shards through the ledger, as
//! embed does), with `[storage.tables]` upkeep at its defaults; the peer is the same table
//! without upkeep, grown as far as `--peer-sizes` (without upkeep every commit writes a
//! manifest listing every fragment, so the peer's total cost is quadratic and it stops
//! early). Start-up is measured on the local path and through the loopback S3 server
//! (`s3s-fs`) serving the same directory.

use super::{build_profile, machine, median, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use knn_datasets::{Secret, StorageConfig, TableMaintenance};
use knn_indexer::table::{rejects_schema, ShardedTable};
use lance::deps::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::s3_server;

/// Flags of `bench scale commits`.
#[derive(Debug, Args)]
pub struct BenchScaleCommitsArgs {
    /// Committed shards at which to measure, increasing.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub sizes: Vec<usize>,
    /// Sizes for the peer without upkeep (its total cost grows with the square of the
    /// shards; keep them small). `--peer-sizes` with no value skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1000,3000")]
    pub peer_sizes: Vec<usize>,
    /// Workers committing at once while the table grows.
    #[arg(long, default_value_t = 4)]
    pub committers: usize,
    /// Timed commits by one warm worker at each size.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Skip the loopback S3 server (start-up through S3 is then not measured).
    #[arg(long)]
    pub no_s3: bool,
    /// Skip the arm with upkeep that keeps no old versions (`keep_versions_hours = 0`).
    #[arg(long)]
    pub no_keep_0: bool,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// One arm: a table grown with or without upkeep.
struct Arm {
    name: &'static str,
    upkeep: TableMaintenance,
    sizes: Vec<usize>,
}

/// What was measured at one size.
#[derive(Debug)]
struct Point {
    shards: usize,
    /// Commits per second while the table grew to this size (all committers).
    grow_rate: f64,
    /// One more commit by a warm worker: median and slowest of the samples, in ms.
    commit_ms: f64,
    commit_max_ms: f64,
    /// Bytes the table grew by per sampled commit (0 when a clean-up shrank it meanwhile).
    bytes_per_commit: f64,
    /// A new worker's start-up (open, refresh the ledger), in seconds: local and via S3.
    startup_local: f64,
    startup_s3: Option<f64>,
    /// One more commit through S3, median ms.
    commit_s3_ms: Option<f64>,
    fragments: usize,
    table_bytes: u64,
    versions_bytes: u64,
}

/// Where the table of one arm lives: `<root>/bench/t.lance` (bucket `bench` for S3), in a
/// temporary directory removed when the arm is done.
struct Place {
    root: PathBuf,
    s3: Option<(s3_server::S3Server, StorageConfig)>,
    _local: Option<tempfile::TempDir>,
}

impl Place {
    fn new(s3: bool) -> Result<Self> {
        if !s3 {
            let dir = tempfile::tempdir()?;
            std::fs::create_dir_all(dir.path().join("bench"))?;
            return Ok(Place {
                root: dir.path().to_path_buf(),
                s3: None,
                _local: Some(dir),
            });
        }
        let server = s3_server::S3Server::start(&["bench"]);
        let storage = StorageConfig {
            endpoint: Some(server.endpoint.clone()),
            region: Some("us-east-1".into()),
            allow_http: true,
            access_key_id: Some(server.access_key.clone()),
            secret_access_key: Some(Secret::new(server.secret_key.clone())),
            ..StorageConfig::default()
        };
        Ok(Place {
            root: server.root.path().to_path_buf(),
            s3: Some((server, storage)),
            _local: None,
        })
    }

    fn table_dir(&self) -> PathBuf {
        self.root.join("bench/t.lance")
    }

    fn local_uri(&self) -> String {
        self.table_dir().to_string_lossy().into_owned()
    }
}

/// Commits shard `s` (one row) through `table`; false when it was already committed.
async fn commit_one(table: &ShardedTable, s: usize) -> Result<bool> {
    let schema = rejects_schema();
    let col = |v: String| Arc::new(arrow_array::StringArray::from(vec![v])) as _;
    let batch = arrow_array::RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow_array::UInt64Array::from(vec![s as u64])),
            col(format!("key{s}")),
            col(format!("shard-{s:08}")),
            col("bench".into()),
            col("one row per shard".into()),
        ],
    )?;
    let ds = Arc::new(table.open().await?);
    let stream = Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::iter([Ok(batch)]),
    ));
    let txn = table.write_uncommitted(&ds, stream).await?;
    Ok(table
        .commit_shard(ds, &format!("shard-{s:08}"), txn)
        .await?)
}

async fn worker(
    uri: &str,
    storage: &StorageConfig,
    upkeep: &TableMaintenance,
) -> Result<ShardedTable> {
    let storage = StorageConfig {
        tables: upkeep.clone(),
        ..storage.clone()
    };
    let table = ShardedTable::open_or_create(uri, rejects_schema(), &storage).await?;
    table.refresh_ledger().await?;
    Ok(table)
}

/// Grows the table until `next` reaches `target`, with `committers` workers at once.
async fn grow(
    uri: &str,
    upkeep: &TableMaintenance,
    committers: usize,
    next: &Arc<AtomicUsize>,
    target: usize,
) -> Result<f64> {
    let start = Instant::now();
    let first = next.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..committers {
        let (uri, upkeep, next) = (uri.to_string(), upkeep.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let table = worker(&uri, &StorageConfig::default(), &upkeep).await?;
            loop {
                let s = next.fetch_add(1, Ordering::SeqCst);
                if s >= target {
                    return anyhow::Ok(());
                }
                if !commit_one(&table, s).await? {
                    bail!("shard {s} was refused as already committed; it never was");
                }
                if (s + 1) % 1000 == 0 {
                    let rate = (s + 1 - first) as f64 / start.elapsed().as_secs_f64();
                    eprintln!(
                        "[bench scale] {uri}: {} shards ({rate:.0} commits/s)",
                        s + 1
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("a committer panicked")??;
    }
    // Every committer overshoots `next` by one on its way out.
    next.store(target, Ordering::SeqCst);
    Ok((target - first) as f64 / start.elapsed().as_secs_f64())
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Median seconds of `rounds` fresh worker start-ups.
async fn startup(
    uri: &str,
    storage: &StorageConfig,
    upkeep: &TableMaintenance,
    rounds: usize,
) -> Result<f64> {
    let mut t = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        worker(uri, storage, upkeep).await?;
        t.push(start.elapsed().as_secs_f64());
    }
    Ok(median(&t))
}

/// Milliseconds of each of `n` commits by one warm worker, shards from `next`.
async fn sample_commits(
    uri: &str,
    storage: &StorageConfig,
    upkeep: &TableMaintenance,
    next: &AtomicUsize,
    n: usize,
) -> Result<Vec<f64>> {
    let table = worker(uri, storage, upkeep).await?;
    let mut t = Vec::new();
    for _ in 0..n {
        let s = next.fetch_add(1, Ordering::SeqCst);
        let start = Instant::now();
        if !commit_one(&table, s).await? {
            bail!("shard {s} was refused as already committed; it never was");
        }
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(t)
}

async fn run_arm(arm: &Arm, args: &BenchScaleCommitsArgs) -> Result<Vec<Point>> {
    let place = Place::new(!args.no_s3)?;
    let uri = place.local_uri();
    ShardedTable::open_or_create(&uri, rejects_schema(), &StorageConfig::default()).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut points = Vec::new();
    for &size in &arm.sizes {
        let grow_rate = grow(&uri, &arm.upkeep, args.committers, &next, size).await?;
        let table_dir = place.table_dir();
        let before = dir_bytes(&table_dir);
        let local = sample_commits(
            &uri,
            &StorageConfig::default(),
            &arm.upkeep,
            &next,
            args.samples,
        )
        .await?;
        // Net growth of the table's directory: a clean-up during the samples (a worker's
        // upkeep round removing old versions) can shrink it, which counts as nothing written.
        let grown = dir_bytes(&table_dir).saturating_sub(before);
        let bytes_per_commit = grown as f64 / args.samples as f64;
        let startup_local = startup(&uri, &StorageConfig::default(), &arm.upkeep, 3).await?;
        let (startup_s3, commit_s3_ms) = match &place.s3 {
            Some((_, storage)) => {
                let s3_uri = "s3://bench/t.lance";
                let s = startup(s3_uri, storage, &arm.upkeep, 3).await?;
                let c = sample_commits(s3_uri, storage, &arm.upkeep, &next, 5).await?;
                (Some(s), Some(median(&c)))
            }
            None => (None, None),
        };
        let ds = knn_indexer::table::load_dataset(&uri, &HashMap::new(), None).await?;
        let point = Point {
            shards: size,
            grow_rate,
            commit_ms: median(&local),
            commit_max_ms: local.iter().copied().fold(0.0, f64::max),
            bytes_per_commit,
            startup_local,
            startup_s3,
            commit_s3_ms,
            fragments: ds.count_fragments(),
            table_bytes: dir_bytes(&table_dir),
            versions_bytes: dir_bytes(&table_dir.join("_versions")),
        };
        eprintln!("[bench scale] {}: {point:?}", arm.name);
        points.push(point);
    }
    Ok(points)
}

/// The growth exponent of `v` between the first and last point: v ∝ n^e.
fn exponent(points: &[Point], v: impl Fn(&Point) -> f64) -> Option<f64> {
    let (a, b) = (points.first()?, points.last()?);
    (b.shards > a.shards).then(|| (v(b) / v(a)).ln() / (b.shards as f64 / a.shards as f64).ln())
}

fn table(md: &mut String, name: &str, points: &[Point]) {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".into(), f);
    let _ = writeln!(md, "**{name}**\n");
    let _ = writeln!(
        md,
        "| shards | grow commits/s | commit ms (median / max) | KB written / commit | \
         start-up local s | start-up S3 s | commit via S3 ms | fragments | table MB | \
         `_versions` MB |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in points {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.1} / {:.0} | {:.1} | {:.3} | {} | {} | {} | {:.1} | {:.1} |",
            p.shards,
            p.grow_rate,
            p.commit_ms,
            p.commit_max_ms,
            p.bytes_per_commit / 1e3,
            p.startup_local,
            opt(p.startup_s3, &|v| format!("{v:.3}")),
            opt(p.commit_s3_ms, &|v| format!("{v:.1}")),
            p.fragments,
            p.table_bytes as f64 / 1e6,
            p.versions_bytes as f64 / 1e6,
        );
    }
    let e =
        |f: &dyn Fn(&Point) -> f64| exponent(points, f).map_or("–".into(), |e| format!("{e:.2}"));
    let _ = writeln!(
        md,
        "\nGrowth exponents (v ∝ shards^e, first to last size): commit time {}, bytes per \
         commit {}, start-up local {}, start-up S3 {}.\n",
        e(&|p| p.commit_ms),
        e(&|p| p.bytes_per_commit),
        e(&|p| p.startup_local),
        e(&|p| p.startup_s3.unwrap_or(f64::NAN)),
    );
}

/// `bench scale commits`: runs both arms, writes the section, returns it.
pub async fn commits(args: &BenchScaleCommitsArgs) -> Result<String> {
    if args.sizes.is_empty() || args.sizes.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--sizes must be increasing shard counts, e.g. 1000,10000,50000");
    }
    if args.committers == 0 || args.samples == 0 {
        bail!("--committers and --samples must be at least 1");
    }
    if !args.no_s3 && !Path::new(".tools/bin/s3s-fs").is_file() {
        bail!(
            ".tools/bin/s3s-fs is missing: run `bash scripts/setup.sh --tests` from the \
             repository root, or pass --no-s3"
        );
    }
    let on = TableMaintenance::default();
    let arms = [
        Arm {
            name: "upkeep",
            upkeep: on.clone(),
            sizes: args.sizes.clone(),
        },
        Arm {
            name: "upkeep, keep_versions_hours = 0",
            upkeep: TableMaintenance {
                keep_versions_hours: 0.0,
                ..on.clone()
            },
            sizes: if args.no_keep_0 {
                Vec::new()
            } else {
                args.sizes.clone()
            },
        },
        Arm {
            name: "no-upkeep",
            upkeep: TableMaintenance {
                every_commits: 0,
                ..on.clone()
            },
            sizes: args.peer_sizes.clone(),
        },
    ];
    let mut results = Vec::new();
    for arm in &arms {
        if !arm.sizes.is_empty() {
            results.push((arm, run_arm(arm, args).await?));
        }
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## scale: commit and ledger cost against committed shards\n"
    );
    let _ = writeln!(
        md,
        "Machine: {}. Build: {}. Command: `knn-diffusion bench scale commits --sizes {} \
         --peer-sizes {} --committers {} --samples {}`. One-row shards committed through \
         the shard ledger by {} concurrent workers (tasks of one process, each its own \
         table handle); at each size one warm worker commits {} more shards (timed one by \
         one), and a new worker starts three times (open the table, read the ledger). \
         `upkeep`: `[storage.tables]` at its defaults (every {} commits: ledger checkpoint, \
         compaction to {} rows per fragment, versions older than {} h or more than {} \
         behind the newest removed). \
         `no-upkeep`: the same with `every_commits = 0`, which is what every table was \
         before. `keep_versions_hours = 0`: upkeep that also removes every version its \
         checkpoint covers, however young. S3: `s3s-fs` on 127.0.0.1 serving the same \
         directory.\n",
        machine(),
        build_profile(),
        join(&args.sizes),
        join(&args.peer_sizes),
        args.committers,
        args.samples,
        args.committers,
        args.samples,
        on.every_commits,
        on.target_rows_per_fragment,
        on.keep_versions_hours,
        on.keep_versions,
    );
    for (arm, points) in &results {
        table(&mut md, arm.name, points);
        if arm.upkeep.every_commits > 0 {
            goals(&mut md, points);
        }
    }
    write_section(&args.out, "scale:commits", &md)?;
    Ok(md)
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn goals(md: &mut String, points: &[Point]) {
    let (Some(a), Some(b)) = (points.first(), points.last()) else {
        return;
    };
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let commit = b.commit_ms / a.commit_ms;
    let startup = b.startup_local / a.startup_local;
    let _ = write!(
        md,
        "Goals (issue 14) for this arm, {} against {} shards: commit time ×{commit:.2} ({}, ≤ 2×); \
         start-up ×{startup:.2} ({}, ≤ 2×)",
        b.shards,
        a.shards,
        verdict(commit <= 2.0),
        verdict(startup <= 2.0),
    );
    if let (Some(sa), Some(sb)) = (a.startup_s3, b.startup_s3) {
        let _ = write!(
            md,
            "; start-up via S3 ×{:.2}, {sb:.2} s at {} shards ({}, ≤ 5 s)",
            sb / sa,
            b.shards,
            verdict(sb <= 5.0)
        );
    }
    md.push_str(".\n\n");
}
