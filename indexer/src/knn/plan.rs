//! The search plan of one `precompute-knn` output: IVF centroids and how many of them each
//! query probes, fixed once and stored so that every worker, and every rerun, searches the
//! same way.
//!
//! - Centroids: spherical k-means (cosine) on a seeded random sample of the pinned table,
//!   `samples_per_partition` rows per centroid (at most [`MAX_TRAINING_ROWS`]); with
//!   `cells` set, two-level ([`Quantizer`]): partitions grouped into cells, and a vector
//!   scores only the partitions of its best cells.
//! - `nprobe` (and the cells a query looks in): calibrated. For a seeded sample of query rows
//!   the exact top-k is found by brute force over the whole table, with the same exclusions
//!   as the real run, and the partitions of those few neighbours are read by address.
//!   IVF-Flat scores are exact, so an exact neighbour is found iff its partition is among
//!   the query's probes: recall@k at any (cells, `nprobe`) follows from where each exact
//!   neighbour's partition ranks, and the plan takes the cheapest pair whose recall on the
//!   sample reaches `target_recall`.
//! - Small tables (fewer than [`IVF_MIN_ROWS`] rows by default) get one partition: the search
//!   is then exact brute force.
//!
//! A plan is stored content-addressed as a small Lance table (`partition`, `centroid`, and
//! `cell` when two-level, with the cell centroids in a table beside it) next to the output,
//! named by the hash of its contents, so two workers that compute it concurrently either
//! write the same table or two different ones of which the output's metadata names one.

use super::quantizer::{sample_offsets, Cells, Quantizer};
use super::search::{centroid_ranks, exact_scan, offsets, Exclusion, TopK};
use super::vectors::VectorTable;
use crate::{IndexerError, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type};
use arrow_array::{
    FixedSizeListArray, Float32Array, RecordBatch, RecordBatchIterator, UInt32Array,
};
use arrow_schema::{DataType, Field, Schema};
use futures::TryStreamExt;
use lance::dataset::{WriteMode, WriteParams};
use lance::Dataset;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Below this many rows the default plan is one partition (exact search).
pub const IVF_MIN_ROWS: usize = 16_384;

/// How the plan is made (`[knn.ivf]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IvfConfig {
    /// IVF partitions; 0: the larger of 4·√rows and rows / 256, or 1 (exact) below 16 384
    /// rows.
    #[serde(default)]
    pub partitions: usize,
    /// Cells the partitions are grouped in (0: none, every query scores every centroid).
    /// About √partitions cells make choosing the probes cheap on data with coarse
    /// structure; the calibration picks how many cells a query looks in.
    #[serde(default)]
    pub cells: usize,
    /// Partitions each query probes; 0: the smallest that reaches `target_recall` on the
    /// calibration sample.
    #[serde(default)]
    pub nprobe: usize,
    /// recall@k the calibrated `nprobe` must reach on the calibration sample.
    #[serde(default = "default_target_recall")]
    pub target_recall: f64,
    /// Query rows whose exact neighbours calibrate `nprobe` (0: no calibration; then set
    /// `nprobe`).
    #[serde(default = "default_calibration_queries")]
    pub calibration_queries: usize,
    /// k-means training rows per partition.
    #[serde(default = "default_samples_per_partition")]
    pub samples_per_partition: usize,
    /// k-means iterations.
    #[serde(default = "default_kmeans_iterations")]
    pub kmeans_iterations: usize,
    /// Seed of the samples and the k-means initialisation.
    #[serde(default)]
    pub seed: u64,
}

fn default_target_recall() -> f64 {
    // The sample estimates recall to about ±0.003 at 1000 queries x k = 10; aiming above
    // 0.99 keeps the true recall at or above 0.99.
    0.995
}
fn default_calibration_queries() -> usize {
    1000
}
fn default_samples_per_partition() -> usize {
    32
}
fn default_kmeans_iterations() -> usize {
    10
}

impl Default for IvfConfig {
    fn default() -> Self {
        Self {
            partitions: 0,
            cells: 0,
            nprobe: 0,
            target_recall: default_target_recall(),
            calibration_queries: default_calibration_queries(),
            samples_per_partition: default_samples_per_partition(),
            kmeans_iterations: default_kmeans_iterations(),
            seed: 0,
        }
    }
}

