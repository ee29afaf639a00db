//! Training data: rows of the precompute-knn table joined to the embeddings table it was
//! made from, in a deterministic order, prefetched on a thread of their own.
//!
//! - Tables: the kNN table (`id`, `knn_ids`, and their row addresses `row_addr`,
//!   `knn_row_addrs`) lists the training rows; the embeddings table, opened at the version the
//!   kNN table records (`source_version`), gives each row's image and embedding and its
//!   neighbours' embeddings, read by Lance `take` at those addresses, each checked against
//!   the id it should hold. Nothing is kept per row but the held-out rows' offsets (8 bytes
//!   per held-out row), so memory is the prefetched batches whatever the table's size.
//! - Order: epoch e visits the training rows in a pseudo-random permutation keyed by
//!   (seed, e): a Feistel network over the row range with cycle walking, so it costs no
//!   memory however many rows there are. Micro-batch m of an epoch holds positions
//!   `m·G .. (m+1)·G` (G = batch per rank × ranks); rank r takes its contiguous slice, so the
//!   ranks' parts are disjoint and together equal one process with batch G. The tail of an
//!   epoch shorter than G is skipped (a different tail each epoch).
//! - Randomness: each sample's flip, condition drop, diffusion step and noise come from a
//!   counter-based generator keyed by (seed, epoch, position), so they do not depend on the
//!   rank layout, the thread, or what ran before: a resumed run draws exactly what an
//!   uninterrupted one would.
//! - Held-out rows: the rows precompute-knn marked `holdout` (the project's `[split]`, a
//!   hash of each key) are never trained on, and were never anyone's neighbour; they make
//!   the sample grids, and `eval` scores on them.
//! - Neighbour-count dropout: with probability `knn_dropout` a sample keeps only the first j
//!   of its k neighbours, j uniform in 0..=k (the rest become null tokens), so one model can
//!   be sampled at any k' <= k with conditions it saw in training.
//! - A row whose image cannot be decoded keeps its slot with loss weight 0; it is counted
//!   and reported with its id.

use crate::rng::{EpochPermutation, SampleRng};
use crate::{Result, TrainerError};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use futures::StreamExt;
use knn_datasets::StorageConfig;
use knn_indexer::knn::precompute::{existing_meta, KNN_ROW_ADDRS_COLUMN, ROW_ADDR_COLUMN};
use lance::dataset::{ProjectionRequest, TakeBuilder};
use lance::Dataset;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// Where the training rows come from, `[train.data]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Embeddings table (default: `embed.output.table`).
    #[serde(default)]
    pub embeddings: Option<String>,
    /// precompute-knn output (default: `knn.output`, i.e. `<embeddings>-knn.lance`).
    #[serde(default)]
    pub knn: Option<String>,
    /// Batches prepared ahead of the model.
    #[serde(default = "default_prefetch")]
    pub prefetch_batches: usize,
    /// Random horizontal flips of the image. Off by default: the condition is the embedding
    /// of the unflipped image, and a mirrored arrow, letter or flag is another image. Turn
    /// it on only for data whose meaning survives a mirror.
    #[serde(default)]
    pub flip: bool,
    /// Probability that a sample keeps only a random prefix of its neighbours (0..=k of
    /// them, uniformly), so the model can be sampled at any k' <= k (0: always all k).
    #[serde(default = "default_knn_dropout")]
    pub knn_dropout: f64,
}

fn default_prefetch() -> usize {
    4
}
fn default_knn_dropout() -> f64 {
    0.5
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            embeddings: None,
            knn: None,
            prefetch_batches: default_prefetch(),
            flip: false,
            knn_dropout: default_knn_dropout(),
        }
    }
}

/// How the rows are split over ranks and steps; validated when built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataLayout {
    train_rows: u64,
    per_rank_batch: usize,
    rank: usize,
    world: usize,
}

/// Where the data stands: the next micro-batch to read.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct DataCursor {
    /// Micro-batches consumed since the start of training.
    pub micro_step: u64,
    /// The epoch of the next micro-batch.
    pub epoch: u64,
    /// The first position (in the epoch's order) of the next micro-batch.
    pub position: u64,
}

