//! Measures of generated images against real ones and against their captions, as pure
//! functions on `[n, d]` embedding tensors, computed in f64 on the tensors' device:
//! - [`frechet_distance`]: the Fréchet distance between Gaussians fitted to two sets of
//!   features (FID's formula; FD_CLIP when the features are CLIP image embeddings,
//!   Kynkäänniemi et al. 2023, arXiv 2203.06026);
//! - [`precision_recall`]: improved precision and recall (Kynkäänniemi et al. 2019, arXiv
//!   1904.06991): the share of generated samples inside the real set's k-NN manifold
//!   (fidelity), and of real samples inside the generated set's (diversity);
//! - [`r_precision`]: text alignment, how often an image's own caption ranks first among
//!   itself and distractors (Xu et al. 2018, AttnGAN), with [`r_precision_candidates`]
//!   drawing the distractors.
//!
//! `python/make_eval_fixture.py` computes the same measures with numpy and scipy (`sqrtm`)
//! for the tests.

use crate::rng::SampleRng;
use crate::{Result, TrainerError};
use knn_indexer::clip::l2_normalize;
use tch::{Kind, Tensor};

/// Rows of the pairwise-distance blocks in [`precision_recall`] (memory: rows × set × 8 B).
const BLOCK_ROWS: i64 = 1024;

fn bad(measure: &'static str, reason: impl Into<String>) -> TrainerError {
    TrainerError::Measure {
        measure,
        reason: reason.into(),
    }
}

/// Checks that `x` is `[n, d]` with n ≥ `min_rows` and returns (n, d).
fn rows(measure: &'static str, what: &str, x: &Tensor, min_rows: i64) -> Result<(i64, i64)> {
    let size = x.size();
    let [n, d] = size[..] else {
        return Err(bad(measure, format!("{what} must be [n, d], got {size:?}")));
    };
    if n < min_rows {
        return Err(bad(
            measure,
            format!("{what} has {n} rows; it needs at least {min_rows}"),
        ));
    }
    Ok((n, d))
}

/// Mean `[d]` and covariance `[d, d]` (unbiased: divided by n − 1, as `numpy.cov`) of the
/// rows of `x` `[n, d]`, in f64.
pub fn mean_cov(x: &Tensor) -> (Tensor, Tensor) {
    let x = x.to_kind(Kind::Double);
    let n = x.size()[0];
    let mu = x.mean_dim(0, false, Kind::Double);
    let c = &x - &mu;
    let cov = c.transpose(0, 1).matmul(&c) / (n - 1) as f64;
    (mu, cov)
}

/// The square root of a symmetric positive semi-definite matrix, from its eigendecomposition
/// (eigenvalues below zero by rounding count as zero).
fn sqrt_psd(m: &Tensor) -> Tensor {
    let (w, v) = m.linalg_eigh("L");
    let s = w.clamp_min(0.0).sqrt();
    (&v * s.unsqueeze(0)).matmul(&v.transpose(0, 1))
}

/// The Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂):
/// ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½.
///
/// tr (Σ₁Σ₂)^½ is the sum of the square roots of the eigenvalues of Σ₁^½ Σ₂ Σ₁^½, which is
/// similar to Σ₁Σ₂ and symmetric, so only symmetric eigendecompositions are needed: no
/// complex `sqrtm`, and singular covariances (fewer samples than dimensions) are fine.
pub fn frechet_distance_gaussians(mu1: &Tensor, cov1: &Tensor, mu2: &Tensor, cov2: &Tensor) -> f64 {
    let (mu1, mu2) = (mu1.to_kind(Kind::Double), mu2.to_kind(Kind::Double));
    let (cov1, cov2) = (cov1.to_kind(Kind::Double), cov2.to_kind(Kind::Double));
    let s1 = sqrt_psd(&cov1);
    let inner = s1.matmul(&cov2).matmul(&s1);
    let inner = (&inner + inner.transpose(0, 1)) / 2.0; // exactly symmetric for eigh
    let tr_sqrt = inner
        .linalg_eigvalsh("L")
        .clamp_min(0.0)
        .sqrt()
        .sum(Kind::Double)
        .double_value(&[]);
    let diff = (&mu1 - &mu2).square().sum(Kind::Double).double_value(&[]);
    let tr = |c: &Tensor| c.trace().double_value(&[]);
    diff + tr(&cov1) + tr(&cov2) - 2.0 * tr_sqrt
}

