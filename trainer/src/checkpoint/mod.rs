//! Checkpoints, in three parts: [`store`] (where: files under `step-N/` on any local path or
//! object-store URL, a SHA-256 manifest written last, pruning), [`contents`] (what: weights,
//! EMA, optimiser state and `state.json`, saved and resumed the same way by every training
//! loop) and [`safetensors`] (how tensors become bytes). [`cadence`] says when a loop saves.

pub mod cadence;
pub mod contents;
pub mod safetensors;
pub mod store;

pub use cadence::SaveCadence;
pub use contents::{SavePoint, TrainState, TrainingCheckpoints, Trajectory};
pub use safetensors::{copy_named, from_safetensors, to_safetensors};
pub use store::{CheckpointStore, LoadedCheckpoint, Manifest, ManifestEntry, FORMAT, MANIFEST};
