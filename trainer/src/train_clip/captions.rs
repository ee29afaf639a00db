//! The captions table of a `train-clip` run: the captioned shards read once with the
//! datasets readers into `<output_dir>/captions.lance` (`id`, `key`, `shard`, `caption`,
//! `image`: a PNG already resized and cropped to the CLIP input), so training reads rows by
//! offset in any order, like the diffusion trainer reads its tables.
//!
//! Preparing is sharded over the ranks of the job and exactly once per shard (the table's
//! ledger, as for embed): a rerun or a resumed job skips the shards already in. A record that
//! cannot be used never stops the run: an image that does not decode, an empty caption or one
//! over `max_caption_chars` is written to `captions-rejects.lance` with its key and reason
//! and counted. A shard that fails as a whole (a missing caption column, a corrupt file) is
//! named; training refuses to start on part of the data, and the next run retries only it.

use super::config::TrainClipConfig;
use crate::parallel::DataParallel;
use crate::{Result, TrainerError};
use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::{ArrayRef, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use futures::StreamExt;
use knn_datasets::{
    assign_shards, decode_image, list_shards, read_shard, DecodeLimits, ListOptions, RawRecord,
    ReaderOptions, Shard, SourceLocation, SplitConfig, StorageConfig, TextColumn,
};
use knn_indexer::clip::ClipImageProcessor;
use knn_indexer::table::{rejects_schema, sibling_uri, Reject, ShardWriter, ShardedTable};
use lance::Dataset;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The captions table's schema.
pub fn captions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("shard", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
    ]))
}

/// What preparing the table did (this rank's part, and the table as a whole).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PrepareSummary {
    /// Shards of the source.
    pub shards: usize,
    /// Shards this rank committed now.
    pub committed: usize,
    /// Shards already in the table.
    pub skipped: usize,
    /// Records this rank wrote.
    pub rows_written: u64,
    /// Records this rank rejected, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// A few of them: (key, shard, reason).
    pub reject_examples: Vec<(String, String, String)>,
}

/// Reads the configured shards into the captions table (this rank's share), then waits for
/// the other ranks. Fails, naming the shard, if any shard could not be read.
pub async fn prepare(
    cfg: &TrainClipConfig,
    storage: &StorageConfig,
    processor: &ClipImageProcessor,
    dp: &mut DataParallel,
) -> Result<PrepareSummary> {
    let uri = table_uri(cfg);
    let table = ShardedTable::open_or_create(&uri, captions_schema(), storage).await?;
    let rejects =
        ShardedTable::open_or_create(&sibling_uri(&uri, "rejects"), rejects_schema(), storage)
            .await?;
    table.refresh_ledger().await?;
    rejects.refresh_ledger().await?;
    let source = SourceLocation::open(&cfg.data.url, storage)?;
    let listing = ListOptions {
        folder_shard_size: 1,
        follow_symlinks: false,
        config_prefix: "train_clip.data".into(),
    };
    let all = list_shards(&source, cfg.data.format, &listing).await?;
    let mut summary = PrepareSummary {
        shards: all.len(),
        ..Default::default()
    };
    let mine = assign_shards(all, dp.rank(), dp.world())?;
    let reader = ReaderOptions {
        image_column: cfg.data.image_column.clone(),
        key_column: Some(cfg.data.key_column.clone()),
        config_prefix: "train_clip.data".into(),
        text_columns: vec![TextColumn {
            name: cfg.data.caption_column.clone(),
            config_key: "train_clip.data.caption_column".into(),
        }],
        max_record_bytes: cfg.data.max_bytes,
        ..Default::default()
    };
    let ctx = Arc::new(ShardContext {
        source,
        reader,
        limits: DecodeLimits {
            max_pixels: cfg.data.max_pixels,
            max_bytes: cfg.data.max_bytes,
            background: [255, 255, 255],
            jpeg_draft_px: 0,
        },
        processor: processor.clone(),
        max_caption_chars: cfg.data.max_caption_chars,
        table,
        rejects,
    });
    let mut failed = Vec::new();
    for shard in mine {
        if ctx.table.is_committed(shard.id.as_str()) {
            summary.skipped += 1;
            continue;
        }
        let name = shard.id.to_string();
        match prepare_shard(ctx.clone(), shard).await {
            Ok((rows, rejected)) => {
                summary.committed += 1;
                summary.rows_written += rows;
                for r in rejected {
                    *summary.rejected.entry(r.code.clone()).or_default() += 1;
                    if summary.reject_examples.len() < 10 {
                        summary.reject_examples.push((
                            r.key,
                            r.shard,
                            format!("{}: {}", r.code, r.detail),
                        ));
                    }
                }
                tracing::info!(shard = %name, rows, "captions shard committed");
            }
            Err(e) => {
                tracing::error!(shard = %name, "captions shard failed: {e}");
                failed.push((name, e));
            }
        }
    }
    // Every rank has done its share (or failed) before any trains.
    let any_failed = dp.agree(0.0, !failed.is_empty(), false)?.stop;
    if let Some((shard, e)) = failed.into_iter().next() {
        return Err(TrainerError::PrepareFailed {
            shard,
            reason: e.to_string(),
        });
    }
    if any_failed {
        return Err(TrainerError::PrepareFailed {
            shard: "(on another rank)".into(),
            reason: "another rank could not read one of its shards; see its log".into(),
        });
    }
    Ok(summary)
}

