//! The `knn-diffusion` CLI end to end: help, config errors, kill -9 and resume, S3 on
//! loopback, the embedded default, data-parallel training and job submission.

mod cli;
mod disk;
mod distributed;
mod eval;
mod faults;
mod secrets;
mod slurm;

use knn_test_support::{fault_proxy, images, parquet, s3_server, tables};
