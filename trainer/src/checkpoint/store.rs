//! Where checkpoints are stored: the files a loop hands over (see [`super::contents`] for what
//! they are) written under `<dir>/step-NNNNNNNNNN/` on a local path or any object-store URL,
//! with `MANIFEST.json` (each file's size and SHA-256) written last.
//!
//! A checkpoint exists only once its manifest does and every file matches it: a crash mid-save,
//! a torn upload or a flipped byte make it invalid, and loading falls back to the previous one
//! with a warning. Tensors are safetensors (never pickle). After each save only the newest
//! `keep_last` valid checkpoints are kept. No credential is ever written: the state holds the
//! training config, which has none.

use super::safetensors::from_safetensors;
use crate::{Result, TrainerError};
use bytes::Bytes;
use knn_datasets::{SourceLocation, StorageConfig};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tch::Tensor;

/// Name of the manifest inside a checkpoint directory.
pub const MANIFEST: &str = "MANIFEST.json";
/// Format tag in every manifest.
pub const FORMAT: &str = "knn-diffusion-checkpoint/1";

/// One file of a manifest.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ManifestEntry {
    /// File name inside the checkpoint directory.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// `MANIFEST.json`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// Optimiser step of the checkpoint.
    pub step: u64,
    /// Every other file of the checkpoint.
    pub files: Vec<ManifestEntry>,
}

/// A checkpoint's files, verified.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// Its step.
    pub step: u64,
    /// Where it is.
    pub location: String,
    /// File name → content.
    pub files: BTreeMap<String, Bytes>,
}

impl LoadedCheckpoint {
    /// A file, or an error naming it.
    pub fn file(&self, name: &str) -> Result<&Bytes> {
        self.files
            .get(name)
            .ok_or_else(|| TrainerError::Checkpoint {
                location: self.location.clone(),
                reason: format!("has no `{name}`"),
            })
    }

    /// Tensors of a safetensors file.
    pub fn tensors(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        from_safetensors(self.file(name)?, &format!("{}/{name}", self.location))
    }

    /// A JSON file, parsed.
    pub fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        serde_json::from_slice(self.file(name)?).map_err(|e| TrainerError::Checkpoint {
            location: format!("{}/{name}", self.location),
            reason: format!("unreadable: {e}"),
        })
    }
}

/// Checkpoints under one directory or URL.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    location: SourceLocation,
    keep_last: usize,
    /// Steps this process wrote or fully verified: pruning need not download them again
    /// (for a large model that is gigabytes per save).
    verified: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
}

