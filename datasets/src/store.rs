//! One object store for every source and table URL: `s3://`, `gs://`, `az://`, `file://`
//! (or a plain local path) and `memory://`.
//!
//! Credentials come from the environment first (the cloud SDKs' usual variables) and the
//! config's `[storage]` table second, so a config value wins. Secrets are [`Secret`]s and are
//! never printed. `memory://NAME/` stores live for the process and are shared by name, so a
//! test can fill one and hand its URL to a reader.

use crate::{DatasetError, Result, Secret};
use object_store::{
    aws::AmazonS3Builder, azure::MicrosoftAzureBuilder, gcp::GoogleCloudStorageBuilder,
    local::LocalFileSystem, memory::InMemory, path::Path, ObjectStore,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use url::Url;

/// Credentials and endpoints for remote stores. Every field is optional: what is unset comes
/// from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// S3 region (e.g. `us-east-1`).
    pub region: Option<String>,
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000` for a local server.
    pub endpoint: Option<String>,
    /// Allow plain `http://` endpoints (local servers only).
    #[serde(default)]
    pub allow_http: bool,
    /// S3 access key id.
    pub access_key_id: Option<String>,
    /// S3 secret access key.
    pub secret_access_key: Option<Secret>,
    /// S3 session token for temporary credentials.
    pub session_token: Option<Secret>,
    /// Path to a Google service-account JSON file.
    pub google_service_account: Option<String>,
    /// Azure storage account name.
    pub azure_account: Option<String>,
    /// Azure storage account key.
    pub azure_access_key: Option<Secret>,
    /// Upkeep of the Lance tables that sharded stages commit to (`[storage.tables]`).
    #[serde(default)]
    pub tables: TableMaintenance,
}

/// How a Lance table that sharded stages (embed, precompute-knn, train-clip's captions)
/// commit to is kept cheap to commit to and to open as it grows (`[storage.tables]`). Every
/// commit writes a manifest listing every fragment, and a new worker reads the shard ledger,
/// so both would grow with the number of shards committed; upkeep bounds them. Versions kept
/// (`keep_versions_hours`) still cost every commit a listing on a file system.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TableMaintenance {
    /// Every this many table versions, the worker whose commit crosses the mark (one worker
    /// per mark) checkpoints the shard ledger, compacts small fragments and removes old
    /// versions. 0: never (then run `knn-diffusion gc`).
    pub every_commits: u64,
    /// Merge fragments smaller than `target_rows_per_fragment` rows during upkeep.
    pub compact: bool,
    /// Rows of a compacted fragment.
    pub target_rows_per_fragment: usize,
    /// A version is removed once the ledger checkpoint covers it and it is older than this
    /// many hours, or more than `keep_versions` versions behind the newest, whichever comes
    /// first. Readers that hold a version longer (precompute-knn, `train`, `train-clip`) tag
    /// it, and tagged versions are never removed; an untagged reader (`sample`, `eval`, a
    /// notebook) is safe for this window. 0 removes every version the checkpoint covers.
    pub keep_versions_hours: f64,
    /// Most versions kept behind the newest (0: no limit, only `keep_versions_hours`). On a
    /// file system every commit lists all of `_versions/`, so a table committed to many
    /// times an hour needs this bound: it keeps the listing, and so each commit, flat.
    pub keep_versions: u64,
}

impl Default for TableMaintenance {
    fn default() -> Self {
        Self {
            every_commits: 500,
            compact: true,
            target_rows_per_fragment: 1_000_000,
            keep_versions_hours: 168.0,
            keep_versions: 1000,
        }
    }
}

impl StorageConfig {
    /// The same settings as Lance's `storage_options` keys, for opening tables on the store.
    pub fn to_lance_options(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        let mut put = |k: &str, v: Option<&str>| {
            if let Some(v) = v {
                out.insert(k.to_string(), v.to_string());
            }
        };
        put("aws_region", self.region.as_deref());
        put("aws_endpoint", self.endpoint.as_deref());
        put("aws_access_key_id", self.access_key_id.as_deref());
        put(
            "aws_secret_access_key",
            self.secret_access_key.as_ref().map(Secret::expose),
        );
        put(
            "aws_session_token",
            self.session_token.as_ref().map(Secret::expose),
        );
        put(
            "google_service_account",
            self.google_service_account.as_deref(),
        );
        put("azure_storage_account_name", self.azure_account.as_deref());
        put(
            "azure_storage_account_key",
            self.azure_access_key.as_ref().map(Secret::expose),
        );
        if self.allow_http {
            out.insert("allow_http".into(), "true".into());
        }
        out
    }
}

/// A parsed URL: the store it lives in and the path of the prefix or object within it.
#[derive(Clone, Debug)]
pub struct SourceLocation {
    /// The store holding the data.
    pub store: Arc<dyn ObjectStore>,
    /// Path of the prefix (or object) inside the store.
    pub prefix: Path,
    /// The URL as the user wrote it (after resolving a local path), for messages.
    pub url: String,
}

