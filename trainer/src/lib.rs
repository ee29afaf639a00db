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
//! - [`tensorboard`]: the same numbers, and the sample grids, as TensorBoard event files;
//! - [`train`](mod@train): the *loop* that wires them together and resumes by itself; the step loop
//!   itself (progress, the ranks' agreement, metrics lines, checkpoints, stops) is shared
//!   with `train_clip` in the private `steps` module;
//! - [`sampling`]: the guided reverse process and PNG grids;
//! - [`sample`](mod@sample): text → retrieval → sampling → PNG grids (the `sample` command);
//! - [`judge`]: how an independent CLIP reads the samples;
//! - [`train_clip`](mod@train_clip): the other loop: contrastive training of the project's own CLIP.
//!
//! The pipeline in small: a folder of images embedded with a random-weight CLIP, each
//! image's neighbours precomputed, then two training steps of the default U-Net on the CPU,
//! checkpointed where `output_dir` says (a run that finds a checkpoint there resumes it):
//!
//! ```
//! use knn_cluster::rendezvous::Rendezvous;
//! use knn_datasets::StorageConfig;
//! use knn_indexer::knn::{precompute_knn, KnnConfig, KnnProgress};
//! use knn_indexer::{embed, EmbedConfig, EmbedProgress};
//! use knn_trainer::{train, TrainConfig};
//! use std::ops::ControlFlow;
//! use std::sync::Arc;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let images = dir.path().join("images");
//! std::fs::create_dir(&images)?;
//! for i in 0..8u8 {
//!     let img = image::RgbImage::from_fn(16, 16, |x, _| image::Rgb([i * 30, x as u8 * 16, 90]));
//!     img.save(images.join(format!("{i}.png")))?;
//! }
//! let table = dir.path().join("emb.lance").display().to_string();
//! let storage = StorageConfig::default();
//! let embedding: EmbedConfig = toml::from_str(&format!(
//!     "[source]\nurl = {:?}\nformat = \"folder\"\n\
//!      [output]\ntable = {table:?}\nimage_size_px = 16\n[clip]\ndevice = \"cpu\"\n",
//!     images.display().to_string(),
//! ))?;
//! embed(&embedding, &storage, (0, 1), Arc::new(EmbedProgress::default())).await?;
//! let neighbours: KnnConfig = toml::from_str(&format!("table = {table:?}\nk = 2\n"))?;
//! precompute_knn(&neighbours, &storage, (0, 1), Arc::new(KnnProgress::default())).await?;
//!
//! let cfg: TrainConfig = toml::from_str(&format!(
//!     "output_dir = {:?}\nk = 2\nbatch_size = 4\nmax_steps = 2\ndevice = \"cpu\"\n\
//!      [data]\nembeddings = {table:?}\nknn = {:?}\n[samples]\nevery_steps = 0\n",
//!     dir.path().join("run").display().to_string(),
//!     neighbours.output_uri()?,
//! ))?;
//! let summary = train(&cfg, &storage, &Rendezvous::single(), &mut |_| ControlFlow::Continue(())).await?;
//! assert_eq!(summary.step, 2);
//! assert!(summary.last_loss.is_finite());
//! assert!(summary.checkpoint.is_some(), "the last step is saved");
//! # Ok(())
//! # }
//! ```

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
mod steps;
pub mod tensorboard;
pub mod train;
pub mod train_clip;
pub mod unet;

pub use config::TrainConfig;
pub use error::{Result, TrainerError};
pub use metrics::TrainProgress;
pub use sample::{sample, SampleRequest, SampleSummary};
pub use train::{train, TrainSummary};
pub use train_clip::{config::TrainClipConfig, train_clip, ClipTrainSummary};
