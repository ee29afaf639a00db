//! Which IVF partitions a vector belongs to and looks in: the coarse quantizer of
//! `precompute-knn`'s search plan.
//!
//! - **Flat** (the default): every centroid is scored; a query costs `p · d`.
//! - **Two-level** (`knn.ivf.cells = c`): the `p` partition centroids are grouped into `c`
//!   cells, each with its own centroid, and a vector scores only the partitions of its
//!   `probe` most similar cells: `(c + probe · p / c) · d` instead of `p · d`. Training is
//!   two-level too: k-means into cells, then k-means inside each cell into its share of the
//!   partitions. It pays on data with coarse structure (cells that mean something, as
//!   semantic embeddings have); on the benchmark's clusters around random directions a
//!   cell's centroid carries almost nothing, and at 1M rows it needed nprobe 52 where flat
//!   needs 2 (BENCHMARKS.md, "scale: precompute-knn").
//!
//! The partitions of a cell are contiguous, so the fine step is the same grouped GEMM as the
//! search itself ([`IvfQueries::scan_sorted`] over the centroids).

use super::search::{
    assign, flat_probes, map_row_chunks, offsets, Exclusion, IvfQueries, TopK, NO_NEIGHBOUR,
};
use std::collections::HashSet;
use tch::{Device, Kind, Tensor};

/// Cells a row looks in for its own partition: the best partition among them is almost
/// always the best of all, at a fraction of the cost.
pub const ASSIGN_CELL_PROBE: usize = 4;

/// The cells of a two-level quantizer.
#[derive(Debug)]
pub struct Cells {
    /// Unit-norm cell centroids [c, d].
    pub centroids: Tensor,
    /// The partitions of cell `j` are `starts[j]..starts[j + 1]` (`c + 1` values).
    pub starts: Vec<i64>,
    /// Cells a query looks in (calibrated with `nprobe`).
    pub probe: usize,
    /// Cells a row looks in for its own partition.
    pub assign_probe: usize,
}

impl Cells {
    /// Number of cells.
    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// Whether there are no cells.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cell of every partition, `[p]`.
    pub fn of_partition(&self, device: Device) -> Tensor {
        let counts: Vec<i64> = self.starts.windows(2).map(|w| w[1] - w[0]).collect();
        Tensor::arange(self.len() as i64, (Kind::Int64, device)).repeat_interleave_self_tensor(
            &Tensor::from_slice(&counts).to_device(device),
            0,
            None,
        )
    }
}

/// Partition centroids, flat or grouped into cells.
#[derive(Debug)]
pub struct Quantizer {
    /// Unit-norm partition centroids [p, d] (grouped by cell when there are cells).
    pub centroids: Tensor,
    /// The cells, for a two-level quantizer.
    pub cells: Option<Cells>,
}

impl Quantizer {
    /// A flat quantizer of `centroids` [p, d].
    pub fn flat(centroids: Tensor) -> Self {
        Self {
            centroids,
            cells: None,
        }
    }

