//! How good a CLIP is on held-out pairs, as pure functions of their embeddings:
//! - retrieval recall@k in both directions (text → image: is the caption's own image among
//!   the k images most similar to it?), against chance, k / n;
//! - the modality gap (Liang et al. 2022, arXiv 2203.02053): how far apart the image and the
//!   text embeddings sit. It decides how much the kNN step matters: KNN-Diffusion trains on
//!   image embeddings and samples from text embeddings, and neighbours retrieved by the text
//!   bring image embeddings back in (PAPER.md, "Why the neighbours help").

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Recall at one k.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RecallAtK {
    /// k.
    pub k: usize,
    /// Share of captions whose image is among their k nearest images.
    pub text_to_image: f64,
    /// Share of images whose caption is among their k nearest captions.
    pub image_to_text: f64,
    /// What a random ranking gets: k / n.
    pub chance: f64,
}

/// The modality gap of paired embeddings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ModalityGap {
    /// Mean cosine of an image and its own caption.
    pub paired_text_image_cos: f64,
    /// Mean cosine of an image and another pair's caption.
    pub unpaired_text_image_cos: f64,
    /// Mean cosine of two different images.
    pub image_image_cos: f64,
    /// Mean cosine of two different captions.
    pub text_text_cos: f64,
    /// Distance between the mean image and the mean text embedding (Liang et al.'s gap).
    pub centroid_distance: f64,
}

/// Held-out quality of a CLIP.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ClipEval {
    /// Held-out pairs scored.
    pub pairs: usize,
    /// Recall at 1, 5 and 10.
    pub recall: Vec<RecallAtK>,
    /// The modality gap.
    pub gap: ModalityGap,
}

impl ClipEval {
    /// The scores as TensorBoard scalars: `held_out/recall@<k>/text_to_image` and
    /// `…/image_to_text` for every k, and `held_out/gap/<field>`.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .recall
            .iter()
            .flat_map(|r| {
                [
                    (
                        format!("held_out/recall@{}/text_to_image", r.k),
                        r.text_to_image,
                    ),
                    (
                        format!("held_out/recall@{}/image_to_text", r.k),
                        r.image_to_text,
                    ),
                ]
            })
            .collect();
        let g = &self.gap;
        for (name, v) in [
            ("paired_text_image_cos", g.paired_text_image_cos),
            ("unpaired_text_image_cos", g.unpaired_text_image_cos),
            ("image_image_cos", g.image_image_cos),
            ("text_text_cos", g.text_text_cos),
            ("centroid_distance", g.centroid_distance),
        ] {
            out.push((format!("held_out/gap/{name}"), v));
        }
        out
    }

    /// Recall at `k` (if measured).
    pub fn at(&self, k: usize) -> Option<&RecallAtK> {
        self.recall.iter().find(|r| r.k == k)
    }
}

/// Recall@k for each of `ks`, of L2-normalised `image` and `text` `[n, d]`, row i a pair.
/// Ties count against the pair (a caption tied with its image's rival is not a hit).
pub fn recall_at(image: &Tensor, text: &Tensor, ks: &[usize]) -> Vec<RecallAtK> {
    let n = image.size()[0];
    let sims = text.matmul(&image.tr()); // [caption, image]
    let own = sims.diagonal(0, 0, 1).unsqueeze(1);
    // Rank of the own item: how many others score at least as high.
    let rank_t2i =
        (sims
            .ge_tensor(&own)
            .to_kind(Kind::Int64)
            .sum_dim_intlist(1, false, Kind::Int64))
            - 1;
    let own_i = own.view([1, n]);
    let rank_i2t =
        (sims
            .ge_tensor(&own_i)
            .to_kind(Kind::Int64)
            .sum_dim_intlist(0, false, Kind::Int64))
            - 1;
    let share = |ranks: &Tensor, k: usize| {
        f64::try_from(ranks.lt(k as i64).to_kind(Kind::Double).mean(Kind::Double)).unwrap_or(0.0)
    };
    ks.iter()
        .map(|&k| RecallAtK {
            k,
            text_to_image: share(&rank_t2i, k),
            image_to_text: share(&rank_i2t, k),
            chance: (k as f64 / n.max(1) as f64).min(1.0),
        })
        .collect()
}

