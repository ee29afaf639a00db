//! `precompute-knn`: for every row of an embeddings table, its `k` nearest other rows by
//! cosine similarity (PAPER.md: each training image is conditioned on its k nearest image
//! embeddings, itself excluded), written to a Lance table `id, knn_ids, knn_sims`.
//!
//! ```text
//! pinned version of the embeddings table
//!   └─ plan (once per output; stored): IVF centroids + calibrated nprobe   [plan.rs]
//!   └─ the table's rows held in memory, grouped by partition, when they fit
//!      `memory_mib`   [resident.rs]
//!   └─ shards = id ranges of the u64 id space, round-robin over workers
//!        └─ per shard: query rows in blocks of `query_block_rows`, each query's probes
//!           picked once   [quantizer.rs]
//!             └─ resident: GEMM of each probed partition's queries x its rows;
//!                otherwise one pass over the whole table in blocks of `db_block_rows`,
//!                the same per database block; running top-k   [search.rs]
//!             └─ rows → uncommitted fragments → one commit carrying the shard id
//! ```
//! Memory: resident, `(4 d + 16 + 4 nprobe)` bytes a row of the table (held-out rows
//! included: they are queries), twice that while it is loaded, and the search holds it only
//! when that fits in half of `memory_mib`. Otherwise memory is set by `query_block_rows` and
//! `db_block_rows` (about `(2 * query_block_rows + 3 * db_block_rows) * d * 4` bytes: the
//! query vectors, their candidate slots (capped at the vectors' size by shrinking the
//! block), and a database block being read while the previous one, and its partition-sorted
//! copy, are searched), not by the table size, plus every row's partition (4 bytes a row),
//! kept so later passes do not recompute it.
//!
//! Exactly once and resumable like embed: a shard is visible in one commit, and the table's
//! [`crate::ledger`] refuses a second commit of it. The output records the embeddings table's
//! version it was computed from, and every run on that output reads that version, so results
//! stay reproducible while the embeddings table grows.

use super::plan::{compute_plan, Calibration, IvfConfig, KnnPlan, RowPartitions};
use super::quantizer::Quantizer;
use super::resident::{bytes_per_row, ResidentRows};
use super::search::{Exclusion, IvfQueries, TopK, NO_NEIGHBOUR};
use super::vectors::VectorTable;
use crate::clip::DeviceChoice;
use crate::embed::peak_rss_mib;
use crate::table::{load_dataset, pin_version, reader_tag, sibling_uri, ShardWriter, ShardedTable};
use crate::{IndexerError, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, UInt64Array};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use futures::StreamExt;
use knn_datasets::{SplitConfig, StorageConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

/// Schema metadata key of the output: the JSON [`KnnOutputMeta`].
pub const KNN_METADATA: &str = "knn.precompute";

/// Compute settings (`[knn.compute]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnnComputeConfig {
    /// `auto` (a CUDA GPU when there is one), `cpu` or `cuda`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Queries searched together in one pass over the table.
    #[serde(default = "default_query_block_rows")]
    pub query_block_rows: usize,
    /// Table rows multiplied against the queries at once.
    #[serde(default = "default_db_block_rows")]
    pub db_block_rows: usize,
    /// Id-range shards of the output (0: one per `query_block_rows` rows). Fixed when the
    /// output is created.
    #[serde(default)]
    pub shards: usize,
    /// Stop after this many shards (0: no limit); for trials.
    #[serde(default)]
    pub max_shards: usize,
    /// Memory (MiB) the search may use. It holds the table's rows in memory, grouped by
    /// partition, when they take at most half of this (4·d + 16 + 4·nprobe bytes a row: at
    /// d = 512 about 2 KiB, so 8 GiB holds 2M rows); a larger table is searched in one pass over it
    /// per query block, in bounded memory, which is slower.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
}

fn default_memory_mib() -> usize {
    8192
}

fn default_query_block_rows() -> usize {
    262_144
}
fn default_db_block_rows() -> usize {
    262_144
}

impl Default for KnnComputeConfig {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Auto,
            query_block_rows: default_query_block_rows(),
            db_block_rows: default_db_block_rows(),
            shards: 0,
            max_shards: 0,
            memory_mib: default_memory_mib(),
        }
    }
}

/// The `precompute-knn` stage's config (`[knn]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnnConfig {
    /// The embeddings table (default: `embed.output.table`).
    #[serde(default)]
    pub table: Option<String>,
    /// The output table (default: the embeddings table with `-knn` before `.lance`).
    #[serde(default)]
    pub output: Option<String>,
    /// Neighbours per row.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Neighbours at least this similar (cosine) count as duplicates of the row and are
    /// skipped; unset: only the row itself is skipped.
    #[serde(default)]
    pub duplicate_similarity: Option<f32>,
    /// Version of the embeddings table to read (default: the latest when the output is
    /// created; later runs on the same output always read the version it records).
    #[serde(default)]
    pub source_version: Option<u64>,
    /// The held-out split (set from the project's `[split]`): held-out rows get neighbours
    /// but are nobody's neighbour, and the output marks them (`holdout`), so training never
    /// sees them. `None`: no row is held out.
    #[serde(default)]
    pub split: Option<SplitConfig>,
    /// The IVF plan.
    #[serde(default)]
    pub ivf: IvfConfig,
    /// Blocks, shards, device.
    #[serde(default)]
    pub compute: KnnComputeConfig,
}