impl DataLayout {
    /// Checks that one global batch fits in the training rows.
    pub fn new(train_rows: u64, per_rank_batch: usize, rank: usize, world: usize) -> Result<Self> {
        if per_rank_batch == 0 {
            return Err(TrainerError::config(
                "train.batch_size",
                "must be at least 1",
            ));
        }
        if world == 0 || rank >= world {
            return Err(TrainerError::config(
                "train (rank)",
                format!("rank {rank} of {world} is not valid"),
            ));
        }
        let global = (per_rank_batch * world) as u64;
        if train_rows < global {
            return Err(TrainerError::config(
                "train.batch_size",
                format!(
                    "one global batch ({per_rank_batch} x {world} ranks = {global}) is larger than the \
                     {train_rows} training rows; lower train.batch_size or split.holdout_fraction"
                ),
            ));
        }
        Ok(Self {
            train_rows,
            per_rank_batch,
            rank,
            world,
        })
    }

    /// Samples in one micro-batch over all ranks.
    pub fn global_batch(&self) -> u64 {
        (self.per_rank_batch * self.world) as u64
    }

    /// Micro-batches per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.train_rows / self.global_batch()
    }

    /// The cursor of micro-batch `m`.
    pub fn cursor(&self, m: u64) -> DataCursor {
        let spe = self.steps_per_epoch();
        DataCursor {
            micro_step: m,
            epoch: m / spe,
            position: (m % spe) * self.global_batch(),
        }
    }

    /// Training rows per epoch.
    pub fn train_rows(&self) -> u64 {
        self.train_rows
    }

    /// This rank's positions in micro-batch `m`, and its epoch.
    pub fn positions(&self, m: u64) -> (u64, Vec<u64>) {
        let c = self.cursor(m);
        let start = c.position + (self.rank * self.per_rank_batch) as u64;
        (
            c.epoch,
            (start..start + self.per_rank_batch as u64).collect(),
        )
    }
}

/// Which kNN-table rows train: all but the held-out ones, kept as the sorted offsets of the
/// held-out rows only.
#[derive(Debug, Default)]
pub struct RowSplit {
    rows: u64,
    holdout: Vec<u64>,
}

impl RowSplit {
    /// A table of `rows` rows whose held-out rows are at the sorted offsets `holdout`.
    pub fn new(rows: u64, holdout: Vec<u64>) -> Self {
        debug_assert!(holdout.windows(2).all(|w| w[0] < w[1]));
        debug_assert!(holdout.last().is_none_or(|&h| h < rows));
        Self { rows, holdout }
    }

    /// Rows of the table.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Training rows.
    pub fn train_rows(&self) -> u64 {
        self.rows - self.holdout.len() as u64
    }

    /// Held-out rows.
    pub fn holdout_rows(&self) -> usize {
        self.holdout.len()
    }

