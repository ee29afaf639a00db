//! Sampling (PAPER.md, "Inference"): prompt → CLIP text embedding → its k nearest image
//! embeddings from any embeddings table (the [`Retriever`]) → the reverse diffusion process
//! with classifier-free guidance → a PNG grid, plus a grid of the retrieved neighbours'
//! images so the user sees what conditioned each sample.
//!
//! Repeatable: the starting noise and every step's noise come from `(seed, step, sample
//! index)` streams, so a seed gives the same images whatever the batch size.

use crate::checkpoint::{CheckpointStore, TrainState};
use crate::data::SampleRng;
use crate::diffusion::{guide, Sampler, SamplerConfig};
use crate::train::{DiffusionModel, TrajectoryConfig};
use crate::unet::Condition;
use crate::{Result, TrainerError};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use futures::TryStreamExt;
use knn_datasets::StorageConfig;
use knn_indexer::clip::checkpoint::LoadedClip;
use knn_indexer::clip::model::l2_normalize;
use knn_indexer::embed::{ClipSettings, DeviceChoice};
use knn_indexer::knn::Retriever;
use lance::deps::datafusion::prelude::{col, lit};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
        }
        x.clamp(-1.0, 1.0)
    })
}

/// Writes `[N, 3, H, W]` images in [−1, 1] as one PNG, `cols` per row.
pub fn write_grid(images: &Tensor, cols: usize, path: &Path) -> Result<()> {
    let (n, _, h, w) = images.size4()?;
    let (n, h, w) = (n as usize, h as usize, w as usize);
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let px = ((images.to_device(Device::Cpu).to_kind(Kind::Float) + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let data = Vec::<u8>::try_from(&px.view([-1]))?;
    let mut grid = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..n {
        let (gx, gy) = ((i % cols) * w, (i / cols) * h);
        for y in 0..h {
            for x in 0..w {
                let o = ((i * h + y) * w + x) * 3;
                grid.put_pixel(
                    (gx + x) as u32,
                    (gy + y) as u32,
                    image::Rgb([data[o], data[o + 1], data[o + 2]]),
                );
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    }
    grid.save(path).map_err(|e| TrainerError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// A trained model loaded from a checkpoint.
pub struct TrainedModel {
    /// Weights (EMA unless asked otherwise) and process.
    pub model: DiffusionModel,
    /// The checkpoint's state.
    pub state: TrainState,
    /// What it was trained with.
    pub trajectory: TrajectoryConfig,
    /// Where it came from.
    pub location: String,
}

/// Loads the newest valid checkpoint under `url` onto `device` (EMA weights when `ema`).
pub async fn load_trained(
    url: &str,
    storage: &StorageConfig,
    device: Device,
    ema: bool,
) -> Result<TrainedModel> {
    let store = CheckpointStore::open(url, storage, usize::MAX)?;
    let ck = store
        .latest_valid()
        .await?
        .ok_or_else(|| TrainerError::NoCheckpoint {
            location: url.to_string(),
            detail: "; run `knn-diffusion train` first or point --checkpoint at its checkpoints"
                .into(),
        })?;
    let state = ck.state()?;
    let trajectory: TrajectoryConfig =
        serde_json::from_value(state.config.clone()).map_err(|e| TrainerError::Checkpoint {
            location: ck.location.clone(),
            reason: format!("state.json's config is unreadable: {e}"),
        })?;
    let model = DiffusionModel::new(&trajectory.unet, &trajectory.diffusion, device, 0)?;
    let file = if ema {
        "ema.safetensors"
    } else {
        "model.safetensors"
    };
    model.load_weights(&ck.tensors(file)?, &format!("{}/{file}", ck.location))?;
    Ok(TrainedModel {
        model,
        state,
        trajectory,
        location: ck.location,
    })
}

/// Token ids for a CLIP without a tokenizer (the random-weight CLIP of the embedded
/// default): UTF-8 bytes mapped into the vocabulary between begin and end tokens. Only for
/// trying the pipeline: such a CLIP's embeddings mean nothing anyway.
fn byte_tokens(clip: &LoadedClip, texts: &[String]) -> Tensor {
    let tc = &clip.model.config().text_config;
    let (ctx, vocab) = (tc.max_position_embeddings as usize, tc.vocab_size);
    // Legacy configs (eos id 2) pool at the largest id: make the end token the largest.
    let eos = if tc.eos_token_id == 2 {
        vocab - 1
    } else {
        tc.eos_token_id
    };
    let bos = vocab - 2;
    let mut ids = Vec::with_capacity(texts.len() * ctx);
    for t in texts {
        let mut row: Vec<i64> = vec![bos];
        row.extend(t.bytes().take(ctx - 2).map(|b| 3 + b as i64 % (vocab - 4)));
        row.push(eos);
        row.resize(ctx, tc.pad_token_id);
        ids.extend(row);
    }
    Tensor::from_slice(&ids).view([texts.len() as i64, ctx as i64])
}

/// L2-normalised CLIP text embeddings `[n, d]` of `prompts`.
pub async fn text_embeddings(
    settings: &ClipSettings,
    storage: &StorageConfig,
    prompts: &[String],
    device: Device,
) -> Result<Tensor> {
    let (clip, identity) = knn_indexer::embed::load_clip(settings, storage, device).await?;
    let ids = match (&clip.tokenizer, settings.checkpoint.is_some()) {
        (Some(tok), _) => {
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            tok.encode(&refs).map_err(|e| {
                TrainerError::config("embed.clip.checkpoint", format!("tokenizer: {e}"))
            })?
        }
        (None, true) => {
            return Err(TrainerError::config(
                "embed.clip.checkpoint",
                format!("CLIP `{identity}` has no tokenizer.json; sampling from text needs one"),
            ))
        }
        (None, false) => byte_tokens(&clip, prompts),
    };
    let feats = tch::no_grad(|| clip.model.text_features(&ids.to_device(device)));
    Ok(l2_normalize(&feats.to_kind(Kind::Float)))
}

/// What `sample` does.
#[derive(Clone, Debug)]
pub struct SampleRequest {
    /// Text prompts.
    pub prompts: Vec<String>,
    /// Checkpoint directory or URL (the newest valid checkpoint in it is used).
    pub checkpoint: String,
    /// Embeddings table to retrieve neighbours from (any table with `id` + `emb`).
    pub retrieval_db: String,
    /// Neighbours (default: the k the model was trained with; fewer leaves slots null).
    pub k: Option<usize>,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// The reverse process.
    pub sampler: SamplerConfig,
    /// Images per prompt.
    pub per_prompt: usize,
    /// Seed of the noise.
    pub seed: u64,
    /// Conditions per model batch.
    pub batch_size: usize,
    /// Output grid (one row per prompt).
    pub out: PathBuf,
    /// Neighbour grid (one row per prompt); default `<out>-neighbours.png`.
    pub neighbours_out: Option<PathBuf>,
    /// Use the raw weights instead of the EMA.
    pub raw_weights: bool,
    /// `auto`, `cpu` or `cuda`.
    pub device: DeviceChoice,
}

/// What `sample` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SampleSummary {
    /// The sample grid.
    pub grid: PathBuf,
    /// The neighbours grid.
    pub neighbours_grid: PathBuf,
    /// Checkpoint used.
    pub checkpoint: String,
    /// Step of that checkpoint.
    pub step: u64,
    /// Images made.
    pub images: usize,
    /// Images per second of the reverse process.
    pub images_per_s: f64,
    /// Neighbour ids per prompt, best first.
    pub neighbour_ids: Vec<Vec<u64>>,
}

/// Samples per `req` with CLIP from `clip`.
pub async fn sample(
    req: &SampleRequest,
    clip: &ClipSettings,
    storage: &StorageConfig,
) -> Result<SampleSummary> {
    if req.prompts.is_empty() {
        return Err(TrainerError::config("--prompt", "give at least one prompt"));
    }
    let device = req.device.resolve("--device")?;
    let trained = load_trained(&req.checkpoint, storage, device, !req.raw_weights).await?;
    let unet = trained.model.unet.config().clone();
    let k = req.k.unwrap_or(unet.knn);
    if k > unet.knn {
        return Err(TrainerError::KTooLarge {
            key: "--k".into(),
            k,
            available: unet.knn,
            table: format!(
                "{} (the model was trained with k = {})",
                trained.location, unet.knn
            ),
        });
    }
    let q = text_embeddings(clip, storage, &req.prompts, device).await?;
    if q.size()[1] as usize != unet.cond_dim {
        return Err(TrainerError::config(
            "embed.clip.checkpoint",
            format!(
                "CLIP gives {}-d embeddings but the model was trained on {}-d ones",
                q.size()[1],
                unet.cond_dim
            ),
        ));
    }
    let retriever = Retriever::open(&req.retrieval_db, storage).await?;
    if retriever.dim() != unet.cond_dim {
        return Err(TrainerError::BadTable {
            table: req.retrieval_db.clone(),
            detail: format!(
                "holds {}-d embeddings, the model needs {}-d",
                retriever.dim(),
                unet.cond_dim
            ),
        });
    }
    let (n, d, slots) = (req.prompts.len(), unet.cond_dim, unet.knn + 1);
    let mut emb = vec![0f32; n * slots * d];
    let mut present = vec![0f32; n * slots];
    let qv = Vec::<f32>::try_from(&q.to_device(Device::Cpu).view([-1]))?;
    let mut neighbour_ids = Vec::with_capacity(n);
    for i in 0..n {
        let query = &qv[i * d..(i + 1) * d];
        emb[i * slots * d..i * slots * d + d].copy_from_slice(query);
        present[i * slots] = 1.0;
        let nb = if k > 0 {
            retriever.search(query, k).await?
        } else {
            Default::default()
        };
        for (j, _) in nb.ids.iter().enumerate() {
            let at = (i * slots + 1 + j) * d;
            emb[at..at + d].copy_from_slice(&nb.emb[j * d..(j + 1) * d]);
            present[i * slots + 1 + j] = 1.0;
        }
        tracing::info!(prompt = %req.prompts[i], neighbours = ?nb.ids, "retrieved");
        neighbour_ids.push(nb.ids);
    }
    // Each prompt's condition repeated per image, prompt-major.
    let reps = req.per_prompt.max(1);
    let cond_all = Tensor::from_slice(&emb)
        .view([n as i64, slots as i64, d as i64])
        .repeat_interleave_self_int(reps as i64, 0, None);
    let present_all = Tensor::from_slice(&present)
        .view([n as i64, slots as i64])
        .repeat_interleave_self_int(reps as i64, 0, None);
    let sampler = req.sampler.build(&trained.model.diffusion, "--sampler")?;
    let total = n * reps;
    let bs = req.batch_size.max(1);
    let started = std::time::Instant::now();
    let mut outs = Vec::new();
    for start in (0..total).step_by(bs) {
        let len = bs.min(total - start) as i64;
        let cond = Condition {
            emb: cond_all.narrow(0, start as i64, len).to_device(device),
            present: present_all.narrow(0, start as i64, len).to_device(device),
            drop: Tensor::zeros([len], (Kind::Float, device)),
        };
        let imgs = generate(
            &trained.model,
            sampler.as_ref(),
            &cond,
            req.guidance,
            req.seed,
            start,
        );
        outs.push(imgs.to_device(Device::Cpu));
    }
    let secs = started.elapsed().as_secs_f64();
    let images = Tensor::cat(&outs, 0);
    write_grid(&images, reps, &req.out)?;

    let nb_out = req.neighbours_out.clone().unwrap_or_else(|| {
        let stem = req
            .out
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("samples");
        req.out.with_file_name(format!("{stem}-neighbours.png"))
    });
    let side = unet.image_size_px;
    let nb_imgs =
        neighbour_images(&req.retrieval_db, storage, &neighbour_ids, k.max(1), side).await?;
    write_grid(&nb_imgs, k.max(1), &nb_out)?;
    Ok(SampleSummary {
        grid: req.out.clone(),
        neighbours_grid: nb_out,
        checkpoint: trained.location,
        step: trained.state.step,
        images: total,
        images_per_s: total as f64 / secs.max(1e-9),
        neighbour_ids,
    })
}

/// The neighbours' images as `[rows · k, 3, side, side]` (grey where the table has no image
/// or fewer neighbours were found).
async fn neighbour_images(
    table: &str,
    storage: &StorageConfig,
    ids: &[Vec<u64>],
    k: usize,
    side: usize,
) -> Result<Tensor> {
    let ds = knn_indexer::table::load_dataset(table, &storage.to_lance_options(), None)
        .await
        .map_err(|e| TrainerError::lance(table, e))?;
    let has_image = ds.schema().field("image").is_some();
    let mut found: HashMap<u64, Vec<u8>> = HashMap::new();
    let all: Vec<u64> = ids.iter().flatten().copied().collect();
    if has_image && !all.is_empty() {
        let mut scan = ds.scan();
        scan.project(&["id", "image"])
            .map_err(|e| TrainerError::lance(table, e))?;
        scan.filter_expr(col("id").in_list(all.iter().map(|&i| lit(i)).collect(), false));
        let batches: Vec<_> = scan
            .try_into_stream()
            .await
            .map_err(|e| TrainerError::lance(table, e))?
            .try_collect()
            .await
            .map_err(|e| TrainerError::lance(table, e))?;
        for b in batches {
            let idc = b.column(0).as_primitive::<UInt64Type>();
            let im = b.column(1).as_binary::<i32>();
            for r in 0..b.num_rows() {
                found.insert(idc.value(r), im.value(r).to_vec());
            }
        }
    } else if !has_image {
        tracing::warn!(
            table,
            "the retrieval table has no `image` column: the neighbours grid is blank"
        );
    }
    let plane = 3 * side * side;
    let mut px = Vec::with_capacity(ids.len() * k * plane);
    for row in ids {
        for j in 0..k {
            let img = row.get(j).and_then(|id| found.get(id)).and_then(|bytes| {
                let im = image::load_from_memory(bytes).ok()?.to_rgb8();
                let im = image::imageops::resize(
                    &im,
                    side as u32,
                    side as u32,
                    image::imageops::FilterType::Triangle,
                );
                Some(crate::data::rgb_to_chw(&im))
            });
            px.extend(img.unwrap_or_else(|| vec![0f32; plane]));
        }
    }
    Ok(Tensor::from_slice(&px).view([(ids.len() * k) as i64, 3, side as i64, side as i64]))
}
