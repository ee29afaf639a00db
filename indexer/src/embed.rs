//! The embed stage: image records in object storage → CLIP embeddings in a Lance table.
//!
//! ```text
//! shards of this worker, minus committed ones
//!   └─ per shard (`shards_in_flight` at once):
//!        read (async) → chunks of `batch_size` → decode + resize + CLIP preprocessing
//!        (blocking pool, `decode_threads` permits, `batches_in_flight` chunks ahead)
//!        → CLIP on its own thread (GPU when present) → RecordBatch → Lance writer
//!        (uncommitted fragments) → commit rejects, then rows, each once per shard
//! ```
//! Every hand-off is a bounded channel or a bounded `buffered` window, so memory is set by
//! the config, not by the size of the input. A shard becomes visible in one commit carrying
//! its id; the [`crate::ledger`] refuses a second commit of the same shard, so a rerun after
//! `kill -9`, or a duplicated worker, never duplicates a row.

mod deadline;

use crate::clip::{l2_normalize, ClipSettings, LoadedClip};
use crate::retry::RetryPlan;
use crate::table::{
    embeddings_schema, embeddings_schema_with, rejects_schema, Reject, ShardWriter, ShardedTable,
};
use crate::{IndexerError, Result};
use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::{
    ArrayRef, FixedSizeListArray, Float32Array, Float64Array, RecordBatch, StringArray,
    UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, SchemaRef};
use deadline::{Deadline, Outcome, Overdue};
use futures::StreamExt;
use knn_datasets::resize::{resize_and_center_crop, Filter};
use knn_datasets::stored::StoredFormat;
use knn_datasets::{
    assign_shards, decode_image, list_shards, read_shard, shard_schema, DatasetError, DecodeLimits,
    ListOptions, RawRecord, ReaderOptions, RejectReason, Shard, ShardFormat, SourceLocation,
    StorageConfig, TextColumn,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Where the images come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// URL of the source: `s3://bucket/prefix/`, `gs://…`, `az://…`, `file:///…`, a local
    /// path, or `memory://name/`.
    pub url: String,
    /// Layout: `parquet` (img2dataset), `webdataset` (.tar) or `folder`.
    pub format: ShardFormat,
    /// Parquet: the binary image column.
    #[serde(default = "default_image_column")]
    pub image_column: String,
    /// Parquet: the key column (row number when empty).
    #[serde(default = "default_key_column")]
    pub key_column: Option<String>,
    /// Folder sources: images per shard (a shard is a slice of one directory).
    #[serde(default = "default_folder_shard_size")]
    pub folder_shard_size: usize,
    /// Parquet: source columns carried into the table beside each embedding (LAION's
    /// `aesthetic`, `similarity`, a `caption`). Typed from the first shard: numbers become
    /// nullable Float64 columns, strings nullable Utf8. A record whose value does not fit
    /// the type is rejected (`bad_column`), naming the column.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Local folder sources: read symlinks whose target is outside the source URL (a
    /// symlink farm over a shared pool). Off (the default), each such link is a counted
    /// `unsafe_path` reject; links inside the source are read either way, and a dangling
    /// link is always a `not_a_file` reject.
    #[serde(default)]
    pub follow_symlinks: bool,
}

fn default_image_column() -> String {
    "jpg".into()
}
fn default_key_column() -> Option<String> {
    Some("key".into())
}
fn default_folder_shard_size() -> usize {
    1000
}

/// Where the tables go and what the stored image looks like.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// URL of the embeddings Lance table.
    pub table: String,
    /// URL of the rejects table; default: the table URL with `-rejects` before `.lance`.
    #[serde(default)]
    pub rejects_table: Option<String>,
    /// Side of the stored training image in pixels (center-cropped square).
    #[serde(default = "default_image_size")]
    pub image_size_px: u32,
    /// Filter for the stored image: `lanczos`, `bicubic` or `bilinear`.
    #[serde(default = "default_filter")]
    pub resize_filter: Filter,
    /// Encoding of the stored image: `png` (lossless), `jpeg` (lossy, at `jpeg_quality`),
    /// `webp` (lossless) or `raw` (binary PPM, nothing to encode). BENCHMARKS.md measures the
    /// bytes and time of each.
    #[serde(default)]
    pub image_format: StoredFormat,
    /// JPEG quality, 1–100, when `image_format = "jpeg"`.
    #[serde(default = "default_jpeg_quality")]
    pub jpeg_quality: u8,
}

fn default_jpeg_quality() -> u8 {
    90
}

fn default_image_size() -> u32 {
    64
}
fn default_filter() -> Filter {
    Filter::Lanczos
}

impl OutputConfig {
    /// The rejects table URL.
    pub fn rejects_url(&self) -> String {
        self.rejects_table
            .clone()
            .unwrap_or_else(|| crate::table::sibling_uri(&self.table, "rejects"))
    }
}

