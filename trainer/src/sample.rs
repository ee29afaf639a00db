//! Sampling (PAPER.md, "Inference"): prompt → CLIP text embedding → its k nearest image
//! embeddings from any embeddings table (the [`Retriever`]) → the reverse diffusion process
//! with classifier-free guidance → a PNG grid, plus a grid of the retrieved neighbours'
//! images so the user sees what conditioned each sample.
//!
//! Repeatable: the starting noise and every step's noise come from `(seed, step, sample
//! index)` streams, so a seed gives the same images whatever the batch size.

use crate::diffusion::SamplerConfig;
use crate::judge::{judge_samples, JudgeReport};
use crate::model::TrainedModel;
use crate::sampling::{generate_all_with, write_grid};
use crate::{Result, TrainerError};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use futures::TryStreamExt;
use knn_datasets::StorageConfig;
use knn_indexer::clip::{ClipSettings, DeviceChoice};
use knn_indexer::knn::{Retriever, ScoreBucket};
use lance::deps::datafusion::prelude::{col, lit};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Tensor};

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
    /// Condition on neighbours from one score bucket of a candidate pool (PAPER.md §4.2).
    pub bucket: Option<ScoreBucket>,
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
    /// `auto`, `cpu` or `cuda` (`train.device` of the config).
    pub device: DeviceChoice,
    /// A judge CLIP to read the samples with ([`crate::judge`]); its report is in the
    /// summary.
    pub judge: Option<ClipSettings>,
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
    /// The judge CLIP's reading of the samples, when one was given.
    pub judge: Option<JudgeReport>,
}

/// Samples per `req` with CLIP from `clip`.
pub async fn sample(
    req: &SampleRequest,
    clip: &ClipSettings,
    storage: &StorageConfig,
) -> Result<SampleSummary> {
    check_prompts(&req.prompts)?;
    let device = req
        .device
        .resolve()
        .map_err(|e| TrainerError::config("train.device", e.to_string()))?;
    let trained = TrainedModel::load(&req.checkpoint, storage, device, !req.raw_weights).await?;
    let unet = trained.model.unet.config().clone();
    let k = req.k.unwrap_or(unet.knn);
    let fix = format!(
        "give --k {} or fewer (fewer leaves the other slots empty)",
        unet.knn
    );
    trained.check_k(k, "--k", "the model", &fix)?;
    let (clip_model, identity) = clip.load(storage, device).await?;
    if let Some(trained_on) = trained.trajectory.clip.as_deref() {
        if trained_on != identity {
            return Err(TrainerError::Indexer(
                knn_indexer::IndexerError::ClipMismatch {
                    table: format!("{} (the model's training table)", trained.location),
                    table_clip: trained_on.to_string(),
                    query_clip: identity.clone(),
                },
            ));
        }
    }
    let prompts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
    if clip_model.modality.is_some() {
        tracing::info!("prompts are moved across the CLIP's modality gap (its modality.json)");
    }
    let q = clip_model.embed_prompts(&prompts)?;
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
    let retriever = open_retriever(&req.retrieval_db, storage, &identity, unet.cond_dim).await?;
    let (n, d) = (req.prompts.len(), unet.cond_dim);
    let qv = Vec::<f32>::try_from(&q.to_device(Device::Cpu).view([-1]))?;
    let found = retrieve(&retriever, &qv, d, k, req.bucket.as_ref()).await?;
    for (p, ids) in req.prompts.iter().zip(&found.ids) {
        tracing::info!(prompt = %p, neighbours = ?ids, "retrieved");
    }
    // Each prompt's condition repeated per image, prompt-major.
    let reps = req.per_prompt.max(1);
    let (emb, present) = found.conditions(&qv, k, unet.knn + 1);
    let cond_all = emb.repeat_interleave_self_int(reps as i64, 0, None);
    let present_all = present.repeat_interleave_self_int(reps as i64, 0, None);
    let sampler = req.sampler.build(&trained.model.diffusion, "--sampler")?;
    let total = n * reps;
    let started = std::time::Instant::now();
    let mut last_said = started;
    let mut progress = |done: usize, steps: usize| {
        // A line every few seconds (and at the end), so a long run shows it is moving.
        if done == steps || last_said.elapsed().as_secs_f64() >= 3.0 {
            last_said = std::time::Instant::now();
            let secs = started.elapsed().as_secs_f64();
            let eta = secs / done as f64 * (steps - done) as f64;
            tracing::info!(step = done, of = steps, eta_s = %format!("{eta:.0}"), "sampling: {done}/{steps} denoising steps");
        }
    };
    let images = generate_all_with(
        &trained.model,
        sampler.as_ref(),
        (&cond_all, &present_all),
        req.guidance,
        req.seed,
        req.batch_size,
        &mut progress,
    );
    let secs = started.elapsed().as_secs_f64();
    write_grid(&images, reps, &req.out)?;

    let nb_out = neighbours_grid(req, storage, &found.ids, k, unet.image_size_px).await?;
    let judge = match &req.judge {
        Some(settings) => {
            let owner: Vec<usize> = (0..total).map(|i| i / reps).collect();
            Some(
                judge_images(
                    settings,
                    storage,
                    device,
                    &identity,
                    &images,
                    &req.prompts,
                    &owner,
                )
                .await?,
            )
        }
        None => None,
    };
    Ok(SampleSummary {
        grid: req.out.clone(),
        neighbours_grid: nb_out,
        checkpoint: trained.location,
        step: trained.state.step,
        images: total,
        images_per_s: total as f64 / secs.max(1e-9),
        neighbour_ids: found.ids,
        judge,
    })
}

