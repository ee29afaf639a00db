//! `[eval]`: what `knn-diffusion eval` trains, samples and measures, and its `--quick` form.

use crate::diffusion::{SamplerConfig, SamplerKind};
use crate::TrainerError;
use knn_indexer::clip::ClipSettings;
use knn_indexer::embed::SourceConfig;
use serde::{Deserialize, Serialize};

/// `[eval]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Where the arms, the samples and the report go (`report.md`, `report.json`,
    /// `grids/`); `--quick` writes below `<output_dir>/quick`.
    #[serde(default = "default_output_dir")]
    pub output_dir: String,
    /// Seeds: each trains its own pair of arms and draws its own noise.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Optimiser steps of every arm (the same budget for each).
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Images per optimiser step of every arm (one process).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Peak learning rate of every arm (default: `train.optim.lr`). Short runs want a
    /// higher one: at 1.5e-3 an arm here left the loss plateau (~0.6) by step 200 and
    /// reached 0.19 at step 300; at 5e-4 it was still at 0.40.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Arms trained at once on the CPU, each in a child process with its share of the
    /// cores (0: one per core, at most the arms left to train; 1: one after another in
    /// this process). Small models use 2 cores poorly: on 2 cores two 1-thread arms train
    /// 1.5x faster than one 2-thread arm after the other. On a GPU arms train one after
    /// another in this process.
    #[serde(default)]
    pub arm_processes: usize,
    /// Neighbours the kNN arm trains with (with neighbour-count dropout, so it can be
    /// sampled at every k of the sweep).
    #[serde(default = "default_knn_k")]
    pub knn_k: usize,
    /// Neighbour-count dropout of the kNN arm (`train.data.knn_dropout` when that is set
    /// higher).
    #[serde(default = "default_knn_dropout")]
    pub knn_dropout: f64,
    /// Inference k of the sweep (each ≤ `knn_k`).
    #[serde(default = "default_sweep")]
    pub sweep_k: Vec<usize>,
    /// The k compared with the no-kNN arm, and used for the table swap and the buckets (one
    /// of `sweep_k`).
    #[serde(default = "default_headline_k")]
    pub headline_k: usize,
    /// Held-out captions sampled (0: every held-out row with a caption).
    #[serde(default)]
    pub prompts: usize,
    /// Distractor captions per image for R-precision (the paper: 99).
    #[serde(default = "default_distractors")]
    pub distractors: usize,
    /// k of the k-NN balls of precision and recall (Kynkäänniemi et al.: 3).
    #[serde(default = "default_pr_k")]
    pub pr_k: usize,
    /// A Lance table with `key` and a caption column (default: the `train-clip` captions
    /// table): a held-out image's caption is that of a row with the same key stem.
    #[serde(default)]
    pub captions: Option<String>,
    /// The caption column of that table.
    #[serde(default = "default_caption_column")]
    pub caption_column: String,
    /// The judge CLIP every measure is taken in (default: `train_clip.judge`'s model).
    #[serde(default)]
    pub judge: Option<ClipSettings>,
    /// How every arm is sampled.
    #[serde(default)]
    pub samples: EvalSamples,
    /// Retrieval tables of other styles for the table swap: each is embedded with the
    /// pipeline's CLIP into `<output_dir>/tables/<name>.lance`.
    #[serde(default)]
    pub swap: Vec<SwapTable>,
    /// Score buckets (PAPER.md §4.2) over the `[score]` column.
    #[serde(default)]
    pub buckets: BucketEval,
    /// Images per style whose judge embeddings make the style's centroid.
    #[serde(default = "default_style_images")]
    pub style_images: usize,
    /// Checkpoints to evaluate instead of training (per seed and arm).
    #[serde(default)]
    pub checkpoints: Vec<ArmCheckpoint>,
    /// What `--quick` changes.
    #[serde(default)]
    pub quick: QuickEval,
}

