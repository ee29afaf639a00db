//! Reading `(id, emb)` from an embeddings table, pinned to one version: row counts, random
//! samples by row offset, and ordered scans in blocks of a bounded number of rows.
//!
//! Any Lance table with a `u64` column `id` and a `FixedSizeList<f32, d>` column `emb` works:
//! the embed stage's table, or one a user brings (PAPER.md swaps the retrieval database at
//! inference).
//!
//! With a held-out split ([`VectorTable::with_split`], which needs a `key` column) every row
//! read says whether it is held out, and *database* scans ([`VectorTable::scan_blocks`], the
//! rows neighbours are chosen from) leave held-out rows out: they are never anyone's
//! neighbour.

use crate::{IndexerError, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use futures::stream::BoxStream;
use futures::StreamExt;
use knn_datasets::SplitConfig;
use lance::dataset::{ProjectionRequest, TakeBuilder};
use lance::deps::datafusion::prelude::{col, lit};
use lance::Dataset;
use std::collections::HashMap;
use std::sync::Arc;
use tch::{Device, Tensor};

/// The id column every vector table has.
pub const ID_COLUMN: &str = "id";
/// The embedding column every vector table has.
pub const EMB_COLUMN: &str = "emb";
/// Lance's row-address column, added to a scan by `with_row_address` (`lance_core::ROW_ADDR`).
const ROW_ADDR: &str = "_rowaddr";

/// The key column the held-out split hashes.
pub const KEY_COLUMN: &str = "key";
/// The column naming each row's source shard (the embed stage's tables have it).
pub const SHARD_COLUMN: &str = "shard";

/// An embeddings table opened at one version.
#[derive(Clone, Debug)]
pub struct VectorTable {
    /// URI as configured.
    pub uri: String,
    /// The opened version.
    pub ds: Dataset,
    /// Embedding dimension.
    pub dim: usize,
    /// Rows at this version.
    pub rows: usize,
    /// The held-out split, when one is applied.
    pub split: Option<SplitConfig>,
}

/// Rows read from a vector table: ids and row-major embeddings.
#[derive(Debug, Default)]
pub struct VectorBlock {
    /// Row ids.
    pub ids: Vec<u64>,
    /// `ids.len() * dim` floats.
    pub emb: Vec<f32>,
    /// Whether each row is held out (all false without a split).
    pub holdout: Vec<bool>,
    /// Each row's Lance row address in the opened version (scans fill it; `take` leaves it
    /// empty). The kNN table stores them so training reads rows without an id → row map.
    pub addrs: Vec<u64>,
}

impl VectorBlock {
    /// Rows in the block.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the block is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The block as tensors on `device`: embeddings [n, d] (L2-normalised, so dot products
    /// are cosine similarities) and ids `[n]` (u64 bits in i64).
    pub fn tensors(&self, dim: usize, device: Device) -> (Tensor, Tensor) {
        let n = self.ids.len() as i64;
        let mut emb = Tensor::from_slice(&self.emb)
            .view([n, dim as i64])
            .to_device(device);
        let norm = emb
            .norm_scalaropt_dim(2.0, [1], true)
            .clamp_min(f64::from(f32::MIN_POSITIVE));
        let _ = emb.g_div_(&norm);
        (emb, u64_tensor(&self.ids, device))
    }

    /// The row addresses as a tensor `[n]` on `device` (u64 bits in i64).
    pub fn addr_tensor(&self, device: Device) -> Tensor {
        u64_tensor(&self.addrs, device)
    }

    /// Appends a scanned batch; with `split`, marks held-out rows, and with `database` too,
    /// leaves them out. A batch with Lance's `_rowaddr` column also fills `addrs`.
    fn append(
        &mut self,
        batch: &RecordBatch,
        table: &str,
        split: Option<&SplitConfig>,
        database: bool,
    ) -> Result<()> {
        let missing = |c: &str| IndexerError::MissingColumn {
            table: table.to_string(),
            column: c.to_string(),
            detail: "not in the scanned batch".into(),
        };
        let ids = batch
            .column_by_name(ID_COLUMN)
            .ok_or_else(|| missing(ID_COLUMN))?
            .as_primitive::<UInt64Type>();
        let emb = batch
            .column_by_name(EMB_COLUMN)
            .ok_or_else(|| missing(EMB_COLUMN))?
            .as_fixed_size_list();
        if emb.null_count() > 0 || emb.values().null_count() > 0 {
            let row = (0..emb.len())
                .find(|&i| emb.is_null(i) || emb.value(i).null_count() > 0)
                .unwrap_or(0);
            return Err(IndexerError::BadRow {
                table: table.to_string(),
                id: ids.value(row),
                reason: "its `emb` is null or has null entries; re-embed it or delete the row"
                    .into(),
            });
        }
        let values = emb.values().as_primitive::<Float32Type>();
        let addrs = batch
            .column_by_name(ROW_ADDR)
            .map(|a| a.as_primitive::<UInt64Type>().values());
        let Some(split) = split else {
            self.ids.extend_from_slice(ids.values());
            if let Some(a) = addrs {
                self.addrs.extend_from_slice(a);
            }
            self.emb.extend_from_slice(values.values());
            self.holdout.resize(self.ids.len(), false);
            return Ok(());
        };
        let keys = batch
            .column_by_name(KEY_COLUMN)
            .ok_or_else(|| missing(KEY_COLUMN))?
            .as_string::<i32>();
        let d = emb.value_length() as usize;
        for row in 0..batch.num_rows() {
            let held = split.is_holdout(keys.value(row));
            if held && database {
                continue;
            }
            self.ids.push(ids.value(row));
            if let Some(a) = addrs {
                self.addrs.push(a[row]);
            }
            self.emb
                .extend_from_slice(&values.values()[row * d..(row + 1) * d]);
            self.holdout.push(held);
        }
        Ok(())
    }
}

impl VectorTable {
    /// Opens `uri` at `version` (the latest when `None`) and checks its columns.
    pub async fn open(
        uri: &str,
        storage: &HashMap<String, String>,
        version: Option<u64>,
    ) -> Result<Self> {
        let ds = crate::table::load_dataset(uri, storage, version)
            .await
            .map_err(|e| IndexerError::lance(uri, e))?;
        let schema: arrow_schema::Schema = ds.schema().into();
        let have = || {
            schema
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match schema.field_with_name(ID_COLUMN).map(|f| f.data_type()) {
            Ok(DataType::UInt64) => {}
            _ => {
                return Err(IndexerError::MissingColumn {
                    table: uri.to_string(),
                    column: ID_COLUMN.into(),
                    detail: format!(
                        "need a u64 `{ID_COLUMN}` column; the table has [{}]",
                        have()
                    ),
                })
            }
        }
        let dim = match schema.field_with_name(EMB_COLUMN).map(|f| f.data_type()) {
            Ok(DataType::FixedSizeList(item, d)) if item.data_type() == &DataType::Float32 => {
                *d as usize
            }
            _ => {
                return Err(IndexerError::MissingColumn {
                    table: uri.to_string(),
                    column: EMB_COLUMN.into(),
                    detail: format!(
                        "need a FixedSizeList<f32, d> `{EMB_COLUMN}` column; the table has [{}]",
                        have()
                    ),
                })
            }
        };
        let rows = ds
            .count_rows(None)
            .await
            .map_err(|e| IndexerError::lance(uri, e))?;
        Ok(Self {
            uri: uri.to_string(),
            ds,
            dim,
            rows,
            split: None,
        })
    }

    /// Applies a held-out split (by the `key` column, which must exist).
    pub fn with_split(mut self, split: Option<SplitConfig>) -> Result<Self> {
        if split.is_some() && self.ds.schema().field(KEY_COLUMN).is_none() {
            return Err(IndexerError::MissingColumn {
                table: self.uri.clone(),
                column: KEY_COLUMN.into(),
                detail: "a held-out split hashes each row's key; embed-stage tables have one"
                    .into(),
            });
        }
        self.split = split;
        Ok(self)
    }

    /// The columns a scan reads.
    fn columns(&self) -> Vec<&'static str> {
        match self.split {
            Some(_) => vec![ID_COLUMN, EMB_COLUMN, KEY_COLUMN],
            None => vec![ID_COLUMN, EMB_COLUMN],
        }
    }

    /// The opened version.
    pub fn version(&self) -> u64 {
        self.ds.version().version
    }

    /// Fails with [`IndexerError::EmptyTable`] when the table has no rows.
    pub fn require_rows(&self) -> Result<()> {
        if self.rows == 0 {
            return Err(IndexerError::EmptyTable {
                table: self.uri.clone(),
                version: self.version(),
            });
        }
        Ok(())
    }

    /// The smallest and largest id (reads the `id` column once).
    pub async fn id_span(&self) -> Result<(u64, u64)> {
        let lance_err = |e| IndexerError::lance(&self.uri, e);
        let mut scanner = self.ds.scan();
        scanner.project(&[ID_COLUMN]).map_err(lance_err)?;
        let mut batches = scanner.try_into_stream().await.map_err(lance_err)?;
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(lance_err)?;
            let ids = batch.column(0).as_primitive::<UInt64Type>();
            for &id in ids.values() {
                lo = lo.min(id);
                hi = hi.max(id);
            }
        }
        Ok((lo.min(hi), hi))
    }

    /// Rows at the given offsets (in scan order, 0-based).
    pub async fn take(&self, offsets: &[u64]) -> Result<VectorBlock> {
        let batch = self
            .ds
            .take(
                offsets,
                self.ds
                    .schema()
                    .project(&self.columns())
                    .map_err(|e| IndexerError::lance(&self.uri, e))?,
            )
            .await
            .map_err(|e| IndexerError::lance(&self.uri, e))?;
        let mut block = VectorBlock::default();
        block.append(&batch, &self.uri, self.split.as_ref(), false)?;
        Ok(block)
    }

    /// Rows at the given row addresses (in this version), in that order.
    pub async fn take_addresses(&self, addrs: &[u64]) -> Result<VectorBlock> {
        let batch = self.take_at(addrs, &self.columns()).await?;
        let mut block = VectorBlock::default();
        block.append(&batch, &self.uri, self.split.as_ref(), false)?;
        Ok(block)
    }

    /// The `key` and `shard` of the rows at `addrs`, in that order: `None` for a column the
    /// table does not have (a table a user brings may have neither).
    pub async fn names_at(&self, addrs: &[u64]) -> Result<Vec<(Option<String>, Option<String>)>> {
        let have = |c: &str| self.ds.schema().field(c).is_some();
        let columns: Vec<&str> = [KEY_COLUMN, SHARD_COLUMN]
            .into_iter()
            .filter(|c| have(c))
            .collect();
        let mut names = vec![(None, None); addrs.len()];
        if columns.is_empty() || addrs.is_empty() {
            return Ok(names);
        }
        let batch = self.take_at(addrs, &columns).await?;
        for (c, column) in columns.iter().enumerate() {
            let values = batch.column(c).as_string::<i32>();
            for (i, name) in names.iter_mut().enumerate() {
                let value = Some(values.value(i).to_string());
                match *column {
                    KEY_COLUMN => name.0 = value,
                    _ => name.1 = value,
                }
            }
        }
        Ok(names)
    }

    /// The `columns` of the rows at `addrs` (in this version), in that order.
    async fn take_at(&self, addrs: &[u64], columns: &[&str]) -> Result<RecordBatch> {
        let lance_err = |e| IndexerError::lance(&self.uri, e);
        let projection = self.ds.schema().project(columns).map_err(lance_err)?;
        let ds = Arc::new(self.ds.clone());
        let plan = ProjectionRequest::from(projection)
            .into_projection_plan(ds.clone())
            .map_err(lance_err)?;
        TakeBuilder::try_new_from_addresses(ds, addrs.to_vec(), Arc::new(plan))
            .map_err(lance_err)?
            .execute()
            .await
            .map_err(lance_err)
    }

    /// All rows (or those with `low <= id < high`) in table order, in blocks of at most
    /// `block_rows` rows; a `database` read leaves held-out rows out.
    pub async fn blocks(
        &self,
        id_range: Option<(u64, Option<u64>)>,
        block_rows: usize,
        database: bool,
    ) -> Result<BoxStream<'static, Result<VectorBlock>>> {
        let mut scanner = self.ds.scan();
        scanner
            .project(&self.columns())
            .map_err(|e| IndexerError::lance(&self.uri, e))?;
        scanner.with_row_address();
        if let Some((low, high)) = id_range {
            let mut filter = col(ID_COLUMN).gt_eq(lit(low));
            if let Some(high) = high {
                filter = filter.and(col(ID_COLUMN).lt(lit(high)));
            }
            scanner.filter_expr(filter);
        }
        let batches = scanner
            .try_into_stream()
            .await
            .map_err(|e| IndexerError::lance(&self.uri, e))?;
        let (uri, dim, block_rows) = (self.uri.clone(), self.dim, block_rows.max(1));
        let split = self.split.clone();
        let state = (Some(batches), VectorBlock::default());
        Ok(
            futures::stream::unfold(state, move |(mut batches, mut block)| {
                let (uri, split) = (uri.clone(), split.clone());
                async move {
                    loop {
                        if block.len() >= block_rows {
                            let rest = split_off(&mut block, block_rows, dim);
                            let full = std::mem::replace(&mut block, rest);
                            return Some((Ok(full), (batches, block)));
                        }
                        let Some(stream) = batches.as_mut() else {
                            // Input ended: hand out what is left, then stop.
                            return (!block.is_empty()).then(|| {
                                (
                                    Ok(std::mem::take(&mut block)),
                                    (None, VectorBlock::default()),
                                )
                            });
                        };
                        match stream.next().await {
                            Some(Ok(batch)) => {
                                if let Err(e) = block.append(&batch, &uri, split.as_ref(), database)
                                {
                                    return Some((Err(e), (None, VectorBlock::default())));
                                }
                            }
                            Some(Err(e)) => {
                                return Some((
                                    Err(IndexerError::lance(&uri, e)),
                                    (None, VectorBlock::default()),
                                ))
                            }
                            None => batches = None,
                        }
                    }
                }
            })
            .boxed(),
        )
    }

    /// Passes over the database rows (all but held-out ones) in blocks (see
    /// [`VectorTable::blocks`]), calling `each` on a blocking thread while the next block is
    /// read, so reading overlaps computing.
    pub async fn scan_blocks<S, F>(
        &self,
        id_range: Option<(u64, Option<u64>)>,
        block_rows: usize,
        state: S,
        each: F,
    ) -> Result<S>
    where
        S: Send + 'static,
        F: FnMut(&mut S, VectorBlock) -> Result<()> + Send + 'static,
    {
        let mut blocks = self.blocks(id_range, block_rows, true).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<VectorBlock>(1);
        let compute = tokio::task::spawn_blocking(move || {
            let (mut state, mut each) = (state, each);
            while let Some(block) = rx.blocking_recv() {
                each(&mut state, block)?;
            }
            Ok::<S, IndexerError>(state)
        });
        let mut reading: Result<()> = Ok(());
        while let Some(block) = blocks.next().await {
            match block {
                Ok(block) => {
                    if tx.send(block).await.is_err() {
                        break; // the compute side failed; its error is returned below
                    }
                }
                Err(e) => {
                    reading = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let state = compute
            .await
            .map_err(|e| IndexerError::Internal(format!("kNN compute thread died: {e}")))??;
        reading.map(|()| state)
    }
}

/// u64 values as an i64 tensor on `device`, bit for bit.
fn u64_tensor(values: &[u64], device: Device) -> Tensor {
    let bits: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    Tensor::from_slice(&bits).to_device(device)
}

/// Splits `block` after `rows` rows, returning the tail.
fn split_off(block: &mut VectorBlock, rows: usize, dim: usize) -> VectorBlock {
    VectorBlock {
        ids: block.ids.split_off(rows),
        emb: block.emb.split_off(rows * dim),
        holdout: block.holdout.split_off(rows),
        addrs: block.addrs.split_off(rows.min(block.addrs.len())),
    }
}
