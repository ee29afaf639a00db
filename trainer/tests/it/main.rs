//! Integration tests of the trainer: schedule and sampler parity with HF diffusers, and
//! training, resuming and sampling on real Lance tables with real libtorch.

mod clip;
mod fixtures;
mod measures;
mod parity;
mod training;

use knn_test_support::{parquet, s3_server};

/// libtorch's random generator is process-global (weight init and dropout draw from it), so
/// tests that train hold this lock: concurrent trainings would interleave its stream.
pub static TORCH_RNG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