/// What the calibration measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    /// Sample queries.
    pub queries: usize,
    /// recall@k on the sample at the plan's `nprobe`.
    pub recall: f64,
    /// recall@k on the sample at a few `nprobe` values.
    pub recall_by_nprobe: Vec<(usize, f64)>,
    /// Cells a query looks in, for a two-level plan.
    #[serde(default)]
    pub cell_probe: Option<usize>,
}

/// Centroids and probes.
#[derive(Debug)]
pub struct KnnPlan {
    /// The partitions (and their cells), on the CPU.
    pub quantizer: Quantizer,
    /// Partitions each query probes.
    pub nprobe: usize,
    /// The calibration, when one ran.
    pub calibration: Option<Calibration>,
}

/// Partition of every row of a pinned table, in scan order (4 bytes a row); computed in the
/// first full pass and reused by later passes of the same process.
#[derive(Debug, Default)]
pub struct RowPartitions(pub Vec<u32>);

impl RowPartitions {
    /// Partitions of the `n` rows starting at scan position `at` (computing them from `emb`
    /// if not known yet).
    pub fn get_or_assign(&mut self, at: usize, emb: &Tensor, quantizer: &Quantizer) -> Tensor {
        let n = emb.size()[0] as usize;
        if self.0.len() >= at + n {
            let known: Vec<i64> = self.0[at..at + n].iter().map(|&p| i64::from(p)).collect();
            return Tensor::from_slice(&known).to_device(emb.device());
        }
        let parts = quantizer.assign(emb);
        if self.0.len() == at {
            let v: Vec<i64> = Vec::try_from(&parts.to_device(Device::Cpu))
                .expect("a 1-D int64 tensor converts to Vec<i64>");
            self.0.extend(v.into_iter().map(|p| p as u32));
        }
        parts
    }
}

/// Most rows the centroids are trained on (2M rows of d = 512 is 4 GiB).
pub const MAX_TRAINING_ROWS: usize = 1 << 21;

/// Rows per partition the default plan aims at for large tables.
pub const DEFAULT_PARTITION_ROWS: usize = 256;

/// The default number of partitions for `rows` rows.
pub fn default_partitions(rows: usize) -> usize {
    if rows < IVF_MIN_ROWS {
        1
    } else {
        // faiss's guideline for IVF is 4 to 16 sqrt(n) lists, but a self-join over data whose
        // clusters get finer as it grows needs partitions that keep their size: with 4 sqrt(n)
        // partitions the 4M-row benchmark set needed nprobe 101, and 1M rows in 20,000
        // clusters nprobe 59, against 2 at 2.5 clusters a partition (BENCHMARKS.md).
        let sqrt = (4.0 * (rows as f64).sqrt()).round() as usize;
        sqrt.max(rows / DEFAULT_PARTITION_ROWS).clamp(1, rows)
    }
}

