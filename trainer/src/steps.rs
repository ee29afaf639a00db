//! The step loop both training loops run ([`crate::train`] and [`crate::train_clip`]): an
//! optimiser step, the progress callback, the ranks' agreement on the loss and on stopping,
//! the metrics line, a checkpoint when due, the run's own work after the step (a sample grid,
//! a held-out evaluation), and the stop. What differs between the loops is a [`Stepping`].

use crate::checkpoint::SaveCadence;
use crate::config::CheckpointConfig;
use crate::data::Loader;
use crate::metrics::{MetricsLog, TrainProgress};
use crate::parallel::DataParallel;
use crate::Result;
use std::ops::ControlFlow;
use std::time::Instant;

/// What one optimiser step did.
pub(crate) struct StepDone {
    /// This rank's loss: the mean of its micro-batches, or its share of a gathered loss.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// One kind of training run, as [`run_steps`] drives it.
pub(crate) trait Stepping {
    /// What its loader yields.
    type Batch: Send + 'static;
    /// The step reached (the number of optimiser steps taken).
    fn step(&self) -> u64;
    /// Its data parallelism.
    fn dp(&mut self) -> &mut DataParallel;
    /// One optimiser step on the loader's next global batch; advances [`Stepping::step`].
    fn optimiser_step(&mut self, loader: &mut Loader<Self::Batch>) -> Result<StepDone>;
    /// The run's own columns of a metrics line, beside the loss and timings.
    fn metrics_fields(&self, done: &StepDone) -> Result<serde_json::Value>;
    /// Writes the checkpoint of the current step (rank 0 only calls it).
    async fn save(&self, recent_losses: Vec<f64>) -> Result<String>;
    /// What the run does after `step`'s checkpoint, on every rank (an image it makes goes
    /// to `metrics`' TensorBoard events); true when the other ranks must wait while rank 0
    /// does it.
    async fn after_step(&mut self, step: u64, metrics: &mut MetricsLog) -> Result<bool>;
}

/// The loop's bounds and cadences.
pub(crate) struct Schedule<'a> {
    /// The step to train to.
    pub max_steps: u64,
    /// A metrics line every this many steps (and at the last).
    pub log_every: u64,
    /// Images in one optimiser step over all ranks.
    pub images_per_step: u64,
    /// When checkpoints are due.
    pub checkpoint: &'a CheckpointConfig,
}

/// How the loop ended.
pub(crate) struct StepsRun {
    /// The loss of the last step, agreed over ranks (NaN when no step ran).
    pub last_loss: f64,
    /// Where the last checkpoint was written (rank 0).
    pub checkpoint: Option<String>,
    /// Steps taken by this call.
    pub steps_run: u64,
    /// Seconds the loop took.
    pub elapsed_s: f64,
    /// Whether a stop request ended it before `max_steps`.
    pub stopped: bool,
}

/// Steps `run` to `schedule.max_steps`, or until any rank is asked to stop (every rank stops
/// at the same step, after a checkpoint).
pub(crate) async fn run_steps<R: Stepping>(
    run: &mut R,
    loader: &mut Loader<R::Batch>,
    schedule: &Schedule<'_>,
    metrics: &mut MetricsLog,
    progress: &mut dyn FnMut(&TrainProgress) -> ControlFlow<()>,
) -> Result<StepsRun> {
    let primary = run.dp().is_primary();
    let mut end = StepsRun {
        last_loss: f64::NAN,
        checkpoint: None,
        steps_run: 0,
        elapsed_s: 0.0,
        stopped: false,
    };
    let mut recent_losses = Vec::new();
    let run_start = Instant::now();
    let mut cadence = SaveCadence::new(schedule.checkpoint);
    while run.step() < schedule.max_steps {
        let started = Instant::now();
        let done = run.optimiser_step(loader)?;
        end.steps_run += 1;
        let step = run.step();
        let asked = progress(&TrainProgress {
            step,
            max_steps: schedule.max_steps,
            loss: done.loss,
            lr: done.lr,
            images_per_s: schedule.images_per_step as f64
                / started.elapsed().as_secs_f64().max(1e-9),
        })
        .is_break();
        // Every rank logs the same mean loss and stops at the same step.
        let agreed = run.dp().agree(done.loss, asked, cadence.clock_due())?;
        let (loss, stop) = (agreed.loss, agreed.stop);
        end.last_loss = loss;
        metrics.record(loss, loader.take_waited().as_secs_f64());
        if primary {
            // Only rank 0's checkpoints record them.
            recent_losses.push(loss);
        }
        if step.is_multiple_of(schedule.log_every) || step == schedule.max_steps {
            metrics.write(step, run.metrics_fields(&done)?)?;
        }
        let at_checkpoint = cadence.due(step, schedule.max_steps, agreed.clock_due, stop);
        if at_checkpoint {
            cadence.saved();
        }
        if primary && at_checkpoint {
            let at = run.save(std::mem::take(&mut recent_losses)).await?;
            tracing::info!(step, checkpoint = %at, "checkpoint written");
            end.checkpoint = Some(at);
        }
        let others_wait = run.after_step(step, metrics).await?;
        if at_checkpoint || others_wait {
            // The others wait (under the longer checkpoint bound) while rank 0 writes, so
            // none exits before the checkpoint exists or times out in the next step.
            run.dp().wait_for_primary()?;
        }
        if stop {
            tracing::info!(
                step,
                "stopping early on request; the checkpoint above resumes it"
            );
            end.stopped = true;
            break;
        }
    }
    end.elapsed_s = run_start.elapsed().as_secs_f64();
    Ok(end)
}