/// Limits on each record.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// Largest width x height accepted (checked from the header, before decoding).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Largest encoded record in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// RGB colour transparent pixels are flattened onto.
    #[serde(default = "default_background")]
    pub background: [u8; 3],
    /// Decode a JPEG at 1/2, 1/4 or 1/8 of its size (in the IDCT, several times faster) when
    /// both sides stay at least the CLIP input and the stored image: what Pillow's `draft()`
    /// does. `false` decodes every JPEG at full size, which is what HF's
    /// `CLIPImageProcessor` sees (embeddings then match a Python pipeline without `draft`).
    #[serde(default = "default_true")]
    pub jpeg_draft: bool,
    /// Longest one record may take to decode, resize and preprocess, in milliseconds (0: no
    /// limit). A record over it is a `timeout` reject and the worker goes on; its decoder
    /// finishes on a thread of its own and the result is dropped. Memory is bounded by
    /// `max_pixels`, checked from the header before decoding.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    20_000
}

fn default_true() -> bool {
    true
}

fn default_max_pixels() -> u64 {
    // Pillow's MAX_IMAGE_PIXELS: the usual bound on untrusted web images.
    89_478_485
}
fn default_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_background() -> [u8; 3] {
    [255, 255, 255]
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            max_pixels: default_max_pixels(),
            max_bytes: default_max_bytes(),
            background: default_background(),
            jpeg_draft: default_true(),
            timeout_ms: default_timeout_ms(),
        }
    }
}

/// Concurrency of the pipeline.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Shards read and written at once.
    #[serde(default = "default_shards_in_flight")]
    pub shards_in_flight: usize,
    /// Threads decoding and resizing (0: one per CPU core).
    #[serde(default)]
    pub decode_threads: usize,
    /// Decoded batches kept ready ahead of CLIP, per shard.
    #[serde(default = "default_batches_in_flight")]
    pub batches_in_flight: usize,
    /// Stop after this many shards (0: no limit); for trials and benchmarks.
    #[serde(default)]
    pub max_shards: usize,
}

fn default_shards_in_flight() -> usize {
    2
}
fn default_batches_in_flight() -> usize {
    3
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            shards_in_flight: default_shards_in_flight(),
            decode_threads: 0,
            batches_in_flight: default_batches_in_flight(),
            max_shards: 0,
        }
    }
}

/// The embed stage's config (`[embed]` in the config file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedConfig {
    /// The source.
    pub source: SourceConfig,
    /// The output tables.
    pub output: OutputConfig,
    /// The CLIP model.
    #[serde(default)]
    pub clip: ClipSettings,
    /// Per-record limits.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Concurrency.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// A shard whose container breaks part way (a truncated tar, a parquet file with a bad
    /// footer or page) commits the records read before the break and one `corrupt_shard`
    /// reject for the unread rest, once: reruns skip it. `false` fails such a shard
    /// instead, and every rerun tries it again (to repair the file and read it whole). A
    /// store error in the middle of a shard is never salvaged: that shard fails and is
    /// retried.
    #[serde(default = "default_true")]
    pub salvage_corrupt_shards: bool,
    /// Embed again only the records earlier runs rejected (`embed --retry-rejects`, not a
    /// config key): see [`crate::retry`].
    #[serde(skip)]
    pub retry_rejects: bool,
}

/// Live counters of a running embed, for progress display.
#[derive(Debug, Default)]
pub struct EmbedProgress {
    /// Shards this worker has to do (after skipping committed ones).
    pub shards_todo: AtomicU64,
    /// Shards finished (committed, found committed, or failed).
    pub shards_finished: AtomicU64,
    /// Images embedded.
    pub images_ok: AtomicU64,
    /// Records rejected.
    pub images_rejected: AtomicU64,
}

/// What a run did (also written by `--summary-json` and read back by `bench embed`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EmbedSummary {
    /// Worker index and count.
    pub worker: (usize, usize),
    /// Shards assigned to this worker.
    pub shards_assigned: usize,
    /// Shards committed by this run.
    pub shards_committed: usize,
    /// Shards skipped because an earlier run had committed them.
    pub shards_skipped: usize,
    /// Shards another process committed while this run worked on them (work discarded).
    pub shards_raced: usize,
    /// Shards that failed, with the reason; they stay uncommitted for a rerun.
    pub shards_failed: Vec<(String, String)>,
    /// Whether this was an `embed --retry-rejects` run (its shards are retries).
    pub retry_rejects: bool,
    /// Under `--retry-rejects`: rejects left alone because a retry meets them again
    /// (`corrupt_shard`, `duplicate_key`, `id_collision`).
    pub rejects_not_retried: u64,
    /// Why the run stopped before its last shard: the output cannot be written (disk full,
    /// read-only, permission denied), so every later shard would fail the same way.
    pub stopped: Option<String>,
    /// Images embedded and committed.
    pub images_ok: u64,
    /// Rejected records by reason code.
    pub rejected: BTreeMap<String, u64>,
    /// A few rejected records: (id, key, shard, reason).
    pub reject_examples: Vec<(u64, String, String, String)>,
    /// Wall time of the run.
    pub elapsed_s: f64,
    /// Summed time decode workers were busy.
    pub decode_busy_s: f64,
    /// Time the CLIP thread was busy.
    pub model_busy_s: f64,
    /// The CLIP that made the embeddings.
    pub clip: String,
    /// Embedding dimension.
    pub dim: usize,
    /// URL of the embeddings table.
    pub table: String,
    /// URL of the rejects table.
    pub rejects_table: String,
    /// Peak resident memory of this process, MiB (Linux).
    pub peak_rss_mib: Option<f64>,
}