    /// Table offset of the `p`-th training row (table order, `p < train_rows()`).
    pub fn train_offset(&self, p: u64) -> u64 {
        // Before held-out offset h_i lie h_i − i training rows, a non-decreasing sequence:
        // the training row p comes after exactly the held-out rows with h_i − i <= p.
        let (mut lo, mut hi) = (0usize, self.holdout.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.holdout[mid] - mid as u64 <= p {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        p + lo as u64
    }

    /// Table offsets of the first `n` held-out rows.
    pub fn holdout_offsets(&self, n: usize) -> Vec<u64> {
        self.holdout.iter().take(n).copied().collect()
    }
}

/// Rows fetched for a set of kNN-table offsets.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Row ids.
    pub ids: Vec<u64>,
    /// Each row's image, CHW floats in [−1, 1] (`None`: undecodable, see `problems`).
    pub images: Vec<Option<Vec<f32>>>,
    /// `[rows, k+1, d]`: the row's embedding, then its neighbours'.
    pub cond: Vec<f32>,
    /// `[rows, k+1]`: 1 where the slot holds an embedding.
    pub present: Vec<f32>,
    /// (id, reason) of every row or neighbour that could not be used.
    pub problems: Vec<(u64, String)>,
}

/// The two tables of a training run, opened and checked.
#[derive(Debug)]
pub struct TrainingData {
    /// Embeddings table URI.
    pub embeddings_uri: String,
    /// kNN table URI.
    pub knn_uri: String,
    emb: Arc<Dataset>,
    knn: Dataset,
    /// Which rows of the kNN table train and which are held out.
    pub split_rows: RowSplit,
    /// The held-out split the kNN table was made with (`None`: no row is held out).
    pub split: Option<knn_datasets::SplitConfig>,
    /// The CLIP that embedded the table (its schema metadata), when recorded.
    pub clip: Option<String>,
    /// Embedding dimension.
    pub dim: usize,
    /// Neighbours stored per row.
    pub k_available: usize,
    /// Neighbours used per row.
    pub k: usize,
    /// Side of the stored images.
    pub image_size_px: usize,
}

fn column_types(ds: &Dataset) -> HashMap<String, arrow_schema::DataType> {
    let schema: arrow_schema::Schema = ds.schema().into();
    schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect()
}

impl TrainingData {
    /// Tags the kNN table version this run reads, named after the run (`run`: its output
    /// directory), so that a clean-up of that table (upkeep of a precompute-knn still
    /// committing, `knn-diffusion gc`) keeps it while the run reads it. The embeddings version
    /// is tagged by precompute-knn.
    pub async fn pin_for(&self, run: &str) {
        knn_indexer::table::pin_version(
            &self.knn,
            &self.knn_uri,
            &knn_indexer::table::reader_tag("train", run),
            "this run's data loader would then fail to read its rows",
        )
        .await;
    }

    /// Opens the kNN table and the embeddings version it was made from; `k` is how many
    /// neighbours training uses (`train.k`).
    pub async fn open(
        embeddings_uri: &str,
        knn_uri: &str,
        storage: &StorageConfig,
        k: usize,
    ) -> Result<Self> {
        let opts = storage.to_lance_options();
        let meta =
            existing_meta(knn_uri, &opts)
                .await?
                .ok_or_else(|| TrainerError::MissingTable {
                    table: knn_uri.to_string(),
                    hint: "run `knn-diffusion precompute-knn` first, or set `train.data.knn`"
                        .into(),
                })?;
        if k > meta.k {
            return Err(TrainerError::KTooLarge {
                key: "train.k".into(),
                k,
                available: meta.k,
                table: knn_uri.to_string(),
            });
        }
        let knn = knn_indexer::table::load_dataset(knn_uri, &opts, None)
            .await
            .map_err(|e| TrainerError::lance(knn_uri, e))?;
        let emb = match knn_indexer::table::load_dataset(
            embeddings_uri,
            &opts,
            Some(meta.source_version),
        )
        .await
        {
            Ok(ds) => ds,
            Err(lance::Error::DatasetNotFound { .. }) => {
                return Err(TrainerError::MissingTable {
                    table: embeddings_uri.to_string(),
                    hint: "run `knn-diffusion embed` first, or set `train.data.embeddings`".into(),
                })
            }
            Err(e) => {
                return Err(TrainerError::BadTable {
                    table: embeddings_uri.to_string(),
                    detail: format!(
                    "cannot open version {} that the kNN table `{knn_uri}` was computed from: {e}",
                    meta.source_version
                ),
                })
            }
        };
        let types = column_types(&emb);
        for (col, want) in [
            ("id", "u64"),
            ("image", "binary (PNG)"),
            ("emb", "FixedSizeList<f32>"),
        ] {
            if !types.contains_key(col) {
                return Err(TrainerError::BadTable {
                    table: embeddings_uri.to_string(),
                    detail: format!("no `{col}` column ({want}); is it an embed-stage table?"),
                });
            }
        }
        if meta.source != embeddings_uri
            && meta.source.trim_end_matches('/') != embeddings_uri.trim_end_matches('/')
        {
            tracing::warn!(knn = knn_uri, made_from = %meta.source, embeddings = embeddings_uri,
                "the kNN table was made from another URI; using it with these embeddings");
        }
        let knn_types = column_types(&knn);
        for col in [ROW_ADDR_COLUMN, KNN_ROW_ADDRS_COLUMN] {
            if !knn_types.contains_key(col) {
                return Err(TrainerError::BadTable {
                    table: knn_uri.to_string(),
                    detail: format!(
                        "no `{col}` column: it was made by an older precompute-knn, before \
                         training read rows by address; run precompute-knn again into a new \
                         `knn.output`"
                    ),
                });
            }
        }
        let split_rows = scan_holdout(&knn, knn_uri).await?;
        if meta.split.is_none() {
            tracing::warn!(
                knn = knn_uri,
                "the kNN table marks no held-out rows (made without a split): every row trains, \
                 and no sample grid is written; rerun precompute-knn into a new output to hold \
                 rows out"
            );
        }
        let clip = emb
            .schema()
            .metadata
            .get(knn_indexer::table::CLIP_METADATA)
            .cloned();
        let mut data = Self {
            embeddings_uri: embeddings_uri.to_string(),
            knn_uri: knn_uri.to_string(),
            emb: Arc::new(emb),
            knn,
            split_rows,
            split: meta.split.clone(),
            clip,
            dim: meta.dim,
            k_available: meta.k,
            k,
            image_size_px: 0,
        };
        if data.rows() == 0 {
            return Err(TrainerError::BadTable {
                table: knn_uri.to_string(),
                detail: "has no rows; run precompute-knn to completion".into(),
            });
        }
        data.image_size_px = data.probe_image_size().await?;
        Ok(data)
    }

