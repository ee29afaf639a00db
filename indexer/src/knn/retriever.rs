//! The retriever used at inference: nearest rows of any embeddings table to one query
//! embedding (PAPER.md: at sampling time a CLIP *text* embedding queries the image index,
//! and the index may be swapped for another database without retraining).
//!
//! It runs Lance's own vector search: the table's ANN index when it has one (built by
//! `build-index`), else an exact scan (allowed unless `require_index`). Similarities are
//! cosine; the query is L2-normalised first. An optional range filter on a numeric column
//! (`low <= column < high`, e.g. the paper's aesthetic-score buckets) is applied before the
//! search, so the k results all satisfy it. So is an excluded set of ids
//! ([`Retriever::excluding`]: `eval` keeps held-out rows out of every retrieval).

use super::vectors::{VectorTable, EMB_COLUMN, ID_COLUMN};
use crate::{IndexerError, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type};
use arrow_array::{Float32Array, RecordBatch};
use arrow_schema::DataType;
use futures::TryStreamExt;
use knn_datasets::StorageConfig;
use lance::deps::datafusion::prelude::{col, lit};
use lance::index::DatasetIndexExt;
use lance_linalg::distance::MetricType;

/// The distance column Lance's vector search adds.
const DISTANCE_COLUMN: &str = "_distance";

/// A numeric range every result must fall in: `low <= column < high`.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeFilter {
    /// A numeric column of the table.
    pub column: String,
    /// Inclusive lower bound.
    pub low: f64,
    /// Exclusive upper bound.
    pub high: f64,
}

/// How the retriever searches.
#[derive(Clone, Debug)]
pub struct RetrieverOptions {
    /// Fail at open when the table has no vector index on `emb`.
    pub require_index: bool,
    /// IVF partitions probed per query (index search only).
    pub nprobes: usize,
    /// Re-rank `refine_factor * k` index candidates with exact distances (None: no re-rank,
    /// similarities are then the index's approximations).
    pub refine_factor: Option<u32>,
}

impl Default for RetrieverOptions {
    fn default() -> Self {
        Self {
            require_index: false,
            nprobes: 32,
            refine_factor: Some(10),
        }
    }
}

/// The k nearest rows to one query, best first.
#[derive(Clone, Debug, Default)]
pub struct Neighbours {
    /// Row ids.
    pub ids: Vec<u64>,
    /// Cosine similarities.
    pub sims: Vec<f32>,
    /// The rows' embeddings, row-major (`ids.len() * dim`).
    pub emb: Vec<f32>,
    /// Embedding dimension.
    pub dim: usize,
}

/// Score-bucket retrieval: the k nearest within one of `of` quantile buckets of `column`
/// over the `pool` nearest rows ([`Retriever::search_bucket`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreBucket {
    /// A float column of the table (`score`, `aesthetic`).
    pub column: String,
    /// Which bucket, 1-based: 1 holds the lowest scores, `of` the highest.
    pub bucket: usize,
    /// How many buckets.
    pub of: usize,
    /// Nearest rows the buckets are cut from (the paper: 1,000).
    pub pool: usize,
}

impl ScoreBucket {
    /// Parses `i/n` (1 ≤ i ≤ n) for `column` over a pool of `pool` rows; `key` names the
    /// setting in errors.
    pub fn parse(column: &str, spec: &str, pool: usize, key: &str) -> Result<Self> {
        let bad = |reason: String| IndexerError::Config {
            key: key.into(),
            reason,
        };
        let (i, n) = spec
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)))
            .ok_or_else(|| {
                bad(format!(
                    "`{spec}` is not `i/n`, e.g. `5/5` for the top fifth"
                ))
            })?;
        if n == 0 || i == 0 || i > n {
            return Err(bad(format!("`{spec}`: need 1 <= i <= n")));
        }
        if pool < n {
            return Err(bad(format!(
                "a pool of {pool} rows cannot make {n} buckets"
            )));
        }
        Ok(Self {
            column: column.into(),
            bucket: i,
            of: n,
            pool,
        })
    }

    /// The ranks `[lo, hi)` of this bucket among `len` rows sorted by score.
    pub fn rank_range(&self, len: usize) -> (usize, usize) {
        (
            (self.bucket - 1) * len / self.of,
            self.bucket * len / self.of,
        )
    }
}

