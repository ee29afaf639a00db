//! How the pipeline chooses and loads its CLIP (`[embed.clip]`): a checkpoint or a random
//! preset, the device and precision, and the identity recorded in every table the CLIP
//! embeds, so that embeddings of two different CLIPs never meet.

use super::checkpoint::random_clip;
use super::{ClipCheckpoint, ClipConfig, LoadedClip};
use crate::{IndexerError, Result};
use knn_datasets::StorageConfig;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// Which device runs CLIP.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The first CUDA GPU when there is one, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (an error when there is none).
    Cuda,
}

/// Numeric precision of CLIP.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f16 on a GPU, f32 on the CPU.
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// 16-bit floats (GPU).
    F16,
    /// bfloat16 (GPU).
    Bf16,
}

/// The CLIP model used.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipSettings {
    /// HF checkpoint directory or URL (config.json + model.safetensors). Empty: a tiny
    /// random-weight CLIP, for trying the pipeline only (a warning says so).
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Local cache for checkpoints fetched from object storage.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: String,
    /// `auto`, `cpu` or `cuda`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// `auto`, `f32`, `f16` or `bf16`.
    #[serde(default)]
    pub precision: Precision,
    /// Images per CLIP forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Seed of the random CLIP when no checkpoint is given.
    #[serde(default)]
    pub random_seed: i64,
    /// Shape of the random CLIP when no checkpoint is given: `tiny`, `vit-b-32` or
    /// `vit-l-14` (random weights: for trials and speed benchmarks only).
    #[serde(default)]
    pub random_preset: RandomPreset,
}

/// Architecture of a random-weight CLIP.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RandomPreset {
    /// [`ClipConfig::tiny`]: d = 64, 32 px input.
    #[default]
    Tiny,
    /// [`ClipConfig::vit_b_32`]: d = 512, 224 px input.
    #[serde(rename = "vit-b-32")]
    VitB32,
    /// [`ClipConfig::vit_l_14`]: d = 768, 224 px input.
    #[serde(rename = "vit-l-14")]
    VitL14,
}

impl RandomPreset {
    /// The architecture.
    pub fn config(self) -> ClipConfig {
        match self {
            RandomPreset::Tiny => ClipConfig::tiny(),
            RandomPreset::VitB32 => ClipConfig::vit_b_32(),
            RandomPreset::VitL14 => ClipConfig::vit_l_14(),
        }
    }

    /// Its name in config files.
    pub fn name(self) -> &'static str {
        match self {
            RandomPreset::Tiny => "tiny",
            RandomPreset::VitB32 => "vit-b-32",
            RandomPreset::VitL14 => "vit-l-14",
        }
    }
}

fn default_cache_dir() -> String {
    ".cache/clip".into()
}
fn default_batch() -> usize {
    64
}

impl Default for ClipSettings {
    fn default() -> Self {
        Self {
            checkpoint: None,
            cache_dir: default_cache_dir(),
            device: DeviceChoice::Auto,
            precision: Precision::Auto,
            batch_size: default_batch(),
            random_seed: 0,
            random_preset: RandomPreset::Tiny,
        }
    }
}

/// `cuda` was asked for on a machine where libtorch sees no CUDA GPU: the one way
/// [`DeviceChoice::resolve`] fails. Callers report it under their own config key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`cuda` asked for but libtorch sees no CUDA GPU; use `auto` or `cpu`")]
pub struct NoCudaDevice;

impl DeviceChoice {
    /// The device, checked against what this machine has.
    pub fn resolve(self) -> std::result::Result<Device, NoCudaDevice> {
        match self {
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceChoice::Cuda => Err(NoCudaDevice),
        }
    }
}

impl ClipSettings {
    /// The device to run on, checked against what this machine has.
    pub fn device(&self) -> Result<Device> {
        self.device.resolve().map_err(|e| IndexerError::Config {
            key: "embed.clip.device".into(),
            reason: e.to_string(),
        })
    }

    /// The tensor kind for `device`.
    pub fn kind(&self, device: Device) -> Result<Kind> {
        match (self.precision, device) {
            (Precision::Auto, Device::Cpu) | (Precision::F32, _) => Ok(Kind::Float),
            (Precision::Auto, _) | (Precision::F16, Device::Cuda(_)) => Ok(Kind::Half),
            (Precision::Bf16, _) => Ok(Kind::BFloat16),
            (Precision::F16, _) => Err(IndexerError::Config {
                key: "embed.clip.precision".into(),
                reason: "f16 needs a GPU; use f32 or bf16 on the CPU".into(),
            }),
        }
    }
}

impl ClipSettings {
    /// Loads the configured CLIP (or the tiny random one) and names it for the table metadata.
    pub async fn load(
        &self,
        storage: &StorageConfig,
        device: Device,
    ) -> Result<(LoadedClip, String)> {
        let settings = self;
        match settings.checkpoint.as_deref().filter(|c| !c.is_empty()) {
            Some(location) => {
                let ckpt = ClipCheckpoint::open(
                    location,
                    storage,
                    std::path::Path::new(&settings.cache_dir),
                )
                .await?;
                let kind = settings.kind(device)?;
                let identity = checkpoint_identity(&ckpt)?;
                let loaded = ckpt.load(device, kind)?;
                Ok((loaded, identity))
            }
            None => {
                tracing::warn!(
                    "no `embed.clip.checkpoint` configured: using a {} CLIP with random weights \
                 (seed {}). Its embeddings carry no meaning; set `embed.clip.checkpoint` to an \
                 HF CLIP directory (config.json + model.safetensors) for real use",
                    settings.random_preset.name(),
                    settings.random_seed
                );
                let cfg = settings.random_preset.config();
                let loaded = random_clip(&cfg, settings.random_seed, device);
                Ok((
                    loaded,
                    format!(
                        "random-{}(seed={})",
                        settings.random_preset.name(),
                        settings.random_seed
                    ),
                ))
            }
        }
    }
}

/// A short identity of a checkpoint: the hashes of its config.json and of its weights, so
/// two CLIPs of one shape but other weights (another seed, more training) differ.
fn checkpoint_identity(ckpt: &ClipCheckpoint) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let bad = |e: std::io::Error| IndexerError::Checkpoint {
        path: ckpt.dir.clone(),
        reason: e.to_string(),
    };
    let short = |d: &[u8]| {
        d.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let config = std::fs::read(ckpt.dir.join("config.json")).map_err(bad)?;
    let mut weights = std::fs::File::open(ckpt.dir.join("model.safetensors")).map_err(bad)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = weights.read(&mut buf).map_err(bad)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!(
        "hf:{}:{}",
        short(&sha2::Sha256::digest(&config)),
        short(&hasher.finalize())
    ))
}
