//! Integration tests of the datasets crate: each reader on generated fixtures, bad records,
//! memory:// and a real S3 server on loopback.

mod cut_store;
mod fixtures;
mod fuzz;
mod image_parity;
mod packaged;
mod readers;
mod s3;

use knn_test_support::{images, s3_server};
