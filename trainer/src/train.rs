//! The diffusion training *loop*: set up the run, resume or start, then step (accumulate
//! micro-batches, optimiser step, record metrics, save when due, write the grid when due,
//! check for a stop), then the summary. The parts live elsewhere and are only wired here:
//! data in [`crate::data`], the model and its loss in [`crate::model`], the optimiser in
//! [`crate::optim`], data parallelism in [`crate::parallel`], checkpoints in
//! [`crate::checkpoint`], the metrics file in [`crate::metrics`], the grid in
//! [`crate::sampling`], and the step loop both training loops run in `crate::steps`.
//!
//! Guarantees:
//! - resumes by itself from the newest valid checkpoint under the output directory (a torn
//!   or corrupted one is skipped with a warning), refusing one made with different
//!   trajectory-relevant settings and naming them;
//! - on the CPU a resumed run is bit-identical to an uninterrupted one: all randomness is
//!   counter-based (see [`crate::rng`]) and the optimiser, EMA and data cursor are saved;
//! - metrics go to `<output_dir>/metrics.jsonl` (rewritten up to the resumed step, so it
//!   never holds a step twice), sample grids of the held-out rows to
//!   `<output_dir>/samples/step-N.png`.

use crate::autocast::AutocastDtype;
use crate::checkpoint::{CheckpointStore, SavePoint, TrainingCheckpoints, Trajectory};
use crate::config::{TrainConfig, TrajectoryConfig};
use crate::data::{build_batch, Batch, DataLayout, Loader, SampleSpec, TrainingData};
use crate::metrics::{MetricsLog, TrainProgress};
use crate::model::{batch_loss, DiffusionModel};
use crate::optim::{zero_gradients, Optimiser};
use crate::parallel::{define_gradients, DataParallel};
use crate::sampling::HoldoutGrid;
use crate::steps::{run_steps, Schedule, StepDone, Stepping};
use crate::unet::{parameter_count, UNetConfig};
use crate::{Result, TrainerError};
use knn_cluster::rendezvous::Rendezvous;
use knn_datasets::StorageConfig;
use serde::Serialize;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, Tensor};

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
    let mut run = Run::set_up(cfg, storage, rdv).await?;
    let resumed_from = run.resume().await?;
    let grid = run.holdout_grid().await?;
    let accum = cfg.grad_accum as u64;
    let mut loader = run.start_loader()?;
    let out_dir = PathBuf::from(&cfg.output_dir);
    std::fs::create_dir_all(&out_dir).map_err(|e| TrainerError::io(&out_dir, e))?;
    // Over all ranks.
    let images_per_step = accum * cfg.batch_size as u64 * run.dp.world() as u64;
    let mut metrics = MetricsLog::open(
        &out_dir.join("metrics.jsonl"),
        run.step,
        run.dp.is_primary(),
        images_per_step,
    )?;
    let schedule = Schedule {
        max_steps: cfg.max_steps,
        log_every: cfg.log_every,
        images_per_step,
        checkpoint: &cfg.checkpoint,
    };
    let mut steps = DiffusionSteps {
        run: &mut run,
        grid,
        out_dir,
        bad_rows: 0,
    };
    let end = run_steps(&mut steps, &mut loader, &schedule, &mut metrics, progress).await?;
    let bad_rows = steps.bad_rows;
    let elapsed = end.elapsed_s;
    Ok(TrainSummary {
        resumed_from,
        step: run.step,
        parameters: parameter_count(&run.model.vs),
        last_loss: end.last_loss,
        mean_recent_loss: metrics.mean_recent_loss(end.last_loss),
        checkpoint: end.checkpoint,
        bad_rows,
        step_time_s: elapsed / end.steps_run.max(1) as f64,
        data_wait_fraction: if elapsed > 0.0 {
            metrics.total_wait_s() / elapsed
        } else {
            0.0
        },
        metrics: metrics.path().to_path_buf(),
        rank: run.dp.rank(),
        world_size: run.dp.world(),
    })
}

/// The diffusion run as the step loop drives it: the run, the held-out grid it writes (rank
/// 0) and the unusable rows its batches have met.
struct DiffusionSteps<'r, 'a> {
    run: &'r mut Run<'a>,
    grid: Option<HoldoutGrid>,
    out_dir: PathBuf,
    bad_rows: u64,
}

impl Stepping for DiffusionSteps<'_, '_> {
    type Batch = Batch;

    fn step(&self) -> u64 {
        self.run.step
    }

