//! Integration tests of the datasets crate: each reader on generated fixtures, bad records,
//! memory:// and a real S3 server on loopback.

mod cut_store;
mod fixtures;
mod fuzz;
mod image_parity;
#[path = "../../../tests/support/images.rs"]
mod images;
mod packaged;
mod readers;
mod s3;
#[path = "../../../tests/support/s3_server.rs"]
mod s3_server;