    /// Number of partitions.
    pub fn partitions(&self) -> usize {
        self.centroids.size()[0] as usize
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            centroids: self.centroids.to_device(device),
            cells: self.cells.as_ref().map(|c| Cells {
                centroids: c.centroids.to_device(device),
                starts: c.starts.clone(),
                probe: c.probe,
                assign_probe: c.assign_probe,
            }),
        }
    }

    /// The `nprobe` partitions each row of `q` [m, d] looks in, best first: [m, nprobe],
    /// [`NO_NEIGHBOUR`] where the cells it looks in hold fewer partitions.
    pub fn probes(&self, q: &Tensor, nprobe: i64) -> Tensor {
        let cell_probe = self.cells.as_ref().map_or(0, |c| c.probe);
        self.probes_in(q, nprobe, cell_probe)
    }

    /// The partition of each row of `x` [n, d].
    pub fn assign(&self, x: &Tensor) -> Tensor {
        match &self.cells {
            None => assign(x, &self.centroids),
            Some(c) => self.probes_in(x, 1, c.assign_probe).view([-1]),
        }
    }

    fn probes_in(&self, q: &Tensor, nprobe: i64, cell_probe: usize) -> Tensor {
        let p = self.centroids.size()[0];
        let nprobe = nprobe.clamp(1, p);
        let Some(cells) = &self.cells else {
            return flat_probes(q, &self.centroids, nprobe);
        };
        let device = q.device();
        let partition_ids = Tensor::arange(p, (Kind::Int64, device));
        let empty = Tensor::zeros([0, nprobe], (Kind::Int64, device));
        map_row_chunks(q, empty, |chunk| {
            let m = chunk.size()[0];
            let cell_probes = flat_probes(chunk, &cells.centroids, cell_probe.max(1) as i64);
            // Query ids no partition id equals, so nothing is excluded.
            let no_ids = Tensor::full([m], NO_NEIGHBOUR - 1, (Kind::Int64, device));
            let queries = IvfQueries::new(
                chunk.shallow_clone(),
                no_ids,
                &cell_probes,
                cells.len() as i64,
            );
            let mut top = TopK::new(m, nprobe, device, false);
            queries.scan_sorted(
                &mut top,
                &self.centroids,
                &partition_ids,
                None,
                &cells.starts,
                Exclusion::default(),
            );
            top.finish();
            top.ids
        })
    }

    /// Trains `p` partitions on the unit rows of `x` (spherical k-means); in `cells` cells
    /// when that is 2 or more (`probe = 1` until the calibration sets it), else flat.
    pub fn train(x: &Tensor, p: usize, cells: usize, iterations: usize, seed: u64) -> Self {
        let n = x.size()[0] as usize;
        let p = p.clamp(1, n.max(1));
        let c = cells.min(p);
        if c < 2 {
            return Self::flat(spherical_kmeans(x, p as i64, iterations, seed));
        }
        let coarse = spherical_kmeans(x, c as i64, iterations, seed);
        let (sorted, perm) = assign(x, &coarse).sort_stable(true, 0, false);
        let x = x.index_select(0, &perm);
        let rows_at = offsets(&sorted, c as i64);
        let counts: Vec<usize> = rows_at.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
        let shares = shares_of(p, &counts);
        let (mut fine, mut starts) = (Vec::with_capacity(c), vec![0i64]);
        for (j, &share) in shares.iter().enumerate() {
            if share > 0 {
                let rows = x.narrow(0, rows_at[j], counts[j] as i64);
                let s = seed.wrapping_add(1 + j as u64);
                fine.push(spherical_kmeans(&rows, share as i64, iterations, s));
            }
            starts.push(starts[j] + share as i64);
        }
        Self {
            centroids: Tensor::cat(&fine, 0),
            cells: Some(Cells {
                centroids: coarse,
                starts,
                probe: 1,
                assign_probe: ASSIGN_CELL_PROBE.min(c),
            }),
        }
    }
}

/// `p` partitions shared among cells of `counts` rows, in proportion (largest remainder),
/// each cell with rows getting at least one and no more than its rows (so the sum exceeds
/// `p` only when more cells than `p` have rows).
fn shares_of(p: usize, counts: &[usize]) -> Vec<usize> {
    let n: usize = counts.iter().sum();
    if n == 0 {
        return vec![0; counts.len()];
    }
    let exact: Vec<f64> = counts
        .iter()
        .map(|&r| p as f64 * r as f64 / n as f64)
        .collect();
    let mut shares: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let left = p.saturating_sub(shares.iter().sum());
    for &j in order.iter().take(left) {
        shares[j] += 1;
    }
    for (s, &r) in shares.iter_mut().zip(counts) {
        *s = (*s).clamp(usize::from(r > 0), r);
    }
    // Raising small cells to one partition may overshoot p: take back from the largest.
    while shares.iter().sum::<usize>() > p {
        let (j, &most) = shares
            .iter()
            .enumerate()
            .max_by_key(|(j, s)| (**s, std::cmp::Reverse(*j)))
            .expect("at least one cell");
        if most <= 1 {
            break;
        }
        shares[j] -= 1;
    }
    shares
}

