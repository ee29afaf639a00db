//! Nearest neighbours over an embeddings table: the batch `precompute-knn` that conditions
//! training (PAPER.md: every image's k nearest image embeddings, itself excluded), the Lance
//! vector index `build-index` makes, and the [`Retriever`] that queries any table at
//! inference.
//!
//! - [`vectors`]: reading `(id, emb)` from a pinned table version, in bounded blocks;
//! - [`search`]: the tch arithmetic (exact and IVF batch search, running top-k);
//! - [`quantizer`]: which partitions a vector belongs to and looks in (flat or two-level);
//! - [`resident`]: the table's rows held in memory, grouped by partition, when they fit;
//! - [`plan`]: IVF centroids and the recall-calibrated `nprobe`, stored with the output;
//! - [`precompute`]: the stage, sharded by id range and committed exactly once per shard;
//! - [`index`]: the `build-index` stage;
//! - [`retriever`]: per-query search through Lance;
//! - [`synthetic`]: generated clustered tables for tests and benchmarks.

pub mod index;
pub mod plan;
pub mod precompute;
pub mod quantizer;
pub mod resident;
pub mod retriever;
pub mod search;
pub mod synthetic;
pub mod vectors;

pub use index::{build_index, IndexConfig, IndexKind, IndexSummary};
pub use plan::IvfConfig;
pub use precompute::{precompute_knn, KnnComputeConfig, KnnConfig, KnnProgress, KnnSummary};
pub use retriever::{Neighbours, RangeFilter, Retriever, RetrieverOptions, ScoreBucket};
pub use vectors::VectorTable;