impl EmbedSummary {
    /// Counts a committed shard: `ok` rows and its `rejects` (a few kept as examples).
    fn committed(&mut self, ok: u64, rejects: Vec<Reject>) {
        self.shards_committed += 1;
        self.images_ok += ok;
        for r in rejects {
            *self.rejected.entry(r.code.clone()).or_default() += 1;
            if self.reject_examples.len() < 10 {
                let why = format!("{}: {}", r.code, r.detail);
                self.reject_examples.push((r.id, r.key, r.shard, why));
            }
        }
    }

    /// Records rejected in all.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// End-to-end images per second.
    pub fn images_per_s(&self) -> f64 {
        self.images_ok as f64 / self.elapsed_s.max(1e-9)
    }
}

impl fmt::Display for EmbedSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "embed summary (worker {} of {}, CLIP {}, d = {})",
            self.worker.0, self.worker.1, self.clip, self.dim
        )?;
        writeln!(
            f,
            "  output: {} (rejects: {})",
            self.table, self.rejects_table
        )?;
        writeln!(
            f,
            "  shards: {} assigned, {} committed, {} skipped (already done), {} done elsewhere meanwhile, {} failed",
            self.shards_assigned,
            self.shards_committed,
            self.shards_skipped,
            self.shards_raced,
            self.shards_failed.len()
        )?;
        if self.retry_rejects {
            writeln!(
                f,
                "  retrying rejects: the shards are source shards with open rejects; {} rejects \
                 left alone (corrupt_shard, duplicate_key, id_collision: a retry meets them again)",
                self.rejects_not_retried
            )?;
        }
        writeln!(
            f,
            "  images: {} ok, {} rejected{}",
            self.images_ok,
            self.rejected_total(),
            if self.rejected.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    self.rejected
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )?;
        for (id, key, shard, reason) in &self.reject_examples {
            writeln!(
                f,
                "    rejected id {id} key `{key}` in shard `{shard}`: {reason}"
            )?;
        }
        for (shard, reason) in &self.shards_failed {
            writeln!(f, "  FAILED shard `{shard}`: {reason}")?;
        }
        if self.stopped.is_some() {
            let left = self.shards_assigned
                - self.shards_committed
                - self.shards_skipped
                - self.shards_raced
                - self.shards_failed.len();
            writeln!(
                f,
                "  STOPPED: the output cannot be written; {left} shards not started"
            )?;
        }
        write!(
            f,
            "  time: {:.1} s, {:.1} img/s end to end; CLIP busy {:.1} s, decode busy {:.1} s{}",
            self.elapsed_s,
            self.images_per_s(),
            self.model_busy_s,
            self.decode_busy_s,
            self.peak_rss_mib
                .map(|m| format!("; peak RSS {m:.0} MiB"))
                .unwrap_or_default()
        )
    }
}

/// A chunk of decoded records waiting for CLIP.
struct DecodedChunk {
    ids: Vec<u64>,
    keys: Vec<String>,
    shard: String,
    images: Vec<Vec<u8>>,
    sizes: Vec<(u32, u32)>,
    pixels: Vec<f32>,
    /// Per carried column, the kept records' values.
    carried: Vec<Vec<Cell>>,
    rejects: Vec<Reject>,
}

struct ModelJob {
    pixels: Vec<f32>,
    n: usize,
    reply: oneshot::Sender<std::result::Result<Vec<f32>, String>>,
}

/// What embed makes of one image: the stored training image and CLIP's input.
#[derive(Clone, Debug)]
pub struct ImagePrep {
    /// Limits on each record, and the JPEG draft size.
    pub limits: DecodeLimits,
    /// Side of the stored image.
    pub stored_px: u32,
    /// Filter of the stored image.
    pub filter: Filter,
    /// Encoding of the stored image.
    pub format: StoredFormat,
    /// JPEG quality of the stored image.
    pub jpeg_quality: u8,
    /// CLIP's preprocessing.
    pub processor: crate::clip::ClipImageProcessor,
}