    /// The side of the first training row's image (all rows of an embed table share it).
    async fn probe_image_size(&self) -> Result<usize> {
        let row = self
            .take_rows(&self.knn, &self.knn_uri, &[0], &["id", ROW_ADDR_COLUMN])
            .await?;
        let id = row.column(0).as_primitive::<UInt64Type>().value(0);
        let addr = row.column(1).as_primitive::<UInt64Type>().value(0);
        let first = self.take_addrs(&[(addr, id)], &["id", "image"]).await?;
        let bytes = first.column(1).as_binary::<i32>().value(0).to_vec();
        let img = image::load_from_memory(&bytes).map_err(|e| TrainerError::BadRecord {
            table: self.embeddings_uri.clone(),
            id,
            reason: format!("image does not decode: {e}"),
        })?;
        if img.width() != img.height() {
            return Err(TrainerError::BadRecord {
                table: self.embeddings_uri.clone(),
                id,
                reason: format!(
                    "image is {}x{}, training needs square images",
                    img.width(),
                    img.height()
                ),
            });
        }
        Ok(img.width() as usize)
    }

    /// The embeddings rows at these (row address, id) pairs, in that order, each checked to
    /// hold the id the kNN table says it does.
    async fn take_addrs(&self, rows: &[(u64, u64)], columns: &[&str]) -> Result<RecordBatch> {
        let uri = &self.embeddings_uri;
        let projection = self
            .emb
            .schema()
            .project(columns)
            .map_err(|e| TrainerError::lance(uri, e))?;
        let plan = ProjectionRequest::from(projection)
            .into_projection_plan(self.emb.clone())
            .map_err(|e| TrainerError::lance(uri, e))?;
        let addrs: Vec<u64> = rows.iter().map(|r| r.0).collect();
        let batch = TakeBuilder::try_new_from_addresses(self.emb.clone(), addrs, Arc::new(plan))
            .map_err(|e| TrainerError::lance(uri, e))?
            .execute()
            .await
            .map_err(|e| TrainerError::BadTable {
                table: uri.clone(),
                detail: format!(
                "cannot read rows at the addresses the kNN table `{}` lists ({e}); it does not \
                 belong to version {} of this table: run precompute-knn again",
                self.knn_uri,
                self.emb.version().version
            ),
            })?;
        let got = batch.column(0).as_primitive::<UInt64Type>().values();
        for (&(addr, want), &have) in rows.iter().zip(got.iter()) {
            if have != want {
                return Err(TrainerError::BadTable {
                    table: uri.clone(),
                    detail: format!(
                        "row address {addr:#x} holds id {have} where the kNN table `{}` says \
                         {want}: the kNN table does not belong to version {} of this table; \
                         run precompute-knn again",
                        self.knn_uri,
                        self.emb.version().version
                    ),
                });
            }
        }
        Ok(batch)
    }

