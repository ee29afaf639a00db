//! Batched nearest-neighbour search in tch: the arithmetic of `precompute-knn`, with no I/O.
//!
//! Vectors are L2-normalised, so cosine similarity is a dot product and a block of queries
//! against a block of database rows is one GEMM (BLAS on the CPU, cuBLAS on a GPU). Two
//! searches share one running top-k ([`TopK`]):
//!
//! - [`exact_scan`]: every query against every row of a database block (ground truth, the
//!   recall calibration, and small tables);
//! - [`IvfQueries::scan`]: an inverted-file search done the batch way. Database rows are
//!   assigned to their nearest centroid; each query probes its `nprobe` nearest centroids.
//!   For each partition of a database block, the queries that probe it are gathered and
//!   multiplied by the block's rows of that partition in one GEMM. Scores are exact (f32 dot
//!   products of the stored vectors), so the only approximation is which partitions a query
//!   looks in — exactly the IVF-Flat trade-off, measured by the calibration in
//!   [`super::plan`].
//!
//! Ids are the tables' u64 ids carried bit-for-bit in i64 tensors. A query never gets its own
//! id back, and with a duplicate threshold `t` no neighbour with similarity ≥ `t`
//! (PAPER.md: a duplicate of the target in its own condition leaks the target).

use tch::{Device, Kind, Tensor};

/// Rows with fewer than k neighbours found carry this id (and similarity −∞) in the empty
/// slots.
pub const NO_NEIGHBOUR: i64 = -1;

/// What a candidate must not be, for every query.
#[derive(Clone, Copy, Debug, Default)]
pub struct Exclusion {
    /// Similarity at or above which a candidate counts as a duplicate of the query.
    pub duplicate_similarity: Option<f32>,
}

impl Exclusion {
    /// Sets excluded entries of `scores` ([q, n]) to −∞: the query itself (same id) and
    /// duplicates.
    fn apply(&self, scores: &mut Tensor, query_ids: &Tensor, row_ids: &Tensor) {
        let same = query_ids.unsqueeze(1).eq_tensor(&row_ids.unsqueeze(0));
        let _ = scores.masked_fill_(&same, f64::NEG_INFINITY);
        if let Some(t) = self.duplicate_similarity {
            let dup = scores.ge(t as f64);
            let _ = scores.masked_fill_(&dup, f64::NEG_INFINITY);
        }
    }
}

/// The best `k` neighbours found so far for each of `q` queries, best first.
#[derive(Debug)]
pub struct TopK {
    k: i64,
    /// Similarities, [q, k] f32, −∞ where no neighbour was found yet.
    pub sims: Tensor,
    /// Neighbour ids, [q, k] i64.
    pub ids: Tensor,
    /// A per-neighbour payload carried along (the neighbour's partition in the calibration).
    pub aux: Option<Tensor>,
}

impl TopK {
    /// An empty top-k for `q` queries; `with_aux` also tracks a payload per neighbour.
    pub fn new(q: i64, k: i64, device: Device, with_aux: bool) -> Self {
        Self {
            k,
            sims: Tensor::full([q, k], f64::NEG_INFINITY, (Kind::Float, device)),
            ids: Tensor::full([q, k], NO_NEIGHBOUR, (Kind::Int64, device)),
            aux: with_aux.then(|| Tensor::full([q, k], -1, (Kind::Int64, device))),
        }
    }

    /// Merges candidates for the queries `rows` (all queries when `None`): `sims` [m, c],
    /// `ids` [m, c] and, when tracked, `aux` [m, c].
    pub fn offer(
        &mut self,
        rows: Option<&Tensor>,
        sims: &Tensor,
        ids: &Tensor,
        aux: Option<&Tensor>,
    ) {
        let current = |t: &Tensor| match rows {
            Some(r) => t.index_select(0, r),
            None => t.shallow_clone(),
        };
        let all_sims = Tensor::cat(&[current(&self.sims), sims.shallow_clone()], 1);
        let (best, pos) = all_sims.topk(self.k, 1, true, true);
        let pick = |mine: &Tensor, theirs: &Tensor| {
            Tensor::cat(&[current(mine), theirs.shallow_clone()], 1).gather(1, &pos, false)
        };
        let best_ids = pick(&self.ids, ids);
        let best_aux = match (&self.aux, aux) {
            (Some(mine), Some(theirs)) => Some(pick(mine, theirs)),
            _ => None,
        };
        match rows {
            Some(r) => {
                let _ = self.sims.index_copy_(0, r, &best);
                let _ = self.ids.index_copy_(0, r, &best_ids);
                if let (Some(mine), Some(b)) = (&mut self.aux, best_aux) {
                    let _ = mine.index_copy_(0, r, &b);
                }
            }
            None => {
                self.sims = best;
                self.ids = best_ids;
                if let Some(b) = best_aux {
                    self.aux = Some(b);
                }
            }
        }
    }