impl ImagePrep {
    /// The preparation `cfg` asks for with CLIP's `processor`. A JPEG is drafted (decoded at
    /// a fraction of its size) to no less than both the CLIP input and the stored image.
    pub fn new(cfg: &EmbedConfig, processor: crate::clip::ClipImageProcessor) -> Self {
        let draft = match (cfg.decode.jpeg_draft, processor.draft_side()) {
            (true, Some(side)) => side.max(cfg.output.image_size_px),
            _ => 0,
        };
        ImagePrep {
            limits: DecodeLimits {
                max_pixels: cfg.decode.max_pixels,
                max_bytes: cfg.decode.max_bytes,
                background: cfg.decode.background,
                jpeg_draft_px: draft,
            },
            stored_px: cfg.output.image_size_px,
            filter: cfg.output.resize_filter,
            format: cfg.output.image_format,
            jpeg_quality: cfg.output.jpeg_quality,
            processor,
        }
    }

    /// Decodes `bytes`, appends CLIP's input to `pixels` (only on success), and returns the
    /// original (width, height) and the stored image's bytes.
    pub fn prepare(
        &self,
        bytes: &[u8],
        pixels: &mut Vec<f32>,
    ) -> std::result::Result<((u32, u32), Vec<u8>), RejectReason> {
        let img = decode_image(bytes, &self.limits)?;
        let small = resize_and_center_crop(&img.rgb, self.stored_px, self.filter);
        let stored = self
            .format
            .encode(&small, self.jpeg_quality)
            .map_err(|detail| RejectReason::Corrupt { detail })?;
        self.processor.preprocess_into(&img.rgb, pixels);
        Ok(((img.width, img.height), stored))
    }
}

/// Everything a shard task needs, shared.
struct Stage {
    cfg: EmbedConfig,
    source: SourceLocation,
    reader: ReaderOptions,
    /// Shared with decodes that ran past `timeout_ms` (which must not keep the stage alive).
    prep: Arc<ImagePrep>,
    /// Decodes given up on and still running.
    overdue: Arc<Overdue>,
    images: ShardedTable,
    rejects: ShardedTable,
    schema: SchemaRef,
    /// `embed.source.columns`, typed, in the schema after `emb`.
    carried: Vec<Field>,
    dim: usize,
    model_tx: mpsc::Sender<ModelJob>,
    decode_permits: Semaphore,
    decode_busy_ns: AtomicU64,
    progress: Arc<EmbedProgress>,
}

enum ShardOutcome {
    Committed { ok: u64, rejects: Vec<Reject> },
    Raced,
}

/// Runs CLIP on its own thread: batches in, L2-normalised embeddings out.
fn spawn_model(
    clip: LoadedClip,
    device: Device,
    side: usize,
    busy_ns: Arc<AtomicU64>,
) -> Result<(mpsc::Sender<ModelJob>, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<ModelJob>(2);
    let handle = std::thread::Builder::new()
        .name("clip".into())
        .spawn(move || {
            let kind = clip.vs.kind();
            while let Some(job) = rx.blocking_recv() {
                let start = Instant::now();
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    tch::no_grad(|| {
                        let x = Tensor::from_slice(&job.pixels)
                            .view([job.n as i64, 3, side as i64, side as i64])
                            .to_device(device)
                            .to_kind(kind);
                        let e = l2_normalize(&clip.model.image_features(&x).to_kind(Kind::Float))
                            .to_device(Device::Cpu)
                            .contiguous()
                            .view([-1]);
                        Vec::<f32>::try_from(&e).map_err(|e| e.to_string())
                    })
                }))
                .unwrap_or_else(|panic| {
                    Err(panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "CLIP forward pass panicked".into()))
                });
                busy_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                let _ = job.reply.send(out);
            }
        })
        .map_err(|e| IndexerError::Internal(format!("cannot start the CLIP thread: {e}")))?;
    Ok((tx, handle))
}

/// The columns `embed.source.columns` carries into the table, typed from `first` shard's
/// schema: numbers as Float64, strings as Utf8, both nullable.
async fn carried_columns(
    cfg: &SourceConfig,
    source: &SourceLocation,
    first: Option<&Shard>,
) -> Result<Vec<Field>> {
    const KEY: &str = "embed.source.columns";
    let (Some(first), false) = (first, cfg.columns.is_empty()) else {
        return Ok(Vec::new());
    };
    let schema = shard_schema(source, first, KEY).await?;
    let own = embeddings_schema(1, "");
    let own: Vec<&str> = own.fields().iter().map(|f| f.name().as_str()).collect();
    let mut seen = std::collections::BTreeSet::new();
    cfg.columns
        .iter()
        .map(|name| {
            let bad = |reason: String| IndexerError::Config {
                key: KEY.into(),
                reason,
            };
            if own.contains(&name.as_str()) || !seen.insert(name) {
                return Err(bad(format!(
                    "`{name}` is listed twice or is one of the table's own columns ({})",
                    own.join(", ")
                )));
            }
            let field = schema
                .field_with_name(name)
                .map_err(|_| DatasetError::missing_column(&first.id, name, &schema, KEY))?;
            let kind = match field.data_type() {
                DataType::Int32
                | DataType::Int64
                | DataType::UInt64
                | DataType::Float32
                | DataType::Float64 => DataType::Float64,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
                other => {
                    return Err(bad(format!(
                        "column `{name}` of shard `{}` has type {other}; only numbers \
                         (int32, int64, uint64, float32, float64) and strings are carried",
                        first.id
                    )))
                }
            };
            Ok(Field::new(name, kind, true))
        })
        .collect()
}