fn default_k() -> usize {
    10
}

impl KnnConfig {
    /// The embeddings table URI.
    pub fn table_uri(&self) -> Result<&str> {
        self.table.as_deref().ok_or_else(|| IndexerError::Config {
            key: "knn.table".into(),
            reason: "no embeddings table: set `knn.table` (or `embed.output.table`)".into(),
        })
    }

    /// The output table URI.
    pub fn output_uri(&self) -> Result<String> {
        if let Some(o) = &self.output {
            return Ok(o.clone());
        }
        Ok(sibling_uri(self.table_uri()?, "knn"))
    }

    fn exclusion(&self) -> Exclusion {
        Exclusion {
            duplicate_similarity: self.duplicate_similarity,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: &str| {
            Err(IndexerError::Config {
                key: key.into(),
                reason: reason.into(),
            })
        };
        if self.k == 0 {
            return bad("knn.k", "must be at least 1");
        }
        if let Some(t) = self.duplicate_similarity {
            if !(-1.0..=1.0).contains(&t) {
                return bad("knn.duplicate_similarity", "a cosine similarity in [-1, 1]");
            }
        }
        if self.compute.query_block_rows == 0 || self.compute.db_block_rows == 0 {
            return bad(
                "knn.compute",
                "`query_block_rows` and `db_block_rows` must be >= 1",
            );
        }
        if !(0.0..=1.0).contains(&self.ivf.target_recall) {
            return bad("knn.ivf.target_recall", "a recall in [0, 1]");
        }
        Ok(())
    }
}

/// What an output was made from, stored in its schema metadata.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KnnOutputMeta {
    /// Embeddings table URI.
    pub source: String,
    /// The version of it that was read.
    pub source_version: u64,
    /// Its rows at that version.
    pub source_rows: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Neighbours per row.
    pub k: usize,
    /// Duplicate threshold.
    pub duplicate_similarity: Option<f32>,
    /// Id-range shards.
    pub shards: usize,
    /// Smallest id in the pinned version (shards split `id_min..=id_max`).
    pub id_min: u64,
    /// Largest id in the pinned version.
    pub id_max: u64,
    /// URI of the plan table.
    pub plan: String,
    /// Content hash of the plan.
    pub plan_sha: String,
    /// IVF partitions.
    pub partitions: usize,
    /// Partitions probed per query.
    pub nprobe: usize,
    /// The calibration, when one ran.
    pub calibration: Option<Calibration>,
    /// The held-out split applied (`None`: none).
    #[serde(default)]
    pub split: Option<SplitConfig>,
}

/// Column of a kNN-table row's own Lance row address in the embeddings version the table was
/// made from (`source_version`).
pub const ROW_ADDR_COLUMN: &str = "row_addr";
/// Column of the neighbours' row addresses in that version, slot for slot with `knn_ids`:
/// training reads a row and its neighbours by address, with no id → row map.
pub const KNN_ROW_ADDRS_COLUMN: &str = "knn_row_addrs";

/// Schema of a precompute-knn output for `k` neighbours.
pub fn knn_schema(k: usize, meta: &KnnOutputMeta) -> SchemaRef {
    let u64_item = Arc::new(Field::new("item", DataType::UInt64, true));
    let f32_item = Arc::new(Field::new("item", DataType::Float32, true));
    Arc::new(
        Schema::new(vec![
            Field::new("id", DataType::UInt64, false),
            Field::new(
                "knn_ids",
                DataType::FixedSizeList(u64_item.clone(), k as i32),
                false,
            ),
            Field::new(
                "knn_sims",
                DataType::FixedSizeList(f32_item, k as i32),
                false,
            ),
            Field::new("holdout", DataType::Boolean, false),
            Field::new(ROW_ADDR_COLUMN, DataType::UInt64, false),
            Field::new(
                KNN_ROW_ADDRS_COLUMN,
                DataType::FixedSizeList(u64_item, k as i32),
                false,
            ),
        ])
        .with_metadata(HashMap::from([(
            KNN_METADATA.to_string(),
            serde_json::to_string(meta).expect("metadata serialises"),
        )])),
    )
}

/// Shard `s` of `n` over the ids `id_min..=id_max` of the pinned table: ids in
/// `[low, high)` (`high = None`: to the end). Ranges split the span of ids actually present,
/// so hashed 63-bit ids (embed's) and any other spread of u64 ids give balanced shards.
pub fn shard_range(s: usize, n: usize, id_min: u64, id_max: u64) -> (u64, Option<u64>) {
    let span = u128::from(id_max.saturating_sub(id_min)) + 1;
    let bound = |i: usize| (u128::from(id_min) + span * i as u128 / n as u128) as u64;
    let high = (s + 1 < n).then(|| bound(s + 1));
    (if s == 0 { 0 } else { bound(s) }, high)
}

/// Name of shard `s` of `n` in the ledger.
pub fn shard_name(s: usize, n: usize) -> String {
    format!("ids-{s:05}-of-{n:05}")
}

