//! Integration tests of the indexer: CLIP parity with HF transformers, and the embed stage on
//! real Lance tables.

mod clip_parity;
mod embed;
#[path = "../../../tests/support/images.rs"]
mod images;
#[path = "../../../tests/support/tables.rs"]
mod tables;