/// `[eval.samples]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSamples {
    /// Classifier-free guidance scale of every arm.
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// The reverse process.
    #[serde(default = "default_sampler")]
    pub sampler: SamplerConfig,
    /// Conditions per model batch.
    #[serde(default = "default_sample_batch")]
    pub batch_size: usize,
}

impl Default for EvalSamples {
    fn default() -> Self {
        Self {
            guidance: default_guidance(),
            sampler: default_sampler(),
            batch_size: default_sample_batch(),
        }
    }
}

/// `[[eval.swap]]`: a retrieval table of another style.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapTable {
    /// Its name in the report (`twitter`).
    pub name: String,
    /// Its images (the embed stage's source settings).
    pub source: SourceConfig,
}

/// `[eval.buckets]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BucketEval {
    /// Quantile buckets of the score (0: no bucket comparison).
    #[serde(default = "default_buckets")]
    pub count: usize,
    /// Nearest rows the buckets are cut from (the paper: 1,000).
    #[serde(default = "default_pool")]
    pub pool: usize,
    /// Prompts sampled per bucket (the first held-out ones).
    #[serde(default = "default_bucket_prompts")]
    pub prompts: usize,
}

impl Default for BucketEval {
    fn default() -> Self {
        Self {
            count: default_buckets(),
            pool: default_pool(),
            prompts: default_bucket_prompts(),
        }
    }
}

/// `[[eval.checkpoints]]`: a trained arm to evaluate as it is.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArmCheckpoint {
    /// The seed it stands for.
    pub seed: u64,
    /// `knn` or `none`.
    pub arm: ArmKind,
    /// Its checkpoint directory or URL (the newest valid checkpoint in it is used).
    pub url: String,
}

/// The two trained arms.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ArmKind {
    /// Conditioned on the CLIP embedding and its kNN (k = `knn_k`, neighbour dropout).
    Knn,
    /// Conditioned on the CLIP embedding alone (k = 0).
    None,
}

impl ArmKind {
    /// Its name in paths and the report.
    pub fn name(self) -> &'static str {
        match self {
            ArmKind::Knn => "knn",
            ArmKind::None => "none",
        }
    }
}

/// `[eval.quick]`: the small form the tests run.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuickEval {
    /// Steps per arm.
    #[serde(default = "default_quick_steps")]
    pub steps: u64,
    /// Held-out captions sampled.
    #[serde(default = "default_quick_prompts")]
    pub prompts: usize,
    /// Prompts per bucket.
    #[serde(default = "default_quick_bucket_prompts")]
    pub bucket_prompts: usize,
    /// Sampler steps.
    #[serde(default = "default_quick_sampler_steps")]
    pub sampler_steps: usize,
    /// Images per style centroid.
    #[serde(default = "default_quick_style_images")]
    pub style_images: usize,
}

impl Default for QuickEval {
    fn default() -> Self {
        Self {
            steps: default_quick_steps(),
            prompts: default_quick_prompts(),
            bucket_prompts: default_quick_bucket_prompts(),
            sampler_steps: default_quick_sampler_steps(),
            style_images: default_quick_style_images(),
        }
    }
}

fn default_output_dir() -> String {
    "runs/eval".into()
}
fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}
fn default_steps() -> u64 {
    600
}
fn default_batch() -> usize {
    32
}
fn default_knn_k() -> usize {
    20
}
fn default_knn_dropout() -> f64 {
    0.5
}
fn default_sweep() -> Vec<usize> {
    vec![1, 5, 10, 20]
}
fn default_headline_k() -> usize {
    10
}
fn default_distractors() -> usize {
    99
}
fn default_pr_k() -> usize {
    3
}
fn default_caption_column() -> String {
    "caption".into()
}
fn default_guidance() -> f64 {
    3.0
}
fn default_sampler() -> SamplerConfig {
    SamplerConfig {
        kind: SamplerKind::Ddim,
        steps: 25,
        ..SamplerConfig::default()
    }
}
fn default_sample_batch() -> usize {
    64
}
fn default_buckets() -> usize {
    5
}
fn default_pool() -> usize {
    1000
}
fn default_bucket_prompts() -> usize {
    32
}
fn default_style_images() -> usize {
    512
}
fn default_quick_steps() -> u64 {
    40
}
fn default_quick_prompts() -> usize {
    24
}
fn default_quick_bucket_prompts() -> usize {
    6
}
fn default_quick_sampler_steps() -> usize {
    8
}
fn default_quick_style_images() -> usize {
    64
}