/// Live counters for progress display.
#[derive(Debug, Default)]
pub struct KnnProgress {
    /// Shards this worker has to do.
    pub shards_todo: AtomicU64,
    /// Shards finished.
    pub shards_finished: AtomicU64,
    /// Query rows this worker has to do (estimate from the id ranges).
    pub queries_todo: AtomicU64,
    /// Query rows whose neighbours are written.
    pub queries_done: AtomicU64,
}

/// What a run did (`--summary-json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KnnSummary {
    /// Worker index and count.
    pub worker: (usize, usize),
    /// Output URI.
    pub output: String,
    /// What the output is made from.
    pub meta: Option<KnnOutputMeta>,
    /// Shards assigned to this worker.
    pub shards_assigned: usize,
    /// Shards committed by this run.
    pub shards_committed: usize,
    /// Shards already committed before.
    pub shards_skipped: usize,
    /// Shards another process committed meanwhile (work discarded).
    pub shards_raced: usize,
    /// Rows written.
    pub queries: u64,
    /// Rows with fewer than k neighbours (duplicates excluded too many, or too few rows).
    pub short_rows: u64,
    /// Time to make the plan (0 when it existed).
    pub plan_s: f64,
    /// Wall time.
    pub elapsed_s: f64,
    /// Device used.
    pub device: String,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Memory budget (`knn.compute.memory_mib`).
    pub memory_mib: usize,
    /// MiB of database rows the search held in memory (`None`: it passed over the table
    /// once per query block instead).
    pub resident_mib: Option<f64>,
    /// Ids that more than one row of the embeddings table holds, found in the shards this
    /// run committed.
    #[serde(default)]
    pub id_collisions: Vec<IdCollision>,
}

/// Distinct records of the embeddings table whose 63-bit ids collide. Ids hash the shard and
/// the key, and embed checks them only within a shard, so records of two shards can meet by
/// chance: n rows hold about n²/2⁶⁴ such pairs, a 0.9 % chance of one at 4·10⁸ rows. Both
/// stay rows: the kNN table and training tell them apart by row address. They are never
/// merged, but neither is offered as the other's neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdCollision {
    /// The shared id.
    pub id: u64,
    /// The rows holding it, in table order.
    pub rows: Vec<CollidingRow>,
}

/// One row of an [`IdCollision`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollidingRow {
    /// Its key (`None` where the table has no `key` column).
    pub key: Option<String>,
    /// Its source shard (`None` where the table has no `shard` column).
    pub shard: Option<String>,
    /// Its row address in the pinned version.
    pub row_addr: u64,
}

impl fmt::Display for IdCollision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "id {}:", self.id)?;
        for (i, row) in self.rows.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            match (&row.key, &row.shard) {
                (Some(k), Some(s)) => write!(f, "{sep}`{k}` (shard {s})")?,
                (Some(k), None) => write!(f, "{sep}`{k}`")?,
                _ => write!(f, "{sep}row address {}", row.row_addr)?,
            }
        }
        Ok(())
    }
}

impl KnnSummary {
    /// Rows per second, end to end (plan included).
    pub fn queries_per_s(&self) -> f64 {
        self.queries as f64 / self.elapsed_s.max(1e-9)
    }
}

impl fmt::Display for KnnSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "precompute-knn summary (worker {} of {}, {})",
            self.worker.0, self.worker.1, self.device
        )?;
        writeln!(f, "  output: {}", self.output)?;
        if let Some(m) = &self.meta {
            writeln!(
                f,
                "  source: {} version {} ({} rows, d = {}); k = {}, duplicates >= {}",
                m.source,
                m.source_version,
                m.source_rows,
                m.dim,
                m.k,
                m.duplicate_similarity
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "off".into())
            )?;
            writeln!(
                f,
                "  plan: {} partitions{}, nprobe {}{}",
                m.partitions,
                match m.calibration.as_ref().and_then(|c| c.cell_probe) {
                    Some(c) => format!(" in cells (queries look in {c})"),
                    None => String::new(),
                },
                m.nprobe,
                match &m.calibration {
                    Some(c) => format!(
                        ", recall@{} {:.4} on {} calibration queries",
                        m.k, c.recall, c.queries
                    ),
                    None if m.partitions == 1 => ", exact".into(),
                    None => ", not calibrated".into(),
                }
            )?;
        }
        writeln!(
            f,
            "  shards: {} assigned, {} committed, {} skipped (already done), {} done elsewhere meanwhile",
            self.shards_assigned, self.shards_committed, self.shards_skipped, self.shards_raced
        )?;
        writeln!(
            f,
            "  rows: {} written, {} with fewer than k neighbours",
            self.queries, self.short_rows
        )?;
        if !self.id_collisions.is_empty() {
            let n = self.id_collisions.len();
            writeln!(
                f,
                "  id collisions: {n} {} held by more than one record (kept apart by row \
                 address, never merged; neither is the other's neighbour)",
                if n == 1 { "id" } else { "ids" }
            )?;
            for c in self.id_collisions.iter().take(10) {
                writeln!(f, "    {c}")?;
            }
            if self.id_collisions.len() > 10 {
                writeln!(
                    f,
                    "    … and {} more (--summary-json lists all)",
                    self.id_collisions.len() - 10
                )?;
            }
        }
        match self.resident_mib {
            Some(r) => writeln!(
                f,
                "  search: table held in memory ({r:.0} MiB; budget {} MiB)",
                self.memory_mib
            )?,
            None if self.queries > 0 => writeln!(
                f,
                "  search: one pass over the table per query block (it does not fit in half \
                 of the {} MiB budget, knn.compute.memory_mib)",
                self.memory_mib
            )?,
            None => {}
        }
        write!(
            f,
            "  time: {:.1} s ({:.1} s plan), {:.0} rows/s{}",
            self.elapsed_s,
            self.plan_s,
            self.queries_per_s(),
            self.peak_rss_mib
                .map(|m| format!("; peak RSS {m:.0} MiB"))
                .unwrap_or_default()
        )
    }
}

