//! Streaming readers for the three source layouts. Each turns one [`Shard`] into a stream of
//! [`RawRecord`]s in shard order, holding at most a few records in memory at a time.
//!
//! Record-level problems (a WebDataset sample with no image, a null parquet cell, a file over
//! `max_bytes`) become records with a [`crate::RejectReason`] payload so they are counted and
//! reported. Shard-level problems (a corrupt parquet footer, a truncated tar, a network error)
//! end the stream with a [`crate::DatasetError`] naming the shard; the shard is then not
//! committed and a rerun tries it again. With [`ReaderOptions::salvage_corrupt_shards`], a
//! container that breaks part way ends its stream with one `corrupt_shard` reject for the
//! unread rest instead, after the records read before the break. A store error met while a
//! container is parsed (a connection reset in the middle of a tar) is never taken for a
//! broken container: `StoreFault` keeps it, and the stream ends with that error.

mod folder;
mod parquet;
mod webdataset;

use crate::DatasetError;
use crate::{RawRecord, RejectReason, Result, Shard, ShardFormat, SourceLocation};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A text column read beside the image (a caption, a score kept as text), and the config key
/// that names it, for errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextColumn {
    /// Parquet: the column. WebDataset: the member extension (`caption` also reads `.txt`).
    pub name: String,
    /// The config key a user sets to name another column.
    pub config_key: String,
}

/// How records are read from shards.
#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// Parquet: the binary image column.
    pub image_column: String,
    /// Parquet: the key column; the row number when absent.
    pub key_column: Option<String>,
    /// The config section the two columns above are set in (errors name
    /// `<prefix>.image_column`).
    pub config_prefix: String,
    /// Text columns read into [`crate::RawRecord::text`], in this order. A shard that lacks
    /// one is an error naming its config key (folder sources have none).
    pub text_columns: Vec<TextColumn>,
    /// Parquet: rows per record batch (images are large, keep it small).
    pub parquet_batch_rows: usize,
    /// Records larger than this are rejected without being read into memory where possible.
    pub max_record_bytes: u64,
    /// Folder shards: files fetched concurrently.
    pub fetch_concurrency: usize,
    /// A container that breaks part way ends with one `corrupt_shard` reject for the unread
    /// rest (after the records read before the break) instead of failing its shard.
    pub salvage_corrupt_shards: bool,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            image_column: "jpg".into(),
            key_column: Some("key".into()),
            config_prefix: "embed.source".into(),
            text_columns: Vec::new(),
            parquet_batch_rows: 64,
            max_record_bytes: 64 * 1024 * 1024,
            fetch_concurrency: 8,
            salvage_corrupt_shards: false,
        }
    }
}

/// Streams the records of `shard`. Within a shard no two rows share an id: a key read twice
/// (a parquet key column with repeats) is a `duplicate_key` reject after the first, and two
/// distinct keys whose 63-bit ids collide make the second an `id_collision` reject naming both.
pub fn read_shard(
    loc: &SourceLocation,
    shard: &Shard,
    opts: &ReaderOptions,
) -> BoxStream<'static, Result<RawRecord>> {
    let records = match shard.format {
        ShardFormat::Parquet => parquet::read(loc.clone(), shard.clone(), opts.clone()),
        ShardFormat::WebDataset => webdataset::read(loc.clone(), shard.clone(), opts.clone()),
        ShardFormat::Folder => folder::read(loc.clone(), shard.clone(), opts.clone()),
    };
    let mut ids = UniqueIds::default();
    let admitted = records.map_ok(move |mut record| {
        if let Err(why) = ids.admit(&record) {
            record.payload = Err(why);
        }
        record
    });
    if !opts.salvage_corrupt_shards {
        return admitted.boxed();
    }
    let (shard_id, texts) = (shard.id.clone(), opts.text_columns.len());
    let mut read = 0usize;
    admitted
        .scan(false, move |ended, item| {
            if *ended {
                return futures::future::ready(None);
            }
            let item = match item {
                Err(DatasetError::CorruptShard { reason, .. }) => {
                    *ended = true;
                    Ok(unread_rest(&shard_id, read, reason, texts))
                }
                other => {
                    read += 1;
                    other
                }
            };
            futures::future::ready(Some(item))
        })
        .boxed()
}

/// The one reject that stands for the unreadable rest of a shard after `read` records. Its
/// key depends only on where the container breaks, so a rerun over the same file makes the
/// same row.
fn unread_rest(shard: &crate::ShardId, read: usize, reason: String, texts: usize) -> RawRecord {
    let detail =
        format!("the shard is unreadable after its first {read} records, which are kept: {reason}");
    RawRecord::new(
        shard,
        format!("#unreadable-after-{read}"),
        Err(RejectReason::CorruptShard { detail }),
        vec![None; texts],
    )
}

/// The first object-store error met while a container was parsed. A parser sees such an
/// error only as a failed read of its input, which it reports as a broken container; this
/// keeps the store's own error, so that a network fault is retried, never salvaged.
#[derive(Clone, Default)]
pub(crate) struct StoreFault(Arc<Mutex<Option<DatasetError>>>);

impl StoreFault {
    /// Keeps `err` (read at `url`) unless an earlier one is kept; returns its text for the
    /// parser's error.
    pub(crate) fn keep(&self, url: &str, err: object_store::Error) -> String {
        let text = err.to_string();
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| DatasetError::from_store(url, err));
        text
    }

    /// `err`, or the store error that caused it.
    pub(crate) fn explain(&self, err: DatasetError) -> DatasetError {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        kept.unwrap_or(err)
    }
}

/// The ids of the rows read so far from one shard, with their keys.
#[derive(Default)]
pub struct UniqueIds {
    keys: HashMap<u64, String>,
}

impl UniqueIds {
    /// Admits `record` as a row, or says why it cannot be one beside the rows before it.
    /// Rejects are not rows and are always admitted.
    pub fn admit(&mut self, record: &RawRecord) -> std::result::Result<(), RejectReason> {
        if record.payload.is_err() {
            return Ok(());
        }
        match self.keys.get(&record.id) {
            None => {
                self.keys.insert(record.id, record.key.clone());
                Ok(())
            }
            Some(first) if *first == record.key => Err(RejectReason::DuplicateKey {
                detail: format!(
                    "key `{}` is read a second time from this shard; the first is kept",
                    record.key
                ),
            }),
            Some(first) => Err(RejectReason::IdCollision {
                detail: format!(
                    "keys `{first}` and `{}` hash to the same id {}; the first is kept. Rename one key (or move it to another shard) to keep both",
                    record.key, record.id
                ),
            }),
        }
    }
}

/// The Arrow schema of a parquet `shard`, read from its footer: what a stage needs to type
/// the source columns it carries along (`embed.source.columns`). Other formats have no
/// schema; `config_key` names the setting that asked for one.
pub async fn shard_schema(
    loc: &SourceLocation,
    shard: &Shard,
    config_key: &str,
) -> Result<arrow_schema::SchemaRef> {
    match shard.format {
        ShardFormat::Parquet => parquet::schema(loc, shard).await,
        ShardFormat::WebDataset | ShardFormat::Folder => Err(crate::DatasetError::Unsupported {
            what: format!(
                "`{config_key}` with {} shards",
                if shard.format == ShardFormat::Folder { "folder" } else { "webdataset" }
            ),
            hint: "columns are carried from parquet sources only; convert the source with img2dataset or leave the setting empty".into(),
        }),
    }
}