/// Computes the plan for `table` (see the module docs).
pub async fn compute_plan(
    table: &VectorTable,
    cfg: &IvfConfig,
    k: usize,
    exclusion: Exclusion,
    device: Device,
    db_block_rows: usize,
) -> Result<KnnPlan> {
    let n = table.rows;
    let p = match cfg.partitions {
        0 => default_partitions(n),
        p => p.min(n),
    };
    let mut quantizer = train_quantizer(table, cfg, p, device).await?;
    let p = quantizer.partitions();

    let calibration_n = cfg.calibration_queries.min(n);
    if p == 1 || calibration_n == 0 {
        if p > 1 && cfg.nprobe == 0 {
            return Err(IndexerError::Config {
                key: "knn.ivf.nprobe".into(),
                reason: "with `calibration_queries = 0` nothing can choose nprobe; set it".into(),
            });
        }
        if let Some(cells) = &mut quantizer.cells {
            // Uncalibrated: look in as many cells as a flat probe of `nprobe` would need at
            // most, which for small nprobe is a few.
            cells.probe = (2 * cfg.nprobe).clamp(1, cells.len());
        }
        return Ok(KnnPlan {
            quantizer: quantizer.to_device(Device::Cpu),
            nprobe: if p == 1 { 1 } else { cfg.nprobe.min(p) },
            calibration: None,
        });
    }

    let started = std::time::Instant::now();
    let exact = ExactSample::find(
        table,
        cfg,
        calibration_n,
        k,
        exclusion,
        device,
        db_block_rows,
    )
    .await?;
    let aux = neighbour_partitions(table, &quantizer, &exact.addrs, &exact.found).await?;
    let (cells, needed, nprobe) = choose_probes(&quantizer, cfg, &exact, &aux, table.rows);
    if let Some(c) = &mut quantizer.cells {
        c.probe = cells;
    }
    let mut table_points: Vec<usize> = [1usize, 2, 4, 8, 16, 32, 64, 128, 256]
        .into_iter()
        .filter(|&x| x < p)
        .collect();
    table_points.push(nprobe);
    table_points.sort_unstable();
    table_points.dedup();
    let calibration = Calibration {
        queries: calibration_n,
        recall: needed.recall_at(nprobe),
        recall_by_nprobe: table_points
            .into_iter()
            .map(|np| (np, needed.recall_at(np)))
            .collect(),
        cell_probe: quantizer.cells.as_ref().map(|c| c.probe),
    };
    tracing::info!(
        nprobe,
        partitions = p,
        cell_probe = calibration.cell_probe,
        sample_recall = calibration.recall,
        elapsed_s = started.elapsed().as_secs_f64(),
        "nprobe calibrated"
    );
    Ok(KnnPlan {
        quantizer: quantizer.to_device(Device::Cpu),
        nprobe,
        calibration: Some(calibration),
    })
}

/// Trains `p` partitions (and `cfg.cells` cells) on a seeded sample of `table`; one
/// partition is the normalised mean.
async fn train_quantizer(
    table: &VectorTable,
    cfg: &IvfConfig,
    p: usize,
    device: Device,
) -> Result<Quantizer> {
    let n = table.rows;
    let started = std::time::Instant::now();
    // Training sample, read in bounded chunks.
    let train_n = if p == 1 {
        n.min(4096)
    } else {
        n.min(p * cfg.samples_per_partition.max(1))
            .min(MAX_TRAINING_ROWS.max(p))
    };
    let train = take_tensor(
        table,
        &sample_offsets(n as u64, train_n as u64, cfg.seed),
        device,
    )
    .await?;
    let quantizer = if p == 1 {
        let mean = train.mean_dim([0i64].as_slice(), true, Kind::Float);
        let norm = mean.norm().clamp_min(f64::from(f32::MIN_POSITIVE));
        Quantizer::flat(mean / norm)
    } else {
        let (iters, seed, cells) = (cfg.kmeans_iterations, cfg.seed, cfg.cells);
        tokio::task::spawn_blocking(move || Quantizer::train(&train, p, cells, iters, seed))
            .await
            .map_err(|e| IndexerError::Internal(format!("k-means thread died: {e}")))?
    };
    tracing::info!(
        partitions = quantizer.partitions(),
        cells = quantizer.cells.as_ref().map_or(0, Cells::len),
        train_rows = train_n,
        elapsed_s = started.elapsed().as_secs_f64(),
        "IVF centroids trained"
    );
    Ok(quantizer)
}

/// The calibration sample's exact neighbours, by brute force over the whole table.
struct ExactSample {
    /// The sample's embeddings [m, d].
    q: Tensor,
    /// Row addresses of the neighbours [m, k].
    addrs: Tensor,
    /// Where a neighbour was found [m, k].
    found: Tensor,
}

