//! The training *loop*: wires the data loader, the U-Net, the diffusion process, the
//! optimiser and the checkpoint store together and steps. Each part lives in its own
//! module; this one only orders them.
//!
//! Guarantees:
//! - resumes by itself from the newest valid checkpoint under the output directory (a torn
//!   or corrupted one is skipped with a warning), refusing one made with different
//!   trajectory-relevant settings and naming them;
//! - on the CPU a resumed run is bit-identical to an uninterrupted one: all randomness is
//!   counter-based (see [`crate::data`] and [`TrainState::seed`]) and the optimiser, EMA and
//!   data cursor are saved;
//! - metrics go to `<output_dir>/metrics.jsonl` (rewritten up to the resumed step, so it
//!   never holds a step twice), sample grids of the held-out rows to
//!   `<output_dir>/samples/step-N.png`.

use crate::autocast::{set_cuda_autocast_dtype, AutocastDtype};
use crate::checkpoint::{to_safetensors, CheckpointStore, TrainState};
use crate::data::{
    condition_tensors, image_tensor, Batch, DataConfig, DataLayout, Loader, SampleSpec,
    TrainingData,
};
use crate::diffusion::{DiffusionConfig, GaussianDiffusion, SamplerConfig};
use crate::optim::{clip_grad_norm, AdamW, Ema, LossScaler, OptimConfig};
use crate::parallel::{define_gradients, DataParallel, DistributedConfig};
use crate::sample::{generate, write_grid};
use crate::unet::{parameter_count, Condition, UNet, UNetConfig, UNetPreset};
use crate::{Result, TrainerError};
use knn_cluster::rendezvous::Rendezvous;
use knn_datasets::StorageConfig;
use knn_indexer::embed::DeviceChoice;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

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

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            url: None,
            every_steps: default_ckpt_every(),
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
fn default_guidance() -> f64 {
    3.0
}

