//! Integration tests of the indexer: CLIP parity with HF transformers, and the embed stage and
//! nearest-neighbour search on real Lance tables.

mod clip_parity;
mod embed;
mod knn;
mod upkeep;

use knn_test_support::{images, parquet, tables};
