//! Errors of the indexer: one variant per thing a user can fix, naming the file, table, shard
//! or config key involved.

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

    /// Some shards failed; the others were committed. A rerun retries only the failed ones.
    #[error("{failed} of {total} shards failed (first: {first}); rerun to retry them")]
    ShardsFailed {
        failed: usize,
        total: usize,
        first: String,
    },

    /// A worker thread died.
    #[error("internal: {0}")]
    Internal(String),
}

impl IndexerError {
    /// Wraps a Lance error with the table it concerns.
    pub fn lance(table: impl Into<String>, source: lance::Error) -> Self {
        IndexerError::Lance {
            table: table.into(),
            source,
        }
    }
}
