//! `build-index`: a Lance vector index on `emb` of an embeddings table, which the
//! [`super::Retriever`] uses for per-query search at inference.
//!
//! IVF_PQ by default (compact; re-ranked with exact distances at query time), IVF_HNSW_SQ as
//! an option (more memory, better recall per probe). Cosine metric: embeddings are
//! L2-normalised CLIP vectors. Parameters left at 0 are derived from the table: √rows IVF
//! partitions, and PQ sub-vectors of 16 dimensions. Lance reports its build stages; they are
//! logged with their durations.

use super::vectors::{VectorTable, EMB_COLUMN};
use crate::{IndexerError, Result};
use knn_datasets::StorageConfig;
use lance::index::vector::VectorIndexParams;
use lance::index::{DatasetIndexExt, IndexBuildProgress};
use lance_index::vector::hnsw::builder::HnswBuildParams;
use lance_index::vector::ivf::IvfBuildParams;
use lance_index::vector::sq::builder::SQBuildParams;
use lance_index::IndexType;
use lance_linalg::distance::MetricType;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Fewest rows an IVF_PQ index can be trained on (256 PQ codewords per sub-vector).
pub const PQ_MIN_ROWS: usize = 256;

/// Which index.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IndexKind {
    /// Inverted file with product quantisation.
    #[default]
    IvfPq,
    /// Inverted file with an HNSW graph over scalar-quantised vectors per partition.
    IvfHnswSq,
}

/// The `build-index` stage's config (`[index]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// The embeddings table (default: `embed.output.table`).
    #[serde(default)]
    pub table: Option<String>,
    /// `ivf_pq` or `ivf_hnsw_sq`.
    #[serde(default)]
    pub kind: IndexKind,
    /// IVF partitions (0: √rows).
    #[serde(default)]
    pub partitions: usize,
    /// PQ sub-vectors (0: d / 16, or d / 8, whichever divides d).
    #[serde(default)]
    pub sub_vectors: usize,
    /// k-means iterations for the IVF and PQ codebooks.
    #[serde(default = "default_iterations")]
    pub max_iterations: usize,
    /// Index name.
    #[serde(default = "default_name")]
    pub name: String,
}

fn default_iterations() -> usize {
    50
}
fn default_name() -> String {
    "emb_idx".into()
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            table: None,
            kind: IndexKind::IvfPq,
            partitions: 0,
            sub_vectors: 0,
            max_iterations: default_iterations(),
            name: default_name(),
        }
    }
}

/// What `build-index` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexSummary {
    /// The table.
    pub table: String,
    /// Its version after the index commit.
    pub version: u64,
    /// Rows indexed.
    pub rows: usize,
    /// Dimension.
    pub dim: usize,
    /// Index kind.
    pub kind: IndexKind,
    /// IVF partitions.
    pub partitions: usize,
    /// PQ sub-vectors (IVF_PQ).
    pub sub_vectors: usize,
    /// Build stages and their seconds, in order.
    pub stages: Vec<(String, f64)>,
    /// Wall time.
    pub elapsed_s: f64,
}

impl fmt::Display for IndexSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "build-index summary: {:?} on `{}` of {} (version {})",
            self.kind, EMB_COLUMN, self.table, self.version
        )?;
        writeln!(
            f,
            "  {} rows, d = {}, {} partitions{}",
            self.rows,
            self.dim,
            self.partitions,
            if self.kind == IndexKind::IvfPq {
                format!(", {} PQ sub-vectors", self.sub_vectors)
            } else {
                String::new()
            }
        )?;
        for (stage, s) in &self.stages {
            writeln!(f, "  stage {stage}: {s:.1} s")?;
        }
        write!(f, "  time: {:.1} s", self.elapsed_s)
    }
}

/// Logs Lance's index build stages and keeps their durations.
#[derive(Debug)]
struct StageLog {
    current: Mutex<Option<(String, Instant, Instant)>>,
    done: Mutex<Vec<(String, f64)>>,
}

#[async_trait::async_trait]
impl IndexBuildProgress for StageLog {
    async fn stage_start(&self, stage: &str, total: Option<u64>, unit: &str) -> lance::Result<()> {
        tracing::info!(stage, total, unit, "index build stage started");
        let now = Instant::now();
        *lock(&self.current) = Some((stage.to_string(), now, now));
        Ok(())
    }