impl ExactSample {
    async fn find(
        table: &VectorTable,
        cfg: &IvfConfig,
        queries: usize,
        k: usize,
        exclusion: Exclusion,
        device: Device,
        db_block_rows: usize,
    ) -> Result<ExactSample> {
        let offsets = sample_offsets(table.rows as u64, queries as u64, cfg.seed.wrapping_add(1));
        let sample = table.take(&offsets).await?;
        let (q, q_ids) = sample.tensors(table.dim, device);
        let state = CalibrationPass {
            top: TopK::new(q.size()[0], k as i64, device, true),
            q,
            q_ids,
            dim: table.dim,
            exclusion,
        };
        let state = table
            .scan_blocks(None, db_block_rows, state, |s, block| {
                let (rows, ids) = block.tensors(s.dim, s.q.device());
                let addrs = block.addr_tensor(s.q.device());
                exact_scan(
                    &mut s.top,
                    &s.q,
                    &s.q_ids,
                    &rows,
                    &ids,
                    Some(&addrs),
                    s.exclusion,
                );
                Ok(())
            })
            .await?;
        Ok(ExactSample {
            found: state.top.sims.isfinite(),
            addrs: state.top.aux.expect("the calibration tracks row addresses"),
            q: state.q,
        })
    }
}

/// For each exact neighbour of the calibration sample, the probe rank its partition needs
/// (sorted): recall at any `nprobe` is the share below it.
struct NeededRanks(Vec<i64>);

impl NeededRanks {
    fn recall_at(&self, nprobe: usize) -> f64 {
        match self.0.is_empty() {
            true => 1.0,
            false => {
                self.0.partition_point(|&r| (r as usize) < nprobe) as f64 / self.0.len() as f64
            }
        }
    }

    /// The smallest `nprobe` whose recall reaches `target`.
    fn nprobe_for(&self, target: f64) -> usize {
        match self.0.is_empty() {
            true => 1,
            false => {
                let at = ((target.clamp(0.0, 1.0) * self.0.len() as f64).ceil() as usize)
                    .clamp(1, self.0.len());
                self.0[at - 1] as usize + 1
            }
        }
    }
}

/// The cheapest (cells looked in, needed ranks, nprobe) whose recall on the sample reaches
/// the target (or, with `nprobe` configured, the cheapest cell count that keeps its recall).
/// A flat quantizer has one choice: every partition scored. The cost of a query counts
/// centroids scored and rows scanned.
fn choose_probes(
    quantizer: &Quantizer,
    cfg: &IvfConfig,
    exact: &ExactSample,
    neighbour_parts: &Tensor,
    rows: usize,
) -> (usize, NeededRanks, usize) {
    let p = quantizer.partitions();
    let per_row = rows as f64 / p as f64;
    let last = quantizer.cells.as_ref().map_or(0, Cells::len);
    let cell_counts: Vec<usize> = match last {
        0 => vec![0],
        last => (0..)
            .map(|e| 1usize << e)
            .take_while(|&x| x < last)
            .chain([last])
            .collect(),
    };
    let mut best: Option<(usize, NeededRanks, usize, f64)> = None;
    for cells in cell_counts {
        let needed = neighbour_ranks(quantizer, &exact.q, neighbour_parts, cells)
            .masked_select(&exact.found)
            .to_device(Device::Cpu);
        let mut v: Vec<i64> = Vec::try_from(&needed).expect("1-D int64");
        v.sort_unstable();
        let needed = NeededRanks(v);
        let nprobe = match cfg.nprobe {
            0 => needed.nprobe_for(cfg.target_recall),
            np => np.min(p),
        };
        if nprobe > p || (cells < last && needed.recall_at(nprobe) < cfg.target_recall) {
            continue; // the target is out of reach looking in this few cells
        }
        let cost = match last {
            0 => p as f64 + nprobe as f64 * per_row,
            last => last as f64 + cells as f64 * p as f64 / last as f64 + nprobe as f64 * per_row,
        };
        if best.as_ref().is_none_or(|b| cost < b.3) {
            best = Some((cells, needed, nprobe, cost));
        }
    }
    let (cells, needed, nprobe, _) = best.expect("looking in every cell reaches any nprobe ≤ p");
    (cells, needed, nprobe)
}

