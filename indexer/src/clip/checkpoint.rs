//! Reading an HF CLIP checkpoint directory: `config.json`, `model.safetensors`, and when
//! present `tokenizer.json` and `preprocessor_config.json`. A checkpoint at an object-store
//! URL is first copied into a local cache directory. Model code never touches files: this
//! module reads the config, builds [`ClipModel`] with `new`, then fills its VarStore.

use super::{ClipConfig, ClipImageProcessor, ClipModel, ClipTokenizer};
use crate::{IndexerError, Result};
use futures::TryStreamExt;
use knn_datasets::{SourceLocation, StorageConfig};
use object_store::ObjectStoreExt;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind};

const FILES: [(&str, bool); 5] = [
    ("config.json", true),
    ("model.safetensors", true),
    ("tokenizer.json", false),
    ("preprocessor_config.json", false),
    (MODALITY_FILE, false),
];

/// Where `train-clip` records the mean text and image embeddings of its training pairs.
pub const MODALITY_FILE: &str = "modality.json";

/// The mean L2-normalised text and image embeddings of a CLIP's training pairs: the two ends
/// of its modality gap (Liang et al. 2022, arXiv 2203.02053). See
/// [`LoadedClip::embed_prompts`].
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct ModalityMeans {
    /// Mean text embedding.
    pub text_mean: Vec<f32>,
    /// Mean image embedding.
    pub image_mean: Vec<f32>,
    /// Pairs averaged.
    pub pairs: usize,
}

/// A checkpoint directory on local disk with its parsed config.
#[derive(Clone, Debug)]
pub struct ClipCheckpoint {
    /// The local directory.
    pub dir: PathBuf,
    /// Parsed `config.json`.
    pub config: ClipConfig,
    /// Parsed `preprocessor_config.json`, or CLIP's defaults for the model's input size.
    pub processor: ClipImageProcessor,
}

/// A CLIP ready to run: weights, preprocessing and (when the checkpoint has one) tokenizer.
#[derive(Debug)]
pub struct LoadedClip {
    /// Holds the weights; keep it alive as long as the model.
    pub vs: nn::VarStore,
    /// The network.
    pub model: ClipModel,
    /// Image preprocessing.
    pub processor: ClipImageProcessor,
    /// Text tokenisation, when `tokenizer.json` exists.
    pub tokenizer: Option<ClipTokenizer>,
    /// A random-weight CLIP without a tokenizer: texts become byte tokens (see
    /// [`LoadedClip::tokenize`]).
    pub random: bool,
    /// The modality means, when the checkpoint has `modality.json`.
    pub modality: Option<ModalityMeans>,
}

impl ClipCheckpoint {
    /// Opens a checkpoint at a local path or an object-store URL (copied to `cache_dir`).
    pub async fn open(location: &str, storage: &StorageConfig, cache_dir: &Path) -> Result<Self> {
        let local = Path::new(location);
        let dir = if local.is_dir() {
            local.to_path_buf()
        } else if location.starts_with("file://") {
            url_to_path(location)?
        } else {
            fetch(location, storage, cache_dir).await?
        };
        Self::open_dir(&dir)
    }