/// One search result.
struct Row {
    sim: f32,
    id: u64,
    emb: Vec<f32>,
    score: Option<f64>,
}

/// Row `i` of a float column as f64 (None when null or not a float column).
fn score_value(col: &dyn arrow_array::Array, i: usize) -> Option<f64> {
    use arrow_array::types::Float64Type;
    if col.is_null(i) {
        return None;
    }
    col.as_primitive_opt::<Float64Type>()
        .map(|c| c.value(i))
        .or_else(|| {
            col.as_primitive_opt::<Float32Type>()
                .map(|c| c.value(i) as f64)
        })
}

/// Nearest-neighbour search over one embeddings table.
#[derive(Debug, Clone)]
pub struct Retriever {
    table: VectorTable,
    indexed: bool,
    options: RetrieverOptions,
    /// Ids never returned, sorted.
    excluded: Vec<u64>,
}

impl Retriever {
    /// Opens the latest version of the embeddings table at `uri` with default options.
    pub async fn open(uri: &str, storage: &StorageConfig) -> Result<Self> {
        Self::open_with(uri, storage, None, RetrieverOptions::default()).await
    }

    /// Opens `uri` at `version` (latest when `None`) with `options`.
    pub async fn open_with(
        uri: &str,
        storage: &StorageConfig,
        version: Option<u64>,
        options: RetrieverOptions,
    ) -> Result<Self> {
        let table = VectorTable::open(uri, &storage.to_lance_options(), version).await?;
        table.require_rows()?;
        let indexed = has_vector_index(&table).await?;
        if options.require_index && !indexed {
            return Err(IndexerError::NoIndex {
                table: uri.to_string(),
                column: EMB_COLUMN.into(),
            });
        }
        Ok(Self {
            table,
            indexed,
            options,
            excluded: Vec::new(),
        })
    }

    /// The same retriever, never returning these ids (held-out rows, the query's own row).
    pub fn excluding(mut self, ids: impl IntoIterator<Item = u64>) -> Self {
        self.excluded.extend(ids);
        self.excluded.sort_unstable();
        self.excluded.dedup();
        self
    }

    /// Rows a search can return at most: the table's less the excluded ids.
    fn searchable_rows(&self) -> usize {
        self.table.rows.saturating_sub(self.excluded.len())
    }

    /// Embedding dimension of the table.
    pub fn dim(&self) -> usize {
        self.table.dim
    }

    /// Rows in the table.
    pub fn rows(&self) -> usize {
        self.table.rows
    }

    /// Whether searches use a vector index (else they scan exactly).
    pub fn is_indexed(&self) -> bool {
        self.indexed
    }

    /// The table URI.
    pub fn uri(&self) -> &str {
        &self.table.uri
    }

    /// The CLIP that embedded the table, as its schema metadata records it.
    pub fn clip(&self) -> Option<&str> {
        self.table
            .ds
            .schema()
            .metadata
            .get(crate::table::CLIP_METADATA)
            .map(String::as_str)
    }

    /// Refuses the table when it records another CLIP than `query_clip`, the one that embeds
    /// the queries. A table that records none is allowed, with a warning.
    pub fn require_clip(&self, query_clip: &str) -> Result<()> {
        match self.clip() {
            Some(c) if c == query_clip => Ok(()),
            Some(c) => Err(IndexerError::ClipMismatch {
                table: self.table.uri.clone(),
                table_clip: c.to_string(),
                query_clip: query_clip.to_string(),
            }),
            None => {
                tracing::warn!(
                    table = %self.table.uri,
                    query_clip,
                    "the retrieval table does not record its CLIP; assuming it is the query's"
                );
                Ok(())
            }
        }
    }

