//! The trainer: a text-to-image diffusion model trained from images alone, conditioned on
//! each image's CLIP embedding and its k nearest neighbours' (PAPER.md, continuous backbone).
//!
//! Split the way openai/guided-diffusion splits it, each part readable and testable alone:
//! - [`diffusion`]: the Gaussian diffusion *process*: schedules, `q_sample`, loss, the DDPM
//!   and DDIM samplers, classifier-free guidance;
//! - [`unet`]: the *network*: an ADM U-Net with kNN context tokens and null tokens;
//! - [`data`]: the Lance tables as batches: deterministic order, rank split, prefetch;
//! - [`optim`]: AdamW, the learning-rate schedule, clipping, EMA;
//! - [`parallel`]: data parallelism over a process group (broadcast, gradient averaging);
//! - [`checkpoint`]: safetensors + JSON state + SHA-256 manifest, on disk or object storage;
//! - [`train`]: the *loop* that wires them together and resumes by itself;
//! - [`sample`]: text → retrieval → guided sampling → PNG grids.

pub mod autocast;
pub mod checkpoint;
pub mod data;
pub mod diffusion;
pub mod error;
pub mod optim;
pub mod parallel;
pub mod sample;
pub mod train;
pub mod unet;

pub use error::{Result, TrainerError};
pub use sample::{sample, SampleRequest, SampleSummary};
pub use train::{train, TrainConfig, TrainProgress, TrainSummary};