impl Default for SampleGridConfig {
    fn default() -> Self {
        Self {
            every_steps: default_grid_every(),
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
        self.checkpoint
            .url
            .clone()
            .unwrap_or_else(|| format!("{}/checkpoints", self.output_dir.trim_end_matches('/')))
    }

    fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.cond_drop_prob) {
            return Err(TrainerError::config(
                "train.cond_drop_prob",
                "must be in [0, 1); 0.1 is usual (0 disables guidance)",
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
    /// Held-out rows.
    pub holdout_rows: usize,
    /// kNN table (whose metadata pins the embeddings version).
    pub knn_table: String,
    /// Its rows.
    pub rows: u64,
}

fn config_hash(v: &serde_json::Value) -> String {
    Sha256::digest(v.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn json_diffs(a: &serde_json::Value, b: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            for (k, va) in x {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match y.get(k) {
                    Some(vb) => json_diffs(va, vb, &key, out),
                    None => out.push(format!("{key} (absent now)")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{prefix}.{k} (new)"));
            }
        }
        _ if a != b => out.push(format!("{prefix}: {a} then, {b} now")),
        _ => {}
    }
}

/// Progress of a running training.
#[derive(Clone, Debug, Serialize)]
pub struct TrainProgress {
    /// Optimiser steps done.
    pub step: u64,
    /// Target.
    pub max_steps: u64,
    /// Loss of the last step.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Images per second over the last logging window.
    pub images_per_s: f64,
}

/// What a training run did.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// Step resumed from (0: fresh start).
    pub resumed_from: u64,
    /// Step reached.
    pub step: u64,
    /// Trainable parameters.
    pub parameters: i64,
    /// Loss of the last step.
    pub last_loss: f64,
    /// Mean loss of the last logging window.
    pub mean_recent_loss: f64,
    /// Newest checkpoint written.
    pub checkpoint: Option<String>,
    /// Rows with unusable images or neighbours (trained with weight 0 / null tokens).
    pub bad_rows: u64,
    /// Mean seconds per optimiser step (this run).
    pub step_time_s: f64,
    /// Fraction of step time spent waiting for data.
    pub data_wait_fraction: f64,
    /// Metrics file (written by rank 0).
    pub metrics: PathBuf,
    /// This process's rank.
    pub rank: usize,
    /// Ranks that trained together.
    pub world_size: usize,
}

/// A model and its process, ready to train or sample.
pub struct DiffusionModel {
    /// The weights.
    pub vs: nn::VarStore,
    /// The network.
    pub unet: UNet,
    /// The process.
    pub diffusion: GaussianDiffusion,
}

impl DiffusionModel {
    /// Builds with fresh weights (seeded).
    pub fn new(
        unet: &UNetConfig,
        diffusion: &DiffusionConfig,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(device);
        let net = UNet::new(vs.root(), unet);
        Ok(Self {
            vs,
            unet: net,
            diffusion: GaussianDiffusion::new(diffusion)?,
        })
    }

    /// Trainable variables sorted by name (a stable order for the optimiser and files).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Copies `weights` into the model; a missing or mis-shaped tensor is named.
    pub fn load_weights(&self, weights: &[(String, Tensor)], what: &str) -> Result<()> {
        let map: std::collections::HashMap<&str, &Tensor> =
            weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tch::no_grad(|| {
            for (name, mut p) in self.named_parameters() {
                let t = map
                    .get(name.as_str())
                    .ok_or_else(|| TrainerError::Checkpoint {
                        location: what.to_string(),
                        reason: format!("lacks `{name}`"),
                    })?;
                if t.size() != p.size() {
                    return Err(TrainerError::Checkpoint {
                        location: what.to_string(),
                        reason: format!("`{name}` is {:?}, the model has {:?}", t.size(), p.size()),
                    });
                }
                p.copy_(&t.to_device(p.device()).to_kind(p.kind()));
            }
            Ok(())
        })
    }
}

/// The weighted diffusion loss of one micro-batch (already on the model's device):
/// `q_sample`, the U-Net, the per-sample MSE, averaged over the usable rows; under CUDA
/// autocast in `reduced` precision when given.
pub fn batch_loss(model: &DiffusionModel, b: &Batch, reduced: Option<AutocastDtype>) -> Tensor {
    let cond = Condition {
        emb: b.cond.shallow_clone(),
        present: b.present.shallow_clone(),
        drop: b.drop.shallow_clone(),
    };
    if let Some(dtype) = reduced {
        // Thread-local in libtorch: set on the thread that runs the model.
        set_cuda_autocast_dtype(dtype);
    }
    tch::autocast(reduced.is_some(), || {
        let xt = model.diffusion.q_sample(&b.images, &b.noise, &b.t);
        let out = model.unet.forward(&xt, &b.t, &cond, true);
        let per = model.diffusion.losses(&out, &b.images, &b.noise, &b.t);
        (per * &b.weight).sum(Kind::Float) / b.weight.sum(Kind::Float).clamp_min(1.0)
    })
}

/// After backward: unscale (f16), clip, AdamW, EMA for optimiser step `step` (0-based).
/// Returns the gradient norm before clipping and whether the step was taken (false: f16
/// overflow, step skipped).
pub fn optimiser_step(
    params: &[(String, Tensor)],
    opt: &mut AdamW,
    ema: &mut Ema,
    scaler: Option<&mut LossScaler>,
    cfg: &OptimConfig,
    lr: f64,
    step: u64,
) -> (f64, bool) {
    let finite = scaler.is_none_or(|s| s.unscale(params));
    let grad_norm = clip_grad_norm(params, cfg.grad_clip);
    if finite {
        opt.step(params, cfg, lr);
        ema.update(params, step + 1);
    }
    (grad_norm, finite)
}

/// Trains (or resumes) per `cfg`. `progress` is called after every optimiser step; when it
/// returns `Break` (a stop request: preemption, a test) a checkpoint of that step is written
/// and training returns early.
///
/// `rdv` says where this process sits in a data-parallel job ([`Rendezvous::single`] for one
/// process): every rank reads its own slice of each global batch, gradients are averaged
/// across ranks, a stop request on any rank stops all of them at the same step, and only
/// rank 0 writes checkpoints, metrics and sample grids.
pub async fn train(
    cfg: &TrainConfig,
    storage: &StorageConfig,
    rdv: &Rendezvous,
    progress: &mut dyn FnMut(&TrainProgress) -> ControlFlow<()>,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let emb_uri = cfg.data.embeddings.clone().unwrap_or_default();
    let knn_uri = cfg.data.knn.clone().unwrap_or_default();
    let device = DataParallel::rank_device(cfg.device.resolve("train.device")?, rdv);
    let reduced = match (cfg.precision, device) {
        (TrainPrecision::F32, _) | (TrainPrecision::Auto, Device::Cpu) => None,
        (TrainPrecision::Bf16 | TrainPrecision::F16, Device::Cpu) => {
            return Err(TrainerError::config(
                "train.precision",
                "bf16 and f16 autocast need a GPU; use `auto` or `f32` on the CPU",
            ))
        }
        (TrainPrecision::F16, _) => Some(AutocastDtype::F16),
        _ => Some(AutocastDtype::Bf16),
    };

    let mut dp = DataParallel::join(rdv, &cfg.distributed, device)?;
    let primary = dp.is_primary();
    let data = Arc::new(TrainingData::open(&emb_uri, &knn_uri, storage, cfg.k).await?);
    let holdout = cfg
        .data
        .holdout_rows
        .min(data.rows.saturating_sub(1) as usize);
    let train_rows = data.rows - holdout as u64;
    let layout = DataLayout::new(train_rows, cfg.batch_size, dp.rank(), dp.world())?;
    let unet_cfg = cfg.model.resolve(data.image_size_px, data.dim, cfg.k)?;

    let trajectory = TrajectoryConfig {
        unet: unet_cfg.clone(),
        diffusion: cfg.diffusion.clone(),
        optim: cfg.optim.clone(),
        seed: cfg.seed,
        global_batch_size: cfg.batch_size * dp.world(),
        grad_accum: cfg.grad_accum,
        cond_drop_prob: cfg.cond_drop_prob,
        flip: cfg.data.flip,
        holdout_rows: holdout,
        knn_table: knn_uri.clone(),
        rows: data.rows,
    };
    let trajectory_json = serde_json::to_value(&trajectory).expect("config serialises");
    let hash = config_hash(&trajectory_json);

    let model = DiffusionModel::new(&unet_cfg, &cfg.diffusion, device, cfg.seed)?;
    let params = model.named_parameters();
    define_gradients(&params);
    let n_params = parameter_count(&model.vs);
    tracing::info!(
        parameters = n_params,
        image_size_px = data.image_size_px,
        k = cfg.k,
        rows = data.rows,
        train_rows,
        device = ?device,
        rank = dp.rank(),
        world = dp.world(),
        "U-Net with {:.2}M parameters",
        n_params as f64 / 1e6
    );
    let mut opt = AdamW::new(&params);
    let mut ema = Ema::new(&params, cfg.optim.ema_decay);
    let store = CheckpointStore::open(&cfg.checkpoint_url(), storage, cfg.checkpoint.keep_last)?;

    // Rank 0 picks the checkpoint (0: none); every rank loads that same one.
    let latest = if primary {
        store.latest_valid().await?
    } else {
        None
    };
    let chosen = dp.broadcast_u64(latest.as_ref().map_or(0, |c| c.step))?;
    let mut step = 0u64;
    let found = match (latest, chosen) {
        (Some(c), _) => Some(c),
        (None, 0) => None,
        (None, s) => Some(store.load(s).await?),
    };
    if let Some(ck) = found {
        let state = ck.state()?;
        if state.config_hash != hash {
            let mut diffs = Vec::new();
            json_diffs(&state.config, &trajectory_json, "", &mut diffs);
            return Err(TrainerError::ConfigChanged {
                location: ck.location.clone(),
                diffs: diffs.join("; "),
            });
        }
        model.load_weights(&ck.tensors("model.safetensors")?, &ck.location)?;
        ema.load(&ck.tensors("ema.safetensors")?)
            .map_err(|reason| TrainerError::Checkpoint {
                location: ck.location.clone(),
                reason,
            })?;
        opt.load_state(&ck.tensors("optimizer.safetensors")?)
            .map_err(|reason| TrainerError::Checkpoint {
                location: ck.location.clone(),
                reason,
            })?;
        let expect = layout.cursor(state.step * cfg.grad_accum as u64);
        if state.cursor != expect {
            return Err(TrainerError::Checkpoint {
                location: ck.location.clone(),
                reason: format!(
                    "its data cursor {:?} disagrees with step {} ({expect:?})",
                    state.cursor, state.step
                ),
            });
        }
        step = state.step;
        tracing::info!(step, checkpoint = %ck.location, "resuming");
    }
    let resumed_from = step;
    // Identical replicas from the first step, however each rank initialised or loaded.
    let param_tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
    dp.broadcast(&param_tensors)?;

    let out_dir = PathBuf::from(&cfg.output_dir);
    std::fs::create_dir_all(&out_dir).map_err(|e| TrainerError::io(&out_dir, e))?;
    let metrics_path = out_dir.join("metrics.jsonl");
    let mut metrics = match primary {
        true => Some(open_metrics(&metrics_path, step)?),
        false => None,
    };

    let holdout_cond = if primary && holdout > 0 && cfg.samples.every_steps > 0 {
        Some(data.fetch(&data.holdout_offsets(holdout)).await?)
    } else {
        None
    };

    let spec = SampleSpec {
        seed: cfg.seed,
        timesteps: cfg.diffusion.timesteps,
        cond_drop_prob: cfg.cond_drop_prob,
        flip: cfg.data.flip,
    };
    let accum = cfg.grad_accum as u64;
    // Over all ranks.
    let images_per_step = accum * cfg.batch_size as u64 * dp.world() as u64;
    let mut loader = Loader::start(
        data.clone(),
        layout,
        spec,
        step * accum,
        cfg.data.prefetch_batches,
    )?;

    let mut scaler = (reduced == Some(AutocastDtype::F16)).then(LossScaler::default);
    let mut skipped_steps = 0u64;
    let mut last_ckpt = None;
    let (mut last_loss, mut window_losses) = (f64::NAN, Vec::new());
    let mut recent_losses = Vec::new();
    let mut bad_rows = 0u64;
    let run_start = Instant::now();
    let mut window_start = Instant::now();
    let mut window_wait = 0f64;
    let (mut total_wait, mut steps_run) = (0f64, 0u64);
    while step < cfg.max_steps {
        let step_started = Instant::now();
        let lr = cfg.optim.lr_at(step, cfg.max_steps);
        for (_, p) in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let mut step_loss = 0f64;
        for a in 0..accum {
            let batch = loader.next_batch()?;
            for (id, reason) in &batch.problems {
                tracing::warn!(id, table = %data.embeddings_uri, "unusable row: {reason}");
            }
            bad_rows += batch.problems.len() as u64;
            let b = batch.to_device(device);
            // The model's own randomness (dropout) is keyed by (seed, step, micro-batch, rank).
            let rank_key = (dp.rank() as u64).wrapping_mul(0xA24B_AED4_963E_E407);
            tch::manual_seed(
                (cfg.seed ^ (step * accum + a).wrapping_mul(0x9E37_79B9) ^ rank_key) as i64,
            );
            let loss = batch_loss(&model, &b, reduced);
            let factor = scaler.as_ref().map_or(1.0, LossScaler::scale) / accum as f64;
            (&loss * factor).backward();
            step_loss += f64::try_from(&loss)? / accum as f64;
        }
        dp.average_gradients(&params)?;
        let (grad_norm, finite) = optimiser_step(
            &params,
            &mut opt,
            &mut ema,
            scaler.as_mut(),
            &cfg.optim,
            lr,
            step,
        );
        if !finite {
            skipped_steps += 1;
            tracing::warn!(
                step,
                "f16 gradients overflowed: step skipped, loss scale halved"
            );
        }
        step += 1;
        steps_run += 1;
        let asked = progress(&TrainProgress {
            step,
            max_steps: cfg.max_steps,
            loss: step_loss,
            lr,
            images_per_s: images_per_step as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
        })
        .is_break();
        // Every rank logs the same mean loss and stops at the same step.
        let (step_loss, stop) = dp.agree(step_loss, asked)?;
        last_loss = step_loss;
        window_losses.push(step_loss);
        if primary {
            // Only rank 0's checkpoints record them.
            recent_losses.push(step_loss);
        }
        let wait = loader.take_waited().as_secs_f64();
        window_wait += wait;
        total_wait += wait;

        if step.is_multiple_of(cfg.log_every) || step == cfg.max_steps {
            let secs = window_start.elapsed().as_secs_f64();
            let images = (window_losses.len() as u64 * images_per_step) as f64;
            let line = serde_json::json!({
                "step": step,
                "loss": step_loss,
                "mean_loss": window_losses.iter().sum::<f64>() / window_losses.len() as f64,
                "lr": lr,
                "grad_norm": grad_norm,
                "step_time_s": secs / window_losses.len() as f64,
                "data_wait_s": window_wait / window_losses.len() as f64,
                "images_per_s": images / secs.max(1e-9),
                "bad_rows": bad_rows,
                "skipped_steps": skipped_steps,
            });
            if let Some(m) = metrics.as_mut() {
                writeln!(m, "{line}")
                    .and_then(|_| m.flush())
                    .map_err(|e| TrainerError::io(&metrics_path, e))?;
                tracing::info!(step, loss = step_loss, lr, grad_norm, "step");
            }
            window_losses.clear();
            window_wait = 0.0;
            window_start = Instant::now();
        }
        let at_checkpoint =
            stop || step.is_multiple_of(cfg.checkpoint.every_steps) || step == cfg.max_steps;
        if primary && at_checkpoint {
            let state = TrainState {
                step,
                cursor: layout.cursor(step * accum),
                seed: cfg.seed,
                config_hash: hash.clone(),
                config: trajectory_json.clone(),
                world_size: dp.world(),
                recent_losses: std::mem::take(&mut recent_losses),
            };
            let files = vec![
                ("model.safetensors".to_string(), to_safetensors(&params)?),
                (
                    "ema.safetensors".to_string(),
                    to_safetensors(ema.weights())?,
                ),
                (
                    "optimizer.safetensors".to_string(),
                    to_safetensors(&opt.state())?,
                ),
                (
                    "state.json".to_string(),
                    serde_json::to_vec_pretty(&state).expect("state serialises"),
                ),
            ];
            let at = store.save(step, files).await?;
            tracing::info!(step, checkpoint = %at, "checkpoint written");
            last_ckpt = Some(at);
        }
        // Rank 0 alone holds the held-out conditions (see `holdout_cond`).
        let at_grid = holdout > 0
            && cfg.samples.every_steps > 0
            && step.is_multiple_of(cfg.samples.every_steps);
        if let Some(h) = holdout_cond.as_ref().filter(|_| at_grid) {
            let path = out_dir.join("samples").join(format!("step-{step:010}.png"));
            let ema_model = DiffusionModel::new(&unet_cfg, &cfg.diffusion, device, cfg.seed)?;
            ema_model.load_weights(ema.weights(), "EMA weights")?;
            let (c, present) = condition_tensors(h, cfg.k, data.dim);
            let cond = Condition {
                emb: c.to_device(device),
                present: present.to_device(device),
                drop: Tensor::zeros([h.ids.len() as i64], (Kind::Float, device)),
            };
            let sampler = cfg
                .samples
                .sampler
                .build(&ema_model.diffusion, "train.samples.sampler")?;
            let imgs = generate(
                &ema_model,
                sampler.as_ref(),
                &cond,
                cfg.samples.guidance,
                cfg.seed,
                0,
            );
            let real = image_tensor(h, data.image_size_px).to_device(device);
            write_grid(&Tensor::cat(&[real, imgs], 0), h.ids.len(), &path)?;
            tracing::info!(step, grid = %path.display(), "sample grid (top: held-out images; bottom: samples from their conditions)");
        }
        if at_checkpoint || at_grid {
            // The others wait (under the longer checkpoint bound) while rank 0 writes, so
            // none exits before the checkpoint exists or times out in the next step.
            dp.wait_for_primary()?;
        }
        if stop {
            tracing::info!(
                step,
                "stopping early on request; the checkpoint above resumes it"
            );
            break;
        }
    }
    let elapsed = run_start.elapsed().as_secs_f64();
    let step_time = elapsed / steps_run.max(1) as f64;
    Ok(TrainSummary {
        resumed_from,
        step,
        parameters: n_params,
        last_loss,
        mean_recent_loss: if window_losses.is_empty() {
            last_loss
        } else {
            window_losses.iter().sum::<f64>() / window_losses.len() as f64
        },
        checkpoint: last_ckpt,
        bad_rows,
        step_time_s: step_time,
        data_wait_fraction: if elapsed > 0.0 {
            total_wait / elapsed
        } else {
            0.0
        },
        metrics: metrics_path,
        rank: dp.rank(),
        world_size: dp.world(),
    })
}

/// Opens the metrics file for appending, first dropping lines past `step` (left by a run
/// that died after its last checkpoint), so every step appears once.
fn open_metrics(path: &Path, step: u64) -> Result<std::fs::File> {
    let kept: Vec<String> = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(str::to_string)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(TrainerError::io(path, e)),
    };
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(path, body).map_err(|e| TrainerError::io(path, e))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| TrainerError::io(path, e))
}