/// One carried value, typed by its column.
#[derive(Clone, Debug)]
enum Cell {
    Number(Option<f64>),
    Text(Option<String>),
}

/// A record's carried values typed by their columns, or why one does not fit (a reject
/// detail).
fn carried_cells(carried: &[Field], values: Vec<Option<String>>) -> Result<Vec<Cell>, String> {
    carried
        .iter()
        .zip(values)
        .map(|(f, v)| match (f.data_type(), v) {
            (DataType::Float64, Some(v)) => {
                v.parse().map(|x| Cell::Number(Some(x))).map_err(|_| {
                    format!(
                        "column `{}` is {v:?}, not a number (the table's column is Float64, typed \
                     from the first shard)",
                        f.name()
                    )
                })
            }
            (DataType::Float64, None) => Ok(Cell::Number(None)),
            (_, v) => Ok(Cell::Text(v)),
        })
        .collect()
}

/// Runs the embed stage for worker `worker` of `workers`.
pub async fn embed(
    cfg: &EmbedConfig,
    storage: &StorageConfig,
    worker: (usize, usize),
    progress: Arc<EmbedProgress>,
) -> Result<EmbedSummary> {
    let started = Instant::now();
    check_settings(cfg)?;
    let source = SourceLocation::open(&cfg.source.url, storage)?;
    let listing = ListOptions {
        folder_shard_size: cfg.source.folder_shard_size,
        follow_symlinks: cfg.source.follow_symlinks,
        config_prefix: "embed.source".into(),
    };
    let all = list_shards(&source, cfg.source.format, &listing).await?;
    let carried = carried_columns(&cfg.source, &source, all.first()).await?;
    let mut mine = assign_shards(all, worker.0, worker.1)?;
    if cfg.pipeline.max_shards > 0 {
        mine.truncate(cfg.pipeline.max_shards);
    }

    let device = cfg.clip.device()?;
    let (clip, identity) = cfg.clip.load(storage, device).await?;
    let dim = clip.model.config().projection_dim as usize;
    let processor = clip.processor.clone();
    let (w, h) = processor.output_size(1, 1);
    if w != h {
        return Err(IndexerError::Config {
            key: "preprocessor_config.json crop_size".into(),
            reason: format!("CLIP input must be square, got {w}x{h}"),
        });
    }
    let schema = embeddings_schema_with(dim as i32, &identity, &carried);
    let images = ShardedTable::open_or_create(&cfg.output.table, schema.clone(), storage).await?;
    let rejects =
        ShardedTable::open_or_create(&cfg.output.rejects_url(), rejects_schema(), storage).await?;
    images.refresh_ledger().await?;
    rejects.refresh_ledger().await?;

    let mut summary = EmbedSummary {
        worker,
        shards_assigned: mine.len(),
        clip: identity,
        dim,
        table: cfg.output.table.clone(),
        rejects_table: cfg.output.rejects_url(),
        ..Default::default()
    };
    let todo = work_list(cfg, &images, &rejects, mine, &mut summary).await?;
    progress
        .shards_todo
        .store(todo.len() as u64, Ordering::Relaxed);
    tracing::info!(
        worker = %format!("{} of {}", worker.0, worker.1),
        assigned = summary.shards_assigned,
        skipped = summary.shards_skipped,
        device = ?device,
        "embedding into {}",
        cfg.output.table
    );

    let model_busy = Arc::new(AtomicU64::new(0));
    let (model_tx, model_thread) = spawn_model(clip, device, w as usize, model_busy.clone())?;
    let decode_threads = match cfg.pipeline.decode_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let stage = Arc::new(Stage {
        cfg: cfg.clone(),
        reader: ReaderOptions {
            image_column: cfg.source.image_column.clone(),
            key_column: cfg.source.key_column.clone().filter(|k| !k.is_empty()),
            max_record_bytes: cfg.decode.max_bytes,
            config_prefix: "embed.source".into(),
            salvage_corrupt_shards: cfg.salvage_corrupt_shards,
            text_columns: carried
                .iter()
                .map(|f| TextColumn {
                    name: f.name().clone(),
                    config_key: "embed.source.columns".into(),
                })
                .collect(),
            ..Default::default()
        },
        prep: Arc::new(ImagePrep::new(cfg, processor)),
        // A hung decoder keeps its thread; a few may, not one per record of a bad shard.
        overdue: Overdue::new((2 * decode_threads).max(4)),
        source,
        images,
        rejects,
        schema,
        carried,
        dim,
        model_tx,
        decode_permits: Semaphore::new(decode_threads),
        decode_busy_ns: AtomicU64::new(0),
        progress: progress.clone(),
    });

    run_shards(&stage, todo, cfg.pipeline.shards_in_flight, &mut summary).await;
    let decode_busy_ns = stage.decode_busy_ns.load(Ordering::Relaxed);
    drop(stage); // closes the model channel
    model_thread
        .join()
        .map_err(|_| IndexerError::Internal("CLIP thread panicked".into()))?;
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.decode_busy_s = decode_busy_ns as f64 / 1e9;
    summary.model_busy_s = model_busy.load(Ordering::Relaxed) as f64 / 1e9;
    summary.peak_rss_mib = peak_rss_mib();
    Ok(summary)
}