/// For queries `q` [m, d] and the partition of each of their neighbours `parts` [m, k] (−1:
/// no neighbour), the rank among the query's probes of each neighbour's partition when the
/// query looks in its `cells` most similar cells (all partitions for a flat quantizer): the
/// smallest `nprobe` that finds the neighbour is the rank + 1. A partition outside those
/// cells gets `i64::MAX / 2`.
fn neighbour_ranks(quantizer: &Quantizer, q: &Tensor, parts: &Tensor, cells: usize) -> Tensor {
    const CHUNK: i64 = 32;
    let device = q.device();
    let centroids = quantizer.centroids.to_device(device);
    let cell_of = quantizer
        .cells
        .as_ref()
        .map(|c| (c.centroids.to_device(device), c.of_partition(device)));
    let m = q.size()[0];
    let mut out = Vec::new();
    for start in (0..m).step_by(CHUNK as usize) {
        let len = CHUNK.min(m - start);
        let q = q.narrow(0, start, len);
        let parts = parts.narrow(0, start, len).clamp_min(0);
        let scores = q.matmul(&centroids.tr());
        let mine = scores.gather(1, &parts, false);
        let better = scores.unsqueeze(1).gt_tensor(&mine.unsqueeze(2));
        let ranks = match &cell_of {
            None => better.sum_dim_intlist([2i64].as_slice(), false, Kind::Int64),
            Some((cell_centroids, of_partition)) => {
                let open = centroid_ranks(&q, cell_centroids)
                    .index_select(1, of_partition)
                    .lt(cells as i64);
                let ranks = better.logical_and(&open.unsqueeze(1)).sum_dim_intlist(
                    [2i64].as_slice(),
                    false,
                    Kind::Int64,
                );
                let reachable = open.gather(1, &parts, false);
                ranks.masked_fill(&reachable.logical_not(), i64::MAX / 2)
            }
        };
        out.push(ranks);
    }
    Tensor::cat(&out, 0)
}

struct CalibrationPass {
    top: TopK,
    q: Tensor,
    q_ids: Tensor,
    dim: usize,
    exclusion: Exclusion,
}

/// The partition of each neighbour at row address `addrs` [m, k] (where `found`), −1 where
/// none: the rows are read by address and assigned.
async fn neighbour_partitions(
    table: &VectorTable,
    quantizer: &Quantizer,
    addrs: &Tensor,
    found: &Tensor,
) -> Result<Tensor> {
    let device = addrs.device();
    let flat: Vec<i64> =
        Vec::try_from(&addrs.masked_select(found).to_device(Device::Cpu)).expect("1-D int64");
    let mut unique: Vec<u64> = flat.iter().map(|&a| a as u64).collect();
    unique.sort_unstable();
    unique.dedup();
    let mut parts = Vec::with_capacity(unique.len());
    for chunk in unique.chunks(65_536) {
        let block = table.take_addresses(chunk).await?;
        let (emb, _) = block.tensors(table.dim, device);
        let p: Vec<i64> =
            Vec::try_from(&quantizer.assign(&emb).to_device(Device::Cpu)).expect("1-D int64");
        parts.extend(p);
    }
    let all: Vec<i64> =
        Vec::try_from(&addrs.reshape([-1]).to_device(Device::Cpu)).expect("1-D int64");
    let mapped: Vec<i64> = all
        .iter()
        .map(|&a| match unique.binary_search(&(a as u64)) {
            Ok(i) => parts[i],
            Err(_) => -1,
        })
        .collect();
    Ok(Tensor::from_slice(&mapped)
        .view([addrs.size()[0], addrs.size()[1]])
        .to_device(device)
        .masked_fill(&found.logical_not(), -1))
}

/// Reads the rows at `offsets` as one normalised tensor [n, d] on `device`.
async fn take_tensor(table: &VectorTable, offsets: &[u64], device: Device) -> Result<Tensor> {
    let mut parts = Vec::new();
    for chunk in offsets.chunks(65_536) {
        let block = table.take(chunk).await?;
        parts.push(block.tensors(table.dim, device).0);
    }
    Ok(Tensor::cat(&parts, 0))
}

const PLAN_NPROBE: &str = "knn.nprobe";
const PLAN_CALIBRATION: &str = "knn.calibration";
const PLAN_CELLS: &str = "knn.cells";

/// How a two-level plan's queries and rows look in its cells (schema metadata `knn.cells`).
#[derive(Serialize, Deserialize)]
struct CellProbes {
    probe: usize,
    assign_probe: usize,
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::try_from(&t.contiguous().view([-1])).expect("f32 centroids convert to Vec<f32>")
}