    async fn take_rows(
        &self,
        ds: &Dataset,
        uri: &str,
        offsets: &[u64],
        columns: &[&str],
    ) -> Result<RecordBatch> {
        let projection = ds
            .schema()
            .project(columns)
            .map_err(|e| TrainerError::lance(uri, e))?;
        ds.take(offsets, projection)
            .await
            .map_err(|e| TrainerError::lance(uri, e))
    }

    /// The rows at these kNN-table offsets, with their images and conditions.
    pub async fn fetch(&self, knn_offsets: &[u64]) -> Result<Fetched> {
        let (k, d) = (self.k, self.dim);
        let n = knn_offsets.len();
        let kb = self
            .take_rows(
                &self.knn,
                &self.knn_uri,
                knn_offsets,
                &["id", ROW_ADDR_COLUMN, "knn_ids", KNN_ROW_ADDRS_COLUMN],
            )
            .await?;
        let ids = kb.column(0).as_primitive::<UInt64Type>().values().to_vec();
        let own = kb.column(1).as_primitive::<UInt64Type>().values();
        let lists = kb.column(2).as_fixed_size_list();
        let stored_k = lists.value_length() as usize;
        let nbr = lists.values().as_primitive::<UInt64Type>();
        let nbr_addr = kb
            .column(3)
            .as_fixed_size_list()
            .values()
            .as_primitive::<UInt64Type>();
        let mut out = Fetched {
            ids: ids.clone(),
            cond: vec![0.0; n * (k + 1) * d],
            present: vec![0.0; n * (k + 1)],
            ..Default::default()
        };

        // Every embedding needed, each row read once: (address, id) by condition slot.
        let mut slots: Vec<(usize, (u64, u64))> = Vec::with_capacity(n * (k + 1));
        for (i, &id) in ids.iter().enumerate() {
            slots.push((i * (k + 1), (own[i], id)));
            for j in 0..k {
                let at = i * stored_k + j;
                if lists.is_null(i) || nbr.is_null(at) || nbr_addr.is_null(at) {
                    continue;
                }
                slots.push((i * (k + 1) + 1 + j, (nbr_addr.value(at), nbr.value(at))));
            }
        }
        let mut wanted: Vec<(u64, u64)> = slots.iter().map(|s| s.1).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let eb = self.take_addrs(&wanted, &["id", "emb"]).await?;
        let emb_values = eb
            .column(1)
            .as_fixed_size_list()
            .values()
            .as_primitive::<Float32Type>()
            .values()
            .to_vec();
        for (slot, row) in slots {
            let at = wanted
                .binary_search(&row)
                .expect("every slot's address was taken");
            out.cond[slot * d..(slot + 1) * d].copy_from_slice(&emb_values[at * d..(at + 1) * d]);
            out.present[slot] = 1.0;
        }

        // Images of the rows themselves, in row order.
        let rows: Vec<(u64, u64)> = own.iter().copied().zip(ids.iter().copied()).collect();
        let ib = self.take_addrs(&rows, &["id", "image"]).await?;
        let images = ib.column(1).as_binary::<i32>();
        for (i, &id) in ids.iter().enumerate() {
            match decode_chw(images.value(i), self.image_size_px) {
                Ok(px) => out.images.push(Some(px)),
                Err(reason) => {
                    out.problems.push((id, reason));
                    out.images.push(None);
                }
            }
        }
        Ok(out)
    }

    /// kNN-table offsets of the first `n` held-out rows.
    pub fn holdout_offsets(&self, n: usize) -> Vec<u64> {
        self.split_rows.holdout_offsets(n)
    }