    /// Offers the best `k` of a score block `scores` [m, n] whose columns are rows `row_ids`
    /// [n] (and payload `row_aux` [n]).
    fn offer_block(
        &mut self,
        rows: Option<&Tensor>,
        scores: &Tensor,
        row_ids: &Tensor,
        row_aux: Option<&Tensor>,
    ) {
        let (m, n) = (scores.size()[0], scores.size()[1]);
        if n > self.k {
            let (s, pos) = scores.topk(self.k, 1, true, false);
            let flat = pos.view([-1]);
            let ids = row_ids.index_select(0, &flat).view([m, self.k]);
            let aux = row_aux.map(|a| a.index_select(0, &flat).view([m, self.k]));
            self.offer(rows, &s, &ids, aux.as_ref());
        } else {
            let ids = row_ids.unsqueeze(0).expand([m, n], false);
            let aux = row_aux.map(|a| a.unsqueeze(0).expand([m, n], false));
            self.offer(rows, scores, &ids, aux.as_ref());
        }
    }

    /// Marks slots still at −∞ (excluded or never filled) as [`NO_NEIGHBOUR`]; returns how
    /// many queries have fewer than k neighbours.
    pub fn finish(&mut self) -> i64 {
        let empty = self.sims.isinf();
        let _ = self.ids.masked_fill_(&empty, NO_NEIGHBOUR);
        if let Some(aux) = &mut self.aux {
            let _ = aux.masked_fill_(&empty, NO_NEIGHBOUR);
        }
        empty.any_dim(1, false).sum(Kind::Int64).int64_value(&[])
    }
}

/// Exact search: queries `q` [m, d] with ids `q_ids` `[m]` against database rows `rows` [n, d]
/// with ids `row_ids` `[n]`, merged into `top`.
pub fn exact_scan(
    top: &mut TopK,
    q: &Tensor,
    q_ids: &Tensor,
    rows: &Tensor,
    row_ids: &Tensor,
    row_aux: Option<&Tensor>,
    exclusion: Exclusion,
) {
    // Column chunks keep the score matrix small when many queries meet a large block.
    const CHUNK: i64 = 16_384;
    let n = rows.size()[0];
    for start in (0..n).step_by(CHUNK as usize) {
        let len = CHUNK.min(n - start);
        let ids = row_ids.narrow(0, start, len);
        let mut scores = q.matmul(&rows.narrow(0, start, len).tr());
        exclusion.apply(&mut scores, q_ids, &ids);
        let aux = row_aux.map(|a| a.narrow(0, start, len));
        top.offer_block(None, &scores, &ids, aux.as_ref());
    }
}

/// Exact top-k of queries `q` [m, d] over all of `rows` [n, d], finished (ground truth for
/// tests and benchmarks).
pub fn exact_knn(
    q: &Tensor,
    q_ids: &Tensor,
    rows: &Tensor,
    row_ids: &Tensor,
    k: i64,
    exclusion: Exclusion,
) -> TopK {
    let mut top = TopK::new(q.size()[0], k, q.device(), false);
    exact_scan(&mut top, q, q_ids, rows, row_ids, None, exclusion);
    top.finish();
    top
}

