//! The rows of a `precompute-knn` search held in memory, grouped by partition: an inverted
//! file. When the table fits the memory budget (`knn.compute.memory_mib`) it is read once.
//! Each row is scored against the centroids once, which gives both its own partition and the
//! partitions it probes as a query (a self-join: every row is both). Every query block is
//! then searched with one grouped GEMM per probed partition, instead of one pass over the
//! whole table per query block, which also loops over every partition of every database
//! block.
//!
//! Held-out rows are held too, after the last partition: they are queries (they get
//! neighbours) but nobody's neighbour.

use super::quantizer::Quantizer;
use super::search::{offsets, Exclusion, IvfQueries, TopK};
use super::vectors::VectorTable;
use crate::Result;
use futures::StreamExt;
use tch::{Device, Kind, Tensor};

/// Bytes a resident row takes: its vector (f32), its id and row address (8 bytes each), and
/// its probes (4 bytes each).
pub fn bytes_per_row(dim: usize, nprobe: usize) -> u64 {
    4 * dim as u64 + 16 + 4 * nprobe as u64
}

/// Every row, sorted by partition, held-out rows last.
#[derive(Debug)]
pub struct ResidentRows {
    rows: Tensor,
    ids: Tensor,
    addrs: Tensor,
    /// The partitions each row probes as a query [n, nprobe] (int32).
    probes: Tensor,
    /// Partition `j` is rows `starts[j]..starts[j + 1]`; rows from `starts[p]` on are held
    /// out.
    starts: Vec<i64>,
    partitions: i64,
}

/// One block of queries taken from the resident rows.
pub struct QueryBlock {
    /// Their positions among the resident rows.
    pub at: Tensor,
    /// Row addresses.
    pub addrs: Vec<u64>,
    /// Whether each is held out.
    pub holdout: Vec<bool>,
}

impl ResidentRows {
    /// Reads every row of `source` in blocks of `block_rows` onto `device`, scoring each
    /// against the centroids of `quantizer` once for its partition and its `nprobe` probes.
    pub async fn load(
        source: &VectorTable,
        quantizer: &Quantizer,
        nprobe: i64,
        block_rows: usize,
        device: Device,
    ) -> Result<Self> {
        let p = quantizer.partitions() as i64;
        let mut blocks = source.blocks(None, block_rows, false).await?;
        let (mut rows, mut ids, mut addrs) = (Vec::new(), Vec::new(), Vec::new());
        let (mut probes, mut keys) = (Vec::new(), Vec::new());
        while let Some(block) = blocks.next().await {
            let block = block?;
            let (emb, id) = block.tensors(source.dim, device);
            let held = Tensor::from_slice(&block.holdout).to_device(device);
            let (pr, part) = score_once(quantizer, &emb, nprobe);
            // Held-out rows sort after every partition.
            keys.push(part.masked_fill(&held, p));
            probes.push(pr.to_kind(Kind::Int));
            addrs.push(block.addr_tensor(device));
            rows.push(emb);
            ids.push(id);
        }
        let key = Tensor::cat(&keys, 0);
        let (sorted, perm) = key.sort_stable(true, 0, false);
        // Where each row goes in partition order. Blocks are copied there one at a time and
        // dropped, so a column never needs more than twice its size.
        let dest = perm.argsort(0, false);
        let gather = |blocks: Vec<Tensor>| {
            let mut size = blocks[0].size();
            size[0] = dest.size()[0];
            let mut out = Tensor::empty(size.as_slice(), (blocks[0].kind(), device));
            let mut at = 0;
            for b in blocks {
                let len = b.size()[0];
                let _ = out.index_copy_(0, &dest.narrow(0, at, len), &b);
                at += len;
            }
            out
        };
        let starts = offsets(&sorted, p + 1);
        Ok(Self {
            rows: gather(rows),
            ids: gather(ids),
            addrs: gather(addrs),
            probes: gather(probes),
            starts: starts[..=p as usize].to_vec(),
            partitions: p,
        })
    }

    /// Rows held (held-out ones included).
    pub fn len(&self) -> usize {
        self.rows.size()[0] as usize
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows with `low <= id < high` (`high` `None`: no upper bound), in blocks of at
    /// most `block_rows`.
    pub fn queries(&self, (low, high): (u64, Option<u64>), block_rows: usize) -> Vec<QueryBlock> {
        // Ids are u64 carried bit for bit in i64: compare them as unsigned.
        let ids: Vec<i64> = Vec::try_from(&self.ids.to_device(Device::Cpu)).expect("1-D int64");
        let held_from = self.starts[self.partitions as usize] as usize;
        let addrs: Vec<i64> = Vec::try_from(&self.addrs.to_device(Device::Cpu)).expect("1-D int64");
        let mine: Vec<i64> = (0..ids.len())
            .filter(|&i| {
                let id = ids[i] as u64;
                id >= low && high.is_none_or(|h| id < h)
            })
            .map(|i| i as i64)
            .collect();
        mine.chunks(block_rows.max(1))
            .map(|c| QueryBlock {
                at: Tensor::from_slice(c).to_device(self.rows.device()),
                addrs: c.iter().map(|&i| addrs[i as usize] as u64).collect(),
                holdout: c.iter().map(|&i| i as usize >= held_from).collect(),
            })
            .collect()
    }

    /// Searches the queries `block` against every database row: (its ids, its top-k with
    /// row addresses as payload).
    pub fn search(&self, block: &QueryBlock, k: i64, exclusion: Exclusion) -> (Tensor, TopK) {
        let q = self.rows.index_select(0, &block.at);
        let q_ids = self.ids.index_select(0, &block.at);
        let probes = self.probes.index_select(0, &block.at).to_kind(Kind::Int64);
        let queries = IvfQueries::new(q, q_ids, &probes, self.partitions);
        let mut top = TopK::new(queries.len(), k, self.rows.device(), true);
        let db = self.starts[self.partitions as usize];
        queries.scan_sorted(
            &mut top,
            &self.rows.narrow(0, 0, db),
            &self.ids.narrow(0, 0, db),
            Some(&self.addrs.narrow(0, 0, db)),
            &self.starts,
            exclusion,
        );
        (queries.ids, top)
    }
}

/// Each row's probes [n, nprobe] and partition [n], from one scoring against the centroids
/// where the quantizer is flat (the best probe is the partition).
fn score_once(quantizer: &Quantizer, emb: &Tensor, nprobe: i64) -> (Tensor, Tensor) {
    let probes = quantizer.probes(emb, nprobe);
    let part = match &quantizer.cells {
        None => probes.select(1, 0),
        Some(_) => quantizer.assign(emb),
    };
    (probes, part)
}
