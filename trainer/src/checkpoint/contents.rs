//! What a training checkpoint holds, apart from where it is stored ([`super::store`]):
//! the weights, the EMA weights, the optimiser state (each a safetensors file), and
//! `state.json` with the step, the data cursor, the seed and the settings that fix the
//! training trajectory. Every training loop of the crate (`train`, `train-clip`) saves and
//! resumes through [`TrainingCheckpoints`], so they share one format and one resume rule.
//!
//! Resume rule: rank 0 picks the newest valid checkpoint, every rank loads that same one,
//! and a checkpoint made with other trajectory settings is refused with the differences named.

use super::safetensors::{copy_named, to_safetensors};
use super::store::{CheckpointStore, LoadedCheckpoint};
use crate::data::DataCursor;
use crate::optim::Optimiser;
use crate::parallel::DataParallel;
use crate::{Result, TrainerError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

/// The trained weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// The EMA of the weights.
pub const EMA_FILE: &str = "ema.safetensors";
/// AdamW's moments and step count.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// [`TrainState`] as JSON.
pub const STATE_FILE: &str = "state.json";

/// The training state saved beside the tensors.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: u64,
    /// The next micro-batch the data loader reads.
    pub cursor: DataCursor,
    /// Every random stream derives from this seed: data order from (seed, epoch), each
    /// sample's flip / drop / step / noise from (seed, epoch, position), the model's dropout
    /// from (seed, step, rank). Nothing else holds random state.
    pub seed: u64,
    /// SHA-256 of `config`.
    pub config_hash: String,
    /// The settings that determine the training trajectory.
    pub config: serde_json::Value,
    /// Data-parallel ranks that trained it.
    pub world_size: usize,
    /// Loss of every optimiser step since the previous checkpoint (diagnostics).
    pub recent_losses: Vec<f64>,
}

impl TrainState {
    /// The state of a loaded checkpoint.
    pub fn of(ck: &LoadedCheckpoint) -> Result<Self> {
        ck.json(STATE_FILE)
    }
}

/// The settings that fix a run's trajectory, as JSON, and their hash: a resume must agree.
#[derive(Clone, Debug)]
pub struct Trajectory {
    /// The settings.
    pub config: serde_json::Value,
    /// Lower-case hex SHA-256 of `config`'s compact JSON.
    pub hash: String,
}

impl Trajectory {
    /// The trajectory of `settings`.
    pub fn of(settings: &impl Serialize) -> Self {
        let config = serde_json::to_value(settings).expect("trajectory settings serialise");
        let hash = Sha256::digest(config.to_string().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self { config, hash }
    }

    /// Fails with [`TrainerError::ConfigChanged`], naming every differing key, unless the
    /// checkpoint at `location` with `state` was made with these settings.
    pub fn check(&self, state: &TrainState, location: &str) -> Result<()> {
        if state.config_hash == self.hash {
            return Ok(());
        }
        let mut diffs = Vec::new();
        json_diffs(&state.config, &self.config, "", &mut diffs);
        Err(TrainerError::ConfigChanged {
            location: location.to_string(),
            diffs: diffs.join("; "),
        })
    }
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

/// Where a run stands when it saves.
#[derive(Clone, Debug)]
pub struct SavePoint {
    /// Optimiser steps completed.
    pub step: u64,
    /// The next micro-batch.
    pub cursor: DataCursor,
    /// The run's seed.
    pub seed: u64,
    /// Ranks training.
    pub world_size: usize,
    /// Losses since the previous checkpoint.
    pub recent_losses: Vec<f64>,
}

/// Saving and resuming one training run's checkpoints.
#[derive(Debug, Clone)]
pub struct TrainingCheckpoints {
    store: CheckpointStore,
    trajectory: Trajectory,
}

impl TrainingCheckpoints {
    /// Checkpoints of the run with `trajectory` in `store`.
    pub fn new(store: CheckpointStore, trajectory: Trajectory) -> Self {
        Self { store, trajectory }
    }

    /// The run's trajectory settings.
    pub fn trajectory(&self) -> &Trajectory {
        &self.trajectory
    }

    /// Loads the newest valid checkpoint into `params` and `opt` on every rank (rank 0
    /// chooses which); `None` when there is none (a fresh start). Returns its state and
    /// location.
    pub async fn resume(
        &self,
        dp: &mut DataParallel,
        params: &[(String, Tensor)],
        opt: &mut Optimiser,
    ) -> Result<Option<(TrainState, String)>> {
        let latest = if dp.is_primary() {
            self.store.latest_valid().await?
        } else {
            None
        };
        let chosen = dp.broadcast_u64(latest.as_ref().map_or(0, |c| c.step))?;
        let ck = match (latest, chosen) {
            (Some(c), _) => c,
            (None, 0) => return Ok(None),
            (None, s) => self.store.load(s).await?,
        };
        let state = TrainState::of(&ck)?;
        self.trajectory.check(&state, &ck.location)?;
        let at = |f: &str| format!("{}/{f}", ck.location);
        copy_named(params, &ck.tensors(MODEL_FILE)?, &at(MODEL_FILE))?;
        opt.ema.load(&ck.tensors(EMA_FILE)?, &at(EMA_FILE))?;
        opt.adamw
            .load_state(&ck.tensors(OPTIMIZER_FILE)?, &at(OPTIMIZER_FILE))?;
        Ok(Some((state, ck.location)))
    }

    /// Writes the checkpoint of `at` (rank 0 only) and prunes old ones; returns its location.
    pub async fn save(
        &self,
        at: SavePoint,
        params: &[(String, Tensor)],
        opt: &Optimiser,
    ) -> Result<String> {
        let step = at.step;
        let state = TrainState {
            step,
            cursor: at.cursor,
            seed: at.seed,
            config_hash: self.trajectory.hash.clone(),
            config: self.trajectory.config.clone(),
            world_size: at.world_size,
            recent_losses: at.recent_losses,
        };
        let files = vec![
            (MODEL_FILE.to_string(), to_safetensors(params)?),
            (EMA_FILE.to_string(), to_safetensors(opt.ema.weights())?),
            (
                OPTIMIZER_FILE.to_string(),
                to_safetensors(&opt.adamw.state())?,
            ),
            (
                STATE_FILE.to_string(),
                serde_json::to_vec_pretty(&state).expect("state serialises"),
            ),
        ];
        self.store.save(step, files).await
    }
}
