//! What can go wrong while training or sampling, one variant per thing a user can fix.

use std::path::PathBuf;

/// Errors of the trainer crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A config value is out of range or inconsistent with another; `key` is its TOML key.
    #[error("config `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// The training asks for more neighbours than the precomputed table holds.
    #[error("config `{key}` = {k} but the kNN table `{table}` holds {available} neighbours per row; lower `{key}` or rerun precompute-knn with a larger `knn.k`")]
    KTooLarge {
        key: String,
        k: usize,
        available: usize,
        table: String,
    },
    /// A table the stage needs does not exist.
    #[error("table `{table}` not found: {hint}")]
    MissingTable { table: String, hint: String },
    /// A table exists but its content cannot be used.
    #[error("table `{table}`: {detail}")]
    BadTable { table: String, detail: String },
    /// One record could not be used (its id says which).
    #[error("table `{table}`, row id {id}: {reason}")]
    BadRecord {
        table: String,
        id: u64,
        reason: String,
    },
    /// Reading or writing a checkpoint failed.
    #[error("checkpoint `{location}`: {reason}")]
    Checkpoint { location: String, reason: String },
    /// No usable checkpoint where one is required.
    #[error("no valid checkpoint under `{location}`{detail}")]
    NoCheckpoint { location: String, detail: String },
    /// A checkpoint was made with a different training config.
    #[error("checkpoint `{location}` was made with a different config: {diffs}; start a new `train.output_dir` or restore those settings")]
    ConfigChanged { location: String, diffs: String },
    /// Lance failed on a table.
    #[error("table `{table}`: {source}")]
    Lance {
        table: String,
        #[source]
        source: lance::Error,
    },
    /// The indexer failed (CLIP, retrieval, tables).
    #[error(transparent)]
    Indexer(#[from] knn_indexer::IndexerError),
    /// The storage layer failed.
    #[error(transparent)]
    Dataset(#[from] knn_datasets::DatasetError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// libtorch raised an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective or the rendezvous of a data-parallel job failed.
    #[error("data-parallel training: {0}")]
    Collective(#[from] knn_cluster::ClusterError),
    /// A shard of `train-clip`'s captioned data could not be read; the next run retries it.
    #[error("captioned shard `{shard}` could not be read: {reason}; fix it or remove it from `train_clip.data.url`, then rerun (committed shards are kept)")]
    PrepareFailed { shard: String, reason: String },
    /// The data loader thread stopped.
    #[error("data loader: {0}")]
    Loader(String),
    /// Arms of an evaluation that child processes were training failed.
    #[error("eval: training failed for {arms}; their errors are in the log above (the lines with that seed and arm). Rerun eval to resume them: the arms trained so far are kept")]
    ArmsFailed { arms: String },
    /// An evaluation measure cannot be computed from its inputs (too few samples, shapes).
    #[error("{measure}: {reason}")]
    Measure {
        measure: &'static str,
        reason: String,
    },
}

impl TrainerError {
    pub(crate) fn lance(table: &str, source: lance::Error) -> Self {
        Self::Lance {
            table: table.to_string(),
            source,
        }
    }

    pub(crate) fn config(key: &str, reason: impl Into<String>) -> Self {
        Self::Config {
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result with [`TrainerError`].
pub type Result<T> = std::result::Result<T, TrainerError>;