    /// Rows of the kNN table (training rows + held out).
    pub fn rows(&self) -> u64 {
        self.split_rows.rows()
    }
}

/// The kNN table's training and held-out rows, from its `holdout` column (all rows train
/// when it has none).
async fn scan_holdout(knn: &Dataset, uri: &str) -> Result<RowSplit> {
    let lance_err = |e| TrainerError::lance(uri, e);
    if knn.schema().field("holdout").is_none() {
        let n = knn.count_rows(None).await.map_err(lance_err)? as u64;
        return Ok(RowSplit::new(n, Vec::new()));
    }
    let mut scanner = knn.scan();
    scanner.project(&["holdout"]).map_err(lance_err)?;
    let mut stream = scanner.try_into_stream().await.map_err(lance_err)?;
    let (mut holdout, mut at) = (Vec::new(), 0u64);
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| TrainerError::lance(uri, e))?;
        let flags = b.column(0).as_boolean();
        holdout.extend(
            flags
                .iter()
                .enumerate()
                .filter(|f| f.1 == Some(true))
                .map(|f| at + f.0 as u64),
        );
        at += b.num_rows() as u64;
    }
    Ok(RowSplit::new(at, holdout))
}

/// PNG/JPEG bytes → CHW floats in [−1, 1]; the image must be `side` px square.
fn decode_chw(bytes: &[u8], side: usize) -> std::result::Result<Vec<f32>, String> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| format!("image does not decode: {e}"))?
        .to_rgb8();
    if img.width() as usize != side || img.height() as usize != side {
        return Err(format!(
            "image is {}x{}, the table's images are {side}x{side}",
            img.width(),
            img.height()
        ));
    }
    Ok(rgb_to_chw(&img))
}

/// An RGB image as CHW floats in [−1, 1] (the model's pixel range).
pub fn rgb_to_chw(img: &image::RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    out
}

/// Per-sample randomness settings.
#[derive(Clone, Copy, Debug)]
pub struct SampleSpec {
    /// The run's seed.
    pub seed: u64,
    /// Diffusion steps T (t is drawn uniformly from 0..T).
    pub timesteps: usize,
    /// Probability of dropping a sample's condition.
    pub cond_drop_prob: f64,
    /// Random horizontal flips.
    pub flip: bool,
    /// Probability of keeping only a random prefix of the neighbours.
    pub knn_dropout: f64,
}

/// One rank's micro-batch, ready for the model (host memory).
#[derive(Debug)]
pub struct Batch {
    /// Which micro-batch this is.
    pub cursor: DataCursor,
    /// Row ids.
    pub ids: Vec<u64>,
    /// `[B, 3, H, W]` in [−1, 1].
    pub images: Tensor,
    /// `[B, k+1, d]`.
    pub cond: Tensor,
    /// `[B, k+1]`.
    pub present: Tensor,
    /// `[B]`, 1 = condition dropped.
    pub drop: Tensor,
    /// `[B]` i64 diffusion steps.
    pub t: Tensor,
    /// `[B, 3, H, W]` standard normal.
    pub noise: Tensor,
    /// `[B]`: 0 for rows that could not be used.
    pub weight: Tensor,
    /// Rows that could not be used, with why.
    pub problems: Vec<(u64, String)>,
}

impl Batch {
    /// Moves every tensor to `device`.
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            cursor: self.cursor,
            ids: self.ids.clone(),
            images: self.images.to_device(device),
            cond: self.cond.to_device(device),
            present: self.present.to_device(device),
            drop: self.drop.to_device(device),
            t: self.t.to_device(device),
            noise: self.noise.to_device(device),
            weight: self.weight.to_device(device),
            problems: self.problems.clone(),
        }
    }
}