impl KnnPlan {
    /// Number of partitions.
    pub fn partitions(&self) -> usize {
        self.quantizer.partitions()
    }

    /// Content hash (hex, 16 digits) of the centroids, cells and nprobe.
    pub fn sha(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for v in f32s(&self.quantizer.centroids) {
            h.update(v.to_le_bytes());
        }
        h.update((self.nprobe as u64).to_le_bytes());
        if let Some(c) = &self.quantizer.cells {
            for v in f32s(&c.centroids) {
                h.update(v.to_le_bytes());
            }
            for &s in &c.starts {
                h.update(s.to_le_bytes());
            }
            h.update((c.probe as u64).to_le_bytes());
            h.update((c.assign_probe as u64).to_le_bytes());
        }
        h.finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Writes the plan as a Lance table at `uri`, with a two-level plan's cell centroids in
    /// the table [`cells_uri`] beside it, written first (an existing one there is the same
    /// plan, since the name carries the content hash).
    pub async fn save(&self, uri: &str, storage: &HashMap<String, String>) -> Result<()> {
        let mut meta = HashMap::from([(PLAN_NPROBE.to_string(), self.nprobe.to_string())]);
        if let Some(c) = &self.calibration {
            meta.insert(
                PLAN_CALIBRATION.into(),
                serde_json::to_string(c).expect("calibration serialises"),
            );
        }
        let mut cell_of = None;
        if let Some(c) = &self.quantizer.cells {
            write_centroids(&cells_uri(uri), &c.centroids, None, HashMap::new(), storage).await?;
            let probes = CellProbes {
                probe: c.probe,
                assign_probe: c.assign_probe,
            };
            meta.insert(
                PLAN_CELLS.into(),
                serde_json::to_string(&probes).expect("cell probes serialise"),
            );
            let of: Vec<i64> = Vec::try_from(&c.of_partition(Device::Cpu)).expect("1-D int64");
            cell_of = Some(UInt32Array::from_iter_values(
                of.into_iter().map(|j| j as u32),
            ));
        }
        write_centroids(uri, &self.quantizer.centroids, cell_of, meta, storage).await
    }

    /// Reads a plan written by [`KnnPlan::save`].
    pub async fn load(uri: &str, storage: &HashMap<String, String>) -> Result<Self> {
        let bad = |reason: String| IndexerError::BadRow {
            table: uri.to_string(),
            id: 0,
            reason,
        };
        let (centroids, cell_of, meta) = read_centroids(uri, storage).await?;
        let nprobe: usize = meta
            .get(PLAN_NPROBE)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("plan metadata `{PLAN_NPROBE}` is missing")))?;
        let calibration = meta
            .get(PLAN_CALIBRATION)
            .map(|c| serde_json::from_str(c))
            .transpose()
            .map_err(|e| bad(format!("plan metadata `{PLAN_CALIBRATION}`: {e}")))?;
        let cells = match meta.get(PLAN_CELLS) {
            None => None,
            Some(json) => {
                let probes: CellProbes = serde_json::from_str(json)
                    .map_err(|e| bad(format!("plan metadata `{PLAN_CELLS}`: {e}")))?;
                let (cell_centroids, _, _) = read_centroids(&cells_uri(uri), storage).await?;
                let cell_of = cell_of
                    .ok_or_else(|| bad("a two-level plan without its `cell` column".into()))?;
                let c = cell_centroids.size()[0] as usize;
                if let Some(i) = cell_of.windows(2).position(|w| w[1] < w[0]) {
                    return Err(bad(format!(
                        "partition {} is out of its cell's order",
                        i + 1
                    )));
                }
                if let Some(&j) = cell_of.iter().find(|&&j| j as usize >= c) {
                    return Err(bad(format!("cell {j} of {c} is not in the cells table")));
                }
                let of: Vec<i64> = cell_of.iter().map(|&j| i64::from(j)).collect();
                let starts = offsets(&Tensor::from_slice(&of), c as i64);
                Some(Cells {
                    centroids: cell_centroids,
                    starts,
                    probe: probes.probe,
                    assign_probe: probes.assign_probe,
                })
            }
        };
        Ok(Self {
            quantizer: Quantizer { centroids, cells },
            nprobe,
            calibration,
        })
    }
}