/// Reads a precompute-knn output's metadata, or `None` when the output does not exist.
pub async fn existing_meta(
    uri: &str,
    storage: &HashMap<String, String>,
) -> Result<Option<KnnOutputMeta>> {
    let ds = match load_dataset(uri, storage, None).await {
        Ok(ds) => ds,
        Err(lance::Error::DatasetNotFound { .. }) => return Ok(None),
        Err(e) => return Err(IndexerError::lance(uri, e)),
    };
    let raw =
        ds.schema()
            .metadata
            .get(KNN_METADATA)
            .ok_or_else(|| IndexerError::SchemaMismatch {
                table: uri.to_string(),
                detail: format!("it is not a precompute-knn output (no `{KNN_METADATA}` metadata)"),
            })?;
    serde_json::from_str(raw)
        .map(Some)
        .map_err(|e| IndexerError::SchemaMismatch {
            table: uri.to_string(),
            detail: format!("its `{KNN_METADATA}` metadata is unreadable: {e}"),
        })
}

/// Name of the tag that keeps the embeddings version a kNN output was made from: the output
/// reads rows by their address in that version, so a clean-up of the embeddings table
/// (`[storage.tables]` upkeep, `knn-diffusion gc`) must not remove it.
pub fn source_tag(output: &str) -> String {
    reader_tag("knn", output)
}

/// Tags the version of `source` that the output `output` is made from (see [`source_tag`]).
async fn pin_source_version(source: &VectorTable, output: &str) {
    pin_version(
        &source.ds,
        &source.uri,
        &source_tag(output),
        "training would then have to run precompute-knn again",
    )
    .await;
}

/// Checks that this run's config agrees with what an existing output was made with.
fn check_meta(cfg: &KnnConfig, meta: &KnnOutputMeta, output: &str) -> Result<()> {
    let mut diffs = Vec::new();
    let mut differ = |key: &str, have: String, want: String| {
        if have != want {
            diffs.push(format!("`knn.{key}` is {have} there, {want} here"));
        }
    };
    differ("table", meta.source.clone(), cfg.table_uri()?.to_string());
    differ("k", meta.k.to_string(), cfg.k.to_string());
    differ(
        "duplicate_similarity",
        format!("{:?}", meta.duplicate_similarity),
        format!("{:?}", cfg.duplicate_similarity),
    );
    differ(
        "split",
        serde_json::to_string(&meta.split).unwrap_or_default(),
        serde_json::to_string(&cfg.split).unwrap_or_default(),
    );
    if let Some(v) = cfg.source_version {
        differ(
            "source_version",
            meta.source_version.to_string(),
            v.to_string(),
        );
    }
    if cfg.compute.shards != 0 {
        differ(
            "compute.shards",
            meta.shards.to_string(),
            cfg.compute.shards.to_string(),
        );
    }
    if cfg.ivf.partitions != 0 {
        differ(
            "ivf.partitions",
            meta.partitions.to_string(),
            cfg.ivf.partitions.to_string(),
        );
    }
    if cfg.ivf.nprobe != 0 {
        differ(
            "ivf.nprobe",
            meta.nprobe.to_string(),
            cfg.ivf.nprobe.to_string(),
        );
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(IndexerError::SchemaMismatch {
            table: output.to_string(),
            detail: format!(
                "the existing kNN output was made with other settings ({}); to resume it, \
                 use its settings; to start over, set another `knn.output`",
                diffs.join("; ")
            ),
        })
    }
}

/// The output, its metadata, the plan, and the source opened at the pinned version.
struct Prepared {
    table: ShardedTable,
    meta: KnnOutputMeta,
    plan: KnnPlan,
    source: VectorTable,
    plan_s: f64,
}

