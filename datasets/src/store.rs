//! One object store for every source and table URL: `s3://`, `gs://`, `az://`, `file://`
//! (or a plain local path) and `memory://`.
//!
//! Credentials come from the environment first (the cloud SDKs' usual variables) and the
//! config's `[storage]` table second, so a config value wins. Secrets are [`Secret`]s and are
//! never printed. `memory://NAME/` stores live for the process and are shared by name, so a
//! test can fill one and hand its URL to a reader.

use crate::{DatasetError, Result, Secret};
use futures::TryStreamExt;
use object_store::{
    aws::AmazonS3Builder, azure::MicrosoftAzureBuilder, gcp::GoogleCloudStorageBuilder,
    local::LocalFileSystem, memory::InMemory, path::Path, BackoffConfig, ClientOptions, ListResult,
    ObjectMeta, ObjectStore, RetryConfig,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
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
    /// How requests to a remote store are retried (`[storage.retry]`).
    #[serde(default)]
    pub retry: RetrySettings,
}

/// How every request to a remote store (`s3://`, `gs://`, `az://`), from a reader or a
/// table, is retried (`[storage.retry]`). A request that fails in a way the store says is
/// passing (5xx such as S3's `503 SlowDown`, 429, a connection reset or refused, a response
/// body cut short) is retried with exponential backoff, each retry logged at `info`, until
/// `max_retries` or `retry_timeout_s` runs out; then the stage fails with the store's error,
/// which names the operation and the URL. Lance's table layer retries a throttled request a
/// few more times on top (its `lance_aimd_*` options), so a table request makes at most
/// about 4 × (`max_retries` + 1) attempts.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Retries of one request after its first attempt (0: none).
    pub max_retries: usize,
    /// No retry starts later than this many seconds after the first attempt.
    pub retry_timeout_s: f64,
    /// The first backoff, in milliseconds; each later one doubles, up to `max_backoff_s`.
    pub init_backoff_ms: u64,
    /// Longest backoff between two attempts, in seconds.
    pub max_backoff_s: f64,
    /// One attempt that has not finished in this many seconds fails (and may be retried).
    pub request_timeout_s: f64,
    /// Connecting to the store fails after this many seconds.
    pub connect_timeout_s: f64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_retries: 10,
            retry_timeout_s: 180.0,
            init_backoff_ms: 100,
            max_backoff_s: 15.0,
            request_timeout_s: 30.0,
            connect_timeout_s: 5.0,
        }
    }
}

impl RetrySettings {
    /// Refuses settings no store could use, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: &str| {
            Err(DatasetError::Config {
                key: format!("storage.retry.{key}"),
                reason: reason.to_string(),
            })
        };
        for (key, v) in [
            ("retry_timeout_s", self.retry_timeout_s),
            ("max_backoff_s", self.max_backoff_s),
            ("request_timeout_s", self.request_timeout_s),
            ("connect_timeout_s", self.connect_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(key, &format!("{v} is not a positive number of seconds"));
            }
        }
        if self.init_backoff_ms == 0 {
            return bad("init_backoff_ms", "must be at least 1");
        }
        Ok(())
    }

    /// The wait before retry `attempt` (1 for the first): `init_backoff_ms`, doubled each
    /// time, up to `max_backoff_s`.
    pub fn backoff(&self, attempt: usize) -> Duration {
        let first = Duration::from_millis(self.init_backoff_ms);
        let doubled = first.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        doubled.min(Duration::from_secs_f64(self.max_backoff_s))
    }

    /// Runs `op` again while it fails with an error `passes` says may pass, up to
    /// `max_retries` times with [`RetrySettings::backoff`] between tries, logging each retry
    /// with `what` (a URL, a table). For operations that are safe to repeat and that the
    /// store client does not retry itself (a listing whose body was cut, a conditional write
    /// whose connection was reset and whose effect is checked by the caller).
    pub async fn again<T, E, F>(
        &self,
        what: &str,
        passes: impl Fn(&E) -> bool,
        mut op: impl FnMut() -> F,
    ) -> std::result::Result<T, E>
    where
        E: std::fmt::Display,
        F: std::future::Future<Output = std::result::Result<T, E>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if attempt < self.max_retries && passes(&e) => {
                    attempt += 1;
                    let wait = self.backoff(attempt);
                    tracing::info!(at = what, attempt, error = %e, "a store request failed; trying again in {:.2} s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    fn retry_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(self.init_backoff_ms),
                max_backoff: Duration::from_secs_f64(self.max_backoff_s),
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: Duration::from_secs_f64(self.retry_timeout_s),
        }
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions::new()
            .with_timeout(Duration::from_secs_f64(self.request_timeout_s))
            .with_connect_timeout(Duration::from_secs_f64(self.connect_timeout_s))
    }
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
        // Lance's names for `[storage.retry]` (lance-io's StorageOptions and object_store's
        // client keys, which take humantime durations).
        let r = &self.retry;
        out.insert("client_max_retries".into(), r.max_retries.to_string());
        out.insert(
            "client_retry_timeout".into(),
            (r.retry_timeout_s.ceil() as u64).max(1).to_string(),
        );
        out.insert("download_retry_count".into(), r.max_retries.to_string());
        let ms = |s: f64| format!("{}ms", (s * 1000.0).ceil() as u64);
        out.insert("timeout".into(), ms(r.request_timeout_s));
        out.insert("connect_timeout".into(), ms(r.connect_timeout_s));
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
    /// How its requests are retried (`[storage.retry]`).
    pub retry: RetrySettings,
}

