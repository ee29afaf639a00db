//! How an independent CLIP reads generated images: the *judge* (a CLIP trained with another
//! seed and held-out split than the one the model was conditioned on, so a model is never
//! judged by its own encoder). Each sample is assigned to the prompt whose judge text
//! embedding is nearest to its judge image embedding; the share assigned to the prompt it was
//! made for says how on-prompt the samples are. The mean cosine of a sample with its own
//! prompt is the judge's CLIP score.

use crate::sampling::to_rgb_images;
use crate::Result;
use knn_indexer::clip::{l2_normalize, LoadedClip};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// The judge's reading of a set of samples.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JudgeReport {
    /// The judge CLIP's identity.
    pub judge: String,
    /// Share of samples nearest (in the judge's space) to their own prompt.
    pub on_prompt: f64,
    /// The same per prompt: (prompt, share).
    pub per_prompt: Vec<(String, f64)>,
    /// Mean cosine of each sample with its own prompt.
    pub clip_score: f64,
}

/// Which prompt each image is nearest to: `image` `[N, d]` and `prompts` `[P, d]`,
/// L2-normalised; `owner[i]` is the prompt image i was made for. Returns the share assigned
/// to their own prompt, the share per prompt and the mean own-prompt cosine.
pub fn assign(image: &Tensor, prompts: &Tensor, owner: &[usize]) -> (f64, Vec<f64>, f64) {
    let sims = image.matmul(&prompts.tr());
    let best = Vec::<i64>::try_from(sims.argmax(1, false).to_device(Device::Cpu))
        .expect("1-D int64 argmax");
    let own = Tensor::from_slice(&owner.iter().map(|&o| o as i64).collect::<Vec<_>>())
        .to_device(image.device());
    let own_sims = sims.gather(1, &own.unsqueeze(1), false);
    let p = prompts.size()[0] as usize;
    let (mut hits, mut counts) = (vec![0usize; p], vec![0usize; p]);
    for (b, &o) in best.iter().zip(owner) {
        counts[o] += 1;
        hits[o] += usize::from(*b as usize == o);
    }
    let total: usize = hits.iter().sum();
    (
        total as f64 / owner.len().max(1) as f64,
        hits.iter()
            .zip(&counts)
            .map(|(&h, &c)| h as f64 / c.max(1) as f64)
            .collect(),
        f64::try_from(own_sims.mean(Kind::Double)).unwrap_or(f64::NAN),
    )
}

/// The judge's L2-normalised image embeddings `[N, d]` of `images` (`[N, 3, H, W]` in
/// [−1, 1]), read as 8-bit RGB like any stored image, 256 at a time.
pub fn image_features(judge: &LoadedClip, images: &Tensor) -> Result<Tensor> {
    let device = judge.vs.device();
    let (_, _, h, w) = images.size4()?;
    let (side_w, side_h) = judge.processor.output_size(w as u32, h as u32);
    let mut parts = Vec::new();
    let rgb = to_rgb_images(images)?;
    for chunk in rgb.chunks(256) {
        let mut pixels = Vec::new();
        for img in chunk {
            judge.processor.preprocess_into(img, &mut pixels);
        }
        let x = Tensor::from_slice(&pixels)
            .view([chunk.len() as i64, 3, side_h as i64, side_w as i64])
            .to_device(device)
            .to_kind(judge.vs.kind());
        parts.push(tch::no_grad(|| {
            l2_normalize(&judge.model.image_features(&x).to_kind(Kind::Float))
        }));
    }
    Ok(Tensor::cat(&parts, 0))
}

/// Reads `images` (`[N, 3, H, W]` in [−1, 1]) made for `prompts`, `owner[i]` being image i's
/// prompt, with the judge CLIP `judge` (named `identity`).
pub fn judge_samples(
    judge: &LoadedClip,
    identity: &str,
    images: &Tensor,
    prompts: &[String],
    owner: &[usize],
) -> Result<JudgeReport> {
    let img = image_features(judge, images)?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let txt = judge.embed_texts(&refs)?;
    let (on_prompt, per, clip_score) = assign(&img, &txt, owner);
    Ok(JudgeReport {
        judge: identity.to_string(),
        on_prompt,
        per_prompt: prompts.iter().cloned().zip(per).collect(),
        clip_score,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_counts_the_nearest_prompt() {
        let prompts = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let images = Tensor::from_slice(&[0.9f32, 0.1, 0.6, 0.8, 0.0, 1.0]).view([3, 2]);
        let (share, per, score) = assign(&images, &prompts, &[0, 0, 1]);
        assert!((share - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(per, vec![0.5, 1.0]);
        assert!((score - (0.9 + 0.6 + 1.0) / 3.0).abs() < 1e-6);
    }
}