async fn prepare(cfg: &KnnConfig, config: &StorageConfig, device: Device) -> Result<Prepared> {
    let output = cfg.output_uri()?;
    let storage = &config.to_lance_options();
    if let Some(m) = existing_meta(&output, storage).await? {
        return adopt(cfg, m, &output, config, 0.0).await;
    }
    // No output yet: make the plan, store it, then create the output naming it.
    let started = Instant::now();
    let source_uri = cfg.table_uri()?;
    let source = VectorTable::open(source_uri, storage, cfg.source_version)
        .await?
        .with_split(cfg.split.clone())?;
    source.require_rows()?;
    if cfg.k >= source.rows {
        return Err(IndexerError::KTooLarge {
            table: source_uri.to_string(),
            k: cfg.k,
            rows: source.rows,
            excluding: " (each row's own entry excluded)",
            max: source.rows.saturating_sub(1),
        });
    }
    let (id_min, id_max) = source.id_span().await?;
    let shards = match cfg.compute.shards {
        0 => source.rows.div_ceil(cfg.compute.query_block_rows).max(1),
        s => s,
    };
    tracing::info!(
        table = source_uri,
        version = source.version(),
        rows = source.rows,
        dim = source.dim,
        "making the kNN search plan"
    );
    let plan = compute_plan(
        &source,
        &cfg.ivf,
        cfg.k,
        cfg.exclusion(),
        device,
        cfg.compute.db_block_rows,
    )
    .await?;
    let sha = plan.sha();
    let uri = sibling_uri(&output, &format!("plan-{sha}"));
    plan.save(&uri, storage).await?;
    pin_source_version(&source, &output).await;
    let m = KnnOutputMeta {
        source: source_uri.to_string(),
        source_version: source.version(),
        source_rows: source.rows,
        dim: source.dim,
        k: cfg.k,
        duplicate_similarity: cfg.duplicate_similarity,
        shards,
        id_min,
        id_max,
        plan: uri,
        plan_sha: sha,
        partitions: plan.partitions(),
        nprobe: plan.nprobe,
        calibration: plan.calibration.clone(),
        split: cfg.split.clone(),
    };
    match ShardedTable::open_or_create(&output, knn_schema(cfg.k, &m), config).await {
        Ok(table) => Ok(Prepared {
            table,
            meta: m,
            plan,
            source,
            plan_s: started.elapsed().as_secs_f64(),
        }),
        // Another worker created the output first, with its own plan: adopt that one.
        Err(IndexerError::SchemaMismatch { .. }) => {
            tracing::info!("another worker created the kNN output first; using its plan");
            let m = existing_meta(&output, storage).await?.ok_or_else(|| {
                IndexerError::Internal(format!(
                    "kNN output `{output}` vanished while it was being created"
                ))
            })?;
            adopt(cfg, m, &output, config, started.elapsed().as_secs_f64()).await
        }
        Err(e) => Err(e),
    }
}

/// Opens an existing output made with metadata `m`, after checking this run's config agrees.
async fn adopt(
    cfg: &KnnConfig,
    m: KnnOutputMeta,
    output: &str,
    config: &StorageConfig,
    plan_s: f64,
) -> Result<Prepared> {
    check_meta(cfg, &m, output)?;
    let storage = &config.to_lance_options();
    let source = VectorTable::open(&m.source, storage, Some(m.source_version))
        .await?
        .with_split(m.split.clone())?;
    let plan = KnnPlan::load(&m.plan, storage).await?;
    pin_source_version(&source, output).await;
    let table = ShardedTable::open_or_create(output, knn_schema(m.k, &m), config).await?;
    Ok(Prepared {
        table,
        meta: m,
        plan,
        source,
        plan_s,
    })
}

