//! One set of generated images read against the held-out set, in the judge's space: FD_CLIP
//! and precision/recall against the held-out images, CLIP score and R-precision against the
//! held-out captions ([`Reference::measure`]); which style centroid each image is nearest
//! ([`style_shares`]); the score of generated images ([`mean_colourfulness`]).

use super::metrics::{frechet_distance, precision_recall, r_precision, r_precision_candidates};
use crate::sampling::to_rgb_images;
use crate::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The measures of one set of images made for the held-out captions (row i for caption i).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Measures {
    /// Fréchet distance to the held-out images in the judge's image space (lower: closer).
    pub fd_clip: f64,
    /// Share of the images inside the held-out images' k-NN manifold (fidelity).
    pub precision: f64,
    /// Share of the held-out images inside the images' manifold (diversity).
    pub recall: f64,
    /// Mean judge cosine of each image with its caption.
    pub clip_score: f64,
    /// Share of images whose caption ranks first among it and the distractors.
    pub r_precision: f64,
}

impl Measures {
    /// `(name, value, higher is better)` of each measure.
    pub fn named(&self) -> [(&'static str, f64, bool); 5] {
        [
            ("fd_clip", self.fd_clip, false),
            ("precision", self.precision, true),
            ("recall", self.recall, true),
            ("clip_score", self.clip_score, true),
            ("r_precision", self.r_precision, true),
        ]
    }
}

/// What generated images are read against: the judge's embeddings of the held-out images
/// and captions, and each image's R-precision candidates.
pub struct Reference {
    /// Held-out images `[n, d]`, L2-normalised.
    pub real: Tensor,
    /// Their captions `[n, d]`, L2-normalised.
    pub texts: Tensor,
    /// Candidates per image: its caption, then the distractors.
    pub candidates: Vec<Vec<usize>>,
    /// Distractors per image.
    pub distractors: usize,
    /// k of precision and recall.
    pub pr_k: usize,
}

impl Reference {
    /// Draws `distractors` per caption (fewer when fewer other captions exist, said in the
    /// log) with `seed`.
    pub fn new(
        real: Tensor,
        texts: Tensor,
        captions: &[String],
        distractors: usize,
        pr_k: usize,
        seed: u64,
    ) -> Result<Self> {
        let n = captions.len();
        // Each caption can draw from every other distinct caption, duplicates of it aside.
        let most_common = {
            let mut counts = std::collections::HashMap::new();
            for c in captions {
                *counts.entry(c).or_insert(0usize) += 1;
            }
            counts.values().copied().max().unwrap_or(0)
        };
        let available = n - most_common;
        let d = distractors.min(available);
        if d < distractors {
            tracing::warn!(
                wanted = distractors,
                used = d,
                captions = n,
                "fewer held-out captions than R-precision distractors: using fewer (chance is \
                 1/(distractors + 1))"
            );
        }
        let truth: Vec<usize> = (0..n).collect();
        let candidates = r_precision_candidates(captions, &truth, d.max(1), seed)?;
        Ok(Self {
            real,
            texts,
            candidates,
            distractors: d.max(1),
            pr_k,
        })
    }

    /// The measures of `fake` (`[n, d]` judge embeddings, row i made for caption i).
    pub fn measure(&self, fake: &Tensor) -> Result<Measures> {
        self.measure_parts(fake, true, true)
    }

    /// The image measures (against the held-out images) and the text ones (against their
    /// captions) of `fake`, each only when asked (NaN otherwise): images that were not made
    /// for the captions have no text alignment, the held-out images none against themselves.
    pub fn measure_parts(&self, fake: &Tensor, image: bool, text: bool) -> Result<Measures> {
        let (precision, recall) = if image {
            precision_recall(&self.real, fake, self.pr_k)?
        } else {
            (f64::NAN, f64::NAN)
        };
        let fd_clip = if image {
            frechet_distance(&self.real, fake)?
        } else {
            f64::NAN
        };
        let (clip_score, r_prec) = if text {
            (
                (fake * &self.texts)
                    .sum_dim_intlist(1, false, Kind::Double)
                    .mean(Kind::Double)
                    .double_value(&[]),
                r_precision(fake, &self.texts, &self.candidates)?,
            )
        } else {
            (f64::NAN, f64::NAN)
        };
        Ok(Measures {
            fd_clip,
            precision,
            recall,
            clip_score,
            r_precision: r_prec,
        })
    }
}

/// The share of `images` (`[n, d]`) nearest (cosine) to each of `centroids` (`[s, d]`).
pub fn style_shares(images: &Tensor, centroids: &Tensor) -> Result<Vec<f64>> {
    let nearest = Vec::<i64>::try_from(
        images
            .matmul(&centroids.tr())
            .argmax(1, false)
            .to_device(Device::Cpu),
    )?;
    let s = centroids.size()[0] as usize;
    let mut counts = vec![0usize; s];
    for i in &nearest {
        counts[*i as usize] += 1;
    }
    Ok(counts
        .iter()
        .map(|&c| c as f64 / nearest.len().max(1) as f64)
        .collect())
}

/// The L2-normalised mean of L2-normalised embeddings `[n, d]`: a style's centroid `[d]`.
pub fn centroid(images: &Tensor) -> Tensor {
    knn_indexer::clip::l2_normalize(&images.mean_dim(0, true, Kind::Float)).squeeze_dim(0)
}

/// Mean colourfulness (the `[score]` proxy scorer) of `[n, 3, h, w]` images in [−1, 1].
pub fn mean_colourfulness(images: &Tensor) -> Result<f64> {
    let rgb = to_rgb_images(images)?;
    let total: f64 = rgb
        .iter()
        .map(|im| knn_indexer::score::colourfulness(im.as_raw()))
        .sum();
    Ok(total / rgb.len().max(1) as f64)
}
