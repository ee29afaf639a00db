//! Throughput probes for `knn-diffusion bench embed`: the model alone, on the same batch
//! size and device the pipeline uses, so the pipeline's end-to-end rate has a ceiling to be
//! compared with.

use crate::clip::{l2_normalize, LoadedClip};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Images per second of CLIP's image tower alone (forward, normalise, copy to the CPU) on
/// random input, after `warmup` batches.
pub fn model_only_img_per_s(
    clip: &LoadedClip,
    device: Device,
    batch: usize,
    batches: usize,
    warmup: usize,
) -> f64 {
    let side = clip.model.config().vision_config.image_size;
    let x =
        Tensor::randn([batch as i64, 3, side, side], (Kind::Float, device)).to_kind(clip.vs.kind());
    let step = || {
        tch::no_grad(|| {
            let e = l2_normalize(&clip.model.image_features(&x).to_kind(Kind::Float))
                .to_device(Device::Cpu);
            drop(std::hint::black_box(e));
        })
    };
    for _ in 0..warmup {
        step();
    }
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let start = Instant::now();
    for _ in 0..batches {
        step();
    }
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    (batch * batches) as f64 / start.elapsed().as_secs_f64()
}
