//! Data parallelism, in one place (torchtitan's `parallelize` role): the model code knows
//! nothing of it. Each rank holds a full replica; [`DataParallel`] broadcasts rank 0's
//! parameters at start, averages gradients after backward (bucketed, one collective per
//! bucket), and makes the ranks agree on the logged loss and on whether to stop.
//!
//! Gradients are reduced after the whole backward pass: tch exposes no per-parameter
//! autograd hooks, so the reduction cannot overlap backward the way torch DDP's does.

use crate::autocast::AutocastDtype;
use crate::config::TrainPrecision;
use crate::{Result, TrainerError};
use knn_cluster::group::{self, Backend, Collective, GroupOptions};
use knn_cluster::rendezvous::Rendezvous;
use knn_indexer::clip::DeviceChoice;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Which collectives backend `[train.distributed]` asks for.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// NCCL when training on a GPU, TCP on the CPU.
    #[default]
    Auto,
    /// The TCP ring through host memory (any device).
    Tcp,
    /// NCCL (GPU only).
    Nccl,
}

/// `[train.distributed]`: how the ranks of a data-parallel job talk. Where a rank sits comes
/// from the launcher's environment (`RANK`/`WORLD_SIZE`/`MASTER_ADDR`, Slurm, Kubernetes).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistributedConfig {
    /// `auto`, `tcp` or `nccl`.
    #[serde(default)]
    pub backend: BackendChoice,
    /// Bound in seconds on joining and on every collective: a lost or frozen rank makes the
    /// others fail after this long.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Gradient bucket size in MiB.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Bound in seconds on the other ranks' wait while rank 0 writes a checkpoint or a
    /// sample grid (a large model's checkpoint to object storage can take minutes).
    #[serde(default = "default_checkpoint_timeout_s")]
    pub checkpoint_timeout_s: f64,
}

fn default_timeout_s() -> f64 {
    300.0
}
fn default_bucket_mb() -> f64 {
    25.0
}
fn default_checkpoint_timeout_s() -> f64 {
    3600.0
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            timeout_s: default_timeout_s(),
            bucket_mb: default_bucket_mb(),
            checkpoint_timeout_s: default_checkpoint_timeout_s(),
        }
    }
}

/// The data-parallel wrapper: a process group plus what training asks of it.
pub struct DataParallel {
    group: Box<dyn Collective>,
    device: Device,
    checkpoint_timeout: Duration,
}

impl DataParallel {
    /// The device this rank trains on: a GPU choice becomes the rank's own GPU.
    pub fn rank_device(device: Device, rdv: &Rendezvous) -> Device {
        match device {
            Device::Cuda(_) => {
                let n = tch::Cuda::device_count().max(1) as usize;
                Device::Cuda(rdv.local_rank % n)
            }
            other => other,
        }
    }

    /// Where a training loop runs: the device (`choice`, a GPU rank on its own GPU) and the
    /// autocast precision, checked, and the process group joined. `section` (`train`,
    /// `train_clip`) names the settings in errors.
    pub fn for_run(
        choice: DeviceChoice,
        precision: TrainPrecision,
        cfg: &DistributedConfig,
        rdv: &Rendezvous,
        section: &str,
    ) -> Result<(Self, Option<AutocastDtype>)> {
        let device = choice
            .resolve()
            .map_err(|e| TrainerError::config(&format!("{section}.device"), e.to_string()))?;
        let device = Self::rank_device(device, rdv);
        let reduced = precision.autocast(device, &format!("{section}.precision"))?;
        Ok((Self::join(rdv, cfg, device)?, reduced))
    }