    async fn stage_progress(&self, stage: &str, completed: u64) -> lance::Result<()> {
        let mut cur = lock(&self.current);
        if let Some((_, started, last)) = cur.as_mut() {
            if last.elapsed().as_secs() >= 10 {
                *last = Instant::now();
                tracing::info!(
                    stage,
                    completed,
                    elapsed_s = started.elapsed().as_secs_f64(),
                    "index build progress"
                );
            }
        }
        Ok(())
    }

    async fn stage_complete(&self, stage: &str) -> lance::Result<()> {
        if let Some((name, started, _)) = lock(&self.current).take() {
            let s = started.elapsed().as_secs_f64();
            tracing::info!(stage, elapsed_s = s, "index build stage done");
            lock(&self.done).push((name, s));
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// PQ sub-vectors for dimension `dim`: 16 dimensions each when possible.
pub fn default_sub_vectors(dim: usize) -> usize {
    [16, 8, 4, 2]
        .into_iter()
        .find(|w| dim.is_multiple_of(*w))
        .map(|w| dim / w)
        .unwrap_or(1)
}

/// Builds (or replaces) the vector index of `cfg.table`.
pub async fn build_index(cfg: &IndexConfig, storage: &StorageConfig) -> Result<IndexSummary> {
    let started = Instant::now();
    let uri = cfg.table.as_deref().ok_or_else(|| IndexerError::Config {
        key: "index.table".into(),
        reason: "no embeddings table: set `index.table` (or `embed.output.table`)".into(),
    })?;
    let table = VectorTable::open(uri, &storage.to_lance_options(), None).await?;
    table.require_rows()?;
    let (rows, dim) = (table.rows, table.dim);
    let partitions = match cfg.partitions {
        0 => ((rows as f64).sqrt().round() as usize).clamp(1, 65_536),
        p => p,
    };
    if partitions > rows {
        return Err(IndexerError::Config {
            key: "index.partitions".into(),
            reason: format!(
                "{partitions} partitions for a table of {rows} rows; use at most {rows}"
            ),
        });
    }
    let sub_vectors = match cfg.sub_vectors {
        0 => default_sub_vectors(dim),
        s if dim.is_multiple_of(s) => s,
        s => {
            return Err(IndexerError::Config {
                key: "index.sub_vectors".into(),
                reason: format!("{s} does not divide the dimension {dim}"),
            })
        }
    };
    let params = match cfg.kind {
        IndexKind::IvfPq => {
            if rows < PQ_MIN_ROWS {
                return Err(IndexerError::Config {
                    key: "index.kind".into(),
                    reason: format!(
                        "table `{uri}` has {rows} rows; IVF_PQ needs at least {PQ_MIN_ROWS} to \
                         train. At this size the retriever's exact scan is fast: skip build-index"
                    ),
                });
            }
            VectorIndexParams::ivf_pq(
                partitions,
                8,
                sub_vectors,
                MetricType::Cosine,
                cfg.max_iterations,
            )
        }
        IndexKind::IvfHnswSq => {
            let mut ivf = IvfBuildParams::new(partitions);
            ivf.max_iters = cfg.max_iterations;
            VectorIndexParams::with_ivf_hnsw_sq_params(
                MetricType::Cosine,
                ivf,
                HnswBuildParams::default(),
                SQBuildParams::default(),
            )
        }
    };
    tracing::info!(table = uri, rows, dim, partitions, kind = ?cfg.kind, "building the vector index");
    let log = Arc::new(StageLog {
        current: Mutex::new(None),
        done: Mutex::new(Vec::new()),
    });
    let mut ds = table.ds.clone();
    ds.create_index_builder(&[EMB_COLUMN], IndexType::Vector, &params)
        .name(cfg.name.clone())
        .replace(true)
        .progress(log.clone())
        .await
        .map_err(|e| IndexerError::lance(uri, e))?;
    let stages = lock(&log.done).clone();
    Ok(IndexSummary {
        table: uri.to_string(),
        version: ds.version().version,
        rows,
        dim,
        kind: cfg.kind,
        partitions,
        sub_vectors,
        stages,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}
