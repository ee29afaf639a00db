//! `[train]`: every config type of the diffusion training loop and its validation, and the
//! [`TrajectoryConfig`] its checkpoints record. The parts' own sections live with the parts
//! ([`crate::data::DataConfig`], [`crate::diffusion::DiffusionConfig`],
//! [`crate::optim::OptimConfig`], [`crate::parallel::DistributedConfig`]); this file gathers
//! them under `[train]`.

use crate::autocast::AutocastDtype;
use crate::data::DataConfig;
use crate::diffusion::{DiffusionConfig, SamplerConfig};
use crate::optim::OptimConfig;
use crate::parallel::DistributedConfig;
use crate::unet::{UNetConfig, UNetPreset};
use crate::{Result, TrainerError};
use knn_indexer::clip::DeviceChoice;
use serde::{Deserialize, Serialize};
use tch::Device;

/// `[train.model]`: a preset, optionally with fields overridden.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `tiny`, `small`, `base` or `paper-400m`.
    #[serde(default)]
    pub preset: UNetPreset,
    /// Overrides the preset's `model_channels`.
    pub model_channels: Option<usize>,
    /// Overrides the preset's `channel_mult`.
    pub channel_mult: Option<Vec<usize>>,
    /// Overrides the preset's `num_res_blocks`.
    pub num_res_blocks: Option<usize>,
    /// Overrides the preset's `attention_resolutions_px`.
    pub attention_resolutions_px: Option<Vec<usize>>,
    /// Overrides the preset's `head_channels`.
    pub head_channels: Option<usize>,
    /// Overrides the preset's `norm_groups`.
    pub norm_groups: Option<usize>,
    /// Overrides the preset's `context_channels`.
    pub context_channels: Option<usize>,
    /// Dropout in residual blocks.
    #[serde(default)]
    pub dropout: f64,
}

impl ModelConfig {
    /// The U-Net for images of `image_size_px`, `cond_dim`-d embeddings and `k` neighbours.
    pub fn resolve(&self, image_size_px: usize, cond_dim: usize, k: usize) -> Result<UNetConfig> {
        let mut c = UNetConfig::preset(self.preset, image_size_px, cond_dim, k);
        if let Some(v) = self.model_channels {
            c.model_channels = v;
        }
        if let Some(v) = &self.channel_mult {
            c.channel_mult = v.clone();
        }
        if let Some(v) = self.num_res_blocks {
            c.num_res_blocks = v;
        }
        if let Some(v) = &self.attention_resolutions_px {
            c.attention_resolutions_px = v.clone();
        }
        if let Some(v) = self.head_channels {
            c.head_channels = v;
        }
        if let Some(v) = self.norm_groups {
            c.norm_groups = v;
        }
        if let Some(v) = self.context_channels {
            c.context_channels = v;
        }
        c.dropout = self.dropout;
        c.validate("train.model")?;
        Ok(c)
    }
}

/// `[train.checkpoint]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Where checkpoints go: a local path or an s3/gs/az URL (default
    /// `<output_dir>/checkpoints`).
    #[serde(default)]
    pub url: Option<String>,
    /// Save every this many optimiser steps (and at the last step).
    #[serde(default = "default_ckpt_every")]
    pub every_steps: u64,
    /// Also save when this many minutes have passed since the last save (0: by steps only).
    /// A long step or a slow store then costs at most this much work on a crash.
    #[serde(default)]
    pub every_minutes: f64,
    /// Valid checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    pub keep_last: usize,
}

fn default_ckpt_every() -> u64 {
    500
}
fn default_keep() -> usize {
    3
}

impl CheckpointConfig {
    /// Checks the settings under `section` (`train.checkpoint`).
    pub fn validate(&self, section: &str) -> Result<()> {
        if !(self.every_minutes >= 0.0 && self.every_minutes.is_finite()) {
            return Err(TrainerError::config(
                &format!("{section}.every_minutes"),
                "minutes between saves: 0 (steps only) or more, e.g. 30",
            ));
        }
        Ok(())
    }

    /// The configured URL, or `<output_dir>/checkpoints`.
    pub fn url_under(&self, output_dir: &str) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| format!("{}/checkpoints", output_dir.trim_end_matches('/')))
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            url: None,
            every_steps: default_ckpt_every(),
            every_minutes: 0.0,
            keep_last: default_keep(),
        }
    }
}

/// `[train.samples]`: grids of the held-out rows during training.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SampleGridConfig {
    /// Write a grid every this many steps (0: never).
    #[serde(default = "default_grid_every")]
    pub every_steps: u64,
    /// Held-out rows in the grid (the first ones of the kNN table's held-out rows).
    #[serde(default = "default_grid_rows")]
    pub rows: usize,
    /// Classifier-free guidance scale.
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// The reverse process.
    #[serde(default)]
    pub sampler: SamplerConfig,
}

fn default_grid_every() -> u64 {
    1000
}
fn default_grid_rows() -> usize {
    8
}
fn default_guidance() -> f64 {
    3.0
}

impl Default for SampleGridConfig {
    fn default() -> Self {
        Self {
            every_steps: default_grid_every(),
            rows: default_grid_rows(),
            guidance: default_guidance(),
            sampler: SamplerConfig::default(),
        }
    }
}

/// Numeric precision of the forward and backward passes. Weights, optimiser state and EMA
/// stay f32 in every mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    /// bf16 autocast on a GPU, f32 on the CPU.
    #[default]
    Auto,
    /// f32 everywhere.
    F32,
    /// CUDA autocast in bf16 (GPU only).
    Bf16,
    /// CUDA autocast in f16 with dynamic loss scaling (GPU only; for GPUs without bf16).
    F16,
}