/// Where a two-level plan at `plan_uri` keeps its cell centroids.
pub fn cells_uri(plan_uri: &str) -> String {
    crate::table::sibling_uri(plan_uri, "cells")
}

/// Writes `centroids` [p, d] as a Lance table (`partition`, `centroid`, and `cell` when
/// given) with schema metadata `meta`; a table already there is the same content.
async fn write_centroids(
    uri: &str,
    centroids: &Tensor,
    cell_of: Option<UInt32Array>,
    meta: HashMap<String, String>,
    storage: &HashMap<String, String>,
) -> Result<()> {
    let (p, d) = (centroids.size()[0], centroids.size()[1]);
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let mut fields = vec![
        Field::new("partition", DataType::UInt32, false),
        Field::new(
            "centroid",
            DataType::FixedSizeList(item.clone(), d as i32),
            false,
        ),
    ];
    let mut columns: Vec<arrow_array::ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(0..p as u32)),
        Arc::new(FixedSizeListArray::new(
            item,
            d as i32,
            Arc::new(Float32Array::from(f32s(centroids))),
            None,
        )),
    ];
    if let Some(c) = cell_of {
        fields.push(Field::new("cell", DataType::UInt32, false));
        columns.push(Arc::new(c));
    }
    let schema = Arc::new(Schema::new(fields).with_metadata(meta));
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| IndexerError::Internal(format!("plan batch: {e}")))?;
    let params = WriteParams {
        mode: WriteMode::Create,
        store_params: Some(crate::table::store_params(storage)),
        ..Default::default()
    };
    let reader = RecordBatchIterator::new(vec![Ok(batch)], schema);
    match Dataset::write(reader, uri, Some(params)).await {
        Ok(_) => Ok(()),
        Err(lance::Error::DatasetAlreadyExists { .. }) => Ok(()),
        Err(e) => Err(IndexerError::lance(uri, e)),
    }
}

/// Reads a table written by [`write_centroids`]: the centroids [p, d] in partition order,
/// each partition's cell when the table has them, and the schema metadata.
async fn read_centroids(
    uri: &str,
    storage: &HashMap<String, String>,
) -> Result<(Tensor, Option<Vec<u32>>, HashMap<String, String>)> {
    let ds = crate::table::load_dataset(uri, storage, None)
        .await
        .map_err(|e| IndexerError::lance(uri, e))?;
    let meta = ds.schema().metadata.clone();
    let batches: Vec<RecordBatch> = ds
        .scan()
        .try_into_stream()
        .await
        .map_err(|e| IndexerError::lance(uri, e))?
        .try_collect()
        .await
        .map_err(|e| IndexerError::lance(uri, e))?;
    let mut rows: Vec<(u32, Vec<f32>, Option<u32>)> = Vec::new();
    for b in &batches {
        let part = b.column(0).as_primitive::<UInt32Type>();
        let cent = b.column(1).as_fixed_size_list();
        let cell = b
            .column_by_name("cell")
            .map(|c| c.as_primitive::<UInt32Type>().clone());
        for i in 0..b.num_rows() {
            let v = cent.value(i);
            rows.push((
                part.value(i),
                v.as_primitive::<Float32Type>().values().to_vec(),
                cell.as_ref().map(|c| c.value(i)),
            ));
        }
    }
    rows.sort_by_key(|r| r.0);
    let d = rows.first().map(|r| r.1.len()).unwrap_or(0) as i64;
    let cells: Option<Vec<u32>> = rows.iter().map(|r| r.2).collect();
    let flat: Vec<f32> = rows.into_iter().flat_map(|r| r.1).collect();
    let p = if d == 0 { 0 } else { flat.len() as i64 / d };
    if p == 0 {
        return Err(IndexerError::BadRow {
            table: uri.to_string(),
            id: 0,
            reason: "the plan has no centroids".into(),
        });
    }
    Ok((Tensor::from_slice(&flat).view([p, d]), cells, meta))
}