fn step_dir(step: u64) -> String {
    format!("step-{step:010}")
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl CheckpointStore {
    /// Checkpoints under `url` (a local path is created); `keep_last` ≥ 1 are kept.
    pub fn open(url: &str, storage: &StorageConfig, keep_last: usize) -> Result<Self> {
        let is_local = !url.contains("://") || url.starts_with("file://");
        if is_local {
            let path = url.strip_prefix("file://").unwrap_or(url);
            std::fs::create_dir_all(path).map_err(|e| TrainerError::io(path, e))?;
        }
        Ok(Self {
            location: SourceLocation::open(url, storage)?,
            keep_last: keep_last.max(1),
            verified: Default::default(),
        })
    }

    /// Checkpoints under `url` for reading only: nothing is created. A local path that is
    /// missing, or is a file rather than a directory, is refused with what it is.
    pub fn open_existing(url: &str, storage: &StorageConfig) -> Result<Self> {
        let is_local = !url.contains("://") || url.starts_with("file://");
        if is_local {
            let path = std::path::Path::new(url.strip_prefix("file://").unwrap_or(url));
            let detail = match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => None,
                Ok(_) => Some(": it is a file, not a checkpoint directory; give the `checkpoints` \
                               directory that a `train` run wrote"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Some(": it does not exist; give the `checkpoints` directory that a `train` run wrote")
                }
                Err(e) => return Err(TrainerError::io(path, e)),
            };
            if let Some(detail) = detail {
                return Err(TrainerError::NoCheckpoint {
                    location: url.to_string(),
                    detail: detail.into(),
                });
            }
        }
        Ok(Self {
            location: SourceLocation::open(url, storage)?,
            keep_last: usize::MAX,
            verified: Default::default(),
        })
    }

    /// The directory or URL, as configured.
    pub fn url(&self) -> &str {
        &self.location.url
    }

    fn path(&self, parts: &[&str]) -> Path {
        let mut p = self.location.prefix.clone();
        for part in parts {
            p = p.join(*part);
        }
        p
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> TrainerError {
        TrainerError::Checkpoint {
            location: self.location.url.clone(),
            reason: format!("{what}: {e}"),
        }
    }

    /// Writes checkpoint `step` from `(file name, content)` pairs, the manifest last, then
    /// deletes all but the newest `keep_last` valid checkpoints. Returns its location. A
    /// save that fails removes what it wrote (so a full disk is not fuller for it); the
    /// checkpoints before it stay as they were.
    pub async fn save(&self, step: u64, files: Vec<(String, Vec<u8>)>) -> Result<String> {
        let dir = step_dir(step);
        let store = &self.location.store;
        let mut entries = Vec::with_capacity(files.len());
        let mut written = Vec::new();
        for (name, data) in files {
            entries.push(ManifestEntry {
                name: name.clone(),
                bytes: data.len() as u64,
                sha256: hex_sha256(&data),
            });
            let path = self.path(&[&dir, &name]);
            if let Err(e) = store.put(&path, PutPayload::from(data)).await {
                return Err(self.failed_save(&dir, &name, written, e).await);
            }
            written.push(path);
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            step,
            files: entries,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| self.err("manifest", e))?;
        if let Err(e) = store
            .put(&self.path(&[&dir, MANIFEST]), PutPayload::from(json))
            .await
        {
            return Err(self.failed_save(&dir, MANIFEST, written, e).await);
        }
        self.mark_verified(step);
        self.prune().await?;
        Ok(format!("{}/{dir}", self.location.url.trim_end_matches('/')))
    }

    /// Removes the files a failed save wrote (best effort: the save has no manifest, so
    /// what stays is skipped on resume anyway) and says what failed, with what to do when
    /// the location is full, read-only or not this user's.
    async fn failed_save(
        &self,
        dir: &str,
        name: &str,
        written: Vec<Path>,
        e: object_store::Error,
    ) -> TrainerError {
        for path in written {
            let _ = self.location.store.delete(&path).await;
        }
        let _ = self.location.store.delete(&self.path(&[dir, name])).await;
        let hint = match knn_indexer::Unwritable::find(&e) {
            Some((knn_indexer::Unwritable::Full, _)) => {
                "; the checkpoint location is full: free space there (or set \
                 `train.checkpoint.url` to a larger volume), then rerun `train`: it resumes \
                 from the newest checkpoint that was saved"
            }
            Some((knn_indexer::Unwritable::ReadOnly, _)) => {
                "; the checkpoint location is read-only: set `train.checkpoint.url` to a \
                 writable place"
            }
            Some((knn_indexer::Unwritable::Denied, _)) => {
                "; this user may not write there: fix the directory's owner or mode, or set \
                 `train.checkpoint.url` elsewhere"
            }
            None => "",
        };
        self.err(&format!("writing {dir}/{name}"), format!("{e}{hint}"))
    }

    /// Steps that have a directory, newest first (valid or not).
    pub async fn steps(&self) -> Result<Vec<u64>> {
        let listing = self
            .location
            .list_dir(Some(&self.location.prefix))
            .await
            .map_err(|e| self.err("listing", e))?;
        let mut steps: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.strip_prefix("step-")?.parse().ok())
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        Ok(steps)
    }

    /// Reads and verifies checkpoint `step`; `Err` says what is wrong with it.
    pub async fn load(&self, step: u64) -> Result<LoadedCheckpoint> {
        let dir = step_dir(step);
        let location = format!("{}/{dir}", self.location.url.trim_end_matches('/'));
        let bad = |reason: String| TrainerError::Checkpoint {
            location: location.clone(),
            reason,
        };
        let store = &self.location.store;
        let raw = match store.get(&self.path(&[&dir, MANIFEST])).await {
            Ok(r) => r
                .bytes()
                .await
                .map_err(|e| bad(format!("reading {MANIFEST}: {e}")))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(bad(format!("no {MANIFEST} (an interrupted save)")))
            }
            Err(e) => return Err(bad(format!("reading {MANIFEST}: {e}"))),
        };
        let manifest: Manifest = serde_json::from_slice(&raw)
            .map_err(|e| bad(format!("{MANIFEST} is unreadable: {e}")))?;
        if manifest.format != FORMAT || manifest.step != step {
            return Err(bad(format!(
                "{MANIFEST} says format {:?} step {}, expected {FORMAT:?} step {step}",
                manifest.format, manifest.step
            )));
        }
        let mut files = BTreeMap::new();
        for e in &manifest.files {
            let data = store
                .get(&self.path(&[&dir, &e.name]))
                .await
                .map_err(|err| bad(format!("reading {}: {err}", e.name)))?
                .bytes()
                .await
                .map_err(|err| bad(format!("reading {}: {err}", e.name)))?;
            if data.len() as u64 != e.bytes {
                return Err(bad(format!(
                    "{} is {} bytes, the manifest says {}",
                    e.name,
                    data.len(),
                    e.bytes
                )));
            }
            if hex_sha256(&data) != e.sha256 {
                return Err(bad(format!(
                    "{} does not match its SHA-256 in the manifest",
                    e.name
                )));
            }
            files.insert(e.name.clone(), data);
        }
        self.mark_verified(step);
        Ok(LoadedCheckpoint {
            step,
            location,
            files,
        })
    }

    /// The newest checkpoint that verifies; invalid newer ones are skipped with a warning.
    pub async fn latest_valid(&self) -> Result<Option<LoadedCheckpoint>> {
        for step in self.steps().await? {
            match self.load(step).await {
                Ok(c) => return Ok(Some(c)),
                Err(e) => tracing::warn!("skipping checkpoint: {e}; using the previous one"),
            }
        }
        Ok(None)
    }

    fn mark_verified(&self, step: u64) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(step);
    }

    fn is_verified(&self, step: u64) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&step)
    }

    /// Deletes every checkpoint older than the newest `keep_last` valid ones. A checkpoint
    /// this process wrote or verified counts as valid without being read again; any other is
    /// verified once.
    async fn prune(&self) -> Result<()> {
        let mut valid = 0;
        for step in self.steps().await? {
            if valid < self.keep_last {
                if self.is_verified(step) || self.load(step).await.is_ok() {
                    valid += 1;
                }
                continue;
            }
            let prefix = self.path(&[&step_dir(step)]);
            let objects: Vec<_> = self
                .location
                .list_all(Some(&prefix))
                .await
                .map_err(|e| self.err("listing an old checkpoint", e))?
                .into_iter()
                .map(|m| m.location)
                .collect();
            // The manifest first, so a half-deleted checkpoint is never taken as valid.
            let (manifest, rest): (Vec<_>, Vec<_>) = objects
                .into_iter()
                .partition(|p| p.filename() == Some(MANIFEST));
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&step);
            for p in manifest.into_iter().chain(rest) {
                self.location
                    .again(|| self.location.store.delete(&p))
                    .await
                    .map_err(|e| self.err("deleting an old checkpoint", e))?;
            }
        }
        Ok(())
    }
}