impl SourceLocation {
    /// The directory of a local (`file://`) source; `None` for object stores.
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        let url = Url::parse(&self.url).ok()?;
        (url.scheme() == "file").then(|| std::path::PathBuf::from(format!("/{}", self.prefix)))
    }

    /// Opens the store behind `url` with the given credentials.
    pub fn open(url: &str, storage: &StorageConfig) -> Result<Self> {
        storage.retry.validate()?;
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
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket()?)
                    .with_retry(storage.retry.retry_config())
                    .with_client_options(storage.retry.client_options());
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
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket()?)
                    .with_retry(storage.retry.retry_config())
                    .with_client_options(storage.retry.client_options());
                if let Some(p) = &storage.google_service_account {
                    b = b.with_service_account_path(p);
                }
                let store = b.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), key_path()?)
            }
            "az" | "abfs" | "abfss" => {
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket()?)
                    .with_retry(storage.retry.retry_config())
                    .with_client_options(storage.retry.client_options());
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
            retry: storage.retry.clone(),
        })
    }

    /// Every object below `prefix` (the store's root when `None`). A listing whose answer
    /// is cut short, which object_store does not retry itself, is listed again as
    /// `[storage.retry]` allows: a listing is safe to repeat.
    pub async fn list_all(&self, prefix: Option<&Path>) -> object_store::Result<Vec<ObjectMeta>> {
        self.again(|| self.store.list(prefix).try_collect()).await
    }

    /// The objects and common prefixes directly below `prefix`, retried as
    /// [`SourceLocation::list_all`] is.
    pub async fn list_dir(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.again(|| self.store.list_with_delimiter(prefix)).await
    }

    /// Runs an idempotent store operation (a listing, a read, a delete) again after a
    /// failure that may pass (object_store's `Generic`: transport and server errors) and
    /// that object_store did not retry itself, with `[storage.retry]`'s count and backoff.
    pub async fn again<T, F>(&self, op: impl FnMut() -> F) -> object_store::Result<T>
    where
        F: std::future::Future<Output = object_store::Result<T>>,
    {
        let passes = |e: &object_store::Error| {
            matches!(e, object_store::Error::Generic { .. }) && crate::Unwritable::find(e).is_none()
        };
        self.retry.again(&self.url, passes, op).await
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
    fn retry_settings_reach_lance_and_bad_ones_are_named() {
        let mut cfg = StorageConfig::default();
        cfg.retry.max_retries = 4;
        cfg.retry.retry_timeout_s = 2.5;
        cfg.retry.request_timeout_s = 0.25;
        let opts = cfg.to_lance_options();
        assert_eq!(opts["client_max_retries"], "4");
        assert_eq!(opts["download_retry_count"], "4");
        assert_eq!(opts["client_retry_timeout"], "3");
        assert_eq!(opts["timeout"], "250ms");
        assert_eq!(opts["connect_timeout"], "5000ms");
        cfg.retry.max_backoff_s = 0.0;
        let err = SourceLocation::open("memory://retry-bad/", &cfg).unwrap_err();
        assert!(
            err.to_string().contains("storage.retry.max_backoff_s"),
            "{err}"
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let r = RetrySettings {
            init_backoff_ms: 100,
            max_backoff_s: 0.5,
            ..RetrySettings::default()
        };
        let ms: Vec<u128> = (1..=5).map(|a| r.backoff(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 500, 500]);
        assert_eq!(r.backoff(10_000).as_millis(), 500);
    }

    #[tokio::test]
    async fn again_retries_only_what_passes_and_only_max_retries_times() {
        let r = RetrySettings {
            max_retries: 3,
            init_backoff_ms: 1,
            ..RetrySettings::default()
        };
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let op = || async {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err::<(), String>("503".into())
        };
        assert!(r.again("x", |_: &String| true, op).await.is_err());
        assert_eq!(calls.swap(0, std::sync::atomic::Ordering::SeqCst), 4);
        assert!(r.again("x", |_: &String| false, op).await.is_err());
        assert_eq!(calls.swap(0, std::sync::atomic::Ordering::SeqCst), 1);
        let mut left = 2;
        let flaky = || {
            left -= 1;
            let fail = left >= 0;
            async move {
                if fail {
                    Err("reset".to_string())
                } else {
                    Ok(7)
                }
            }
        };
        assert_eq!(r.again("x", |_: &String| true, flaky).await, Ok(7));
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
