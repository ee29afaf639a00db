//! Integration tests of the indexer: CLIP parity with HF transformers, and the embed stage on
//! real Lance tables.

mod clip_parity;
mod embed;