/// Applies `f` to chunks of 16 384 rows of `x` and concatenates the results, so score
/// matrices against many centroids stay small; `empty` is the result for no rows.
pub(crate) fn map_row_chunks(x: &Tensor, empty: Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    const CHUNK: i64 = 16_384;
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(CHUNK as usize)
        .map(|start| f(&x.narrow(0, start, CHUNK.min(n - start))))
        .collect();
    if parts.is_empty() {
        empty
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// The `nprobe` centroids of `centroids` [p, d] most similar to each row of `q` [m, d],
/// best first: [m, nprobe].
pub fn flat_probes(q: &Tensor, centroids: &Tensor, nprobe: i64) -> Tensor {
    let nprobe = nprobe.clamp(1, centroids.size()[0]);
    let empty = Tensor::zeros([0, nprobe], (Kind::Int64, q.device()));
    map_row_chunks(q, empty, |c| {
        c.matmul(&centroids.tr()).topk(nprobe, 1, true, true).1
    })
}

/// Assigns each row of `x` [n, d] to its most similar centroid of `centroids` [p, d].
pub fn assign(x: &Tensor, centroids: &Tensor) -> Tensor {
    let empty = Tensor::zeros([0], (Kind::Int64, x.device()));
    map_row_chunks(x, empty, |c| c.matmul(&centroids.tr()).argmax(1, false))
}

/// Start offsets of each partition in rows sorted by partition: `p + 1` values.
pub(crate) fn offsets(sorted_partition_of: &Tensor, partitions: i64) -> Vec<i64> {
    let counts = sorted_partition_of.bincount::<Tensor>(None, partitions);
    let ends: Vec<i64> = Vec::try_from(&counts.cumsum(0, Kind::Int64).to_device(Device::Cpu))
        .expect("a 1-D int64 tensor converts to Vec<i64>");
    std::iter::once(0).chain(ends).collect()
}

/// A block of queries prepared for IVF scanning: each query's probes, and for every
/// partition the list of queries that probe it.
#[derive(Debug)]
pub struct IvfQueries {
    /// Query vectors [m, d].
    pub emb: Tensor,
    /// Query ids `[m]`.
    pub ids: Tensor,
    /// Query row numbers grouped by probed partition (m · nprobe entries).
    by_partition: Tensor,
    /// For the same entries, the candidate slot `query * nprobe + probe rank`.
    slot_by_partition: Tensor,
    /// Partitions each query probes.
    nprobe: i64,
    /// Where each partition's group starts in `by_partition`.
    starts: Vec<i64>,
}

impl IvfQueries {
    /// Queries `emb` [m, d] with ids `ids` `[m]` that look in the partitions `probes`
    /// [m, nprobe] (from [`flat_probes`] or a two-level quantizer; [`NO_NEIGHBOUR`] where a
    /// query has fewer) of `partitions` partitions.
    pub fn new(emb: Tensor, ids: Tensor, probes: &Tensor, partitions: i64) -> Self {
        let nprobe = probes.size()[1].max(1);
        let flat = probes.reshape([-1]);
        let probed = flat.ge(0).nonzero().view([-1]);
        let (sorted, perm) = flat.index_select(0, &probed).sort_stable(true, 0, false);
        let slots = probed.index_select(0, &perm);
        Self {
            by_partition: slots.divide_scalar_mode(nprobe, "floor"),
            slot_by_partition: slots,
            nprobe,
            starts: offsets(&sorted, partitions),
            emb,
            ids,
        }
    }

    /// Number of queries.
    pub fn len(&self) -> i64 {
        self.emb.size()[0]
    }

    /// Whether the block is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scans one database block: `rows` [n, d] with ids `row_ids` `[n]`, payload `row_aux` `[n]`
    /// (merged into `top`'s `aux` when both track one) and partitions `row_partition` `[n]`
    /// (from [`assign`]), merging into `top`.
    ///
    /// Each (query, probed partition) pair has its own slot of k candidates, so partitions
    /// fill their slots independently and the block is merged into `top` once, at the end:
    /// a handful of tensor ops per partition rather than a merge each. Slots hold positions
    /// in the block; ids and payload are gathered once, after the last partition.
    pub fn scan(
        &self,
        top: &mut TopK,
        rows: &Tensor,
        row_ids: &Tensor,
        row_aux: Option<&Tensor>,
        row_partition: &Tensor,
        exclusion: Exclusion,
    ) {
        let p = self.starts.len() as i64 - 1;
        let (sorted, perm) = row_partition.sort_stable(true, 0, false);
        let aux = row_aux.map(|a| a.index_select(0, &perm));
        self.scan_sorted(
            top,
            &rows.index_select(0, &perm),
            &row_ids.index_select(0, &perm),
            aux.as_ref(),
            &offsets(&sorted, p),
            exclusion,
        );
    }

    /// [`IvfQueries::scan`] of rows already grouped by partition: partition `j` is rows
    /// `row_starts[j]..row_starts[j + 1]` of `rows`, `row_ids` and `row_aux`.
    pub fn scan_sorted(
        &self,
        top: &mut TopK,
        rows: &Tensor,
        row_ids: &Tensor,
        row_aux: Option<&Tensor>,
        row_starts: &[i64],
        exclusion: Exclusion,
    ) {
        let p = self.starts.len() as i64 - 1;
        let (m, k, device) = (self.len(), top.k, rows.device());
        let slots = m * self.nprobe;
        let mut cand_sims = Tensor::full([slots, k], f64::NEG_INFINITY, (Kind::Float, device));
        // Empty slots point at position 0; their similarity stays −∞, so they never win a
        // place that a real candidate could take, and `finish` marks them.
        let mut cand_pos = Tensor::zeros([slots, k], (Kind::Int64, device));
        for part in 0..p as usize {
            let (qa, qb) = (self.starts[part], self.starts[part + 1]);
            let (ra, rb) = (row_starts[part], row_starts[part + 1]);
            if qa == qb || ra == rb {
                continue;
            }
            let q_rows = self.by_partition.narrow(0, qa, qb - qa);
            let q = self.emb.index_select(0, &q_rows);
            let q_ids = self.ids.index_select(0, &q_rows);
            let block = rows.narrow(0, ra, rb - ra);
            let block_ids = row_ids.narrow(0, ra, rb - ra);
            let mut scores = q.matmul(&block.tr());
            exclusion.apply(&mut scores, &q_ids, &block_ids);
            let (qn, n) = (qb - qa, rb - ra);
            let slot = self.slot_by_partition.narrow(0, qa, qn);
            if n >= k {
                let (s, pos) = scores.topk(k, 1, true, false);
                let _ = cand_sims.index_copy_(0, &slot, &s);
                let _ = cand_pos.index_copy_(0, &slot, &(pos + ra));
            } else {
                let pos = Tensor::arange_start(ra, rb, (Kind::Int64, device))
                    .unsqueeze(0)
                    .expand([qn, n], false);
                let _ = cand_sims.narrow(1, 0, n).index_copy_(0, &slot, &scores);
                let _ = cand_pos.narrow(1, 0, n).index_copy_(0, &slot, &pos);
            }
        }
        let flat = cand_pos.view([-1]);
        let gather = |per_row: &Tensor| per_row.index_select(0, &flat).view([m, self.nprobe * k]);
        let cand_ids = gather(row_ids);
        let cand_aux = row_aux.map(gather);
        top.offer(
            None,
            &cand_sims.view([m, self.nprobe * k]),
            &cand_ids,
            cand_aux.as_ref(),
        );
    }
}

/// For each query of `q` [m, d], the rank (0 = most similar) of every centroid [m, p].
pub fn centroid_ranks(q: &Tensor, centroids: &Tensor) -> Tensor {
    let (m, p) = (q.size()[0], centroids.size()[0]);
    let order = q.matmul(&centroids.tr()).argsort(1, true);
    let ranks = Tensor::zeros([m, p], (Kind::Int64, q.device()));
    let positions = Tensor::arange(p, (Kind::Int64, q.device()))
        .unsqueeze(0)
        .expand([m, p], false)
        .contiguous();
    ranks.scatter(1, &order, &positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalised(n: i64, d: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
        &x / x.norm_scalaropt_dim(2.0, [1], true)
    }

    fn ids(n: i64) -> Tensor {
        Tensor::arange(n, (Kind::Int64, Device::Cpu)) * 7919 + 13
    }

    #[test]
    fn exact_matches_full_sort_and_skips_self() {
        let x = normalised(300, 16, 1);
        let id = ids(300);
        let mut top = TopK::new(300, 5, Device::Cpu, false);
        // Two database blocks, to exercise the running merge.
        for (a, n) in [(0, 170), (170, 130)] {
            exact_scan(
                &mut top,
                &x,
                &id,
                &x.narrow(0, a, n),
                &id.narrow(0, a, n),
                None,
                Exclusion::default(),
            );
        }
        let mut full = x.matmul(&x.tr());
        let _ = full.fill_diagonal_(f64::NEG_INFINITY, false);
        let (want_sims, want_pos) = full.topk(5, 1, true, true);
        assert!(top.sims.allclose(&want_sims, 1e-6, 1e-6, false));
        assert!(top
            .ids
            .equal(&id.index_select(0, &want_pos.view([-1])).view([300, 5])));
        assert_eq!(top.finish(), 0);
    }

    #[test]
    fn ivf_with_every_partition_probed_is_exact() {
        let x = normalised(400, 8, 2);
        let id = ids(400);
        let centroids = x.narrow(0, 0, 12).copy();
        let part = assign(&x, &centroids);
        let probes = flat_probes(&x.narrow(0, 0, 100), &centroids, 12);
        let queries = IvfQueries::new(x.narrow(0, 0, 100), id.narrow(0, 0, 100), &probes, 12);
        // The payload is each row's position: it must travel with the id it belongs to.
        let row = Tensor::arange(400, (Kind::Int64, Device::Cpu));
        let mut ivf = TopK::new(100, 10, Device::Cpu, true);
        queries.scan(&mut ivf, &x, &id, Some(&row), &part, Exclusion::default());
        let aux = ivf.aux.as_ref().unwrap();
        assert!(id
            .index_select(0, &aux.view([-1]))
            .view([100, 10])
            .equal(&ivf.ids));
        let mut exact = TopK::new(100, 10, Device::Cpu, false);
        exact_scan(
            &mut exact,
            &x.narrow(0, 0, 100),
            &id.narrow(0, 0, 100),
            &x,
            &id,
            None,
            Exclusion::default(),
        );
        assert!(ivf.ids.equal(&exact.ids));
    }

    #[test]
    fn duplicates_are_excluded_and_short_lists_are_marked() {
        // Row 1 duplicates row 0; row 2 is distinct.
        let x = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0, 0.0, 1.0]).view([3, 2]);
        let id = ids(3);
        let mut top = TopK::new(3, 2, Device::Cpu, false);
        let ex = Exclusion {
            duplicate_similarity: Some(0.99),
        };
        exact_scan(&mut top, &x, &id, &x, &id, None, ex);
        let short = top.finish();
        let got: Vec<i64> = Vec::try_from(top.ids.view([-1])).unwrap();
        // Row 0: its duplicate (row 1) is excluded, row 2 remains, then nothing; likewise
        // row 1. Row 2 has both others.
        assert_eq!(&got[0..2], &[id.int64_value(&[2]), NO_NEIGHBOUR]);
        assert_eq!(&got[2..4], &[id.int64_value(&[2]), NO_NEIGHBOUR]);
        assert_eq!(short, 2);
    }

    #[test]
    fn ivf_short_lists_mark_ids_and_payload_empty() {
        // Three rows in partitions of one or two rows (fewer than k = 4): every query gets
        // the two others, and the two slots left are marked in both ids and payload.
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.8, 0.6, 0.0, 1.0]).view([3, 2]);
        let id = ids(3);
        let row = Tensor::from_slice(&[10i64, 11, 12]);
        let part = assign(&x, &x.narrow(0, 0, 2));
        let probes = flat_probes(&x, &x.narrow(0, 0, 2), 2);
        let queries = IvfQueries::new(x.shallow_clone(), id.shallow_clone(), &probes, 2);
        let mut top = TopK::new(3, 4, Device::Cpu, true);
        queries.scan(&mut top, &x, &id, Some(&row), &part, Exclusion::default());
        assert_eq!(top.finish(), 3);
        let got: Vec<i64> = Vec::try_from(top.ids.view([-1])).unwrap();
        let aux: Vec<i64> = Vec::try_from(top.aux.unwrap().view([-1])).unwrap();
        for q in 0..3 {
            let want_rows: Vec<i64> = (0..3).filter(|&r| r != q).collect();
            let mut rows = aux[q as usize * 4..q as usize * 4 + 2].to_vec();
            rows.sort_unstable();
            assert_eq!(rows, want_rows.iter().map(|r| r + 10).collect::<Vec<_>>());
            for j in 0..2 {
                let r = aux[q as usize * 4 + j] - 10;
                assert_eq!(got[q as usize * 4 + j], id.int64_value(&[r]));
            }
            assert_eq!(
                &got[q as usize * 4 + 2..q as usize * 4 + 4],
                &[NO_NEIGHBOUR; 2]
            );
            assert_eq!(
                &aux[q as usize * 4 + 2..q as usize * 4 + 4],
                &[NO_NEIGHBOUR; 2]
            );
        }
    }

    #[test]
    fn centroid_ranks_invert_the_order() {
        let q = normalised(4, 6, 3);
        let c = normalised(5, 6, 4);
        let ranks = centroid_ranks(&q, &c);
        let best = q.matmul(&c.tr()).argmax(1, false);
        let at_best = ranks.gather(1, &best.unsqueeze(1), false);
        assert!(at_best.eq(0).all().int64_value(&[]) == 1);
        assert!(
            ranks
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)
                .eq(10)
                .all()
                .int64_value(&[])
                == 1
        );
    }
}
