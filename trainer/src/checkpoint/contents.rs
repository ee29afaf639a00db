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
use crate::optim::{LossScaler, Optimiser};
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
    /// The f16 loss scaler's scale and clean-step count, so a resume neither starts again
    /// from 65536 (and skips steps finding the scale) nor loses a doubling; absent for f32
    /// and bf16 runs, and in checkpoints from before it was saved (they resume with a fresh
    /// scaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
    /// Steps skipped so far because f16 gradients overflowed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_steps: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
        if let (Some(scaler), Some(saved)) = (opt.scaler.as_mut(), &state.loss_scaler) {
            *scaler = saved.clone();
        }
        opt.skipped_steps = state.skipped_steps;
        Ok(Some((state, ck.location)))
    }

    /// Resumes a run: loads the newest valid checkpoint as [`Self::resume`] does, checks its
    /// data cursor against `cursor_at(its step)`, then makes every replica rank 0's, however
    /// each rank initialised or loaded. Returns the step resumed from (0: a fresh start).
    pub async fn resume_run(
        &self,
        dp: &mut DataParallel,
        params: &[(String, Tensor)],
        opt: &mut Optimiser,
        cursor_at: impl Fn(u64) -> DataCursor,
    ) -> Result<u64> {
        let mut step = 0;
        if let Some((state, location)) = self.resume(dp, params, opt).await? {
            let expect = cursor_at(state.step);
            if state.cursor != expect {
                return Err(TrainerError::Checkpoint {
                    location,
                    reason: format!(
                        "its data cursor {:?} disagrees with step {} ({expect:?})",
                        state.cursor, state.step
                    ),
                });
            }
            step = state.step;
            tracing::info!(step, checkpoint = %location, "resuming");
        }
        let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        dp.broadcast(&tensors)?;
        Ok(step)
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
            loss_scaler: opt.scaler.clone(),
            skipped_steps: opt.skipped_steps,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::OptimConfig;
    use crate::parallel::DistributedConfig;
    use knn_cluster::rendezvous::Rendezvous;
    use tch::Device;

    /// An f16 run's loss scaler, halved by an overflow, comes back from its checkpoint as it
    /// was (f16 needs a GPU to train, but the scaler and its checkpoint do not).
    #[tokio::test]
    async fn the_loss_scale_and_skipped_steps_survive_a_resume() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().to_str().unwrap();
        let store = || CheckpointStore::open(url, &Default::default(), 2).unwrap();
        let trajectory = Trajectory::of(&serde_json::json!({"run": 1}));
        let ckpts = TrainingCheckpoints::new(store(), trajectory.clone());
        let mut dp = DataParallel::join(
            &Rendezvous::single(),
            &DistributedConfig::default(),
            Device::Cpu,
        )
        .unwrap();
        let w = Tensor::ones([3], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![("w".to_string(), w.shallow_clone())];
        let mut opt = Optimiser::new(&params, &OptimConfig::default(), true);
        (w.sum(tch::Kind::Float) * f64::INFINITY).backward();
        let scaler = opt.scaler.as_mut().unwrap();
        assert!(
            !scaler.unscale(&params),
            "an infinite gradient is an overflow"
        );
        assert_eq!(scaler.scale(), 32768.0);
        opt.skipped_steps = 1;
        let at = SavePoint {
            step: 7,
            cursor: DataCursor::default(),
            seed: 0,
            world_size: 1,
            recent_losses: vec![],
        };
        ckpts.save(at, &params, &opt).await.unwrap();

        let mut fresh = Optimiser::new(&params, &OptimConfig::default(), true);
        assert_eq!(fresh.scaler.as_ref().unwrap().scale(), 65536.0);
        let resumed = TrainingCheckpoints::new(store(), trajectory);
        let (state, _) = resumed
            .resume(&mut dp, &params, &mut fresh)
            .await
            .unwrap()
            .expect("the checkpoint just written");
        assert_eq!(state.step, 7);
        assert_eq!(fresh.scaler, opt.scaler);
        assert_eq!(fresh.skipped_steps, 1);
        // An f32 run writes neither, so its state.json is as it was before they existed.
        let plain = Optimiser::new(&params, &OptimConfig::default(), false);
        ckpts
            .save(
                SavePoint {
                    step: 8,
                    cursor: DataCursor::default(),
                    seed: 0,
                    world_size: 1,
                    recent_losses: vec![],
                },
                &params,
                &plain,
            )
            .await
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("step-0000000008/state.json")).unwrap();
        assert!(
            !text.contains("loss_scaler") && !text.contains("skipped_steps"),
            "{text}"
        );
    }
}