    fn dp(&mut self) -> &mut DataParallel {
        &mut self.run.dp
    }

    fn optimiser_step(&mut self, loader: &mut Loader) -> Result<StepDone> {
        self.run.optimiser_step(loader, &mut self.bad_rows)
    }

    fn metrics_fields(&self, done: &StepDone) -> Result<serde_json::Value> {
        Ok(serde_json::json!({
            "lr": done.lr,
            "grad_norm": done.grad_norm,
            "bad_rows": self.bad_rows,
            "skipped_steps": self.run.opt.skipped_steps,
        }))
    }

    async fn save(&self, recent_losses: Vec<f64>) -> Result<String> {
        self.run.save(recent_losses).await
    }

    /// The sample grid when due; the others wait while rank 0, which alone holds the
    /// held-out rows (see `holdout_grid`), writes it.
    async fn after_step(&mut self, step: u64, metrics: &mut MetricsLog) -> Result<bool> {
        let every = self.run.cfg.samples.every_steps;
        let at_grid = every > 0 && step.is_multiple_of(every);
        if let Some(g) = self.grid.as_ref().filter(|_| at_grid) {
            let path = self
                .out_dir
                .join("samples")
                .join(format!("step-{step:010}.png"));
            g.write(&self.run.opt.ema, &path)?;
            metrics.image(step, "samples", &path)?;
            tracing::info!(step, grid = %path.display(), "sample grid (top: held-out images; bottom: samples from their conditions)");
        }
        Ok(at_grid && self.run.holdout > 0)
    }
}

/// A training run once set up: where it runs, its data, model and optimiser, its
/// checkpoints, and the step it has reached.
struct Run<'a> {
    cfg: &'a TrainConfig,
    device: Device,
    reduced: Option<AutocastDtype>,
    dp: DataParallel,
    data: Arc<TrainingData>,
    layout: DataLayout,
    holdout: usize,
    unet: UNetConfig,
    model: DiffusionModel,
    params: Vec<(String, Tensor)>,
    opt: Optimiser,
    checkpoints: TrainingCheckpoints,
    step: u64,
}

impl<'a> Run<'a> {
    /// The data loader, reading ahead the micro-batches from the current step to the last.
    fn start_loader(&self) -> Result<Loader> {
        let cfg = self.cfg;
        let spec = SampleSpec {
            seed: cfg.seed,
            timesteps: cfg.diffusion.timesteps,
            cond_drop_prob: cfg.cond_drop_prob,
            flip: cfg.data.flip,
            knn_dropout: cfg.data.knn_dropout,
        };
        let (data, layout) = (self.data.clone(), self.layout);
        Loader::start(
            move |m| {
                let data = data.clone();
                async move { build_batch(&data, &layout, &spec, m).await }
            },
            self.step * cfg.grad_accum as u64..cfg.max_steps * cfg.grad_accum as u64,
            cfg.data.prefetch_batches,
        )
    }

    /// Device and precision, the process group, the tables, a fresh model and optimiser,
    /// and the checkpoint store.
    async fn set_up(
        cfg: &'a TrainConfig,
        storage: &StorageConfig,
        rdv: &Rendezvous,
    ) -> Result<Self> {
        let emb_uri = cfg.data.embeddings.clone().unwrap_or_default();
        let knn_uri = cfg.data.knn.clone().unwrap_or_default();
        let (dp, reduced) =
            DataParallel::for_run(cfg.device, cfg.precision, &cfg.distributed, rdv, "train")?;
        let device = dp.device();
        let data = Arc::new(TrainingData::open(&emb_uri, &knn_uri, storage, cfg.k).await?);
        if dp.rank() == 0 {
            data.pin_for(&cfg.output_dir).await;
        }
        let holdout = data.split_rows.holdout_rows().min(cfg.samples.rows);
        let train_rows = data.split_rows.train_rows();
        let layout = DataLayout::new(train_rows, cfg.batch_size, dp.rank(), dp.world())?;
        let unet = cfg.model.resolve(data.image_size_px, data.dim, cfg.k)?;
        let trajectory = Trajectory::of(&TrajectoryConfig {
            unet: unet.clone(),
            diffusion: cfg.diffusion.clone(),
            optim: cfg.optim.clone(),
            seed: cfg.seed,
            global_batch_size: cfg.batch_size * dp.world(),
            grad_accum: cfg.grad_accum,
            cond_drop_prob: cfg.cond_drop_prob,
            flip: cfg.data.flip,
            knn_dropout: cfg.data.knn_dropout,
            split: data.split.clone(),
            knn_table: knn_uri.clone(),
            rows: data.rows(),
            clip: data.clip.clone(),
        });
        let model = DiffusionModel::new(&unet, &cfg.diffusion, device, cfg.seed)?;
        let params = model.named_parameters();
        define_gradients(&params);
        let n_params = parameter_count(&model.vs);
        tracing::info!(
            parameters = n_params,
            image_size_px = data.image_size_px,
            k = cfg.k,
            rows = data.rows(),
            train_rows,
            device = ?device,
            rank = dp.rank(),
            world = dp.world(),
            "U-Net with {:.2}M parameters",
            n_params as f64 / 1e6
        );
        let opt = Optimiser::new(&params, &cfg.optim, reduced == Some(AutocastDtype::F16));
        let store =
            CheckpointStore::open(&cfg.checkpoint_url(), storage, cfg.checkpoint.keep_last)?;
        Ok(Self {
            cfg,
            device,
            reduced,
            dp,
            data,
            layout,
            holdout,
            unet,
            model,
            params,
            opt,
            checkpoints: TrainingCheckpoints::new(store, trajectory),
            step: 0,
        })
    }