/// The Fréchet distance between Gaussians fitted to the rows of `a` `[n, d]` and `b`
/// `[m, d]` (each at least 2 rows). FID and FD_CLIP are this on Inception or CLIP features.
/// Few rows bias it upwards; compare runs at the same sample counts.
pub fn frechet_distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    const M: &str = "Fréchet distance";
    let (_, da) = rows(M, "the first set", a, 2)?;
    let (_, db) = rows(M, "the second set", b, 2)?;
    if da != db {
        return Err(bad(M, format!("the sets have {da} and {db} dimensions")));
    }
    let (mu1, cov1) = mean_cov(a);
    let (mu2, cov2) = mean_cov(b);
    Ok(frechet_distance_gaussians(&mu1, &cov1, &mu2, &cov2))
}

/// Each row's distance to its `k`-th nearest other row of `x` (Euclidean).
fn kth_neighbour_radii(x: &Tensor, k: usize) -> Tensor {
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(BLOCK_ROWS as usize)
        .map(|start| {
            let len = BLOCK_ROWS.min(n - start);
            let d = Tensor::cdist(&x.narrow(0, start, len), x, 2.0, Some(2));
            // The row itself is at distance 0, the first of the sorted distances.
            d.kthvalue(k as i64 + 1, 1, false).0
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// The share of `points` within `radii[j]` of some `set[j]` (inclusive).
fn share_inside(points: &Tensor, set: &Tensor, radii: &Tensor) -> f64 {
    let n = points.size()[0];
    let inside: i64 = (0..n)
        .step_by(BLOCK_ROWS as usize)
        .map(|start| {
            let len = BLOCK_ROWS.min(n - start);
            let d = Tensor::cdist(&points.narrow(0, start, len), set, 2.0, Some(2));
            d.le_tensor(&radii.unsqueeze(0))
                .any_dim(1, false)
                .sum(Kind::Int64)
                .int64_value(&[])
        })
        .sum();
    inside as f64 / n as f64
}

/// Improved precision and recall with `k`-NN balls (Kynkäänniemi et al. 2019 use k = 3): a
/// sample lies in a set's manifold when it is within some member's distance to that member's
/// k-th nearest other member. Precision is the share of `fake` rows in the manifold of
/// `real`; recall the share of `real` rows in the manifold of `fake`. Both sets need more
/// than `k` rows.
pub fn precision_recall(real: &Tensor, fake: &Tensor, k: usize) -> Result<(f64, f64)> {
    const M: &str = "precision/recall";
    if k == 0 {
        return Err(bad(M, "k must be at least 1"));
    }
    let (_, dr) = rows(M, "the real set", real, k as i64 + 1)?;
    let (_, df) = rows(M, "the generated set", fake, k as i64 + 1)?;
    if dr != df {
        return Err(bad(M, format!("the sets have {dr} and {df} dimensions")));
    }
    let (real, fake) = (real.to_kind(Kind::Double), fake.to_kind(Kind::Double));
    let precision = share_inside(&fake, &real, &kth_neighbour_radii(&real, k));
    let recall = share_inside(&real, &fake, &kth_neighbour_radii(&fake, k));
    Ok((precision, recall))
}

/// R-precision at R = 1: the share of images whose own caption has the highest cosine
/// similarity among `candidates[i]` (image i's caption first, then its distractors), with
/// `images` `[n, d]` and `texts` `[m, d]` indexed by the candidates. A distractor that
/// scores exactly as high as the true caption counts against it.
pub fn r_precision(images: &Tensor, texts: &Tensor, candidates: &[Vec<usize>]) -> Result<f64> {
    const M: &str = "R-precision";
    let (n, di) = rows(M, "the images", images, 1)?;
    let (m, dt) = rows(M, "the captions", texts, 1)?;
    if di != dt {
        return Err(bad(
            M,
            format!("images have {di} dimensions, captions {dt}"),
        ));
    }
    if candidates.len() as i64 != n {
        return Err(bad(
            M,
            format!("{} candidate lists for {n} images", candidates.len()),
        ));
    }
    if let Some((i, c)) = candidates
        .iter()
        .enumerate()
        .find(|(_, c)| c.len() < 2 || c.iter().any(|&j| j as i64 >= m))
    {
        return Err(bad(
            M,
            format!(
                "image {i}'s candidates {c:?} need a caption and a distractor among {m} captions"
            ),
        ));
    }
    let unit = |x: &Tensor| l2_normalize(&x.to_kind(Kind::Double));
    let sims = unit(images).matmul(&unit(texts).transpose(0, 1)); // [n, m]
    let sims = Vec::<f64>::try_from(sims.to_device(tch::Device::Cpu).view([-1]))?;
    let hits = candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| {
            let row = &sims[i * m as usize..(i + 1) * m as usize];
            let truth = row[c[0]];
            c[1..].iter().all(|&j| row[j] < truth)
        })
        .count();
    Ok(hits as f64 / n as f64)
}

/// Candidate lists for [`r_precision`]: for image i, caption `truth[i]` then `distractors`
/// other captions drawn without replacement by `seed`, none of them the same text as the
/// truth (a duplicate caption is not a wrong one). The paper's setting is 99 distractors.
pub fn r_precision_candidates<T: PartialEq>(
    captions: &[T],
    truth: &[usize],
    distractors: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    const M: &str = "R-precision";
    truth
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let Some(own) = captions.get(t) else {
                return Err(bad(
                    M,
                    format!("image {i}'s caption {t} is not among {} captions", captions.len()),
                ));
            };
            let mut pool: Vec<usize> = (0..captions.len())
                .filter(|&j| captions[j] != *own)
                .collect();
            if pool.len() < distractors {
                return Err(bad(
                    M,
                    format!(
                        "image {i} has {} captions unlike its own to draw {distractors} distractors from; use fewer distractors or more captions",
                        pool.len()
                    ),
                ));
            }
            let mut rng = SampleRng::new(seed, 0, i as u64);
            let mut out = Vec::with_capacity(distractors + 1);
            out.push(t);
            // A partial Fisher–Yates shuffle: the first `distractors` of the pool.
            for s in 0..distractors {
                let r = s + (rng.next_u64() % (pool.len() - s) as u64) as usize;
                pool.swap(s, r);
                out.push(pool[s]);
            }
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_sets_are_at_distance_zero_and_a_shift_adds_its_square() {
        let x = Tensor::randn([200, 6], (Kind::Double, tch::Device::Cpu));
        assert!(frechet_distance(&x, &x).unwrap().abs() < 1e-9);
        let shifted = &x + 2.0;
        let fd = frechet_distance(&x, &shifted).unwrap();
        assert!((fd - 6.0 * 4.0).abs() < 1e-8, "{fd}");
    }

    #[test]
    fn a_set_covers_itself_and_not_a_far_one() {
        let x = Tensor::randn([50, 4], (Kind::Double, tch::Device::Cpu));
        assert_eq!(precision_recall(&x, &x, 3).unwrap(), (1.0, 1.0));
        let far = &x + 100.0;
        assert_eq!(precision_recall(&x, &far, 3).unwrap(), (0.0, 0.0));
        assert!(precision_recall(&x.narrow(0, 0, 3), &x, 3).is_err());
    }

    #[test]
    fn candidates_skip_copies_of_the_truth_and_repeat_by_seed() {
        let caps = ["cat", "dog", "cat", "sun", "moon", "star"];
        let c = r_precision_candidates(&caps, &[0, 3], 3, 7).unwrap();
        assert_eq!(c[0][0], 0);
        assert!(c[0][1..].iter().all(|&j| caps[j] != "cat"), "{c:?}");
        let mut seen = c[1].clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4, "no caption twice: {c:?}");
        assert_eq!(c, r_precision_candidates(&caps, &[0, 3], 3, 7).unwrap());
        let err = r_precision_candidates(&caps, &[0], 5, 7).unwrap_err();
        assert!(
            matches!(&err, TrainerError::Measure { measure: "R-precision", reason }
                if reason.contains("4 captions unlike its own")),
            "{err}"
        );
    }
}
