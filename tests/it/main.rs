//! The `knn-diffusion` CLI end to end: help, config errors, kill -9 and resume, S3 on
//! loopback, and the embedded default.

mod cli;
#[path = "../support/images.rs"]
#[allow(dead_code)]
mod images;
#[path = "../support/s3_server.rs"]
mod s3_server;
#[path = "../support/tables.rs"]
mod tables;
