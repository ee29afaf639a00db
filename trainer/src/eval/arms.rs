//! The trained arms an evaluation compares: per seed, a kNN model (k = `eval.knn_k`, with
//! neighbour-count dropout so one model serves every k of the sweep) and a no-kNN model
//! (k = 0), each from `[train]` with the same steps, batch and schedule. Each trains into
//! `<output_dir>/arms/seed-S/<arm>/` and resumes like any training run, so a rerun finds
//! them trained and only evaluates. `[[eval.checkpoints]]` names arms trained elsewhere.

use super::config::{ArmKind, EvalConfig};
use crate::config::TrainConfig;
use crate::metrics::TrainProgress;
use crate::Result;
use knn_cluster::rendezvous::Rendezvous;
use knn_datasets::StorageConfig;
use serde::Serialize;
use std::ops::ControlFlow;
use std::time::Instant;

/// One arm of one seed, ready to load.
#[derive(Clone, Debug, Serialize)]
pub struct Arm {
    /// The seed.
    pub seed: u64,
    /// Which arm.
    pub kind: ArmKind,
    /// Its checkpoint directory.
    pub checkpoints: String,
    /// Optimiser steps it was trained for (None: taken from `[[eval.checkpoints]]`).
    pub steps: Option<u64>,
    /// Steps trained by this run (0: found trained).
    pub trained_now: u64,
    /// Seconds spent training it in this run.
    pub train_seconds: f64,
    /// Mean loss of its last logging window (this run's training only).
    pub last_loss: Option<f64>,
}

/// `[train]` turned into the config of one arm: its own output directory and seed, `k`,
/// the eval's steps and batch on one process, warm-up at most a tenth of the steps, an EMA
/// that averages over at most the last tenth of them (its decay at most 1 − 10/steps: at
/// 0.999 a 250-step run's EMA weights would still be 78% the random initial ones, and its
/// samples noise), checkpoints at the end (and every 200 steps, so a stopped eval resumes),
/// no grids.
pub fn arm_config(
    train: &TrainConfig,
    eval: &EvalConfig,
    run_dir: &str,
    knn_table: &str,
    seed: u64,
    kind: ArmKind,
) -> TrainConfig {
    let mut t = train.clone();
    t.output_dir = format!("{run_dir}/arms/seed-{seed}/{}", kind.name());
    t.seed = seed;
    t.max_steps = eval.steps;
    t.batch_size = eval.batch_size;
    t.grad_accum = 1;
    t.data.knn = Some(knn_table.to_string());
    match kind {
        ArmKind::Knn => {
            t.k = eval.knn_k;
            t.data.knn_dropout = eval.knn_dropout;
        }
        ArmKind::None => {
            t.k = 0;
            t.data.knn_dropout = 0.0;
        }
    }
    t.optim.warmup_steps = t.optim.warmup_steps.min(eval.steps / 10);
    t.optim.ema_decay = t
        .optim
        .ema_decay
        .min(1.0 - 10.0 / eval.steps.max(20) as f64);
    t.checkpoint.url = None;
    t.checkpoint.every_steps = eval.steps.min(200);
    t.checkpoint.keep_last = 1;
    t.samples.every_steps = 0;
    t
}

/// The arm `kind` of `seed`: from `[[eval.checkpoints]]`, or trained (resumed) per
/// [`arm_config`].
pub async fn ensure_arm(
    train: &TrainConfig,
    eval: &EvalConfig,
    run_dir: &str,
    knn_table: &str,
    (seed, kind): (u64, ArmKind),
    storage: &StorageConfig,
) -> Result<Arm> {
    if let Some(given) = eval
        .checkpoints
        .iter()
        .find(|c| c.seed == seed && c.arm == kind)
    {
        tracing::info!(seed, arm = kind.name(), checkpoints = %given.url, "arm from [[eval.checkpoints]]");
        return Ok(Arm {
            seed,
            kind,
            checkpoints: given.url.clone(),
            steps: None,
            trained_now: 0,
            train_seconds: 0.0,
            last_loss: None,
        });
    }
    let cfg = arm_config(train, eval, run_dir, knn_table, seed, kind);
    let started = Instant::now();
    let every = (eval.steps / 5).max(1);
    let mut first = None;
    let mut report = |p: &TrainProgress| {
        let from = *first.get_or_insert(p.step - 1);
        if p.step.is_multiple_of(every) {
            tracing::info!(
                seed,
                arm = kind.name(),
                step = p.step,
                of = p.max_steps,
                loss = p.loss,
                eta_s = started.elapsed().as_secs_f64() / (p.step - from) as f64
                    * (p.max_steps - p.step) as f64,
                "training arm"
            );
        }
        ControlFlow::Continue(())
    };
    let summary = crate::train(&cfg, storage, &Rendezvous::single(), &mut report).await?;
    let trained_now = summary.step - summary.resumed_from;
    Ok(Arm {
        seed,
        kind,
        checkpoints: cfg.checkpoint_url(),
        steps: Some(summary.step),
        trained_now,
        train_seconds: if trained_now > 0 {
            started.elapsed().as_secs_f64()
        } else {
            0.0
        },
        last_loss: (trained_now > 0).then_some(summary.mean_recent_loss),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_share_one_budget_and_their_ema_follows_the_training() {
        let train: TrainConfig = toml::from_str("").unwrap();
        let eval: EvalConfig = toml::from_str("steps = 250").unwrap();
        let knn = arm_config(&train, &eval, "out", "knn.lance", 1, ArmKind::Knn);
        let none = arm_config(&train, &eval, "out", "knn.lance", 1, ArmKind::None);
        assert_eq!((knn.k, none.k), (20, 0));
        assert_eq!(
            (knn.max_steps, knn.batch_size),
            (none.max_steps, none.batch_size)
        );
        assert_eq!(knn.output_dir, "out/arms/seed-1/knn");
        assert_eq!(none.data.knn.as_deref(), Some("knn.lance"));
        // 0.999 would leave 0.999^250 = 78% of the random initial weights in the EMA.
        assert!((knn.optim.ema_decay - 0.96).abs() < 1e-12);
        assert!(knn.optim.warmup_steps <= 25);
        assert_eq!(knn.samples.every_steps, 0);
    }
}
