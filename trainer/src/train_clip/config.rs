//! `[train_clip]`: contrastive training of the project's own CLIP on captioned shards.

use crate::config::{CheckpointConfig, TrainPrecision};
use crate::optim::OptimConfig;
use crate::parallel::DistributedConfig;
use crate::{Result, TrainerError};
use knn_datasets::{ShardFormat, SplitConfig};
use knn_indexer::clip::{ClipConfig, ClipTextConfig, ClipVisionConfig, DeviceChoice};
use serde::{Deserialize, Serialize};

/// `[train_clip.data]`: the captioned shards (img2dataset parquet, or WebDataset with `.txt`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClipDataConfig {
    /// Where the shards are: a local path or an s3/gs/az URL; every shard below it is read
    /// (`data/captioned/` holds all the sets `data fetch` writes).
    #[serde(default = "default_url")]
    pub url: String,
    /// `parquet` or `webdataset`.
    #[serde(default = "default_format")]
    pub format: ShardFormat,
    /// Parquet: the binary image column.
    #[serde(default = "default_image_column")]
    pub image_column: String,
    /// Parquet: the key column.
    #[serde(default = "default_key_column")]
    pub key_column: String,
    /// The caption column (WebDataset: the `.txt` member when `caption`).
    #[serde(default = "default_caption_column")]
    pub caption_column: String,
    /// Captions longer than this (in characters) are rejected as `caption_too_long`.
    #[serde(default = "default_max_caption_chars")]
    pub max_caption_chars: usize,
    /// Records larger than this are rejected.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Largest width x height decoded (checked from the header).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Micro-batches prepared ahead of the model.
    #[serde(default = "default_prefetch")]
    pub prefetch_batches: usize,
    /// Each training caption is put in one of these (`{}` is the caption), drawn per sample,
    /// so the text tower reads "a red heart" as it reads "red heart": captions are tags,
    /// prompts are phrases. Held-out recall uses the captions as they are.
    #[serde(default = "default_templates")]
    pub caption_templates: Vec<String>,
    /// Each training image is a random square crop of at least this fraction of its side,
    /// scaled back (1: no crops): the towers learn what a thing is, not where it sits.
    #[serde(default = "default_crop_scale")]
    pub random_crop_scale: f64,
    /// Probability that a training caption is cut to its first comma-separated part
    /// (`red heart, emotion, love` → `red heart`): captions list tags, prompts name a thing.
    #[serde(default = "default_first_part")]
    pub first_part_prob: f64,
}

fn default_url() -> String {
    "data/captioned/".into()
}
fn default_format() -> ShardFormat {
    ShardFormat::Parquet
}
fn default_image_column() -> String {
    "png".into()
}
fn default_key_column() -> String {
    "key".into()
}
fn default_caption_column() -> String {
    "caption".into()
}
fn default_max_caption_chars() -> usize {
    300
}
fn default_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_pixels() -> u64 {
    89_478_485
}
fn default_prefetch() -> usize {
    4
}
fn default_crop_scale() -> f64 {
    0.9
}
fn default_first_part() -> f64 {
    0.5
}
fn default_templates() -> Vec<String> {
    ["{}", "a {}", "an image of {}", "a picture of a {}"]
        .map(String::from)
        .to_vec()
}

impl Default for ClipDataConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

/// A named CLIP size for `train-clip`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClipPreset {
    /// 32 px input, 8 px patches, width 64, 2 layers a tower, d = 64 (~0.4M parameters):
    /// tests.
    Tiny,
    /// 32 px input, 8 px patches, width 128, 3 layers a tower, 24 tokens of context,
    /// d = 128 (~1.8M parameters): the demo.
    #[default]
    Small,
    /// 64 px input, 8 px patches, width 256, 6 layers a tower, d = 256 (~10M parameters).
    Base,
}

