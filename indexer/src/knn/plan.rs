//! The search plan of one `precompute-knn` output: IVF centroids and how many of them each
//! query probes, fixed once and stored so that every worker, and every rerun, searches the
//! same way.
//!
//! - Centroids: spherical k-means (cosine; Lloyd iterations with re-normalised means) on a
//!   seeded random sample of the pinned table, `samples_per_partition` rows per centroid.
//! - `nprobe`: calibrated. For a seeded sample of query rows the exact top-k is found by brute
//!   force over the whole table, with the same exclusions as the real run. IVF-Flat scores are
//!   exact, so an exact neighbour is found iff its partition is among the query's `nprobe`
//!   most similar centroids: recall@k at any `nprobe` follows from the rank of each exact
//!   neighbour's partition, and the plan takes the smallest `nprobe` whose recall on the
//!   sample reaches `target_recall`.
//! - Small tables (fewer than [`IVF_MIN_ROWS`] rows by default) get one partition: the search
//!   is then exact brute force.
//!
//! A plan is stored content-addressed as a small Lance table (`partition`, `centroid`) next to
//! the output, named by the hash of its contents, so two workers that compute it concurrently
//! either write the same table or two different ones of which the output's metadata names one.

use super::search::{assign, centroid_ranks, exact_scan, Exclusion, TopK};
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
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Below this many rows the default plan is one partition (exact search).
pub const IVF_MIN_ROWS: usize = 16_384;

/// How the plan is made (`[knn.ivf]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IvfConfig {
    /// IVF partitions; 0: round(4 sqrt(rows)), or 1 (exact) below 16 384 rows.
    #[serde(default)]
    pub partitions: usize,
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
}

/// Centroids and probes.
#[derive(Debug)]
pub struct KnnPlan {
    /// Unit-norm centroids [partitions, d], on the CPU.
    pub centroids: Tensor,
    /// Partitions each query probes.
    pub nprobe: usize,
    /// The calibration, when one ran.
    pub calibration: Option<Calibration>,
}

/// Partition of every row of a pinned table, in scan order (2 bytes a row); computed in the
/// first full pass and reused by later passes of the same process.
#[derive(Debug, Default)]
pub struct RowPartitions(pub Vec<u16>);

/// Most partitions a plan may have (row partitions are kept as u16).
pub const MAX_PARTITIONS: usize = 65_536;

impl RowPartitions {
    /// Partitions of the `n` rows starting at scan position `at` (computing them from `emb`
    /// if not known yet).
    pub fn get_or_assign(&mut self, at: usize, emb: &Tensor, centroids: &Tensor) -> Tensor {
        let n = emb.size()[0] as usize;
        if self.0.len() >= at + n {
            let known: Vec<i64> = self.0[at..at + n].iter().map(|&p| i64::from(p)).collect();
            return Tensor::from_slice(&known).to_device(emb.device());
        }
        let parts = assign(emb, centroids);
        if self.0.len() == at {
            let v: Vec<i64> = Vec::try_from(&parts.to_device(Device::Cpu))
                .expect("a 1-D int64 tensor converts to Vec<i64>");
            self.0.extend(v.into_iter().map(|p| p as u16));
        }
        parts
    }
}