/// Runs precompute-knn for worker `worker` of `workers`.
pub async fn precompute_knn(
    cfg: &KnnConfig,
    storage: &StorageConfig,
    worker: (usize, usize),
    progress: Arc<KnnProgress>,
) -> Result<KnnSummary> {
    let started = Instant::now();
    cfg.validate()?;
    let device = cfg
        .compute
        .device
        .resolve()
        .map_err(|e| IndexerError::Config {
            key: "knn.compute.device".into(),
            reason: e.to_string(),
        })?;
    let prepared = prepare(cfg, storage, device).await?;
    let Prepared {
        table,
        meta,
        plan,
        source,
        plan_s,
    } = prepared;

    table.refresh_ledger().await?;
    let mine: Vec<usize> = (0..meta.shards)
        .filter(|s| s % worker.1 == worker.0)
        .collect();
    let mut summary = KnnSummary {
        worker,
        output: table.uri().to_string(),
        meta: Some(meta.clone()),
        shards_assigned: mine.len(),
        plan_s,
        device: format!("{device:?}"),
        ..Default::default()
    };
    if meta.shards < worker.1 {
        tracing::warn!(
            shards = meta.shards,
            workers = worker.1,
            "fewer shards than workers: some workers have nothing to do (set knn.compute.shards)"
        );
    }
    let mut todo: Vec<usize> = mine
        .into_iter()
        .filter(|&s| !table.is_committed(&shard_name(s, meta.shards)))
        .collect();
    summary.shards_skipped = summary.shards_assigned - todo.len();
    if cfg.compute.max_shards > 0 {
        todo.truncate(cfg.compute.max_shards);
    }
    progress
        .shards_todo
        .store(todo.len() as u64, Ordering::Relaxed);
    progress.queries_todo.store(
        (meta.source_rows as u64 * todo.len() as u64).div_ceil(meta.shards as u64),
        Ordering::Relaxed,
    );
    let schema = knn_schema(meta.k, &meta);
    let query_rows =
        effective_query_rows(cfg.compute.query_block_rows, meta.dim, plan.nprobe, meta.k);
    summary.memory_mib = cfg.compute.memory_mib;
    let mut search = Search {
        quantizer: Some(plan.quantizer.to_device(device)),
        partitions: RowPartitions::default(),
        resident: None,
    };
    if !todo.is_empty() {
        if let Some((rows, mib)) =
            hold_rows(cfg, &meta, &source, &search, plan.nprobe, device).await?
        {
            (search.resident, summary.resident_mib) = (Some(rows), Some(mib));
        }
    }
    let ctx = ShardContext {
        cfg,
        meta: &meta,
        schema: &schema,
        source: &source,
        nprobe: plan.nprobe as i64,
        query_rows,
        progress: &progress,
    };
    for s in todo {
        let name = shard_name(s, meta.shards);
        let ds = Arc::new(table.open().await?);
        let mut out = ShardOutput::new(ShardWriter::new(&table, ds.clone()));
        let range = shard_range(s, meta.shards, meta.id_min, meta.id_max);
        let (rows, short) = match &search.resident {
            Some(r) => search_resident(&ctx, r, range, &name, &mut out).await?,
            None => search_streamed(&ctx, &mut search, range, &name, &mut out).await?,
        };
        summary.short_rows += short;
        let twins = out.shared_ids();
        let txn = out.writer.finish().await?;
        if table.commit_shard(ds, &name, txn).await? {
            summary.shards_committed += 1;
            summary.queries += rows;
            tracing::info!(shard = %name, rows, "shard committed");
            report_collisions(&source, twins, &name, &mut summary).await?;
        } else {
            summary.shards_raced += 1;
            tracing::warn!(shard = %name, "shard was committed by another process meanwhile; this run's copy is discarded");
        }
        progress.shards_finished.fetch_add(1, Ordering::Relaxed);
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.peak_rss_mib = peak_rss_mib();
    Ok(summary)
}

/// Reads the whole table into memory, grouped by partition, when it takes at most half of
/// `memory_mib` (read once, instead of once per query block), with the MiB it takes; `None`
/// when it does not fit.
async fn hold_rows(
    cfg: &KnnConfig,
    meta: &KnnOutputMeta,
    source: &VectorTable,
    search: &Search,
    nprobe: usize,
    device: Device,
) -> Result<Option<(ResidentRows, f64)>> {
    let bytes = meta.source_rows as u64 * bytes_per_row(meta.dim, nprobe);
    if bytes > (cfg.compute.memory_mib as u64) << 19 {
        return Ok(None);
    }
    let loading = Instant::now();
    let quantizer = search.quantizer.as_ref().expect("present between passes");
    let rows = ResidentRows::load(
        source,
        quantizer,
        nprobe as i64,
        cfg.compute.db_block_rows,
        device,
    )
    .await?;
    let mib = bytes as f64 / 1048576.0;
    tracing::info!(
        rows = rows.len(),
        mib,
        elapsed_s = loading.elapsed().as_secs_f64(),
        "table held in memory, grouped by partition"
    );
    Ok(Some((rows, mib)))
}

/// What every shard's search reads.
struct ShardContext<'a> {
    cfg: &'a KnnConfig,
    meta: &'a KnnOutputMeta,
    schema: &'a SchemaRef,
    source: &'a VectorTable,
    nprobe: i64,
    query_rows: usize,
    progress: &'a KnnProgress,
}

/// What the search keeps between shards: the quantizer, every row's partition once a pass
/// has computed it, and the rows themselves when they fit in memory.
struct Search {
    /// Moved to the compute thread during a streamed pass, and back.
    quantizer: Option<Quantizer>,
    partitions: RowPartitions,
    resident: Option<ResidentRows>,
}

/// Searches the rows of one shard (ids in `range`) against the rows held in memory, writing
/// them to `writer`: (rows written, rows with fewer than k neighbours).
async fn search_resident(
    ctx: &ShardContext<'_>,
    resident: &ResidentRows,
    range: (u64, Option<u64>),
    name: &str,
    out: &mut ShardOutput,
) -> Result<(u64, u64)> {
    let (mut rows, mut short) = (0u64, 0u64);
    for block in resident.queries(range, ctx.query_rows) {
        let started = Instant::now();
        let (ids, top) = resident.search(&block, ctx.meta.k as i64, ctx.cfg.exclusion());
        tracing::info!(
            shard = name,
            queries = block.addrs.len(),
            pass_s = started.elapsed().as_secs_f64(),
            "query block searched"
        );
        let (n, s) = write_block(ctx, out, &ids, &block.addrs, &block.holdout, top).await?;
        rows += n;
        short += s;
    }
    Ok((rows, short))
}