impl TrainPrecision {
    /// The autocast precision on `device` (`None`: f32); bf16 and f16 need a GPU. `key`
    /// names the setting in errors.
    pub fn autocast(self, device: Device, key: &str) -> Result<Option<AutocastDtype>> {
        match (self, device) {
            (TrainPrecision::F32, _) | (TrainPrecision::Auto, Device::Cpu) => Ok(None),
            (TrainPrecision::Bf16 | TrainPrecision::F16, Device::Cpu) => Err(TrainerError::config(
                key,
                "bf16 and f16 autocast need a GPU; use `auto` or `f32` on the CPU",
            )),
            (TrainPrecision::F16, _) => Ok(Some(AutocastDtype::F16)),
            _ => Ok(Some(AutocastDtype::Bf16)),
        }
    }
}

/// `[train]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Local directory for metrics, sample grids and (by default) checkpoints.
    #[serde(default = "default_output_dir")]
    pub output_dir: String,
    /// Neighbours per sample (≤ the precomputed k; 0 trains the no-kNN ablation).
    #[serde(default = "default_k")]
    pub k: usize,
    /// Seed of every random stream.
    #[serde(default)]
    pub seed: u64,
    /// Images per rank per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimiser step.
    #[serde(default = "default_accum")]
    pub grad_accum: usize,
    /// Optimiser steps to train for (a resumed run continues up to it).
    #[serde(default = "default_max_steps")]
    pub max_steps: u64,
    /// Probability of dropping a sample's condition (classifier-free guidance).
    #[serde(default = "default_drop")]
    pub cond_drop_prob: f64,
    /// `auto`, `cpu` or `cuda`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// `auto`, `f32` or `bf16`.
    #[serde(default)]
    pub precision: TrainPrecision,
    /// Write a metrics line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// The tables.
    #[serde(default)]
    pub data: DataConfig,
    /// The U-Net.
    #[serde(default)]
    pub model: ModelConfig,
    /// The diffusion process.
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    /// Optimiser, schedule, clipping, EMA.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Sample grids during training.
    #[serde(default)]
    pub samples: SampleGridConfig,
    /// How the ranks of a data-parallel job talk.
    #[serde(default)]
    pub distributed: DistributedConfig,
}

fn default_output_dir() -> String {
    "runs/train".into()
}
fn default_k() -> usize {
    10
}
fn default_batch() -> usize {
    16
}
fn default_accum() -> usize {
    1
}
fn default_max_steps() -> u64 {
    2000
}
fn default_drop() -> f64 {
    0.1
}
fn default_log_every() -> u64 {
    10
}

impl TrainConfig {
    /// Where checkpoints go.
    pub fn checkpoint_url(&self) -> String {
        self.checkpoint.url_under(&self.output_dir)
    }

    /// Checks ranges and that the tables are named; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.cond_drop_prob) {
            return Err(TrainerError::config(
                "train.cond_drop_prob",
                "must be in [0, 1); 0.1 is usual (0 disables guidance)",
            ));
        }
        if !(0.0..=1.0).contains(&self.data.knn_dropout) {
            return Err(TrainerError::config(
                "train.data.knn_dropout",
                "a probability in [0, 1]",
            ));
        }
        if self.max_steps == 0 {
            return Err(TrainerError::config(
                "train.max_steps",
                "must be at least 1 (the step a resumed run trains up to)",
            ));
        }
        if self.batch_size == 0 {
            return Err(TrainerError::config(
                "train.batch_size",
                "must be at least 1",
            ));
        }
        if self.grad_accum == 0 {
            return Err(TrainerError::config(
                "train.grad_accum",
                "must be at least 1",
            ));
        }
        if self.checkpoint.every_steps == 0 {
            return Err(TrainerError::config(
                "train.checkpoint.every_steps",
                "must be at least 1",
            ));
        }
        self.checkpoint.validate("train.checkpoint")?;
        if self.data.embeddings.is_none() || self.data.knn.is_none() {
            return Err(TrainerError::config(
                "train.data.embeddings",
                "no embeddings or kNN table named (set train.data.embeddings / train.data.knn, \
                 or embed.output.table)",
            ));
        }
        self.optim.validate()
    }
}

/// What a checkpoint's `config` records and a resume must agree with.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct TrajectoryConfig {
    /// The U-Net as built.
    pub unet: UNetConfig,
    /// The diffusion process.
    pub diffusion: DiffusionConfig,
    /// Optimiser settings.
    pub optim: OptimConfig,
    /// Seed.
    pub seed: u64,
    /// Samples per micro-batch over all ranks (`batch_size` x world size): a job may resume
    /// on another number of ranks when this stays the same.
    pub global_batch_size: usize,
    /// Accumulation.
    pub grad_accum: usize,
    /// Condition drop.
    pub cond_drop_prob: f64,
    /// Flips.
    pub flip: bool,
    /// Neighbour-count dropout.
    pub knn_dropout: f64,
    /// The held-out split of the kNN table.
    pub split: Option<knn_datasets::SplitConfig>,
    /// kNN table (whose metadata pins the embeddings version).
    pub knn_table: String,
    /// Its rows.
    pub rows: u64,
    /// The CLIP that embedded the training table (its identity), when recorded: prompts
    /// must be embedded by the same one.
    #[serde(default)]
    pub clip: Option<String>,
}