/// `[train_clip.model]`: a preset, with any field overridden.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClipModelConfig {
    /// `tiny`, `small` or `base`.
    #[serde(default)]
    pub preset: ClipPreset,
    /// Input side of the image tower in pixels.
    pub image_size_px: Option<i64>,
    /// Patch side in pixels.
    pub patch_size_px: Option<i64>,
    /// Width of both towers.
    pub width: Option<i64>,
    /// Layers of each tower.
    pub layers: Option<i64>,
    /// Attention heads of each tower.
    pub heads: Option<i64>,
    /// Dimension of the joint embedding space (the pipeline's `d`).
    pub embed_dim: Option<i64>,
    /// Tokens of context of the text tower.
    pub context_tokens: Option<i64>,
    /// Tokens of the BPE vocabulary trained on the captions.
    pub vocab_size: Option<i64>,
}

impl ClipModelConfig {
    /// The architecture, as `config.json` will record it.
    pub fn resolve(&self) -> Result<ClipConfig> {
        let (side, patch, width, layers, heads, dim, ctx, vocab) = match self.preset {
            ClipPreset::Tiny => (32, 8, 64, 2, 4, 64, 32, 1024),
            ClipPreset::Small => (32, 8, 128, 3, 4, 128, 24, 4096),
            ClipPreset::Base => (64, 8, 256, 6, 8, 256, 48, 8192),
        };
        let side = self.image_size_px.unwrap_or(side);
        let patch = self.patch_size_px.unwrap_or(patch);
        let width = self.width.unwrap_or(width);
        let layers = self.layers.unwrap_or(layers);
        let heads = self.heads.unwrap_or(heads);
        let bad =
            |k: &str, r: String| Err(TrainerError::config(&format!("train_clip.model.{k}"), r));
        if patch <= 0 || side <= 0 || side % patch != 0 {
            return bad(
                "patch_size_px",
                format!("{patch} must divide image_size_px = {side}"),
            );
        }
        if heads <= 0 || width <= 0 || width % heads != 0 {
            return bad("heads", format!("{heads} must divide width = {width}"));
        }
        let ctx = self.context_tokens.unwrap_or(ctx);
        if ctx < 3 {
            return bad(
                "context_tokens",
                "needs at least 3 (begin, a token, end)".into(),
            );
        }
        let vocab = self.vocab_size.unwrap_or(vocab);
        if vocab < 300 {
            return bad(
                "vocab_size",
                "needs at least 300 (256 bytes and the special tokens)".into(),
            );
        }
        let text = ClipTextConfig {
            vocab_size: vocab,
            hidden_size: width,
            intermediate_size: 4 * width,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            max_position_embeddings: ctx,
            eos_token_id: i64::from(knn_indexer::clip::tokenizer::EOS_TOKEN.1),
            pad_token_id: i64::from(knn_indexer::clip::tokenizer::PAD_TOKEN.1),
            ..Default::default()
        };
        let vision = ClipVisionConfig {
            hidden_size: width,
            intermediate_size: 4 * width,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            image_size: side,
            patch_size: patch,
            ..Default::default()
        };
        Ok(ClipConfig {
            text_config: text,
            vision_config: vision,
            projection_dim: self.embed_dim.unwrap_or(dim),
        })
    }
}

/// `[train_clip.judge]`: what makes the judge CLIP another model: its own seed, its own
/// held-out split, its own directory. `train-clip --judge` trains it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// Its run directory.
    #[serde(default = "default_judge_dir")]
    pub output_dir: String,
    /// Its seed.
    #[serde(default = "default_judge_seed")]
    pub seed: u64,
    /// The salt of its held-out split.
    #[serde(default = "default_judge_salt")]
    pub salt: String,
}

fn default_judge_dir() -> String {
    "runs/clip-judge".into()
}
fn default_judge_seed() -> u64 {
    1
}
fn default_judge_salt() -> String {
    "judge".into()
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            output_dir: default_judge_dir(),
            seed: default_judge_seed(),
            salt: default_judge_salt(),
        }
    }
}

