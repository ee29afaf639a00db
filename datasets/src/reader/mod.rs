//! Streaming readers for the three source layouts. Each turns one [`Shard`] into a stream of
//! [`RawRecord`]s in shard order, holding at most a few records in memory at a time.
//!
//! Record-level problems (a WebDataset sample with no image, a null parquet cell, a file over
//! `max_bytes`) become records with a [`crate::RejectReason`] payload so they are counted and
//! reported. Shard-level problems (a corrupt parquet footer, a truncated tar, a network error)
//! end the stream with a [`crate::DatasetError`] naming the shard; the shard is then not
//! committed and a rerun tries it again.

mod folder;
mod parquet;
mod webdataset;

use crate::{RawRecord, Result, Shard, ShardFormat, SourceLocation};
use futures::stream::BoxStream;

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
        }
    }
}

/// Streams the records of `shard`.
pub fn read_shard(
    loc: &SourceLocation,
    shard: &Shard,
    opts: &ReaderOptions,
) -> BoxStream<'static, Result<RawRecord>> {
    match shard.format {
        ShardFormat::Parquet => parquet::read(loc.clone(), shard.clone(), opts.clone()),
        ShardFormat::WebDataset => webdataset::read(loc.clone(), shard.clone(), opts.clone()),
        ShardFormat::Folder => folder::read(loc.clone(), shard.clone(), opts.clone()),
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
