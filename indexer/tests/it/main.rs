//! Integration tests of the indexer: CLIP parity with HF transformers, and the embed stage and
//! nearest-neighbour search on real Lance tables.

mod clip_parity;
mod embed;
#[path = "../../../tests/support/images.rs"]
mod images;
mod knn;
#[path = "../../../tests/support/parquet.rs"]
mod parquet;
#[path = "../../../tests/support/tables.rs"]
mod tables;
mod upkeep;