/// A deterministic stream of pseudo-random numbers (SplitMix64).
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
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
        let t = rng.next_u64() % (j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut v: Vec<u64> = chosen.into_iter().collect();
    v.sort_unstable();
    v
}

/// Spherical k-means of the unit rows of `x` into `p` unit centroids (Lloyd iterations with
/// re-normalised means; an empty partition is re-seeded with the rows least similar to
/// their centroid).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn clustered(n: i64, clusters: i64, d: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let centres = Tensor::randn([clusters, d], (Kind::Float, Device::Cpu));
        let which = Tensor::randint(clusters, [n], (Kind::Int64, Device::Cpu));
        let x = centres.index_select(0, &which)
            + Tensor::randn([n, d], (Kind::Float, Device::Cpu)) * 0.3;
        &x / x.norm_scalaropt_dim(2.0, [1], true)
    }

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

    #[test]
    fn shares_follow_the_rows_and_sum_to_p() {
        assert_eq!(shares_of(10, &[50, 30, 20]), vec![5, 3, 2]);
        assert_eq!(shares_of(4, &[1, 1, 100]).iter().sum::<usize>(), 4);
        // A cell is never given more partitions than rows, and an empty cell none.
        assert_eq!(shares_of(10, &[0, 2, 8]), vec![0, 2, 8]);
        assert_eq!(
            shares_of(3, &[1, 1, 1, 1])
                .iter()
                .filter(|&&s| s == 1)
                .count(),
            4
        );
    }

    #[test]
    fn two_level_probes_match_flat_when_every_cell_is_searched() {
        let x = clustered(6000, 300, 16, 1);
        let mut q = Quantizer::train(&x, 2500, 50, 4, 7);
        let cells = q.cells.as_ref().expect("50 cells: two-level");
        let c = cells.len();
        assert_eq!(*cells.starts.last().unwrap() as usize, q.partitions());
        assert!(cells.starts.windows(2).all(|w| w[0] <= w[1]));
        let queries = x.narrow(0, 0, 500);
        let flat = flat_probes(&queries, &q.centroids, 5);
        q.cells.as_mut().unwrap().probe = c;
        assert!(
            q.probes(&queries, 5).equal(&flat),
            "all cells: same as flat"
        );
        // With fewer cells, a probe list is the best partitions of the best cells: each
        // probed partition lies in one of them, and they are in order of similarity.
        q.cells.as_mut().unwrap().probe = 2;
        let probes = q.probes(&queries, 5);
        let cells = q.cells.as_ref().unwrap();
        let of = cells.of_partition(Device::Cpu);
        let best_cells = flat_probes(&queries, &cells.centroids, 2);
        let probed_cells = of
            .index_select(0, &probes.clamp_min(0).view([-1]))
            .view([500, 5]);
        let inside = probed_cells
            .unsqueeze(2)
            .eq_tensor(&best_cells.unsqueeze(1))
            .any_dim(2, false);
        assert!(inside.logical_or(&probes.lt(0)).all().int64_value(&[]) == 1);
        let sims = queries
            .matmul(&q.centroids.tr())
            .gather(1, &probes.clamp_min(0), false);
        let later = sims.narrow(1, 1, 4);
        let earlier = sims.narrow(1, 0, 4);
        assert!(
            earlier
                .ge_tensor(&later)
                .logical_or(&probes.narrow(1, 1, 4).lt(0))
                .all()
                .int64_value(&[])
                == 1
        );
        // Assignment agrees with the flat best partition for almost every row.
        let agree = q
            .assign(&x)
            .eq_tensor(&assign(&x, &q.centroids))
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(agree > 0.98, "assignment agrees with flat for {agree}");
    }
}
