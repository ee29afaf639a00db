//! Generated vector tables for tests and benchmarks: normalised points scattered around
//! random cluster centres, with ids spread over the u64 range like the embed stage's hashed
//! ids (so id-range shards are balanced), written as a Lance table `id, emb`.

use crate::{IndexerError, Result};
use arrow_array::{
    FixedSizeListArray, Float32Array, RecordBatch, RecordBatchIterator, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use lance::dataset::{WriteMode, WriteParams};
use lance::Dataset;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Generated data: `ids[i]` is the id of row `i` of `emb` [n, d].
#[derive(Debug)]
pub struct Clustered {
    /// Row ids (63-bit, pseudo-random, distinct).
    pub ids: Vec<u64>,
    /// Unit rows [n, d] on the CPU.
    pub emb: Tensor,
}

/// The id of generated row `i` under `seed`: a SplitMix64 hash, top bit cleared.
pub fn synthetic_id(i: u64, seed: u64) -> u64 {
    let mut z = i
        .wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) >> 1
}

/// `n` unit vectors of dimension `d` around `clusters` centres: centre + `noise` x Gaussian
/// (both scaled by 1/√d, so `noise` is the spread relative to the distance between centres).
pub fn clustered(n: usize, d: usize, clusters: usize, noise: f64, seed: u64) -> Clustered {
    tch::manual_seed(seed as i64);
    let opts = (Kind::Float, Device::Cpu);
    let scale = 1.0 / (d as f64).sqrt();
    let centres = Tensor::randn([clusters.max(1) as i64, d as i64], opts) * scale;
    let which = Tensor::randint(
        clusters.max(1) as i64,
        [n as i64],
        (Kind::Int64, Device::Cpu),
    );
    let x = centres.index_select(0, &which)
        + Tensor::randn([n as i64, d as i64], opts) * (noise * scale);
    let norm = x.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
    Clustered {
        ids: (0..n as u64).map(|i| synthetic_id(i, seed)).collect(),
        emb: x / norm,
    }
}

/// Schema `id: u64, emb: FixedSizeList<f32, d>` plus any extra `f32` columns.
pub fn vector_schema(d: usize, extra_f32: &[&str]) -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let mut fields = vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("emb", DataType::FixedSizeList(item, d as i32), false),
    ];
    fields.extend(
        extra_f32
            .iter()
            .map(|c| Field::new(*c, DataType::Float32, false)),
    );
    Arc::new(Schema::new(fields))
}

/// Rows `ids` / `emb` [n, d] (and extra f32 columns) as one batch.
pub fn vector_batch(ids: &[u64], emb: &Tensor, extra: &[(&str, Vec<f32>)]) -> Result<RecordBatch> {
    let d = emb.size()[1] as usize;
    let names: Vec<&str> = extra.iter().map(|(n, _)| *n).collect();
    let schema = vector_schema(d, &names);
    let flat: Vec<f32> = Vec::try_from(&emb.contiguous().view([-1]).to_kind(Kind::Float))?;
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let mut columns: Vec<Arc<dyn arrow_array::Array>> = vec![
        Arc::new(UInt64Array::from(ids.to_vec())),
        Arc::new(FixedSizeListArray::new(
            item,
            d as i32,
            Arc::new(Float32Array::from(flat)),
            None,
        )),
    ];
    for (_, v) in extra {
        columns.push(Arc::new(Float32Array::from(v.clone())));
    }
    RecordBatch::try_new(schema, columns)
        .map_err(|e| IndexerError::Internal(format!("vector batch: {e}")))
}

/// Writes (creates, or appends to) a vector table at `uri`, in batches of 65 536 rows.
pub async fn write_vectors(uri: &str, ids: &[u64], emb: &Tensor, append: bool) -> Result<Dataset> {
    let n = ids.len();
    let d = emb.size()[1] as usize;
    let mut batches = Vec::new();
    for start in (0..n).step_by(65_536) {
        let len = 65_536.min(n - start);
        batches.push(Ok(vector_batch(
            &ids[start..start + len],
            &emb.narrow(0, start as i64, len as i64),
            &[],
        )?));
    }
    let reader = RecordBatchIterator::new(batches, vector_schema(d, &[]));
    let params = WriteParams {
        mode: if append {
            WriteMode::Append
        } else {
            WriteMode::Create
        },
        ..Default::default()
    };
    Dataset::write(reader, uri, Some(params))
        .await
        .map_err(|e| IndexerError::lance(uri, e))
}
