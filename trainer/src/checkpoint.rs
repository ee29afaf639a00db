//! Checkpoints: what the loop hands over (model, EMA and optimizer tensors, the JSON train
//! state) written as files under `<dir>/step-NNNNNNNNNN/` on a local path or any object-store
//! URL, with `MANIFEST.json` (each file's size and SHA-256) written last.
//!
//! A checkpoint exists only once its manifest does and every file matches it: a crash mid-save,
//! a torn upload or a flipped byte make it invalid, and loading falls back to the previous one
//! with a warning. Tensors are safetensors (never pickle). After each save only the newest
//! `keep_last` valid checkpoints are kept. No credential is ever written: the state holds the
//! training config, which has none.

use crate::data::DataCursor;
use crate::{Result, TrainerError};
use bytes::Bytes;
use futures::TryStreamExt;
use knn_datasets::{SourceLocation, StorageConfig};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Name of the manifest inside a checkpoint directory.
pub const MANIFEST: &str = "MANIFEST.json";
/// Format tag in every manifest.
pub const FORMAT: &str = "knn-diffusion-checkpoint/1";

/// The training state saved beside the tensors.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: u64,
    /// The next micro-batch the data loader reads.
    pub cursor: DataCursor,
    /// Every random stream derives from this seed: data order from (seed, epoch), each
    /// sample's flip / drop / step / noise from (seed, epoch, position), the model's dropout
    /// from (seed, step, rank). Nothing else holds random state.
    pub seed: u64,
    /// SHA-256 of `config`.
    pub config_hash: String,
    /// The settings that determine the training trajectory.
    pub config: serde_json::Value,
    /// Data-parallel ranks that trained it.
    pub world_size: usize,
    /// Loss of every optimiser step since the previous checkpoint (diagnostics).
    pub recent_losses: Vec<f64>,
}

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
        from_safetensors(self.file(name)?).map_err(|reason| TrainerError::Checkpoint {
            location: format!("{}/{name}", self.location),
            reason,
        })
    }

    /// The JSON train state.
    pub fn state(&self) -> Result<TrainState> {
        serde_json::from_slice(self.file("state.json")?).map_err(|e| TrainerError::Checkpoint {
            location: format!("{}/state.json", self.location),
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
    /// deletes all but the newest `keep_last` valid checkpoints. Returns its location.
    pub async fn save(&self, step: u64, files: Vec<(String, Vec<u8>)>) -> Result<String> {
        let dir = step_dir(step);
        let store = &self.location.store;
        let mut entries = Vec::with_capacity(files.len());
        for (name, data) in files {
            entries.push(ManifestEntry {
                name: name.clone(),
                bytes: data.len() as u64,
                sha256: hex_sha256(&data),
            });
            store
                .put(&self.path(&[&dir, &name]), PutPayload::from(data))
                .await
                .map_err(|e| self.err(&format!("writing {dir}/{name}"), e))?;
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            step,
            files: entries,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| self.err("manifest", e))?;
        store
            .put(&self.path(&[&dir, MANIFEST]), PutPayload::from(json))
            .await
            .map_err(|e| self.err(&format!("writing {dir}/{MANIFEST}"), e))?;
        self.mark_verified(step);
        self.prune().await?;
        Ok(format!("{}/{dir}", self.location.url.trim_end_matches('/')))
    }

    /// Steps that have a directory, newest first (valid or not).
    pub async fn steps(&self) -> Result<Vec<u64>> {
        let listing = self
            .location
            .store
            .list_with_delimiter(Some(&self.location.prefix))
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
                .store
                .list(Some(&prefix))
                .map_ok(|m| m.location)
                .try_collect()
                .await
                .map_err(|e| self.err("listing an old checkpoint", e))?;
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
                    .store
                    .delete(&p)
                    .await
                    .map_err(|e| self.err("deleting an old checkpoint", e))?;
            }
        }
        Ok(())
    }
}

struct TensorBytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_of(kind: Kind) -> std::result::Result<safetensors::Dtype, String> {
    Ok(match kind {
        Kind::Float => safetensors::Dtype::F32,
        Kind::Double => safetensors::Dtype::F64,
        Kind::Half => safetensors::Dtype::F16,
        Kind::BFloat16 => safetensors::Dtype::BF16,
        Kind::Int64 => safetensors::Dtype::I64,
        Kind::Int => safetensors::Dtype::I32,
        other => return Err(format!("cannot store tensors of kind {other:?}")),
    })
}

fn kind_of(dtype: safetensors::Dtype) -> std::result::Result<Kind, String> {
    Ok(match dtype {
        safetensors::Dtype::F32 => Kind::Float,
        safetensors::Dtype::F64 => Kind::Double,
        safetensors::Dtype::F16 => Kind::Half,
        safetensors::Dtype::BF16 => Kind::BFloat16,
        safetensors::Dtype::I64 => Kind::Int64,
        safetensors::Dtype::I32 => Kind::Int,
        other => return Err(format!("unsupported dtype {other:?}")),
    })
}

/// Named tensors → safetensors bytes (copied to the CPU first).
pub fn to_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind()).map_err(|r| TrainerError::Checkpoint {
            location: name.clone(),
            reason: r,
        })?;
        let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, t.numel())?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), TensorBytes { dtype, shape, data }));
    }
    safetensors::serialize(owned.iter().map(|(n, t)| (n.as_str(), t)), None).map_err(|e| {
        TrainerError::Checkpoint {
            location: "safetensors".into(),
            reason: e.to_string(),
        }
    })
}

/// safetensors bytes → named tensors on the CPU, sorted by name.
pub fn from_safetensors(bytes: &[u8]) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip() {
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::from_slice(&[7i64]);
        let bytes = to_safetensors(&[
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ])
        .unwrap();
        let back = from_safetensors(&bytes).unwrap();
        let get = |n: &str| back.iter().find(|p| p.0 == n).unwrap().1.shallow_clone();
        assert!(get("a").equal(&a));
        assert!(get("b").equal(&b));
    }
}
