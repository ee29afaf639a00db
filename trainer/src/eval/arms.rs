//! The trained arms an evaluation compares: per seed, a kNN model (k = `eval.knn_k`, with
//! neighbour-count dropout so one model serves every k of the sweep) and a no-kNN model
//! (k = 0), each from `[train]` with the same steps, batch and schedule. Each trains into
//! `<output_dir>/arms/seed-S/<arm>/` and resumes like any training run, so a rerun finds
//! them trained and only evaluates. `[[eval.checkpoints]]` names arms trained elsewhere.

use super::config::{ArmKind, EvalConfig};
use crate::checkpoint::CheckpointStore;
use crate::config::TrainConfig;
use crate::metrics::TrainProgress;
use crate::{Result, TrainerError};
use knn_cluster::rendezvous::Rendezvous;
use knn_datasets::StorageConfig;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;
use tokio::task::JoinSet;

/// One arm of one seed, ready to load.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
/// the eval's steps, batch and learning rate on one process, warm-up at most a tenth of the steps, an EMA
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
    t.optim.lr = eval.lr.unwrap_or(t.optim.lr);
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
    if let Some(given) = eval.given(seed, kind) {
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
    let summary = crate::train(&cfg, storage, &Rendezvous::single(), &mut report)
        .await
        .map_err(|e| match e {
            // Its checkpoints are of other eval settings (steps, batch, lr, [train]).
            TrainerError::ConfigChanged { diffs, .. } => TrainerError::config(
                "eval",
                format!(
                    "arm seed {seed} {} in `{}` was trained with other settings ({diffs}); \
                     delete that directory to train it again, or restore them",
                    kind.name(),
                    cfg.output_dir
                ),
            ),
            e => e,
        })?;
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

/// How to start this program in a child process that trains one arm: `program args…
/// --train-arm SEED:ARM --arm-knn-table URI --summary-json FILE`, where `args` load the same
/// config as this run (`eval --config F --set … [--quick]`). The CLI fills it in.
#[derive(Clone, Debug)]
pub struct ArmLauncher {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments up to the arm's own.
    pub args: Vec<OsString>,
}

/// `SEED:ARM` (`0:knn`, `2:none`), the child's `--train-arm`.
pub fn parse_arm(s: &str) -> std::result::Result<(u64, ArmKind), String> {
    let bad = || format!("`{s}`: expected SEED:ARM with ARM knn or none, e.g. 0:knn");
    let (seed, kind) = s.split_once(':').ok_or_else(bad)?;
    let seed = seed.parse().map_err(|_| bad())?;
    let kind = match kind {
        "knn" => ArmKind::Knn,
        "none" => ArmKind::None,
        _ => return Err(bad()),
    };
    Ok((seed, kind))
}

/// Every arm of every seed: from `[[eval.checkpoints]]`, found trained, or trained now.
/// With a `launcher` the arms left to train run `eval.arm_processes` at a time in child
/// processes (each with its share of the cores; a failed one is reported once the others
/// have finished, and a rerun resumes it); the rest are found or trained in this process.
pub async fn train_arms(
    train: &TrainConfig,
    eval: &EvalConfig,
    (run_dir, knn_table): (&str, &str),
    launcher: Option<&ArmLauncher>,
    storage: &StorageConfig,
) -> Result<Vec<Arm>> {
    let jobs: Vec<(u64, ArmKind)> = eval
        .seeds
        .iter()
        .flat_map(|&s| [(s, ArmKind::Knn), (s, ArmKind::None)])
        .collect();
    let mut left = Vec::new();
    for &(seed, kind) in &jobs {
        let cfg = arm_config(train, eval, run_dir, knn_table, seed, kind);
        if eval.given(seed, kind).is_none() && !trained(&cfg, storage).await? {
            left.push((seed, kind));
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let processes = match eval.arm_processes {
        0 => cores,
        n => n,
    }
    .min(left.len());
    let mut done = HashMap::new();
    if let (Some(launcher), true) = (launcher, processes > 1) {
        let threads = (cores / processes).max(1);
        tracing::info!(
            arms = left.len(),
            processes,
            threads,
            "training the arms in child processes"
        );
        done = train_in_children(launcher, &left, (run_dir, knn_table), processes, threads).await?;
    }
    let mut arms = Vec::new();
    for job in jobs {
        match done.remove(&job) {
            Some(arm) => arms.push(arm),
            None => arms.push(ensure_arm(train, eval, run_dir, knn_table, job, storage).await?),
        }
    }
    Ok(arms)
}

/// Whether the arm's newest checkpoint is of its last step.
async fn trained(cfg: &TrainConfig, storage: &StorageConfig) -> Result<bool> {
    let store = CheckpointStore::open(&cfg.checkpoint_url(), storage, 1)?;
    Ok(store
        .steps()
        .await?
        .first()
        .is_some_and(|&s| s >= cfg.max_steps))
}

/// Runs `launcher` for each arm of `left`, `processes` at a time with `threads` threads
/// each, and reads back what each trained.
async fn train_in_children(
    launcher: &ArmLauncher,
    left: &[(u64, ArmKind)],
    (run_dir, knn_table): (&str, &str),
    processes: usize,
    threads: usize,
) -> Result<HashMap<(u64, ArmKind), Arm>> {
    let mut queue = left.iter().copied();
    let mut running = JoinSet::new();
    let (mut done, mut failed) = (HashMap::new(), Vec::new());
    loop {
        while running.len() < processes {
            let Some((seed, kind)) = queue.next() else {
                break;
            };
            let summary = PathBuf::from(format!(
                "{run_dir}/arms/seed-{seed}/{}.summary.json",
                kind.name()
            ));
            if let Some(dir) = summary.parent() {
                std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
            }
            let mut cmd = tokio::process::Command::new(&launcher.program);
            cmd.args(&launcher.args)
                .arg("--train-arm")
                .arg(format!("{seed}:{}", kind.name()))
                .arg("--arm-knn-table")
                .arg(knn_table)
                .arg("--summary-json")
                .arg(&summary)
                .env("OMP_NUM_THREADS", threads.to_string())
                .env("MKL_NUM_THREADS", threads.to_string())
                .kill_on_drop(true);
            let mut child = cmd
                .spawn()
                .map_err(|e| TrainerError::io(&launcher.program, e))?;
            running.spawn(async move { ((seed, kind), summary, child.wait().await) });
        }
        let Some(finished) = running.join_next().await else {
            break;
        };
        let Ok(((seed, kind), summary, status)) = finished else {
            continue; // a panic in `child.wait()`: the arm is trained in this process instead
        };
        let arm = format!("seed {seed} arm {}", kind.name());
        match status {
            // What it trained, or why that cannot be read: counted with the failures, so
            // the others are waited for.
            Ok(s) if s.success() => match std::fs::read_to_string(&summary)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str::<Arm>(&text).map_err(|e| e.to_string()))
            {
                Ok(trained) => {
                    done.insert((seed, kind), trained);
                }
                Err(e) => failed.push(format!("{arm} ({}: {e})", summary.display())),
            },
            Ok(s) => failed.push(format!("{arm} ({s})")),
            Err(e) => failed.push(format!("{arm} ({e})")),
        }
    }
    if !failed.is_empty() {
        return Err(TrainerError::ArmsFailed {
            arms: failed.join(", "),
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_share_one_budget_and_their_ema_follows_the_training() {
        let train: TrainConfig = toml::from_str("").unwrap();
        let eval: EvalConfig = toml::from_str("steps = 250\nlr = 2e-3").unwrap();
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
        assert_eq!((knn.optim.lr, none.optim.lr), (2e-3, 2e-3));
    }

    #[test]
    fn arm_flags_parse_and_name_the_form_they_want() {
        assert_eq!(parse_arm("2:none"), Ok((2, ArmKind::None)));
        assert_eq!(parse_arm("0:knn"), Ok((0, ArmKind::Knn)));
        for bad in ["knn", "x:knn", "1:k0", ""] {
            assert!(parse_arm(bad).unwrap_err().contains("SEED:ARM"), "{bad}");
        }
    }
}