/// Refuses settings no run can use, naming the key.
fn check_settings(cfg: &EmbedConfig) -> Result<()> {
    let refuse = |key: &str, reason: String| {
        Err(IndexerError::Config {
            key: key.into(),
            reason,
        })
    };
    if cfg.clip.batch_size == 0 {
        return refuse("embed.clip.batch_size", "must be at least 1".into());
    }
    if cfg.output.image_size_px == 0 {
        return refuse("embed.output.image_size_px", "must be at least 1".into());
    }
    if !(1..=100).contains(&cfg.output.jpeg_quality) {
        let q = cfg.output.jpeg_quality;
        return refuse(
            "embed.output.jpeg_quality",
            format!("{q} is not in 1..=100"),
        );
    }
    Ok(())
}

/// The shards this run embeds, of this worker's `mine`: those not yet committed, or with
/// `--retry-rejects` the retries of their open rejects (each shard with its [`RetryPlan`]).
/// Counts the assigned, skipped and not-retried in `summary`.
async fn work_list(
    cfg: &EmbedConfig,
    images: &ShardedTable,
    rejects: &ShardedTable,
    mine: Vec<Shard>,
    summary: &mut EmbedSummary,
) -> Result<Vec<(Shard, Option<RetryPlan>)>> {
    let todo: Vec<(Shard, Option<RetryPlan>)> = if cfg.retry_rejects {
        let (plans, not_retried) = crate::retry::plan(images, rejects, mine).await?;
        summary.shards_assigned = plans.len();
        summary.rejects_not_retried = not_retried;
        summary.retry_rejects = true;
        plans
            .into_iter()
            .filter(|(_, p)| !images.is_committed(&p.id))
            .map(|(s, p)| (s, Some(p)))
            .collect()
    } else {
        mine.into_iter()
            .filter(|s| !images.is_committed(s.id.as_str()))
            .map(|s| (s, None))
            .collect()
    };
    summary.shards_skipped = summary.shards_assigned - todo.len();
    if !todo.is_empty() && !images.added_columns().is_empty() {
        return Err(IndexerError::SchemaMismatch {
            table: cfg.output.table.clone(),
            detail: format!(
                "{} shards are new, but the table has columns added after embedding ({}), \
                 which new rows would lack; embed them into a new `embed.output.table`",
                todo.len(),
                images.added_columns().join(", ")
            ),
        });
    }
    Ok(todo)
}

/// Embeds and commits `todo`, `in_flight` shards at a time, into `summary`; stops starting
/// shards at the first that finds its output unwritable.
async fn run_shards(
    stage: &Arc<Stage>,
    todo: Vec<(Shard, Option<RetryPlan>)>,
    in_flight: usize,
    summary: &mut EmbedSummary,
) {
    let mut results = futures::stream::iter(todo)
        .map(|(shard, retry)| {
            let stage = stage.clone();
            async move {
                let id = retry
                    .as_ref()
                    .map_or(shard.id.to_string(), |p| p.id.clone());
                let out = tokio::spawn(process_shard(stage.clone(), shard, retry))
                    .await
                    .map_err(|e| IndexerError::Internal(format!("shard task died: {e}")))
                    .and_then(|r| r);
                stage
                    .progress
                    .shards_finished
                    .fetch_add(1, Ordering::Relaxed);
                (id, out)
            }
        })
        .buffer_unordered(in_flight.max(1));
    while let Some((shard, outcome)) = results.next().await {
        match outcome {
            Ok(ShardOutcome::Committed { ok, rejects }) => summary.committed(ok, rejects),
            Ok(ShardOutcome::Raced) => summary.shards_raced += 1,
            Err(e) => {
                tracing::error!(shard = %shard, "shard failed: {e}");
                let stop = e.is_unwritable();
                summary.shards_failed.push((shard, e.to_string()));
                if stop {
                    summary.stopped = Some(e.to_string());
                    break;
                }
            }
        }
    }
}

