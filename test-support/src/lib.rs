//! What knn-diffusion's integration tests (and `bench`'s S3 runs) share: generated inputs,
//! real servers on loopback, and readers for the tables the stages write. A dev-only crate:
//! nothing the CLI ships depends on it except the benchmarks, which start the same S3 server.
//!
//! ```
//! use knn_test_support::images;
//!
//! // A real 8x4 PNG whose pixels depend on the seed, and a WebDataset shard holding it.
//! let png = images::png(8, 4, 7);
//! assert_eq!(&png[1..4], b"PNG");
//! let shard = images::tar(&[("0001.png", png.clone()), ("0001.txt", b"a cat".to_vec())]);
//! assert_eq!(shard.len() % 512, 0);
//! ```
//!
//! - [`images`]: PNGs with a seed-dependent pattern, a decompression bomb, tar shards.
//! - [`parquet`]: a record batch as the bytes of one parquet file.
//! - [`s3_server`]: `s3s-fs` on 127.0.0.1 with SigV4, serving a temporary directory.
//! - [`fault_proxy`]: an HTTP proxy in front of it that injects an object store's faults.
//! - [`tables`]: a Lance table's columns and rows, read back after `validate()`.
//! - [`tensorboard`]: what TensorBoard's reader finds in an event-file folder.

pub mod fault_proxy;
pub mod images;
pub mod parquet;
pub mod s3_server;
pub mod tables;
pub mod tensorboard;
