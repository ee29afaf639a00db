//! Errors of the indexer: one variant per thing a user can fix, naming the file, table, shard
//! or config key involved.

use knn_datasets::Unwritable;
use std::path::PathBuf;

/// Result with [`IndexerError`].
pub type Result<T, E = IndexerError> = std::result::Result<T, E>;

/// What went wrong embedding or indexing.
#[derive(Debug, thiserror::Error)]
pub enum IndexerError {
    /// Reading the source failed.
    #[error(transparent)]
    Dataset(#[from] knn_datasets::DatasetError),

    /// A CLIP checkpoint directory is incomplete or malformed.
    #[error("CLIP checkpoint `{path}`: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A tokenizer failed to tokenize text or to be trained (`reason` is the `tokenizers`
    /// crate's).
    #[error("tokenizer: {reason}")]
    Tokenizer { reason: String },

    /// A `preprocessor_config.json` asks for something CLIPImageProcessor does not do, or is
    /// not one.
    #[error("preprocessor_config.json: {reason}")]
    ProcessorConfig { reason: String },

    /// A config value is out of range or inconsistent.
    #[error("config `{key}`: {reason}")]
    Config { key: String, reason: String },

    /// libtorch failed (out of memory, bad shapes, missing CUDA).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// Lance failed on a table.
    #[error("Lance table `{table}`: {source}")]
    Lance {
        table: String,
        #[source]
        source: lance::Error,
    },

    /// A table exists with a schema the stage cannot append to.
    #[error(
        "table `{table}` has a different schema than this run writes: {detail}; \
         write to a new `output.table` or delete the old one"
    )]
    SchemaMismatch { table: String, detail: String },

    /// A table was embedded by another CLIP than the one embedding the query: their spaces
    /// differ, so its neighbours would be meaningless.
    #[error("table `{table}` was embedded by CLIP `{table_clip}`, but the query is embedded by CLIP `{query_clip}`; embed the table with the same CLIP (`embed.clip.checkpoint`) or query with the table's")]
    ClipMismatch {
        table: String,
        table_clip: String,
        query_clip: String,
    },

    /// Some shards failed; the others were committed. A rerun retries only the failed ones.
    #[error("{failed} of {total} shards failed (first: {first}); they stay uncommitted and a rerun retries only them, which helps after a network or storage fault; a shard that fails the same way again is corrupt: fix or remove that file, or keep what it holds with `embed.salvage_corrupt_shards = true`")]
    ShardsFailed {
        failed: usize,
        total: usize,
        first: String,
    },

    /// Too many records' decoders are still running past their time budget to start another.
    #[error("shard `{shard}`: record `{key}` was not decoded: {running} earlier records ran past `embed.decode.timeout_ms` = {timeout_ms} and their decoders are still running (at most {max} may be); the decoder may hang on this data. Lower `embed.decode.max_pixels`, raise the timeout, or remove the records rejected as `timeout`, then rerun")]
    DecodeStalled {
        shard: String,
        key: String,
        running: usize,
        max: usize,
        timeout_ms: u64,
    },

    /// A table lacks a column a stage needs, or has it with the wrong type.
    #[error("table `{table}`: column `{column}`: {detail}")]
    MissingColumn {
        table: String,
        column: String,
        detail: String,
    },

    /// One row of a table cannot be used.
    #[error("table `{table}`, row id {id}: {reason}")]
    BadRow {
        table: String,
        id: u64,
        reason: String,
    },

    /// A table has no rows.
    #[error("table `{table}` (version {version}) has no rows; run `embed` first, or point at a table with rows")]
    EmptyTable { table: String, version: u64 },

    /// More neighbours were asked for than the table can give.
    #[error(
        "k = {k} neighbours asked of table `{table}`, which has {rows} rows{excluding}; \
         use k <= {max}"
    )]
    KTooLarge {
        table: String,
        k: usize,
        rows: usize,
        excluding: &'static str,
        max: usize,
    },

    /// A query's dimension differs from the table's embeddings.
    #[error(
        "query has dimension {query_dim} but table `{table}` holds {table_dim}-dimensional \
         embeddings; embed the query with the CLIP that made the table"
    )]
    DimensionMismatch {
        table: String,
        query_dim: usize,
        table_dim: usize,
    },

    /// A vector index is required but the table has none.
    #[error(
        "table `{table}` has no vector index on `{column}`; run `knn-diffusion build-index` \
         on it, or allow brute-force search"
    )]
    NoIndex { table: String, column: String },

    /// A table cannot be written where it is: its file system is full, read-only, or not
    /// this user's to write. Every shard would fail the same way, so the stage stops.
    #[error("{}", unwritable_message(table, *problem, detail))]
    Unwritable {
        table: String,
        problem: Unwritable,
        /// The operating system's words (`No space left on device (os error 28)`).
        detail: String,
    },

    /// A worker thread died.
    #[error("internal: {0}")]
    Internal(String),
}

fn unwritable_message(table: &str, problem: Unwritable, detail: &str) -> String {
    match problem {
        Unwritable::Full => format!(
            "no space left on the device holding `{table}` ({detail}): free space (or raise the \
             quota) or write the output to a larger volume, then rerun the same command: what \
             was committed is kept and only the rest runs"
        ),
        Unwritable::ReadOnly => format!(
            "`{table}` is on a read-only file system ({detail}): write the output to a writable \
             place, or remount it read-write"
        ),
        Unwritable::Denied => format!(
            "permission denied on `{table}` ({detail}): make it readable and writable by this \
             user (check the owner and mode of it and of its directory), or use another place"
        ),
    }
}

impl IndexerError {
    /// Wraps a Lance error with the table it concerns.
    /// A full, read-only or forbidden file system becomes [`IndexerError::Unwritable`].
    pub fn lance(table: impl Into<String>, source: lance::Error) -> Self {
        if let Some((problem, detail)) = Unwritable::find(&source) {
            return IndexerError::Unwritable {
                table: table.into(),
                problem,
                detail,
            };
        }
        IndexerError::Lance {
            table: table.into(),
            source,
        }
    }

    /// Whether every later write to the same place would fail the same way.
    pub fn is_unwritable(&self) -> bool {
        matches!(self, IndexerError::Unwritable { .. })
    }
}
