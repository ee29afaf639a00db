//! The indexer: CLIP in tch, and the embed stage that turns image records into a Lance table
//! of CLIP embeddings (PAPER.md: `f_img(I)` for every image of the database).
//!
//! - [`clip`]: the model, its preprocessing and tokenizer, HF checkpoint loading;
//! - [`embed`]: the stage: fetch → decode/resize → batch → CLIP → Lance, sharded over
//!   workers, exactly once per shard ([`ledger`]), resumable;
//! - [`table`]: the output tables' schemas and the shard-committing writer;
//! - [`knn`]: nearest neighbours: `build-index`, batch `precompute-knn`, the [`Retriever`].

pub mod bench;
pub mod clip;
pub mod embed;
pub mod error;
pub mod knn;
pub mod ledger;
pub mod retry;
pub mod score;
pub mod table;

pub use embed::{embed, EmbedConfig, EmbedProgress, EmbedSummary};
pub use error::{IndexerError, Result};
pub use knn::{precompute_knn, Retriever};
pub use knn_datasets::Unwritable;
