//! The trainer: a text-to-image diffusion model trained from images alone, conditioned on
//! each image's CLIP embedding and its k nearest neighbours' (PAPER.md, continuous backbone).
//!
//! Split the way openai/guided-diffusion splits it, each part readable and testable alone:
//! - [`diffusion`]: the Gaussian diffusion *process*: schedules, `q_sample`, loss, the DDPM
//!   and DDIM samplers, classifier-free guidance;
//! - [`unet`]: the *network*: an ADM U-Net with kNN context tokens and null tokens;
//! - [`model`]: the two together, the loss of a micro-batch, a model loaded from a
//!   checkpoint;
//! - [`config`]: `[train]` and what a checkpoint records of it;
//! - [`data`]: the Lance tables as batches: deterministic order, rank split, prefetch;
//! - [`rng`]: the counter-based permutation and random streams everything draws from;
//! - [`optim`]: AdamW, the learning-rate schedule, clipping, EMA, loss scaling;
//! - [`parallel`]: data parallelism over a process group (broadcast, gradient averaging);
//! - [`checkpoint`]: where checkpoints live, what they hold, tensors as safetensors;
//! - [`metrics`]: `metrics.jsonl` and the progress callback;
//! - [`train`]: the *loop* that wires them together and resumes by itself;
//! - [`sampling`]: the guided reverse process and PNG grids;
//! - [`sample`]: text → retrieval → sampling → PNG grids (the `sample` command);
//! - [`judge`]: how an independent CLIP reads the samples;
//! - [`train_clip`]: the other loop: contrastive training of the project's own CLIP.

pub mod autocast;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod diffusion;
pub mod error;
pub mod eval;
pub mod judge;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod rng;
pub mod sample;
pub mod sampling;
pub mod train;
pub mod train_clip;
pub mod unet;

pub use config::TrainConfig;
pub use error::{Result, TrainerError};
pub use metrics::TrainProgress;
pub use sample::{sample, SampleRequest, SampleSummary};
pub use train::{train, TrainSummary};
pub use train_clip::{config::TrainClipConfig, train_clip, ClipTrainSummary};