/// Reads, embeds and commits one shard.
/// With `retry`, only the records it names are read, and the shard commits as the retry's.
async fn process_shard(
    stage: Arc<Stage>,
    shard: Shard,
    retry: Option<RetryPlan>,
) -> Result<ShardOutcome> {
    let shard_id = retry
        .as_ref()
        .map_or(shard.id.to_string(), |p| p.id.clone());
    let ds = Arc::new(stage.images.open().await?);
    let batch = stage.cfg.clip.batch_size;
    let ahead = stage.cfg.pipeline.batches_in_flight.max(1);
    let wanted = retry.clone().map(Arc::new);
    let seen = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let (w, s) = (wanted.clone(), seen.clone());
    let mut chunks = read_shard(&stage.source, &shard, &stage.reader)
        .filter(move |r| {
            let keep = match (&w, r) {
                (Some(plan), Ok(rec)) => {
                    let keep = plan.keys.contains_key(&rec.key);
                    if keep {
                        s.lock().expect("seen keys").insert(rec.key.clone());
                    }
                    keep
                }
                _ => true,
            };
            std::future::ready(keep)
        })
        .chunks(batch)
        .map(|records| decode_chunk(stage.clone(), records))
        .buffered(ahead)
        .map(|decoded| embed_chunk(stage.clone(), decoded))
        .buffered(2);

    let mut writer = ShardWriter::new(&stage.images, ds.clone());
    let mut ok = 0u64;
    let mut rejects = Vec::new();
    while let Some(item) = chunks.next().await {
        let (rows, rej) = item?;
        stage
            .progress
            .images_rejected
            .fetch_add(rej.len() as u64, Ordering::Relaxed);
        rejects.extend(rej);
        if rows.num_rows() == 0 {
            continue;
        }
        ok += rows.num_rows() as u64;
        stage
            .progress
            .images_ok
            .fetch_add(rows.num_rows() as u64, Ordering::Relaxed);
        writer.write(rows).await?;
    }
    drop(chunks);
    let images_txn = writer.finish().await?;

    // A retry's rows: failures again under its shard id, and `retried` marks; the run
    // counts everything but the marks.
    let rejects = match &wanted {
        Some(plan) => plan.reject_rows(&shard.id, rejects, &seen.lock().expect("seen keys")),
        None => rejects,
    };
    stage.rejects.commit_rejects(&shard_id, &rejects).await?;
    let committed = stage.images.commit_shard(ds, &shard_id, images_txn).await?;
    if !committed {
        tracing::warn!(shard = %shard_id, "shard was committed by another process meanwhile; this run's copy is discarded");
        return Ok(ShardOutcome::Raced);
    }
    let rejects: Vec<Reject> = rejects
        .into_iter()
        .filter(|r| r.code != crate::retry::RETRIED)
        .collect();
    tracing::info!(shard = %shard_id, ok, rejected = rejects.len(), "shard committed");
    Ok(ShardOutcome::Committed { ok, rejects })
}

/// Decodes, resizes and preprocesses a chunk on the blocking pool.
async fn decode_chunk(
    stage: Arc<Stage>,
    records: Vec<knn_datasets::Result<RawRecord>>,
) -> Result<DecodedChunk> {
    let records: Vec<RawRecord> = records.into_iter().collect::<std::result::Result<_, _>>()?;
    let _permit = stage
        .decode_permits
        .acquire()
        .await
        .map_err(|e| IndexerError::Internal(e.to_string()))?;
    let st = stage.clone();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let out = decode_records(&st, records);
        st.decode_busy_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    })
    .await
    .map_err(|e| IndexerError::Internal(format!("decode task died: {e}")))?
}