impl SourceLocation {
    /// The directory of a local (`file://`) source; `None` for object stores.
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        let url = Url::parse(&self.url).ok()?;
        (url.scheme() == "file").then(|| std::path::PathBuf::from(format!("/{}", self.prefix)))
    }

    /// Opens the store behind `url` with the given credentials.
    pub fn open(url: &str, storage: &StorageConfig) -> Result<Self> {
        let parsed = parse_url(url)?;
        let bad = |reason: String| DatasetError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let bucket = || {
            parsed
                .host_str()
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .ok_or_else(|| bad("missing bucket / container name".into()))
        };
        let key_path = || Path::from_url_path(parsed.path()).map_err(|e| bad(e.to_string()));
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match parsed.scheme() {
            "file" => {
                let fs_path = parsed
                    .to_file_path()
                    .map_err(|_| bad("not a local file path".into()))?;
                let prefix = Path::from_filesystem_path(&fs_path).map_err(|e| {
                    if fs_path.exists() {
                        bad(e.to_string())
                    } else {
                        DatasetError::NotFound {
                            url: url.to_string(),
                        }
                    }
                })?;
                (Arc::new(LocalFileSystem::new()), prefix)
            }
            "memory" => (
                memory_store(parsed.host_str().unwrap_or_default()),
                key_path()?,
            ),
            "s3" | "s3a" => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket()?);
                if let Some(r) = &storage.region {
                    b = b.with_region(r);
                }
                if let Some(e) = &storage.endpoint {
                    b = b.with_endpoint(e);
                }
                if storage.allow_http {
                    b = b.with_allow_http(true);
                }
                if let Some(k) = &storage.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(s) = &storage.secret_access_key {
                    b = b.with_secret_access_key(s.expose());
                }
                if let Some(t) = &storage.session_token {
                    b = b.with_token(t.expose());
                }
                let store = b.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), key_path()?)
            }
            "gs" => {
                let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket()?);
                if let Some(p) = &storage.google_service_account {
                    b = b.with_service_account_path(p);
                }
                let store = b.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), key_path()?)
            }
            "az" | "abfs" | "abfss" => {
                let mut b = MicrosoftAzureBuilder::from_env().with_container_name(bucket()?);
                if let Some(a) = &storage.azure_account {
                    b = b.with_account(a);
                }
                if let Some(k) = &storage.azure_access_key {
                    b = b.with_access_key(k.expose());
                }
                let store = b.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), key_path()?)
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme `{other}`; use s3://, gs://, az://, file:// or memory://"
                )))
            }
        };
        Ok(Self {
            store,
            prefix,
            url: parsed.to_string(),
        })
    }

    /// A URL for an object below this prefix, for messages and record provenance.
    pub fn url_of(&self, path: &Path) -> String {
        let base = self.url.trim_end_matches('/');
        let rel = path
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(path.as_ref())
            .trim_start_matches('/');
        if rel.is_empty() {
            base.to_string()
        } else {
            format!("{base}/{rel}")
        }
    }
}

/// Parses a URL, treating a string without a scheme as a local path (made absolute).
pub fn parse_url(url: &str) -> Result<Url> {
    let bad = |reason: String| DatasetError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    match Url::parse(url) {
        Ok(u) if u.scheme().len() > 1 => Ok(u),
        _ => {
            let path = std::path::Path::new(url);
            let abs = if path.is_absolute() {
                path.to_path_buf()
            } else {
                std::env::current_dir()
                    .map_err(|e| bad(e.to_string()))?
                    .join(path)
            };
            Url::from_directory_path(&abs)
                .or_else(|_| Url::from_file_path(&abs))
                .map_err(|_| bad("not an absolute local path".into()))
        }
    }
}

/// The process-wide in-memory store named `name` (`memory://name/`).
fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_scheme_is_named() {
        let err = SourceLocation::open("ftp://host/x", &StorageConfig::default()).unwrap_err();
        assert!(matches!(err, DatasetError::InvalidUrl { .. }));
        assert!(err.to_string().contains("ftp"), "{err}");
    }

    #[test]
    fn lance_options_carry_secrets_but_debug_hides_them() {
        let cfg = StorageConfig {
            access_key_id: Some("AKID".into()),
            secret_access_key: Some(Secret::new("very-secret")),
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: true,
            ..Default::default()
        };
        let opts = cfg.to_lance_options();
        assert_eq!(opts["aws_secret_access_key"], "very-secret");
        assert_eq!(opts["allow_http"], "true");
        assert!(!format!("{cfg:?}").contains("very-secret"));
    }

    #[test]
    fn memory_stores_are_shared_by_name() {
        let a = SourceLocation::open("memory://shared-a/x/", &StorageConfig::default()).unwrap();
        let b = SourceLocation::open("memory://shared-a/y/", &StorageConfig::default()).unwrap();
        assert!(Arc::ptr_eq(&a.store, &b.store));
        assert_eq!(a.prefix.as_ref(), "x");
    }

    #[test]
    fn plain_paths_become_file_urls() {
        let dir = tempfile::tempdir().unwrap();
        let loc =
            SourceLocation::open(dir.path().to_str().unwrap(), &StorageConfig::default()).unwrap();
        assert!(loc.url.starts_with("file:///"), "{}", loc.url);
    }
}