/// `[train_clip]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainClipConfig {
    /// Run directory: the captions table, tokenizer, checkpoints, metrics, and the exported
    /// model under `model/`.
    #[serde(default = "default_output_dir")]
    pub output_dir: String,
    /// Where the HF CLIP directory goes (default `<output_dir>/model`).
    #[serde(default)]
    pub export_dir: Option<String>,
    /// Seed of the weights and the data order.
    #[serde(default)]
    pub seed: u64,
    /// Pairs per rank per step (the contrastive batch is this times the ranks).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Optimiser steps.
    #[serde(default = "default_max_steps")]
    pub max_steps: u64,
    /// `auto`, `cpu` or `cuda`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// `auto` or `f32` (`bf16`/`f16` on a GPU).
    #[serde(default)]
    pub precision: TrainPrecision,
    /// A metrics line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Held-out recall every this many steps (and at the end; 0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// The held-out split (default: the project's `[split]`, so `eval`'s held-out records are
    /// never trained on).
    #[serde(default)]
    pub split: Option<SplitConfig>,
    /// The shards.
    #[serde(default)]
    pub data: ClipDataConfig,
    /// The architecture.
    #[serde(default)]
    pub model: ClipModelConfig,
    /// AdamW and its schedule.
    #[serde(default = "default_optim")]
    pub optim: OptimConfig,
    /// Checkpoints.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Ranks of a data-parallel job.
    #[serde(default)]
    pub distributed: DistributedConfig,
    /// The judge CLIP (`train-clip --judge`).
    #[serde(default)]
    pub judge: JudgeConfig,
}

fn default_output_dir() -> String {
    "runs/clip".into()
}
fn default_batch() -> usize {
    256
}
fn default_max_steps() -> u64 {
    2000
}
fn default_log_every() -> u64 {
    20
}
fn default_optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-3,
        warmup_steps: 100,
        weight_decay: 0.1,
        beta2: 0.98,
        eps: 1e-6,
        ema_decay: 0.0,
        ..Default::default()
    }
}

impl TrainClipConfig {
    /// This config turned into the judge's: its seed, split salt and directories.
    pub fn for_judge(&self) -> Self {
        let mut c = self.clone();
        c.output_dir = self.judge.output_dir.clone();
        c.export_dir = None;
        c.seed = self.judge.seed;
        c.split = Some(SplitConfig {
            salt: self.judge.salt.clone(),
            ..self.split()
        });
        c.checkpoint.url = None;
        c
    }

    /// The held-out split in force.
    pub fn split(&self) -> SplitConfig {
        self.split.clone().unwrap_or_default()
    }

    /// The HF directory the run exports.
    pub fn export_dir(&self) -> String {
        self.export_dir
            .clone()
            .unwrap_or_else(|| format!("{}/model", self.output_dir.trim_end_matches('/')))
    }

    /// Where checkpoints go.
    pub fn checkpoint_url(&self) -> String {
        self.checkpoint.url_under(&self.output_dir)
    }

    /// Checks ranges; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size < 2 {
            return Err(TrainerError::config(
                "train_clip.batch_size",
                "a contrastive batch needs at least 2 pairs",
            ));
        }
        if self.checkpoint.every_steps == 0 || self.log_every == 0 {
            return Err(TrainerError::config(
                "train_clip.checkpoint.every_steps",
                "every_steps and log_every must be at least 1",
            ));
        }
        self.checkpoint.validate("train_clip.checkpoint")?;
        if !matches!(
            self.data.format,
            ShardFormat::Parquet | ShardFormat::WebDataset
        ) {
            return Err(TrainerError::config(
                "train_clip.data.format",
                "captions need `parquet` or `webdataset` shards (a folder has no captions)",
            ));
        }
        if self.data.caption_templates.is_empty()
            || self
                .data
                .caption_templates
                .iter()
                .any(|t| !t.contains("{}"))
        {
            return Err(TrainerError::config(
                "train_clip.data.caption_templates",
                "give at least one template, each with `{}` where the caption goes",
            ));
        }
        if !(0.0..=1.0).contains(&self.data.first_part_prob) {
            return Err(TrainerError::config(
                "train_clip.data.first_part_prob",
                "a probability in [0, 1]",
            ));
        }
        if !(self.data.random_crop_scale > 0.0 && self.data.random_crop_scale <= 1.0) {
            return Err(TrainerError::config(
                "train_clip.data.random_crop_scale",
                "a fraction of the side in (0, 1]",
            ));
        }
        self.split().validate().map_err(|e| {
            TrainerError::config("train_clip.split.holdout_fraction", e.to_string())
        })?;
        self.model.resolve()?;
        self.optim.validate()
    }
}
