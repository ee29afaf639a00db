//! Errors of the datasets crate: one variant per thing a user can act on, each naming the URL,
//! shard or config key involved. Errors about a single record are not here: those are
//! [`crate::RejectReason`]s, counted and reported, never fatal.

/// Result with [`DatasetError`].
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

/// What went wrong reading a source.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The source or table URL cannot be parsed or has no usable scheme.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// The store refused our credentials.
    #[error(
        "access denied to `{url}`: {detail}. Check the credentials (config `storage.access_key_id` / \
         `storage.secret_access_key` or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3; \
         GOOGLE_APPLICATION_CREDENTIALS for gs; AZURE_STORAGE_ACCOUNT_KEY for az)"
    )]
    AccessDenied { url: String, detail: String },

    /// A config value no stage could use.
    #[error("config `{key}`: {reason}")]
    Config { key: String, reason: String },

    /// The object or prefix does not exist.
    #[error("not found: `{url}`")]
    NotFound { url: String },

    /// Any other object store failure (network, server error) at `url`.
    #[error(
        "object store error at `{url}`: {source}. Passing faults are retried as \
         `[storage.retry]` allows (max_retries, retry_timeout_s); once the store answers \
         again, rerun: what was committed is kept"
    )]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },

    /// The source holds no shard of the configured format.
    #[error("no {format} shards under `{url}`; check `{key}.url` and `{key}.format`")]
    NoShards {
        url: String,
        format: String,
        /// The config section the source is set in (`embed.source`).
        key: String,
    },

    /// A shard's container (parquet file, tar archive) is unreadable as a whole.
    #[error("shard `{shard}` is unreadable: {reason}")]
    CorruptShard { shard: String, reason: String },

    /// A configured column is missing from a shard; `key` is the config key that names it.
    #[error("shard `{shard}` has no column `{column}` (has: {available}); set `{key}`")]
    MissingColumn {
        shard: String,
        column: String,
        available: String,
        key: String,
    },

    /// A configured column holds a type that cannot be read as asked; `key` is the config key
    /// that names the column.
    #[error(
        "shard `{shard}`: column `{column}` has type {types}; set `{key}` to a column of that type"
    )]
    ColumnType {
        shard: String,
        column: String,
        /// The type found and the one wanted: `Int32 (want binary)`.
        types: String,
        key: String,
    },

    /// A setting asks for something this source cannot give.
    #[error("{what} is not supported: {hint}")]
    Unsupported { what: String, hint: String },
    /// A packaged data set could not be fetched or unpacked.
    #[error("package `{package}`: {reason}")]
    Package { package: String, reason: String },

    /// A local file or directory could not be read or written.
    #[error("{path}: {source}")]
    LocalIo {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Worker index and count do not fit together.
    #[error("worker {index} of {count} is not valid: need 0 <= worker < workers and workers >= 1")]
    InvalidWorker { index: usize, count: usize },
}

impl DatasetError {
    /// [`DatasetError::MissingColumn`] for `column` of `shard`, listing what `schema` has.
    pub fn missing_column(
        shard: impl ToString,
        column: &str,
        schema: &arrow_schema::Schema,
        key: impl Into<String>,
    ) -> Self {
        Self::MissingColumn {
            shard: shard.to_string(),
            column: column.to_string(),
            available: schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", "),
            key: key.into(),
        }
    }

    /// Classifies an object store error at `url` into the variant a user can act on.
    pub fn from_store(url: impl Into<String>, source: object_store::Error) -> Self {
        let url = url.into();
        match source {
            object_store::Error::NotFound { .. } => DatasetError::NotFound { url },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => DatasetError::AccessDenied {
                url,
                detail: source.to_string(),
            },
            other => {
                // S3-compatible servers answer a bad signature with 403 through the generic path.
                let text = other.to_string();
                if text.contains("SignatureDoesNotMatch")
                    || text.contains("InvalidAccessKeyId")
                    || text.contains("AccessDenied")
                    || text.contains("403 Forbidden")
                {
                    DatasetError::AccessDenied { url, detail: text }
                } else {
                    DatasetError::Store { url, source: other }
                }
            }
        }
    }
}