/// A deterministic stream of pseudo-random numbers (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `count` distinct offsets in `0..n`, sorted, chosen by `seed` (Floyd's algorithm).
pub fn sample_offsets(n: u64, count: u64, seed: u64) -> Vec<u64> {
    let count = count.min(n);
    let mut rng = SplitMix(seed ^ 0x6b6e_6e2d_6469_6666);
    let mut chosen = HashSet::with_capacity(count as usize);
    for j in (n - count)..n {
        let t = rng.next() % (j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut v: Vec<u64> = chosen.into_iter().collect();
    v.sort_unstable();
    v
}

/// Spherical k-means of the unit rows of `x` into `p` unit centroids.
pub fn spherical_kmeans(x: &Tensor, p: i64, iterations: usize, seed: u64) -> Tensor {
    let (n, d) = (x.size()[0], x.size()[1]);
    let init: Vec<i64> = sample_offsets(n as u64, p as u64, seed)
        .into_iter()
        .map(|o| o as i64)
        .collect();
    let mut c = x.index_select(0, &Tensor::from_slice(&init).to_device(x.device()));
    for _ in 0..iterations {
        let a = assign(x, &c);
        let mut sums = Tensor::zeros([p, d], (Kind::Float, x.device())).index_add(0, &a, x);
        let counts = a.bincount::<Tensor>(None, p);
        let empty = counts.eq(0).nonzero().view([-1]);
        let n_empty = empty.size()[0];
        if n_empty > 0 {
            // Re-seed empty partitions with the rows least similar to their centroid.
            let fit =
                (x * c.index_select(0, &a)).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
            let worst = fit.topk(n_empty.min(n), 0, false, true).1;
            let _ = sums.index_copy_(
                0,
                &empty.narrow(0, 0, worst.size()[0]),
                &x.index_select(0, &worst),
            );
        }
        let norm = sums
            .norm_scalaropt_dim(2.0, [1], true)
            .clamp_min(f64::from(f32::MIN_POSITIVE));
        c = sums / norm;
    }
    c
}

/// The default number of partitions for `rows` rows.
pub fn default_partitions(rows: usize) -> usize {
    if rows < IVF_MIN_ROWS {
        1
    } else {
        // faiss's guideline for IVF (4 to 16 sqrt(n) lists). Finer partitions follow the
        // data's clusters more closely: on the 1M-row benchmark set, sqrt(n) partitions
        // needed nprobe 12 for recall 0.995 and 4 sqrt(n) needed 1 (BENCHMARKS.md).
        ((4.0 * (rows as f64).sqrt()).round() as usize).clamp(1, MAX_PARTITIONS.min(rows))
    }
}

/// Computes the plan for `table` (see the module docs); fills `partitions` with every row's
/// partition as a side effect of the calibration pass.
pub async fn compute_plan(
    table: &VectorTable,
    cfg: &IvfConfig,
    k: usize,
    exclusion: Exclusion,
    device: Device,
    db_block_rows: usize,
    partitions_of_rows: &mut RowPartitions,
) -> Result<KnnPlan> {
    let n = table.rows;
    let p = match cfg.partitions {
        0 => default_partitions(n),
        p => p.min(n),
    }
    .min(MAX_PARTITIONS);
    let started = std::time::Instant::now();
    // Training sample, read in bounded chunks.
    let train_n = if p == 1 {
        n.min(4096)
    } else {
        n.min(p * cfg.samples_per_partition.max(1))
    };
    let train = take_tensor(
        table,
        &sample_offsets(n as u64, train_n as u64, cfg.seed),
        device,
    )
    .await?;
    let centroids = if p == 1 {
        let mean = train.mean_dim([0i64].as_slice(), true, Kind::Float);
        let norm = mean.norm().clamp_min(f64::from(f32::MIN_POSITIVE));
        mean / norm
    } else {
        let (train, iters, seed) = (train, cfg.kmeans_iterations, cfg.seed);
        tokio::task::spawn_blocking(move || spherical_kmeans(&train, p as i64, iters, seed))
            .await
            .map_err(|e| IndexerError::Internal(format!("k-means thread died: {e}")))?
    };
    tracing::info!(
        partitions = p,
        train_rows = train_n,
        elapsed_s = started.elapsed().as_secs_f64(),
        "IVF centroids trained"
    );

    let calibration_n = cfg.calibration_queries.min(n);
    if p == 1 || calibration_n == 0 {
        if p > 1 && cfg.nprobe == 0 {
            return Err(IndexerError::Config {
                key: "knn.ivf.nprobe".into(),
                reason: "with `calibration_queries = 0` nothing can choose nprobe; set it".into(),
            });
        }
        return Ok(KnnPlan {
            centroids: centroids.to_device(Device::Cpu),
            nprobe: if p == 1 { 1 } else { cfg.nprobe.min(p) },
            calibration: None,
        });
    }

    // Exact neighbours of the calibration sample, with their partitions.
    let started = std::time::Instant::now();
    let offsets = sample_offsets(n as u64, calibration_n as u64, cfg.seed.wrapping_add(1));
    let sample = table.take(&offsets).await?;
    let (q, q_ids) = sample.tensors(table.dim, device);
    let state = CalibrationPass {
        top: TopK::new(q.size()[0], k as i64, device, true),
        q,
        q_ids,
        centroids: centroids.shallow_clone(),
        partitions: std::mem::take(partitions_of_rows),
        at: 0,
        dim: table.dim,
        exclusion,
    };
    let state = table
        .scan_blocks(None, db_block_rows, state, |s, block| {
            let (rows, ids) = block.tensors(s.dim, s.q.device());
            let parts = s.partitions.get_or_assign(s.at, &rows, &s.centroids);
            s.at += block.len();
            exact_scan(
                &mut s.top,
                &s.q,
                &s.q_ids,
                &rows,
                &ids,
                Some(&parts),
                s.exclusion,
            );
            Ok(())
        })
        .await?;
    *partitions_of_rows = state.partitions;
    let ranks = centroid_ranks(&state.q, &centroids);
    let found = state.top.sims.isfinite();
    let aux = state.top.aux.expect("the calibration tracks partitions");
    let needed = ranks
        .gather(1, &aux.clamp_min(0), false)
        .masked_select(&found)
        .to_device(Device::Cpu);
    let mut needed: Vec<i64> = Vec::try_from(&needed).expect("1-D int64");
    needed.sort_unstable();
    let recall_at = |nprobe: usize| -> f64 {
        if needed.is_empty() {
            return 1.0;
        }
        needed.partition_point(|&r| (r as usize) < nprobe) as f64 / needed.len() as f64
    };
    let nprobe = match cfg.nprobe {
        0 if needed.is_empty() => 1,
        0 => {
            let at = ((cfg.target_recall.clamp(0.0, 1.0) * needed.len() as f64).ceil() as usize)
                .clamp(1, needed.len());
            (needed[at - 1] as usize + 1).min(p)
        }
        np => np.min(p),
    };
    let mut table_points: Vec<usize> = [1usize, 2, 4, 8, 16, 32, 64, 128, 256]
        .into_iter()
        .filter(|&x| x < p)
        .collect();
    table_points.push(nprobe);
    table_points.sort_unstable();
    table_points.dedup();
    let calibration = Calibration {
        queries: calibration_n,
        recall: recall_at(nprobe),
        recall_by_nprobe: table_points
            .into_iter()
            .map(|np| (np, recall_at(np)))
            .collect(),
    };
    tracing::info!(
        nprobe,
        partitions = p,
        sample_recall = calibration.recall,
        elapsed_s = started.elapsed().as_secs_f64(),
        "nprobe calibrated"
    );
    Ok(KnnPlan {
        centroids: centroids.to_device(Device::Cpu),
        nprobe,
        calibration: Some(calibration),
    })
}

struct CalibrationPass {
    top: TopK,
    q: Tensor,
    q_ids: Tensor,
    centroids: Tensor,
    partitions: RowPartitions,
    at: usize,
    dim: usize,
    exclusion: Exclusion,
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

impl KnnPlan {
    /// Number of partitions.
    pub fn partitions(&self) -> usize {
        self.centroids.size()[0] as usize
    }

    /// Content hash (hex, 16 digits) of the centroids and nprobe.
    pub fn sha(&self) -> String {
        use sha2::Digest;
        let flat: Vec<f32> = Vec::try_from(&self.centroids.contiguous().view([-1]))
            .expect("f32 centroids convert to Vec<f32>");
        let mut h = sha2::Sha256::new();
        for v in flat {
            h.update(v.to_le_bytes());
        }
        h.update((self.nprobe as u64).to_le_bytes());
        h.finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Writes the plan as a Lance table at `uri` (an existing one there is the same plan,
    /// since the name carries the content hash).
    pub async fn save(&self, uri: &str, storage: &HashMap<String, String>) -> Result<()> {
        let (p, d) = (self.centroids.size()[0], self.centroids.size()[1]);
        let flat: Vec<f32> = Vec::try_from(&self.centroids.contiguous().view([-1]))
            .expect("f32 centroids convert to Vec<f32>");
        let item = Arc::new(Field::new("item", DataType::Float32, true));
        let mut meta = HashMap::from([(PLAN_NPROBE.to_string(), self.nprobe.to_string())]);
        if let Some(c) = &self.calibration {
            meta.insert(
                PLAN_CALIBRATION.into(),
                serde_json::to_string(c).expect("calibration serialises"),
            );
        }
        let schema = Arc::new(
            Schema::new(vec![
                Field::new("partition", DataType::UInt32, false),
                Field::new(
                    "centroid",
                    DataType::FixedSizeList(item.clone(), d as i32),
                    false,
                ),
            ])
            .with_metadata(meta),
        );
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(UInt32Array::from_iter_values(0..p as u32)),
                Arc::new(FixedSizeListArray::new(
                    item,
                    d as i32,
                    Arc::new(Float32Array::from(flat)),
                    None,
                )),
            ],
        )
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

    /// Reads a plan written by [`KnnPlan::save`].
    pub async fn load(uri: &str, storage: &HashMap<String, String>) -> Result<Self> {
        let ds = crate::table::load_dataset(uri, storage, None)
            .await
            .map_err(|e| IndexerError::lance(uri, e))?;
        let meta = ds.schema().metadata.clone();
        let bad = |reason: String| IndexerError::BadRow {
            table: uri.to_string(),
            id: 0,
            reason,
        };
        let nprobe: usize = meta
            .get(PLAN_NPROBE)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("plan metadata `{PLAN_NPROBE}` is missing")))?;
        let calibration = meta
            .get(PLAN_CALIBRATION)
            .map(|c| serde_json::from_str(c))
            .transpose()
            .map_err(|e| bad(format!("plan metadata `{PLAN_CALIBRATION}`: {e}")))?;
        let batches: Vec<RecordBatch> = ds
            .scan()
            .try_into_stream()
            .await
            .map_err(|e| IndexerError::lance(uri, e))?
            .try_collect()
            .await
            .map_err(|e| IndexerError::lance(uri, e))?;
        let mut rows: Vec<(u32, Vec<f32>)> = Vec::new();
        for b in &batches {
            let part = b.column(0).as_primitive::<UInt32Type>();
            let cent = b.column(1).as_fixed_size_list();
            for i in 0..b.num_rows() {
                let v = cent.value(i);
                rows.push((
                    part.value(i),
                    v.as_primitive::<Float32Type>().values().to_vec(),
                ));
            }
        }
        rows.sort_by_key(|r| r.0);
        let d = rows.first().map(|r| r.1.len()).unwrap_or(0) as i64;
        let flat: Vec<f32> = rows.into_iter().flat_map(|r| r.1).collect();
        let p = if d == 0 { 0 } else { flat.len() as i64 / d };
        if p == 0 {
            return Err(bad("the plan has no centroids".into()));
        }
        Ok(Self {
            centroids: Tensor::from_slice(&flat).view([p, d]),
            nprobe,
            calibration,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_offsets_are_distinct_sorted_and_seeded() {
        let a = sample_offsets(1000, 100, 7);
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|&x| x < 1000));
        assert_eq!(a, sample_offsets(1000, 100, 7));
        assert_ne!(a, sample_offsets(1000, 100, 8));
        assert_eq!(sample_offsets(5, 10, 0), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn kmeans_finds_separated_clusters() {
        // Four tight clusters around the axes of R^4.
        tch::manual_seed(0);
        let centres = Tensor::eye(4, (Kind::Float, Device::Cpu));
        let x =
            centres.repeat([50, 1]) + Tensor::randn([200, 4], (Kind::Float, Device::Cpu)) * 0.01;
        let x = &x / x.norm_scalaropt_dim(2.0, [1], true);
        let c = spherical_kmeans(&x, 4, 10, 3);
        // Every true centre has a centroid within cosine 0.99.
        let best = centres.matmul(&c.tr()).amax([1i64].as_slice(), false);
        assert!(best.min().double_value(&[]) > 0.99, "{best}");
    }
}