/// `<output_dir>/captions.lance`.
pub fn table_uri(cfg: &TrainClipConfig) -> String {
    format!("{}/captions.lance", cfg.output_dir.trim_end_matches('/'))
}

struct ShardContext {
    source: SourceLocation,
    reader: ReaderOptions,
    limits: DecodeLimits,
    processor: ClipImageProcessor,
    max_caption_chars: usize,
    table: ShardedTable,
    rejects: ShardedTable,
}

/// Reads, converts and commits one shard: (rows written, rejects).
async fn prepare_shard(ctx: Arc<ShardContext>, shard: Shard) -> Result<(u64, Vec<Reject>)> {
    let shard_id = shard.id.to_string();
    let ds = Arc::new(ctx.table.open().await?);
    let mut writer = ShardWriter::new(&ctx.table, ds.clone());
    let mut chunks = read_shard(&ctx.source, &shard, &ctx.reader).chunks(128);
    let (mut rows, mut rejects) = (0u64, Vec::new());
    while let Some(records) = chunks.next().await {
        let records: Vec<RawRecord> = records.into_iter().collect::<std::result::Result<_, _>>()?;
        let c = ctx.clone();
        let (batch, rej) = tokio::task::spawn_blocking(move || convert(&c, records))
            .await
            .map_err(|e| TrainerError::Loader(format!("decode task died: {e}")))??;
        rejects.extend(rej);
        if batch.num_rows() > 0 {
            rows += batch.num_rows() as u64;
            writer.write(batch).await.map_err(TrainerError::Indexer)?;
        }
    }
    let txn = writer.finish().await?;
    ctx.rejects.commit_rejects(&shard_id, &rejects).await?;
    ctx.table.commit_shard(ds, &shard_id, txn).await?;
    Ok((rows, rejects))
}

/// Records → rows (image decoded, resized and cropped to the CLIP input, re-encoded as PNG)
/// and rejects.
fn convert(ctx: &ShardContext, records: Vec<RawRecord>) -> Result<(RecordBatch, Vec<Reject>)> {
    let (mut ids, mut keys, mut shards) = (Vec::new(), StringBuilder::new(), StringBuilder::new());
    let (mut captions, mut images) = (StringBuilder::new(), BinaryBuilder::new());
    let mut rejects = Vec::new();
    for rec in records {
        let caption = rec.text.first().cloned().flatten();
        let caption = caption.as_deref().map(str::trim).unwrap_or_default();
        let shard = rec.shard.to_string();
        let mut reject = |code: &str, detail: String| {
            rejects.push(Reject {
                id: rec.id,
                key: rec.key.clone(),
                shard: shard.clone(),
                code: code.into(),
                detail,
            })
        };
        if caption.is_empty() {
            reject("empty_caption", "the caption is empty or null".into());
            continue;
        }
        let chars = caption.chars().count();
        if chars > ctx.max_caption_chars {
            reject(
                "caption_too_long",
                format!(
                    "{chars} characters, over train_clip.data.max_caption_chars = {}",
                    ctx.max_caption_chars
                ),
            );
            continue;
        }
        let decoded = rec
            .payload
            .clone()
            .and_then(|bytes| decode_image(&bytes, &ctx.limits));
        let img = match decoded {
            Ok(img) => img,
            Err(reason) => {
                reject(reason.code(), reason.detail());
                continue;
            }
        };
        let small = ctx.processor.geometry(&img.rgb);
        let mut png = Vec::new();
        if let Err(e) = small.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        {
            reject("corrupt", format!("re-encoding failed: {e}"));
            continue;
        }
        ids.push(rec.id);
        keys.append_value(&rec.key);
        shards.append_value(&shard);
        captions.append_value(caption);
        images.append_value(&png);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(ids)),
        Arc::new(keys.finish()),
        Arc::new(shards.finish()),
        Arc::new(captions.finish()),
        Arc::new(images.finish()),
    ];
    let batch = RecordBatch::try_new(captions_schema(), columns)
        .map_err(|e| TrainerError::Loader(format!("captions batch: {e}")))?;
    Ok((batch, rejects))
}