impl EvalConfig {
    /// The config `--quick` runs: fewer steps, prompts, sampler steps and style images, into
    /// `<output_dir>/quick`; the seeds, every comparison and the given checkpoints stay.
    pub fn quick(&self) -> Self {
        let mut q = self.clone();
        q.output_dir = format!("{}/quick", self.output_dir.trim_end_matches('/'));
        q.steps = self.quick.steps;
        q.prompts = self.quick.prompts;
        q.buckets.prompts = self.quick.bucket_prompts;
        q.samples.sampler.steps = self.quick.sampler_steps;
        q.style_images = self.quick.style_images;
        q
    }

    /// The `[[eval.checkpoints]]` entry of arm `kind` of `seed`, if any.
    pub fn given(&self, seed: u64, kind: ArmKind) -> Option<&ArmCheckpoint> {
        self.checkpoints
            .iter()
            .find(|c| c.seed == seed && c.arm == kind)
    }

    /// Checks what can be checked before any work; errors name the key.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |key: &str, reason: String| Err(TrainerError::config(key, reason));
        if self.seeds.is_empty() {
            return bad(
                "eval.seeds",
                "give at least one seed (3 for mean ± std)".into(),
            );
        }
        let mut seen = self.seeds.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != self.seeds.len() {
            return bad("eval.seeds", format!("{:?} repeats a seed", self.seeds));
        }
        if self.steps == 0 || self.batch_size == 0 {
            return bad(
                "eval.steps",
                "steps and batch_size must be at least 1".into(),
            );
        }
        if self.lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
            return bad(
                "eval.lr",
                format!("{:?} is not a learning rate > 0", self.lr),
            );
        }
        if self.knn_k == 0 {
            return bad("eval.knn_k", "the kNN arm needs k >= 1".into());
        }
        if let Some(&k) = self.sweep_k.iter().find(|&&k| k == 0 || k > self.knn_k) {
            return bad(
                "eval.sweep_k",
                format!(
                    "k = {k} is outside 1..={} (eval.knn_k, what the kNN arm trains with)",
                    self.knn_k
                ),
            );
        }
        if !self.sweep_k.contains(&self.headline_k) {
            return bad(
                "eval.headline_k",
                format!(
                    "{} is not in eval.sweep_k {:?}: the comparison with k = 0 reads the \
                     sweep's samples at that k",
                    self.headline_k, self.sweep_k
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.knn_dropout) {
            return bad(
                "eval.knn_dropout",
                format!("{} is not a probability", self.knn_dropout),
            );
        }
        if self.distractors == 0 || self.pr_k == 0 {
            return bad(
                "eval.distractors",
                "distractors and pr_k must be at least 1".into(),
            );
        }
        let mut names: Vec<&str> = self.swap.iter().map(|s| s.name.as_str()).collect();
        if let Some(n) = names.iter().find(|n| {
            n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        }) {
            return bad(
                "eval.swap.name",
                format!("`{n}` must be letters, digits, `-` or `_` (it names a table)"),
            );
        }
        names.push("own");
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return bad(
                "eval.swap.name",
                "names must differ from each other and from `own` (the training table)".into(),
            );
        }
        if self.buckets.count == 1
            || (self.buckets.count > 0 && self.buckets.pool < self.buckets.count)
        {
            return bad(
                "eval.buckets",
                format!(
                    "{} buckets from a pool of {} rows: need 0 (off) or 2..=pool",
                    self.buckets.count, self.buckets.pool
                ),
            );
        }
        Ok(())
    }
}
