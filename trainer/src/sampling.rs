//! The reverse process as every caller uses it: [`generate`] runs a sampler from noise for a
//! batch of conditions with classifier-free guidance, [`write_grid`] writes images as one
//! PNG, and [`HoldoutGrid`] is the grid a training run writes of its held-out rows.
//!
//! Repeatable: the starting noise and every step's noise come from `(seed, step, sample
//! index)` streams, so a seed gives the same images whatever the batch size.

use crate::config::SampleGridConfig;
use crate::data::{condition_tensors, image_tensor, Fetched};
use crate::diffusion::{guide, DiffusionConfig, Sampler};
use crate::model::DiffusionModel;
use crate::optim::Ema;
use crate::rng::SampleRng;
use crate::unet::{Condition, UNetConfig};
use crate::{Result, TrainerError};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Standard normals `[n, 3, side, side]` for images `first..first+n` of stream `stream`.
fn noise(seed: u64, stream: u64, first: usize, n: usize, side: usize, device: Device) -> Tensor {
    let per = 3 * side * side;
    let mut v = Vec::with_capacity(n * per);
    for i in first..first + n {
        let mut z = Vec::with_capacity(per);
        SampleRng::new(seed ^ 0xA076_1D64_78BD_642F, stream, i as u64).normals(per, &mut z);
        v.extend(z);
    }
    Tensor::from_slice(&v)
        .view([n as i64, 3, side as i64, side as i64])
        .to_device(device)
}

/// Runs the reverse process from noise for each row of `cond`; images in [−1, 1].
/// `guidance` is the classifier-free scale s (1: conditional only; 0: unconditional only).
/// Row i is image `first + i` of the request: its noise depends on that index and the seed
/// only, so batching does not change any image.
pub fn generate(
    model: &DiffusionModel,
    sampler: &dyn Sampler,
    cond: &Condition,
    guidance: f64,
    seed: u64,
    first: usize,
) -> Tensor {
    generate_with(model, sampler, cond, guidance, seed, first, &mut || {})
}

/// [`generate`], calling `on_step` after each denoising step.
pub fn generate_with(
    model: &DiffusionModel,
    sampler: &dyn Sampler,
    cond: &Condition,
    guidance: f64,
    seed: u64,
    first: usize,
    on_step: &mut dyn FnMut(),
) -> Tensor {
    let device = cond.emb.device();
    let n = cond.emb.size()[0] as usize;
    let side = model.unet.config().image_size_px;
    let uncond = cond.unconditional();
    let both = Condition::cat(cond, &uncond);
    tch::no_grad(|| {
        let mut x = noise(seed, 0, first, n, side, device);
        for (i, &t) in sampler.timesteps().iter().enumerate() {
            let tt = Tensor::full([n as i64], t as i64, (Kind::Int64, device));
            let out = if guidance == 1.0 {
                model.unet.forward(&x, &tt, cond, false)
            } else {
                let out = model.unet.forward(
                    &Tensor::cat(&[&x, &x], 0),
                    &Tensor::cat(&[&tt, &tt], 0),
                    &both,
                    false,
                );
                let halves = out.chunk(2, 0);
                guide(&halves[0], &halves[1], guidance)
            };
            let z = if sampler.uses_noise(t) {
                noise(seed, i as u64 + 1, first, n, side, device)
            } else {
                x.zeros_like()
            };
            x = sampler.step(&out, t, &x, &z).prev_sample;
            on_step();
        }
        x.clamp(-1.0, 1.0)
    })
}

/// [`generate`] for every row of `cond` (`[N, slots, d]` embeddings and `[N, slots]`
/// presence, on any device), `batch_size` rows at a time on the model's device; the images
/// come back on the CPU. Row i is image i of the request.
pub fn generate_all(
    model: &DiffusionModel,
    sampler: &dyn Sampler,
    conds: (&Tensor, &Tensor),
    guidance: f64,
    seed: u64,
    batch_size: usize,
) -> Tensor {
    let quiet = &mut |_: usize, _: usize| {};
    generate_all_with(model, sampler, conds, guidance, seed, batch_size, quiet)
}