/// Searches the rows of one shard (ids in `range`) in query blocks, each with one pass over
/// the whole table, writing them to `writer`: (rows written, rows with fewer than k
/// neighbours).
async fn search_streamed(
    ctx: &ShardContext<'_>,
    search: &mut Search,
    range: (u64, Option<u64>),
    name: &str,
    out: &mut ShardOutput,
) -> Result<(u64, u64)> {
    let (source, device) = (ctx.source, search_device(search));
    let mut queries = source.blocks(Some(range), ctx.query_rows, false).await?;
    let (mut rows, mut short) = (0u64, 0u64);
    while let Some(block) = queries.next().await {
        let mut block = block?;
        let n = block.len() as u64;
        let pass_started = Instant::now();
        let (q, q_ids) = block.tensors(source.dim, device);
        let q_addrs = std::mem::take(&mut block.addrs);
        let holdout = std::mem::take(&mut block.holdout);
        drop(block);
        let (k, nprobe) = (ctx.meta.k as i64, ctx.nprobe);
        let quantizer = search.quantizer.take().expect("returned after each pass");
        let (quantizer, queries_block) = tokio::task::spawn_blocking(move || {
            let probes = quantizer.probes(&q, nprobe);
            let queries = IvfQueries::new(q, q_ids, &probes, quantizer.partitions() as i64);
            (quantizer, queries)
        })
        .await
        .map_err(|e| IndexerError::Internal(format!("probe thread died: {e}")))?;
        let pass = SearchPass {
            top: TopK::new(queries_block.len(), k, device, true),
            queries: queries_block,
            quantizer,
            partitions: std::mem::take(&mut search.partitions),
            at: 0,
            dim: source.dim,
            exclusion: ctx.cfg.exclusion(),
            busy_s: 0.0,
        };
        let pass = source
            .scan_blocks(None, ctx.cfg.compute.db_block_rows, pass, |p, block| {
                let started = Instant::now();
                let (emb, ids) = block.tensors(p.dim, p.queries.emb.device());
                let addrs = block.addr_tensor(p.queries.emb.device());
                let parts = p.partitions.get_or_assign(p.at, &emb, &p.quantizer);
                p.at += block.len();
                p.queries
                    .scan(&mut p.top, &emb, &ids, Some(&addrs), &parts, p.exclusion);
                p.busy_s += started.elapsed().as_secs_f64();
                Ok(())
            })
            .await?;
        let SearchPass {
            top,
            queries: searched,
            quantizer,
            partitions,
            busy_s,
            ..
        } = pass;
        (search.quantizer, search.partitions) = (Some(quantizer), partitions);
        tracing::info!(
            shard = name,
            queries = n,
            pass_s = pass_started.elapsed().as_secs_f64(),
            compute_s = busy_s,
            "query block searched"
        );
        let (n, s) = write_block(ctx, out, &searched.ids, &q_addrs, &holdout, top).await?;
        rows += n;
        short += s;
    }
    Ok((rows, short))
}

/// Finishes `top` for the queries `ids` (row addresses `addrs`, held out where `holdout`),
/// writes their output rows to `out` and counts them: (rows, rows with fewer than k
/// neighbours).
async fn write_block(
    ctx: &ShardContext<'_>,
    out: &mut ShardOutput,
    ids: &Tensor,
    addrs: &[u64],
    holdout: &[bool],
    mut top: TopK,
) -> Result<(u64, u64)> {
    let short = top.finish() as u64;
    let batch = output_batch(ctx.schema, ids, addrs, &top, ctx.meta.k, holdout)?;
    out.write(batch).await?;
    let n = addrs.len() as u64;
    ctx.progress.queries_done.fetch_add(n, Ordering::Relaxed);
    Ok((n, short))
}

/// Where one shard's rows go: the output writer, and the (id, row address) of every row
/// written. Two rows with one id always fall in the same shard (shards are id ranges), so
/// this finds every id collision of the table, at 16 bytes a row of one shard.
struct ShardOutput {
    writer: ShardWriter,
    written: Vec<(u64, u64)>,
}

impl ShardOutput {
    fn new(writer: ShardWriter) -> Self {
        Self {
            writer,
            written: Vec::new(),
        }
    }

    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let ids = batch.column(0).as_primitive::<UInt64Type>().values();
        let addrs = batch
            .column_by_name(ROW_ADDR_COLUMN)
            .expect("the output schema has row addresses")
            .as_primitive::<UInt64Type>()
            .values();
        self.written
            .extend(ids.iter().copied().zip(addrs.iter().copied()));
        self.writer.write(batch).await
    }

    /// Each id that more than one written row holds, with their row addresses in order.
    fn shared_ids(&mut self) -> Vec<(u64, Vec<u64>)> {
        let mut written = std::mem::take(&mut self.written);
        written.sort_unstable();
        written
            .chunk_by(|a, b| a.0 == b.0)
            .filter(|run| run.len() > 1)
            .map(|run| (run[0].0, run.iter().map(|r| r.1).collect()))
            .collect()
    }
}

/// Warns of each id that more than one row of `shard` holds (`twins`, from
/// [`ShardOutput::shared_ids`]), naming their keys and shards, and lists it in `summary`.
async fn report_collisions(
    source: &VectorTable,
    twins: Vec<(u64, Vec<u64>)>,
    shard: &str,
    summary: &mut KnnSummary,
) -> Result<()> {
    for (id, addrs) in twins {
        let names = source.names_at(&addrs).await?;
        let rows = addrs
            .into_iter()
            .zip(names)
            .map(|(row_addr, (key, shard))| CollidingRow {
                key,
                shard,
                row_addr,
            })
            .collect();
        let c = IdCollision { id, rows };
        tracing::warn!(
            shard,
            "id collision: distinct records share one 63-bit {c}. Nothing is merged \
             and nothing needs doing: both are rows, told apart by row address in the \
             kNN table and in training; only, neither is offered as the other's \
             neighbour"
        );
        summary.id_collisions.push(c);
    }
    Ok(())
}