/// Refuses no prompts, or an empty one, naming which.
fn check_prompts(prompts: &[String]) -> Result<()> {
    if prompts.is_empty() {
        return Err(TrainerError::config("--prompt", "give at least one prompt"));
    }
    if let Some(i) = prompts.iter().position(|p| p.trim().is_empty()) {
        return Err(TrainerError::config(
            "--prompt",
            format!(
                "prompt {} of {} is empty; give each --prompt some text",
                i + 1,
                prompts.len()
            ),
        ));
    }
    Ok(())
}

/// The retrieval table `table`, checked against the prompts' CLIP (`identity`) and the
/// model's condition width.
async fn open_retriever(
    table: &str,
    storage: &StorageConfig,
    identity: &str,
    cond_dim: usize,
) -> Result<Retriever> {
    let retriever = Retriever::open(table, storage).await?;
    retriever.require_clip(identity)?;
    if retriever.dim() != cond_dim {
        return Err(TrainerError::BadTable {
            table: table.to_string(),
            detail: format!(
                "holds {}-d embeddings, the model needs {}-d",
                retriever.dim(),
                cond_dim
            ),
        });
    }
    Ok(retriever)
}

/// Writes the grid of each prompt's `k` retrieved neighbours (`ids`, from the retrieval
/// table): at `--neighbours-out`, or beside the samples' grid. Returns where.
async fn neighbours_grid(
    req: &SampleRequest,
    storage: &StorageConfig,
    ids: &[Vec<u64>],
    k: usize,
    side: usize,
) -> Result<PathBuf> {
    let nb_out = req.neighbours_out.clone().unwrap_or_else(|| {
        let stem = req
            .out
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("samples");
        req.out.with_file_name(format!("{stem}-neighbours.png"))
    });
    let nb_imgs = table_images(&req.retrieval_db, storage, ids, k.max(1), side).await?;
    write_grid(&nb_imgs, k.max(1), &nb_out)?;
    Ok(nb_out)
}

/// Scores `images` (image i made for prompt `owner[i]`) with the judge CLIP.
async fn judge_images(
    settings: &ClipSettings,
    storage: &StorageConfig,
    device: Device,
    identity: &str,
    images: &Tensor,
    prompts: &[String],
    owner: &[usize],
) -> Result<JudgeReport> {
    let (judge, judge_id) = settings.load(storage, device).await?;
    if judge_id == *identity {
        tracing::warn!(
            judge = %judge_id,
            "the judge CLIP is the CLIP the samples were conditioned on: its score is \
             not independent"
        );
    }
    let report = judge_samples(&judge, &judge_id, images, prompts, owner)?;
    tracing::info!(
        on_prompt = report.on_prompt,
        clip_score = report.clip_score,
        "judge CLIP: {:.0}% of the samples are nearest their own prompt",
        100.0 * report.on_prompt
    );
    Ok(report)
}

/// The neighbours retrieved for each of a set of queries, best first.
#[derive(Clone, Debug, Default)]
pub struct Retrieved {
    /// Row ids per query.
    pub ids: Vec<Vec<u64>>,
    /// Their embeddings per query, row-major.
    pub emb: Vec<Vec<f32>>,
    /// Embedding dimension.
    pub dim: usize,
}

/// The `k` nearest rows of `retriever` (within `bucket` when given) to each query of
/// `queries` (`n · dim`, row-major); none when `k` is 0.
pub async fn retrieve(
    retriever: &Retriever,
    queries: &[f32],
    dim: usize,
    k: usize,
    bucket: Option<&ScoreBucket>,
) -> Result<Retrieved> {
    let mut out = Retrieved {
        dim,
        ..Default::default()
    };
    for query in queries.chunks(dim) {
        let nb = match (k, bucket) {
            (0, _) => Default::default(),
            (_, Some(b)) => retriever.search_bucket(query, k, b).await?,
            (_, None) => retriever.search(query, k).await?,
        };
        out.ids.push(nb.ids);
        out.emb.push(nb.emb);
    }
    Ok(out)
}

impl Retrieved {
    /// The model's conditions for the queries: `[n, slots, d]` embeddings (the query, then
    /// its first `k` neighbours) and `[n, slots]` presence (slots past them are null).
    pub fn conditions(&self, queries: &[f32], k: usize, slots: usize) -> (Tensor, Tensor) {
        let (d, n) = (self.dim, self.ids.len());
        let mut emb = vec![0f32; n * slots * d];
        let mut present = vec![0f32; n * slots];
        for (i, query) in queries.chunks(d).take(n).enumerate() {
            emb[i * slots * d..i * slots * d + d].copy_from_slice(query);
            present[i * slots] = 1.0;
            let found = self.ids[i].len().min(k).min(slots - 1);
            for j in 0..found {
                let at = (i * slots + 1 + j) * d;
                emb[at..at + d].copy_from_slice(&self.emb[i][j * d..(j + 1) * d]);
                present[i * slots + 1 + j] = 1.0;
            }
        }
        (
            Tensor::from_slice(&emb).view([n as i64, slots as i64, d as i64]),
            Tensor::from_slice(&present).view([n as i64, slots as i64]),
        )
    }
}

/// The neighbours' images as `[rows · k, 3, side, side]` (grey where the table has no image
/// or fewer neighbours were found).
pub(crate) async fn table_images(
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