    /// Loads the newest valid checkpoint, if any, then makes every replica rank 0's.
    /// Returns the step resumed from (0: a fresh start).
    async fn resume(&mut self) -> Result<u64> {
        let (layout, accum) = (&self.layout, self.cfg.grad_accum as u64);
        self.step = self
            .checkpoints
            .resume_run(&mut self.dp, &self.params, &mut self.opt, |step| {
                layout.cursor(step * accum)
            })
            .await?;
        Ok(self.step)
    }

    /// The held-out rows' grid, on rank 0 when grids are asked for.
    async fn holdout_grid(&self) -> Result<Option<HoldoutGrid>> {
        if !self.dp.is_primary() || self.holdout == 0 || self.cfg.samples.every_steps == 0 {
            return Ok(None);
        }
        Ok(Some(HoldoutGrid {
            rows: self
                .data
                .fetch(&self.data.holdout_offsets(self.holdout))
                .await?,
            k: self.cfg.k,
            dim: self.data.dim,
            unet: self.unet.clone(),
            diffusion: self.cfg.diffusion.clone(),
            settings: self.cfg.samples.clone(),
            seed: self.cfg.seed,
            device: self.device,
        }))
    }

    /// One optimiser step: the micro-batches' losses and gradients, averaged over ranks,
    /// then AdamW and the EMA.
    fn optimiser_step(&mut self, loader: &mut Loader, bad_rows: &mut u64) -> Result<StepDone> {
        let cfg = self.cfg;
        let accum = cfg.grad_accum as u64;
        let lr = cfg.optim.lr_at(self.step, cfg.max_steps);
        zero_gradients(&self.params);
        let mut loss_sum = 0f64;
        for a in 0..accum {
            let batch = loader.next_batch()?;
            for (id, reason) in &batch.problems {
                tracing::warn!(id, table = %self.data.embeddings_uri, "unusable row: {reason}");
            }
            *bad_rows += batch.problems.len() as u64;
            let b = batch.to_device(self.device);
            // The model's own randomness (dropout) is keyed by (seed, step, micro-batch, rank).
            let rank_key = (self.dp.rank() as u64).wrapping_mul(0xA24B_AED4_963E_E407);
            tch::manual_seed(
                (cfg.seed ^ (self.step * accum + a).wrapping_mul(0x9E37_79B9) ^ rank_key) as i64,
            );
            let loss = batch_loss(&self.model, &b, self.reduced);
            (&loss * self.opt.loss_factor(cfg.grad_accum)).backward();
            loss_sum += f64::try_from(&loss)? / accum as f64;
        }
        self.dp.average_gradients(&self.params)?;
        let (grad_norm, _) = self.opt.step(&self.params, &cfg.optim, lr, self.step);
        self.step += 1;
        Ok(StepDone {
            loss: loss_sum,
            lr,
            grad_norm,
        })
    }

    /// Writes the checkpoint of the current step (rank 0).
    async fn save(&self, recent_losses: Vec<f64>) -> Result<String> {
        let at = SavePoint {
            step: self.step,
            cursor: self.layout.cursor(self.step * self.cfg.grad_accum as u64),
            seed: self.cfg.seed,
            world_size: self.dp.world(),
            recent_losses,
        };
        self.checkpoints.save(at, &self.params, &self.opt).await
    }
}