    /// The `k` rows most similar to `query`.
    pub async fn search(&self, query: &[f32], k: usize) -> Result<Neighbours> {
        self.search_filtered(query, k, None).await
    }

    /// The `k` rows most similar to `query` among those passing `filter` (fewer when fewer
    /// pass).
    pub async fn search_filtered(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&RangeFilter>,
    ) -> Result<Neighbours> {
        let rows = self.nearest_rows(query, k, filter, None).await?;
        Ok(self.neighbours(rows))
    }

    /// The `k` rows most similar to `query` within one score bucket (PAPER.md §4.2): the
    /// `bucket.pool` nearest rows are ranked by `bucket.column` and cut into `bucket.of`
    /// equal quantile buckets; the result is the k nearest of bucket `bucket.bucket` (fewer
    /// when it holds fewer). Rows with a null score are left out of the pool.
    pub async fn search_bucket(
        &self,
        query: &[f32],
        k: usize,
        bucket: &ScoreBucket,
    ) -> Result<Neighbours> {
        self.check_score_column(&bucket.column)?;
        let rows = self.searchable_rows();
        let pool = bucket.pool.min(rows).max(k.min(rows));
        let mut rows: Vec<Row> = self
            .nearest_rows(query, pool, None, Some(&bucket.column))
            .await?
            .into_iter()
            .filter(|r| r.score.is_some())
            .collect();
        rows.sort_by(|a, b| {
            a.score
                .unwrap()
                .total_cmp(&b.score.unwrap())
                .then(a.id.cmp(&b.id))
        });
        let (lo, hi) = bucket.rank_range(rows.len());
        let mut chosen: Vec<Row> = rows.drain(lo..hi).collect();
        chosen.sort_by(|a, b| b.sim.total_cmp(&a.sim));
        chosen.truncate(k);
        Ok(self.neighbours(chosen))
    }

    fn neighbours(&self, rows: Vec<Row>) -> Neighbours {
        let mut out = Neighbours {
            dim: self.table.dim,
            ..Default::default()
        };
        for r in rows {
            out.sims.push(r.sim);
            out.ids.push(r.id);
            out.emb.extend(r.emb);
        }
        out
    }