fn decode_records(stage: &Stage, records: Vec<RawRecord>) -> Result<DecodedChunk> {
    let shard = records
        .first()
        .map(|r| r.shard.to_string())
        .unwrap_or_default();
    let mut chunk = DecodedChunk {
        ids: Vec::with_capacity(records.len()),
        keys: Vec::with_capacity(records.len()),
        shard: shard.clone(),
        images: Vec::with_capacity(records.len()),
        sizes: Vec::with_capacity(records.len()),
        pixels: Vec::new(),
        carried: vec![Vec::with_capacity(records.len()); stage.carried.len()],
        rejects: Vec::new(),
    };
    let (side_w, side_h) = stage.prep.processor.output_size(1, 1);
    chunk
        .pixels
        .reserve(records.len() * 3 * side_w as usize * side_h as usize);
    let timeout_ms = stage.cfg.decode.timeout_ms;
    let mut deadline = (timeout_ms > 0)
        .then(|| Deadline::new(Duration::from_millis(timeout_ms), stage.overdue.clone()));
    for rec in records {
        let cells = match carried_cells(&stage.carried, rec.text) {
            Ok(cells) => cells,
            Err(detail) => {
                chunk.rejects.push(Reject {
                    id: rec.id,
                    key: rec.key,
                    shard: shard.clone(),
                    code: "bad_column".into(),
                    detail,
                });
                continue;
            }
        };
        let prepared = match (rec.payload, deadline.as_mut()) {
            (Err(why), _) => Err(why),
            (Ok(bytes), None) => stage.prep.prepare(&bytes, &mut chunk.pixels),
            (Ok(bytes), Some(deadline)) => {
                let prep = stage.prep.clone();
                let job = move || {
                    let mut pixels = Vec::new();
                    prep.prepare(&bytes, &mut pixels)
                        .map(|(size, stored)| (size, stored, pixels))
                };
                match deadline.run(job) {
                    Outcome::Done(Ok((size, stored, pixels))) => {
                        chunk.pixels.extend_from_slice(&pixels);
                        Ok((size, stored))
                    }
                    Outcome::Done(Err(why)) => Err(why),
                    Outcome::TimedOut => Err(RejectReason::Timeout {
                        detail: format!(
                            "decoding took longer than embed.decode.timeout_ms = {timeout_ms}"
                        ),
                    }),
                    Outcome::Panicked(why) => Err(RejectReason::Corrupt {
                        detail: format!("the decoder failed: {why}"),
                    }),
                    Outcome::Stalled(running) => {
                        return Err(IndexerError::DecodeStalled {
                            shard,
                            key: rec.key,
                            running,
                            max: stage.overdue.max(),
                            timeout_ms,
                        })
                    }
                }
            }
        };
        match prepared {
            Ok((size, stored)) => {
                chunk.ids.push(rec.id);
                chunk.keys.push(rec.key);
                chunk.images.push(stored);
                chunk.sizes.push(size);
                for (column, cell) in chunk.carried.iter_mut().zip(cells) {
                    column.push(cell);
                }
            }
            Err(reason) => {
                tracing::debug!(id = rec.id, key = %rec.key, shard = %shard, reason = reason.code(), "rejected: {}", reason.detail());
                chunk.rejects.push(Reject {
                    id: rec.id,
                    key: rec.key,
                    shard: shard.clone(),
                    code: reason.code().to_string(),
                    detail: reason.detail(),
                });
            }
        }
    }
    Ok(chunk)
}

/// Sends a decoded chunk through CLIP and assembles the table rows.
async fn embed_chunk(
    stage: Arc<Stage>,
    decoded: Result<DecodedChunk>,
) -> Result<(RecordBatch, Vec<Reject>)> {
    let mut chunk = decoded?;
    let n = chunk.ids.len();
    let embs = if n == 0 {
        Vec::new()
    } else {
        let (reply, rx) = oneshot::channel();
        let pixels = std::mem::take(&mut chunk.pixels);
        stage
            .model_tx
            .send(ModelJob { pixels, n, reply })
            .await
            .map_err(|_| IndexerError::Internal("CLIP thread stopped".into()))?;
        rx.await
            .map_err(|_| IndexerError::Internal("CLIP thread stopped".into()))?
            .map_err(|e| IndexerError::Internal(format!("CLIP forward pass failed: {e}")))?
    };
    let batch = rows_batch(&stage.schema, &stage.carried, stage.dim, &chunk, embs)?;
    Ok((batch, chunk.rejects))
}

fn rows_batch(
    schema: &SchemaRef,
    carried: &[Field],
    dim: usize,
    chunk: &DecodedChunk,
    embs: Vec<f32>,
) -> Result<RecordBatch> {
    let n = chunk.ids.len();
    let mut keys = StringBuilder::new();
    let mut shards = StringBuilder::new();
    let mut images = BinaryBuilder::new();
    for i in 0..n {
        keys.append_value(&chunk.keys[i]);
        shards.append_value(&chunk.shard);
        images.append_value(&chunk.images[i]);
    }
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let emb =
        FixedSizeListArray::try_new(item, dim as i32, Arc::new(Float32Array::from(embs)), None)
            .map_err(|e| IndexerError::Internal(format!("embedding batch: {e}")))?;
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(chunk.ids.clone())),
        Arc::new(keys.finish()),
        Arc::new(shards.finish()),
        Arc::new(images.finish()),
        Arc::new(UInt32Array::from_iter_values(
            chunk.sizes.iter().map(|s| s.0),
        )),
        Arc::new(UInt32Array::from_iter_values(
            chunk.sizes.iter().map(|s| s.1),
        )),
        Arc::new(emb),
    ];
    for (field, cells) in carried.iter().zip(&chunk.carried) {
        let column: ArrayRef = match field.data_type() {
            DataType::Float64 => Arc::new(Float64Array::from_iter(cells.iter().map(|c| match c {
                Cell::Number(x) => *x,
                Cell::Text(_) => None,
            }))),
            _ => Arc::new(StringArray::from_iter(cells.iter().map(|c| match c {
                Cell::Text(t) => t.as_deref(),
                Cell::Number(_) => None,
            }))),
        };
        columns.push(column);
    }
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| IndexerError::Internal(format!("row batch: {e}")))
}

/// Peak resident set size of this process in MiB (`VmHWM`), where /proc exists.
pub fn peak_rss_mib() -> Option<f64> {
    proc_status_mib("VmHWM:")
}

/// A size field of `/proc/self/status` (`VmHWM:`, `VmRSS:`, …) in MiB (Linux only).
pub fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// How long to wait between progress log lines when no terminal shows a bar.
pub const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);