/// Builds micro-batch `m` of this rank.
pub async fn build_batch(
    data: &TrainingData,
    layout: &DataLayout,
    spec: &SampleSpec,
    m: u64,
) -> Result<Batch> {
    let (epoch, positions) = layout.positions(m);
    let perm = EpochPermutation::new(layout.train_rows, spec.seed, epoch);
    let offsets: Vec<u64> = positions
        .iter()
        .map(|&p| data.split_rows.train_offset(perm.apply(p)))
        .collect();
    let mut f = data.fetch(&offsets).await?;
    let slots = data.k + 1;
    let side = data.image_size_px;
    let plane = side * side;
    let b = positions.len();
    let mut images = Vec::with_capacity(b * 3 * plane);
    let mut noise = Vec::with_capacity(b * 3 * plane);
    let (mut drop, mut t, mut weight) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &p) in positions.iter().enumerate() {
        let mut rng = SampleRng::new(spec.seed, epoch, p);
        let flip = spec.flip && rng.next_u64() & 1 == 1;
        drop.push(if rng.uniform() < spec.cond_drop_prob {
            1f32
        } else {
            0.0
        });
        t.push((rng.next_u64() % spec.timesteps as u64) as i64);
        let mut z = Vec::with_capacity(3 * plane);
        rng.normals(3 * plane, &mut z);
        noise.extend_from_slice(&z);
        // Drawn after everything else, so the other draws do not depend on it.
        if spec.knn_dropout > 0.0 && rng.uniform() < spec.knn_dropout {
            let keep = (rng.next_u64() % (data.k as u64 + 1)) as usize;
            for j in keep..data.k {
                f.present[i * slots + 1 + j] = 0.0;
            }
        }
        match &f.images[i] {
            Some(px) if flip => {
                for row in px.chunks_exact(side) {
                    images.extend(row.iter().rev());
                }
                weight.push(1f32);
            }
            Some(px) => {
                images.extend_from_slice(px);
                weight.push(1.0);
            }
            None => {
                images.extend(std::iter::repeat_n(0f32, 3 * plane));
                weight.push(0.0);
            }
        }
    }
    let (bi, si, ki, di) = (b as i64, side as i64, (data.k + 1) as i64, data.dim as i64);
    Ok(Batch {
        cursor: layout.cursor(m),
        ids: f.ids,
        images: Tensor::from_slice(&images).view([bi, 3, si, si]),
        cond: Tensor::from_slice(&f.cond).view([bi, ki, di]),
        present: Tensor::from_slice(&f.present).view([bi, ki]),
        drop: Tensor::from_slice(&drop),
        t: Tensor::from_slice(&t),
        noise: Tensor::from_slice(&noise).view([bi, 3, si, si]),
        weight: Tensor::from_slice(&weight),
        problems: f.problems,
    })
}

/// Prefetches micro-batches on its own thread (with its own async runtime for Lance), a
/// bounded number ahead. Every training loop uses it: `make(m)` builds micro-batch `m`.
///
/// It reads only the micro-batches the run will use (`batches`), and dropping it waits for
/// its thread to stop (after the batch in hand, at most), so no batch is still being built
/// with libtorch while the process exits: a run that resumes at its last step, or ends,
/// leaves nothing behind.
pub struct Loader<B = Batch> {
    rx: Receiver<Result<B>>,
    thread: Option<std::thread::JoinHandle<()>>,
    waited: Duration,
}