fn search_device(search: &Search) -> Device {
    search
        .quantizer
        .as_ref()
        .map_or(Device::Cpu, |q| q.centroids.device())
}

/// Query rows per block: `query_block_rows`, fewer when the candidate slots (nprobe x k per
/// query, 12 bytes each) would outweigh the query vectors themselves (4 d bytes), so a large
/// calibrated nprobe cannot multiply the configured memory.
pub fn effective_query_rows(query_block_rows: usize, dim: usize, nprobe: usize, k: usize) -> usize {
    let vector_bytes = 4 * dim;
    let slot_bytes = 12 * nprobe * k;
    if slot_bytes <= vector_bytes {
        query_block_rows
    } else {
        (query_block_rows * vector_bytes / slot_bytes)
            .max(1024)
            .min(query_block_rows)
    }
}

struct SearchPass {
    top: TopK,
    queries: IvfQueries,
    quantizer: Quantizer,
    partitions: RowPartitions,
    at: usize,
    dim: usize,
    exclusion: Exclusion,
    busy_s: f64,
}

/// The output rows of one query block (`addrs`: their row addresses); missing neighbours are
/// nulls; rows are marked held out where `holdout` says so (by position, not by id, since
/// two rows may share an id).
fn output_batch(
    schema: &SchemaRef,
    ids: &Tensor,
    addrs: &[u64],
    top: &TopK,
    k: usize,
    holdout: &[bool],
) -> Result<RecordBatch> {
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).contiguous().view([-1]);
    let ids: Vec<i64> = Vec::try_from(&cpu(ids))?;
    let knn_ids: Vec<i64> = Vec::try_from(&cpu(&top.ids))?;
    let knn_sims: Vec<f32> = Vec::try_from(&cpu(&top.sims))?;
    let knn_addrs: Vec<i64> = match &top.aux {
        Some(aux) => Vec::try_from(&cpu(aux))?,
        None => {
            return Err(IndexerError::Internal(
                "the search tracked no row addresses".into(),
            ))
        }
    };
    if addrs.len() != ids.len() || holdout.len() != ids.len() {
        return Err(IndexerError::Internal(format!(
            "{} row addresses and {} held-out marks for {} query rows",
            addrs.len(),
            holdout.len(),
            ids.len()
        )));
    }
    let valid = NullBuffer::from(
        knn_ids
            .iter()
            .map(|&i| i != NO_NEIGHBOUR)
            .collect::<Vec<_>>(),
    );
    let u64_item = Arc::new(Field::new("item", DataType::UInt64, true));
    let f32_item = Arc::new(Field::new("item", DataType::Float32, true));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(ids.iter().map(|&i| i as u64))),
        Arc::new(FixedSizeListArray::new(
            u64_item.clone(),
            k as i32,
            Arc::new(UInt64Array::new(
                knn_ids.iter().map(|&i| i as u64).collect(),
                Some(valid.clone()),
            )),
            None,
        )),
        Arc::new(FixedSizeListArray::new(
            f32_item,
            k as i32,
            Arc::new(Float32Array::new(knn_sims.into(), Some(valid.clone()))),
            None,
        )),
        Arc::new(arrow_array::BooleanArray::from(holdout.to_vec())),
        Arc::new(UInt64Array::from_iter_values(addrs.iter().copied())),
        Arc::new(FixedSizeListArray::new(
            u64_item,
            k as i32,
            Arc::new(UInt64Array::new(
                knn_addrs.iter().map(|&a| a as u64).collect(),
                Some(valid),
            )),
            None,
        )),
    ];
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| IndexerError::Internal(format!("kNN output batch: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_tile_the_ids_present_and_balance_hashed_ids() {
        // 63-bit hashed ids, as embed writes them.
        let ids: Vec<u64> = (0..10_000u64)
            .map(|i| crate::knn::synthetic::synthetic_id(i, 1))
            .collect();
        let (lo, hi) = (*ids.iter().min().unwrap(), *ids.iter().max().unwrap());
        let n = 4;
        let mut counts = vec![0usize; n];
        for &id in &ids {
            let owners: Vec<usize> = (0..n)
                .filter(|&s| {
                    let (a, b) = shard_range(s, n, lo, hi);
                    id >= a && b.is_none_or(|b| id < b)
                })
                .collect();
            assert_eq!(owners.len(), 1, "id {id} owned by {owners:?}");
            counts[owners[0]] += 1;
        }
        assert!(
            counts.iter().all(|&c| (2_000..3_000).contains(&c)),
            "{counts:?}"
        );
        // One id, or the full u64 range, still gives well-formed ranges.
        assert_eq!(shard_range(0, 1, 7, 7), (0, None));
        assert_eq!(shard_range(1, 2, 0, u64::MAX), (1 << 63, None));
    }
}
