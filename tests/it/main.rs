//! The `knn-diffusion` CLI end to end: help, config errors, kill -9 and resume, S3 on
//! loopback, the embedded default, data-parallel training and job submission.

mod cli;
mod disk;
mod distributed;
mod eval;
#[path = "../support/fault_proxy.rs"]
mod fault_proxy;
mod faults;
#[path = "../support/images.rs"]
#[allow(dead_code)]
mod images;
#[path = "../support/parquet.rs"]
mod parquet;
#[path = "../support/s3_server.rs"]
mod s3_server;
mod secrets;
mod slurm;
#[path = "../support/tables.rs"]
mod tables;