/// [`generate_all`], calling `on_step(done, total)` after each denoising step of each
/// batch (`total`: steps × batches).
pub fn generate_all_with(
    model: &DiffusionModel,
    sampler: &dyn Sampler,
    (emb, present): (&Tensor, &Tensor),
    guidance: f64,
    seed: u64,
    batch_size: usize,
    on_step: &mut dyn FnMut(usize, usize),
) -> Tensor {
    let device = model.vs.device();
    let total = emb.size()[0] as usize;
    let bs = batch_size.max(1);
    let steps = sampler.timesteps().len() * total.div_ceil(bs);
    let mut done = 0;
    let outs: Vec<Tensor> = (0..total)
        .step_by(bs)
        .map(|start| {
            let len = bs.min(total - start) as i64;
            let cond = Condition {
                emb: emb.narrow(0, start as i64, len).to_device(device),
                present: present.narrow(0, start as i64, len).to_device(device),
                drop: Tensor::zeros([len], (Kind::Float, device)),
            };
            let mut step = || {
                done += 1;
                on_step(done, steps);
            };
            generate_with(model, sampler, &cond, guidance, seed, start, &mut step)
                .to_device(Device::Cpu)
        })
        .collect();
    Tensor::cat(&outs, 0)
}

/// `[N, 3, H, W]` images in [−1, 1] as 8-bit RGB images.
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (n, _, h, w) = images.size4()?;
    let px = ((images.to_device(Device::Cpu).to_kind(Kind::Float) + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let data = Vec::<u8>::try_from(&px.view([-1]))?;
    let plane = (3 * h * w) as usize;
    Ok((0..n as usize)
        .map(|i| {
            image::RgbImage::from_raw(
                w as u32,
                h as u32,
                data[i * plane..(i + 1) * plane].to_vec(),
            )
            .expect("a plane holds h x w RGB pixels")
        })
        .collect())
}

/// Writes `[N, 3, H, W]` images in [−1, 1] as one PNG, `cols` per row.
pub fn write_grid(images: &Tensor, cols: usize, path: &Path) -> Result<()> {
    let tiles = to_rgb_images(images)?;
    let (n, h, w) = (
        tiles.len(),
        images.size()[2] as usize,
        images.size()[3] as usize,
    );
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let mut grid = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for (i, tile) in tiles.iter().enumerate() {
        let (gx, gy) = ((i % cols) * w, (i / cols) * h);
        image::imageops::replace(&mut grid, tile, gx as i64, gy as i64);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    }
    grid.save(path).map_err(|e| TrainerError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// The grid a training run writes every `train.samples.every_steps`: the held-out rows'
/// images above, samples from their conditions (with the EMA weights) below.
pub struct HoldoutGrid {
    /// The held-out rows, fetched once.
    pub rows: Fetched,
    /// Neighbours per condition.
    pub k: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// The model's shape.
    pub unet: UNetConfig,
    /// Its process.
    pub diffusion: DiffusionConfig,
    /// Sampler and guidance.
    pub settings: SampleGridConfig,
    /// Seed of the noise (and of the throw-away initial weights).
    pub seed: u64,
    /// Where the model runs.
    pub device: Device,
}

impl HoldoutGrid {
    /// Samples the grid with the EMA weights `ema` and writes it to `path`.
    pub fn write(&self, ema: &Ema, path: &Path) -> Result<()> {
        let ema_model = DiffusionModel::new(&self.unet, &self.diffusion, self.device, self.seed)?;
        ema_model.load_weights(ema.weights(), "EMA weights")?;
        let n = self.rows.ids.len();
        let (c, present) = condition_tensors(&self.rows, self.k, self.dim);
        let cond = Condition {
            emb: c.to_device(self.device),
            present: present.to_device(self.device),
            drop: Tensor::zeros([n as i64], (Kind::Float, self.device)),
        };
        let sampler = self
            .settings
            .sampler
            .build(&ema_model.diffusion, "train.samples.sampler")?;
        let imgs = generate(
            &ema_model,
            sampler.as_ref(),
            &cond,
            self.settings.guidance,
            self.seed,
            0,
        );
        let real = image_tensor(&self.rows, self.unet.image_size_px).to_device(self.device);
        write_grid(&Tensor::cat(&[real, imgs], 0), n, path)
    }
}