    /// Opens a local checkpoint directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let bad = |reason: String| IndexerError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| bad(format!("cannot read config.json: {e}")))?;
        let config: ClipConfig = serde_json::from_str(&text)
            .map_err(|e| bad(format!("config.json is not a CLIP config: {e}")))?;
        if !dir.join("model.safetensors").is_file() {
            return Err(bad(
                "no model.safetensors (pickle .bin checkpoints are not read: convert with \
                 `model.save_pretrained(dir, safe_serialization=True)`)"
                    .into(),
            ));
        }
        let processor = match std::fs::read_to_string(dir.join("preprocessor_config.json")) {
            Ok(t) => ClipImageProcessor::from_json(&t).map_err(|e| bad(e.to_string()))?,
            Err(_) => ClipImageProcessor::for_image_size(config.vision_config.image_size as u32),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            processor,
        })
    }

    /// Builds the model on `device` in `kind` (f32, or f16/bf16 on a GPU) and loads weights.
    pub fn load(&self, device: Device, kind: Kind) -> Result<LoadedClip> {
        let mut vs = nn::VarStore::new(device);
        let model = ClipModel::new(vs.root(), &self.config);
        vs.load(self.dir.join("model.safetensors"))
            .map_err(|e| IndexerError::Checkpoint {
                path: self.dir.clone(),
                reason: format!("model.safetensors does not fit config.json: {e}"),
            })?;
        vs.set_kind(kind);
        let tokenizer = self.tokenizer()?;
        let modality = self.modality()?;
        Ok(LoadedClip {
            vs,
            model,
            processor: self.processor.clone(),
            tokenizer,
            random: false,
            modality,
        })
    }

    /// The modality means, when the checkpoint has `modality.json` (of the model's width).
    pub fn modality(&self) -> Result<Option<ModalityMeans>> {
        let path = self.dir.join(MODALITY_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(IndexerError::Checkpoint {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let m: ModalityMeans =
            serde_json::from_str(&text).map_err(|e| IndexerError::Checkpoint {
                path: path.clone(),
                reason: format!("unreadable: {e}"),
            })?;
        let d = self.config.projection_dim as usize;
        if m.text_mean.len() != d || m.image_mean.len() != d {
            return Err(IndexerError::Checkpoint {
                path,
                reason: format!("its means are not {d}-d, the model's projection_dim"),
            });
        }
        Ok(Some(m))
    }

    /// The tokenizer, when the checkpoint has `tokenizer.json`.
    pub fn tokenizer(&self) -> Result<Option<ClipTokenizer>> {
        let path = self.dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let pad_id = pad_token_id(&self.dir).unwrap_or(self.config.text_config.pad_token_id);
        ClipTokenizer::from_file(
            &path,
            self.config.text_config.max_position_embeddings as usize,
            pad_id as u32,
        )
        .map(Some)
    }
}

/// A CLIP with random weights (seeded): the embedded default when no checkpoint is given.
pub fn random_clip(config: &ClipConfig, seed: i64, device: Device) -> LoadedClip {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(device);
    let model = ClipModel::new(vs.root(), config);
    LoadedClip {
        vs,
        model,
        processor: ClipImageProcessor::for_image_size(config.vision_config.image_size as u32),
        tokenizer: None,
        random: true,
        modality: None,
    }
}

/// The pad token id HF's tokenizer config names, looked up in `tokenizer.json`'s vocab.
fn pad_token_id(dir: &Path) -> Option<i64> {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?)
            .ok()?;
    let pad = match cfg.get("pad_token")? {
        serde_json::Value::String(s) => s.clone(),
        other => other.get("content")?.as_str()?.to_string(),
    };
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).ok()?).ok()?;
    tok.get("model")?.get("vocab")?.get(&pad)?.as_i64()
}

fn url_to_path(url: &str) -> Result<PathBuf> {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.to_file_path().ok())
        .ok_or_else(|| IndexerError::Checkpoint {
            path: PathBuf::from(url),
            reason: "not a local file URL".into(),
        })
}

/// Copies a remote checkpoint into `cache_dir/<hash of url>/`, skipping files already there
/// with the right size.
async fn fetch(url: &str, storage: &StorageConfig, cache_dir: &Path) -> Result<PathBuf> {
    let loc = SourceLocation::open(url, storage)?;
    let digest = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(url.as_bytes());
        d.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let dir = cache_dir.join(digest);
    let io = |e: std::io::Error, path: &Path| IndexerError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io(e, &dir))?;
    for (name, required) in FILES {
        let path = loc.prefix.clone().join(name);
        let meta = match loc.store.head(&path).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) if !required => continue,
            Err(e) => {
                return Err(knn_datasets::DatasetError::from_store(loc.url_of(&path), e).into())
            }
        };
        let target = dir.join(name);
        if tokio::fs::metadata(&target).await.map(|m| m.len()).ok() == Some(meta.size) {
            continue;
        }
        let partial = dir.join(format!("{name}.partial"));
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| io(e, &partial))?;
        let mut body = loc
            .store
            .get(&path)
            .await
            .map_err(|e| knn_datasets::DatasetError::from_store(loc.url_of(&path), e))?
            .into_stream();
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| knn_datasets::DatasetError::from_store(loc.url_of(&path), e))?
        {
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(|e| io(e, &partial))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| io(e, &partial))?;
        tokio::fs::rename(&partial, &target)
            .await
            .map_err(|e| io(e, &target))?;
    }
    Ok(dir)
}