/// The captions table opened at one version, split into training and held-out rows.
#[derive(Debug)]
pub struct CaptionRows {
    /// Where it is.
    pub uri: String,
    ds: Dataset,
    /// Offsets of the training rows, in table order.
    pub train: Vec<u64>,
    /// Offsets of the held-out rows, in table order.
    pub holdout: Vec<u64>,
}

/// A set of rows read: ids, captions, and each image's PNG bytes.
#[derive(Debug, Default)]
pub struct CaptionBatch {
    /// Row ids.
    pub ids: Vec<u64>,
    /// Captions.
    pub captions: Vec<String>,
    /// PNGs at the CLIP input size.
    pub images: Vec<Vec<u8>>,
}

impl CaptionRows {
    /// Opens version `version` of the table and splits its rows by key with `split`.
    pub async fn open(
        uri: &str,
        storage: &StorageConfig,
        version: u64,
        split: &SplitConfig,
    ) -> Result<Self> {
        let ds = knn_indexer::table::load_dataset(uri, &storage.to_lance_options(), Some(version))
            .await
            .map_err(|e| TrainerError::lance(uri, e))?;
        let mut scan = ds.scan();
        scan.project(&["key"])
            .map_err(|e| TrainerError::lance(uri, e))?;
        let mut stream = scan
            .try_into_stream()
            .await
            .map_err(|e| TrainerError::lance(uri, e))?;
        let (mut train, mut holdout, mut at) = (Vec::new(), Vec::new(), 0u64);
        while let Some(b) = stream.next().await {
            let b = b.map_err(|e| TrainerError::lance(uri, e))?;
            let keys = b.column(0).as_string::<i32>();
            for i in 0..b.num_rows() {
                if split.is_holdout(keys.value(i)) {
                    holdout.push(at);
                } else {
                    train.push(at);
                }
                at += 1;
            }
        }
        Ok(Self {
            uri: uri.to_string(),
            ds,
            train,
            holdout,
        })
    }

    /// Tags the version this run reads, named after the run (`run`: its output directory),
    /// so that upkeep of a captions table still being prepared, or `knn-diffusion gc`, keeps
    /// it while the run reads it.
    pub async fn pin_for(&self, run: &str) {
        knn_indexer::table::pin_version(
            &self.ds,
            &self.uri,
            &knn_indexer::table::reader_tag("train-clip", run),
            "this run's captions loader would then fail to read its rows",
        )
        .await;
    }

    /// The table version.
    pub fn version(&self) -> u64 {
        self.ds.version().version
    }

    /// All rows.
    pub fn rows(&self) -> u64 {
        (self.train.len() + self.holdout.len()) as u64
    }

    /// Rows at these table offsets, in that order.
    pub async fn take(&self, offsets: &[u64]) -> Result<CaptionBatch> {
        let lance_err = |e| TrainerError::lance(&self.uri, e);
        let projection = self
            .ds
            .schema()
            .project(&["id", "caption", "image"])
            .map_err(lance_err)?;
        let b = self
            .ds
            .take(offsets, projection)
            .await
            .map_err(|e| TrainerError::lance(&self.uri, e))?;
        let captions = b.column(1).as_string::<i32>();
        let images = b.column(2).as_binary::<i32>();
        Ok(CaptionBatch {
            ids: b.column(0).as_primitive::<UInt64Type>().values().to_vec(),
            captions: (0..b.num_rows())
                .map(|i| captions.value(i).to_string())
                .collect(),
            images: (0..b.num_rows())
                .map(|i| images.value(i).to_vec())
                .collect(),
        })
    }

    /// Every caption of the training rows (for the tokenizer), in table order.
    pub async fn training_captions(&self) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(self.train.len());
        for chunk in self.train.chunks(4096) {
            let lance_err = |e| TrainerError::lance(&self.uri, e);
            let projection = self.ds.schema().project(&["caption"]).map_err(lance_err)?;
            let b = self
                .ds
                .take(chunk, projection)
                .await
                .map_err(|e| TrainerError::lance(&self.uri, e))?;
            let c = b.column(0).as_string::<i32>();
            out.extend((0..b.num_rows()).map(|i| c.value(i).to_string()));
        }
        Ok(out)
    }
}