/// The modality gap of L2-normalised `image` and `text` `[n, d]`, row i a pair.
pub fn modality_gap(image: &Tensor, text: &Tensor) -> ModalityGap {
    let n = image.size()[0] as f64;
    let mean_offdiag = |m: &Tensor| {
        let total = f64::try_from(m.sum(Kind::Double)).unwrap_or(f64::NAN);
        let diag = f64::try_from(m.diagonal(0, 0, 1).sum(Kind::Double)).unwrap_or(f64::NAN);
        (total - diag) / (n * (n - 1.0)).max(1.0)
    };
    let ti = text.matmul(&image.tr());
    let paired = f64::try_from(ti.diagonal(0, 0, 1).mean(Kind::Double)).unwrap_or(f64::NAN);
    let centroid =
        (image.mean_dim(0, false, Kind::Float) - text.mean_dim(0, false, Kind::Float)).norm();
    ModalityGap {
        paired_text_image_cos: paired,
        unpaired_text_image_cos: mean_offdiag(&ti),
        image_image_cos: mean_offdiag(&image.matmul(&image.tr())),
        text_text_cos: mean_offdiag(&text.matmul(&text.tr())),
        centroid_distance: f64::try_from(centroid).unwrap_or(f64::NAN),
    }
}

/// Recall at 1, 5, 10 and the modality gap.
pub fn evaluate(image: &Tensor, text: &Tensor) -> ClipEval {
    ClipEval {
        pairs: image.size()[0] as usize,
        recall: recall_at(image, text, &[1, 5, 10]),
        gap: modality_gap(image, text),
    }
}

impl std::fmt::Display for ClipEval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "held-out pairs: {}", self.pairs)?;
        for r in &self.recall {
            writeln!(
                f,
                "  recall@{:<2} text->image {:.3}  image->text {:.3}  (chance {:.4}: {:.1}x / {:.1}x)",
                r.k,
                r.text_to_image,
                r.image_to_text,
                r.chance,
                r.text_to_image / r.chance,
                r.image_to_text / r.chance
            )?;
        }
        let g = &self.gap;
        write!(
            f,
            "  modality gap: paired text-image cos {:.3}, unpaired {:.3}, image-image {:.3}, \
             text-text {:.3}, centroid distance {:.3}",
            g.paired_text_image_cos,
            g.unpaired_text_image_cos,
            g.image_image_cos,
            g.text_text_cos,
            g.centroid_distance
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_ranks_both_ways() {
        // Caption 0 matches image 0 best; caption 1 prefers image 0 over its own image 1.
        let image = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 0.6, 0.8]).view([3, 2]);
        let text = Tensor::from_slice(&[1.0f32, 0.0, 0.8, 0.6, 0.6, 0.8]).view([3, 2]);
        let r = recall_at(&image, &text, &[1, 2, 3]);
        // t2i: caption 0 → image 0 first (hit); caption 1 [.8, .6, .96]: own (.6) is last;
        // caption 2 [.6, .8, 1.0]: own first.
        assert!((r[0].text_to_image - 2.0 / 3.0).abs() < 1e-9);
        assert!((r[2].text_to_image - 1.0).abs() < 1e-9);
        assert!((r[0].chance - 1.0 / 3.0).abs() < 1e-9);
        // i2t: image 1 [0, .6, .8] ranks caption 1 second.
        assert!((r[0].image_to_text - 2.0 / 3.0).abs() < 1e-9);
        assert!((r[1].image_to_text - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_gap_of_identical_modalities_is_zero() {
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let g = modality_gap(&x, &x);
        assert!(g.centroid_distance.abs() < 1e-9);
        assert!((g.paired_text_image_cos - 1.0).abs() < 1e-9);
        assert!(g.image_image_cos.abs() < 1e-9);
    }
}