impl<B> Drop for Loader<B> {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next send fail, which stops it.
        let (_, closed) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<B: Send + 'static> Loader<B> {
    /// Reads the micro-batches `batches` in order, `depth` batches ahead.
    pub fn start<F, Fut>(make: F, batches: std::ops::Range<u64>, depth: usize) -> Result<Self>
    where
        F: Fn(u64) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<B>>,
    {
        let (tx, rx) = sync_channel(depth.max(1));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("knn-loader-io")
            .build()
            .map_err(|e| TrainerError::Loader(format!("cannot start its runtime: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("knn-loader".into())
            .spawn(move || {
                for m in batches {
                    let batch = rt.block_on(make(m));
                    let failed = batch.is_err();
                    // The trainer dropped the loader: stop.
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| TrainerError::Loader(format!("cannot start its thread: {e}")))?;
        Ok(Self {
            rx,
            thread: Some(thread),
            waited: Duration::ZERO,
        })
    }

    /// The next micro-batch; the time spent waiting for it is added to the waited time.
    pub fn next_batch(&mut self) -> Result<B> {
        let t0 = Instant::now();
        let b = self
            .rx
            .recv()
            .map_err(|_| TrainerError::Loader("its thread stopped".into()))?;
        self.waited += t0.elapsed();
        b
    }

    /// Total time the trainer waited for data, then reset.
    pub fn take_waited(&mut self) -> Duration {
        std::mem::take(&mut self.waited)
    }
}

/// The condition tensors of a fetch, for sampling: `(cond [n,k+1,d], present [n,k+1])`.
pub fn condition_tensors(f: &Fetched, k: usize, dim: usize) -> (Tensor, Tensor) {
    let n = f.ids.len() as i64;
    (
        Tensor::from_slice(&f.cond).view([n, (k + 1) as i64, dim as i64]),
        Tensor::from_slice(&f.present).view([n, (k + 1) as i64]),
    )
}

/// Images of a fetch as `[n, 3, H, W]` (undecodable ones black).
pub fn image_tensor(f: &Fetched, side: usize) -> Tensor {
    let plane = 3 * side * side;
    let mut px = Vec::with_capacity(f.images.len() * plane);
    for im in &f.images {
        match im {
            Some(v) => px.extend_from_slice(v),
            None => px.extend(std::iter::repeat_n(-1f32, plane)),
        }
    }
    Tensor::from_slice(&px).view([f.images.len() as i64, 3, side as i64, side as i64])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_offsets_skip_exactly_the_held_out_rows() {
        // Against the list it replaces, over splits with held-out rows at the ends, in runs
        // and none at all.
        let mut state = 7u64;
        for rows in [1u64, 2, 5, 17, 200] {
            for trial in 0..20 {
                let holdout: Vec<u64> = (0..rows)
                    .filter(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (state >> 33) % 4 < trial % 4
                    })
                    .collect();
                let want: Vec<u64> = (0..rows).filter(|r| !holdout.contains(r)).collect();
                let split = RowSplit::new(rows, holdout.clone());
                assert_eq!(split.train_rows(), want.len() as u64);
                let got: Vec<u64> = (0..split.train_rows())
                    .map(|p| split.train_offset(p))
                    .collect();
                assert_eq!(got, want, "rows {rows}, held out {holdout:?}");
            }
        }
    }

    #[test]
    fn ranks_split_the_global_batch_disjointly() {
        let one = DataLayout::new(100, 8, 0, 1).unwrap();
        let r0 = DataLayout::new(100, 4, 0, 2).unwrap();
        let r1 = DataLayout::new(100, 4, 1, 2).unwrap();
        for m in [0u64, 5, 12, 13] {
            let (e, all) = one.positions(m);
            let (e0, mut p0) = r0.positions(m);
            let (e1, p1) = r1.positions(m);
            assert_eq!((e, e), (e0, e1));
            p0.extend(p1);
            assert_eq!(p0, all);
        }
        assert_eq!(one.steps_per_epoch(), 12);
        assert_eq!(
            one.cursor(13),
            DataCursor {
                micro_step: 13,
                epoch: 1,
                position: 8
            }
        );
        assert!(DataLayout::new(7, 4, 0, 2).is_err());
    }

    #[test]
    fn the_loader_reads_only_its_range_and_dropping_it_waits_for_the_batch_in_hand() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let mut loader = Loader::start(|m| async move { Ok(m) }, 3..5, 4).unwrap();
        assert_eq!(loader.next_batch().unwrap(), 3);
        assert_eq!(loader.next_batch().unwrap(), 4);
        let end = loader.next_batch().unwrap_err();
        assert!(matches!(end, TrainerError::Loader(_)), "{end}");

        // A slow batch is still being built when the loader is dropped: the drop returns
        // only once it is done, and nothing after it is started.
        let built = Arc::new(AtomicU64::new(0));
        let counter = built.clone();
        let loader = Loader::start(
            move |m| {
                let counter = counter.clone();
                async move {
                    std::thread::sleep(Duration::from_millis(300));
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(m)
                }
            },
            0..u64::MAX,
            1,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(loader);
        let after_drop = built.load(Ordering::SeqCst);
        assert!(
            after_drop >= 1,
            "the drop returned before the batch in hand was done"
        );
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            built.load(Ordering::SeqCst),
            after_drop,
            "the thread went on after the drop"
        );
    }
}