    /// The device this rank computes on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Joins the job `rdv` describes (a single process joins trivially).
    pub fn join(rdv: &Rendezvous, cfg: &DistributedConfig, device: Device) -> Result<Self> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(cfg.timeout_s)
            || !positive(cfg.bucket_mb)
            || !positive(cfg.checkpoint_timeout_s)
        {
            return Err(TrainerError::config(
                "train.distributed",
                "timeout_s, bucket_mb and checkpoint_timeout_s must be positive",
            ));
        }
        // `auto` is NCCL for GPU ranks of a real job; a single process needs no collectives
        // unless NCCL is asked for by name (a GPU check of the NCCL path at world size 1).
        let backend = match (cfg.backend, device) {
            (BackendChoice::Nccl, Device::Cuda(_)) => Backend::Nccl,
            (BackendChoice::Nccl, _) => {
                return Err(TrainerError::config(
                    "train.distributed.backend",
                    "`nccl` needs training on a GPU; use `tcp` or `auto` on the CPU",
                ))
            }
            (BackendChoice::Auto, Device::Cuda(_)) if rdv.is_distributed() => Backend::Nccl,
            _ => Backend::Tcp,
        };
        let opts = GroupOptions {
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            bucket_bytes: (cfg.bucket_mb * 1024.0 * 1024.0) as usize,
        };
        let group = group::join(rdv, backend, device, opts)?;
        Ok(Self {
            group,
            device,
            checkpoint_timeout: Duration::from_secs_f64(cfg.checkpoint_timeout_s),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Ranks in the job.
    pub fn world(&self) -> usize {
        self.group.world()
    }

    /// Whether this rank writes checkpoints, metrics and sample grids.
    pub fn is_primary(&self) -> bool {
        self.rank() == 0
    }

    /// Gives every rank rank 0's values of `tensors` (parameters, optimiser state).
    pub fn broadcast(&mut self, tensors: &[Tensor]) -> Result<()> {
        Ok(self.group.broadcast(tensors, 0)?)
    }

    /// Averages the gradients of `params` over the ranks.
    pub fn average_gradients(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        if self.world() == 1 && self.group.backend() == Backend::Tcp {
            return Ok(());
        }
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).collect();
        if let Some(i) = grads.iter().position(|g| !g.defined()) {
            return Err(TrainerError::config(
                "train (data parallel)",
                format!("parameter {} has no gradient to average", params[i].0),
            ));
        }
        Ok(self.group.all_reduce_mean(&grads)?)
    }

    /// Every rank's rows of `local` (`[B, d]`, the same B on every rank) stacked in rank
    /// order. This rank's rows are `local` itself, gradient and all; the others' are copies
    /// without one (open_clip's `gather_with_grad = False`).
    pub fn gather_with_own(&mut self, local: &Tensor) -> Result<Tensor> {
        let world = self.world() as i64;
        if world == 1 {
            return Ok(local.shallow_clone());
        }
        let (b, d) = local.size2()?;
        let r = self.rank() as i64;
        let all = Tensor::zeros([world * b, d], (local.kind(), local.device()));
        tch::no_grad(|| all.narrow(0, r * b, b).copy_(&local.detach()));
        // A sum is the mean times the ranks; every slot but one rank's is zero.
        self.group.all_reduce_mean(&[all.shallow_clone()])?;
        let all = all * world as f64;
        let mut parts = Vec::with_capacity(3);
        if r > 0 {
            parts.push(all.narrow(0, 0, r * b));
        }
        parts.push(local.shallow_clone());
        if r + 1 < world {
            parts.push(all.narrow(0, (r + 1) * b, (world - r - 1) * b));
        }
        Ok(Tensor::cat(&parts, 0))
    }

    /// The mean of `loss` over the ranks, whether any rank asked to stop, and whether any
    /// rank's save clock is due: every rank then stops, or saves, at the same step.
    pub fn agree(&mut self, loss: f64, stop: bool, clock_due: bool) -> Result<Agreed> {
        if self.world() == 1 {
            return Ok(Agreed {
                loss,
                stop,
                clock_due,
            });
        }
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let t =
            Tensor::from_slice(&[loss as f32, flag(stop), flag(clock_due)]).to_device(self.device);
        self.group.all_reduce_mean(&[t.shallow_clone()])?;
        let v = Vec::<f32>::try_from(&t.to_device(Device::Cpu))?;
        Ok(Agreed {
            loss: v[0] as f64,
            stop: v[1] > 0.0,
            clock_due: v[2] > 0.0,
        })
    }

    /// Rank 0's `value` on every rank.
    pub fn broadcast_u64(&mut self, value: u64) -> Result<u64> {
        if self.world() == 1 {
            return Ok(value);
        }
        // Two exact f32 halves of 24 bits each hold any step count in practice (< 2^48).
        let t = Tensor::from_slice(&[(value >> 24) as f32, (value & 0xFF_FFFF) as f32])
            .to_device(self.device)
            .to_kind(Kind::Float);
        self.group.broadcast(&[t.shallow_clone()], 0)?;
        let v = Vec::<f32>::try_from(&t.to_device(Device::Cpu))?;
        Ok(((v[0] as u64) << 24) | v[1] as u64)
    }

    /// Waits for rank 0 to finish writing (a checkpoint, a grid), bounded by
    /// `checkpoint_timeout_s` rather than the collectives' timeout.
    pub fn wait_for_primary(&mut self) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        Ok(self.group.barrier_within(self.checkpoint_timeout)?)
    }
}

/// Gives every parameter a (zero) gradient, so all ranks reduce the same set of buffers
/// even when a step's batch leaves some parameter unused.
pub fn define_gradients(params: &[(String, Tensor)]) {
    let mut total: Option<Tensor> = None;
    for (_, p) in params {
        if !p.grad().defined() {
            let z = p.sum(Kind::Float) * 0.0;
            total = Some(match total {
                Some(t) => t + z,
                None => z,
            });
        }
    }
    if let Some(t) = total {
        t.backward();
    }
}

/// What the ranks agreed on after a step ([`DataParallel::agree`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreed {
    /// The mean loss over the ranks.
    pub loss: f64,
    /// Some rank asked to stop.
    pub stop: bool,
    /// Some rank's save clock is due.
    pub clock_due: bool,
}
