//! The contrastive loss of CLIP (Radford et al. 2021, arXiv 2103.00020, Fig. 3; open_clip's
//! `ClipLoss`): cosine similarities of every image with every caption of the batch, scaled
//! by the learned temperature `exp(logit_scale)`, cross-entropy towards the matching pair in
//! both directions, averaged.

use tch::{Kind, Reduction, Tensor};

/// The largest logit scale, ln(100): open_clip clamps the temperature there after each step.
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_091;

/// Symmetric InfoNCE of L2-normalised `image` and `text` features `[n, d]` (row i of each is
/// a pair) with log inverse temperature `logit_scale`.
pub fn clip_loss(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Tensor {
    let n = image.size()[0];
    let logits = image.matmul(&text.tr()) * logit_scale.exp();
    let labels = Tensor::arange(n, (Kind::Int64, image.device()));
    let i2t = logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
    let t2i = logits
        .tr()
        .cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
    (i2t + t2i) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Worked by hand: two orthogonal pairs at scale 1 give logits [[1, 0], [0, 1]] both
    /// ways, so the loss is ln(1 + e^-1) = 0.31326.
    #[test]
    fn loss_of_two_orthogonal_pairs() {
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let scale = Tensor::from_slice(&[0.0f32]).view([]);
        let l = f64::try_from(clip_loss(&x, &x, &scale)).unwrap();
        assert!((l - (1.0 + (-1.0f64).exp()).ln()).abs() < 1e-6, "{l}");
        // Swapped captions make it worse.
        let swapped = x.flip([0]);
        assert!(f64::try_from(clip_loss(&x, &swapped, &scale)).unwrap() > l);
        let _ = Device::Cpu;
    }
}
