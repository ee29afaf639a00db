//! The diffusion model as the loops and `sample` use it: the U-Net with its weights and the
//! Gaussian process ([`DiffusionModel`]), the weighted loss of one micro-batch
//! ([`batch_loss`]), and a trained model read back from a checkpoint ([`TrainedModel`]).

use crate::autocast::{set_cuda_autocast_dtype, AutocastDtype};
use crate::checkpoint::contents::{EMA_FILE, MODEL_FILE};
use crate::checkpoint::{copy_named, CheckpointStore, TrainState};
use crate::config::TrajectoryConfig;
use crate::data::Batch;
use crate::diffusion::{DiffusionConfig, GaussianDiffusion};
use crate::unet::{Condition, UNet, UNetConfig};
use crate::{Result, TrainerError};
use knn_datasets::StorageConfig;
use tch::{nn, Device, Kind, Tensor};

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
        named_parameters(&self.vs)
    }

    /// Copies `weights` into the model; a missing or mis-shaped tensor is named with `what`.
    pub fn load_weights(&self, weights: &[(String, Tensor)], what: &str) -> Result<()> {
        copy_named(&self.named_parameters(), weights, what)
    }
}

/// The variables of `vs` sorted by name (a stable order for the optimiser and files).
pub fn named_parameters(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
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

/// A trained model loaded from a checkpoint.
pub struct TrainedModel {
    /// Weights (EMA unless asked otherwise) and process.
    pub model: DiffusionModel,
    /// The checkpoint's state.
    pub state: TrainState,
    /// What it was trained with.
    pub trajectory: TrajectoryConfig,
    /// Where it came from.
    pub location: String,
}

impl TrainedModel {
    /// Refuses `k` neighbours above the k this model was trained with: it has no slot for
    /// them. `key` is the flag or config key that asked, `what` says which model it is to the
    /// user, `fix` how to ask for fewer.
    pub fn check_k(&self, k: usize, key: &str, what: &str, fix: &str) -> Result<()> {
        let trained = self.model.unet.config().knn;
        if k <= trained {
            return Ok(());
        }
        Err(TrainerError::config(
            key,
            format!(
                "asks for k = {k}, but {what} in `{}` was trained with k = {trained}; {fix}",
                self.location
            ),
        ))
    }

    /// Loads the newest valid checkpoint under `url` onto `device` (EMA weights when `ema`).
    pub async fn load(
        url: &str,
        storage: &StorageConfig,
        device: Device,
        ema: bool,
    ) -> Result<Self> {
        let store = CheckpointStore::open_existing(url, storage)?;
        let ck = store
            .latest_valid()
            .await?
            .ok_or_else(|| TrainerError::NoCheckpoint {
                location: url.to_string(),
                detail:
                    "; run `knn-diffusion train` first or point --checkpoint at its checkpoints"
                        .into(),
            })?;
        let state = TrainState::of(&ck)?;
        let trajectory: TrajectoryConfig =
            serde_json::from_value(state.config.clone()).map_err(|e| TrainerError::Checkpoint {
                location: ck.location.clone(),
                reason: format!("state.json's config is unreadable: {e}"),
            })?;
        let model = DiffusionModel::new(&trajectory.unet, &trajectory.diffusion, device, 0)?;
        let file = if ema { EMA_FILE } else { MODEL_FILE };
        model.load_weights(&ck.tensors(file)?, &format!("{}/{file}", ck.location))?;
        Ok(Self {
            model,
            state,
            trajectory,
            location: ck.location,
        })
    }
}