    /// The `k` nearest rows to `query` (passing `filter`), best first, with `score_column`'s
    /// value when asked.
    async fn nearest_rows(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&RangeFilter>,
        score_column: Option<&str>,
    ) -> Result<Vec<Row>> {
        let uri = &self.table.uri;
        if query.len() != self.table.dim {
            return Err(IndexerError::DimensionMismatch {
                table: uri.clone(),
                query_dim: query.len(),
                table_dim: self.table.dim,
            });
        }
        if k == 0 || k > self.searchable_rows() {
            return Err(IndexerError::KTooLarge {
                table: uri.clone(),
                k,
                rows: self.table.rows,
                excluding: if self.excluded.is_empty() {
                    ""
                } else {
                    " less the excluded ids"
                },
                max: self.searchable_rows(),
            });
        }
        let norm = query
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        let q = Float32Array::from_iter_values(query.iter().map(|v| v / norm));
        let lance_err = |e| IndexerError::lance(uri.clone(), e);
        let mut scanner = self.table.ds.scan();
        let mut columns = vec![ID_COLUMN, EMB_COLUMN, DISTANCE_COLUMN];
        columns.extend(score_column);
        scanner.project(&columns).map_err(lance_err)?;
        scanner
            .nearest(EMB_COLUMN, &q, k)
            .map_err(lance_err)?
            .distance_metric(MetricType::Cosine)
            .nprobes(self.options.nprobes.max(1));
        if let Some(f) = self.options.refine_factor {
            scanner.refine(f);
        }
        let mut keep = None;
        if let Some(f) = filter {
            self.check_filter_column(f)?;
            keep = Some(
                col(f.column.as_str())
                    .gt_eq(lit(f.low))
                    .and(col(f.column.as_str()).lt(lit(f.high))),
            );
        }
        if !self.excluded.is_empty() {
            let out = col(ID_COLUMN).in_list(self.excluded.iter().map(|&i| lit(i)).collect(), true);
            keep = Some(match keep {
                Some(k) => k.and(out),
                None => out,
            });
        }
        if let Some(expr) = keep {
            scanner.prefilter(true).filter_expr(expr);
        }
        let batches: Vec<RecordBatch> = scanner
            .try_into_stream()
            .await
            .map_err(lance_err)?
            .try_collect()
            .await
            .map_err(lance_err)?;
        let mut rows: Vec<Row> = Vec::new();
        for b in &batches {
            let ids = b
                .column_by_name(ID_COLUMN)
                .map(|c| c.as_primitive::<UInt64Type>().clone());
            let emb = b
                .column_by_name(EMB_COLUMN)
                .map(|c| c.as_fixed_size_list().clone());
            let dist = b
                .column_by_name(DISTANCE_COLUMN)
                .map(|c| c.as_primitive::<Float32Type>().clone());
            let (Some(ids), Some(emb), Some(dist)) = (ids, emb, dist) else {
                return Err(IndexerError::Internal(format!(
                    "Lance vector search on `{uri}` returned no id/emb/_distance columns"
                )));
            };
            let scores = score_column.and_then(|c| b.column_by_name(c));
            for i in 0..b.num_rows() {
                let e = emb.value(i);
                rows.push(Row {
                    sim: 1.0 - dist.value(i),
                    id: ids.value(i),
                    emb: e.as_primitive::<Float32Type>().values().to_vec(),
                    score: scores.and_then(|c| score_value(c.as_ref(), i)),
                });
            }
        }
        rows.sort_by(|a, b| b.sim.total_cmp(&a.sim));
        rows.truncate(k);
        Ok(rows)
    }

    fn check_score_column(&self, column: &str) -> Result<()> {
        self.check_column(
            column,
            |t| matches!(t, DataType::Float64 | DataType::Float32),
            "score buckets need a float column",
            "no such score column: add one with `knn-diffusion score` or carry it with \
             `embed.source.columns`",
        )
    }

    fn check_filter_column(&self, f: &RangeFilter) -> Result<()> {
        self.check_column(
            &f.column,
            DataType::is_numeric,
            "a range filter needs a numeric column",
            "no such column to filter on",
        )
    }

    /// That `column` exists and its type passes `accept`; else an error with `need` (and the
    /// type it has) or `missing`.
    fn check_column(
        &self,
        column: &str,
        accept: impl Fn(&DataType) -> bool,
        need: &str,
        missing: &str,
    ) -> Result<()> {
        let schema: arrow_schema::Schema = self.table.ds.schema().into();
        let detail = match schema.field_with_name(column) {
            Ok(field) if accept(field.data_type()) => return Ok(()),
            Ok(field) => format!("{need}; it is {}", field.data_type()),
            Err(_) => missing.to_string(),
        };
        Err(IndexerError::MissingColumn {
            table: self.table.uri.clone(),
            column: column.into(),
            detail,
        })
    }
}

/// Whether the table has a vector index on `emb`.
pub async fn has_vector_index(table: &VectorTable) -> Result<bool> {
    let field_id = table
        .ds
        .schema()
        .field(EMB_COLUMN)
        .map(|f| f.id)
        .unwrap_or(-1);
    let indices = table
        .ds
        .load_indices()
        .await
        .map_err(|e| IndexerError::lance(&table.uri, e))?;
    Ok(indices.iter().any(|i| i.fields.contains(&field_id)))
}
