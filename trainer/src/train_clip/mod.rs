//! `train-clip`: contrastive training of a small CLIP on captioned images, so the pipeline
//! has a text encoder that means something without downloading one (a user can also train
//! a domain CLIP on their own captioned shards). As open_clip does it: a ViT image tower and
//! a causal text transformer ([`knn_indexer::clip::ClipModel`]), symmetric InfoNCE with a
//! learned temperature ([`loss`]), features gathered over the ranks so every pair of the
//! global batch is a negative for every other, AdamW without decay on gains, biases,
//! embeddings and the temperature.
//!
//! ```text
//! captioned shards ─► captions table (once, sharded over ranks)      [captions]
//!   └─ split by key: training rows | held-out rows (never trained on)
//!   └─ byte-level BPE trained on the training captions (tokenizer.json, once)
//!   └─ loop: batch → both towers → gathered features → loss → step   (this file)
//!   └─ held-out recall@k and the modality gap                         [eval]
//!   └─ an HF CLIP directory                                            [export]
//! ```
//! It shares the diffusion loop's parts: the checkpoint store and format, the process group,
//! the data layout and loader, the optimiser and the metrics log. Rerunning resumes from the
//! newest valid checkpoint; two ranks with batch B train what one process with batch 2B does.

pub mod captions;
pub mod config;
pub mod eval;
pub mod export;
pub mod loss;

use crate::autocast::{set_cuda_autocast_dtype, AutocastDtype};
use crate::checkpoint::{CheckpointStore, SavePoint, TrainingCheckpoints, Trajectory};
use crate::data::{DataLayout, Loader};
use crate::metrics::{MetricsLog, TrainProgress};
use crate::model::named_parameters;
use crate::optim::{zero_gradients, AdamW, Optimiser};
use crate::parallel::{define_gradients, DataParallel};
use crate::rng::{EpochPermutation, SampleRng};
use crate::steps::{run_steps, Schedule, StepDone, Stepping};
use crate::{Result, TrainerError};
use captions::{CaptionRows, PrepareSummary};
use config::TrainClipConfig;
use eval::ClipEval;
use knn_cluster::rendezvous::Rendezvous;
use knn_datasets::{SplitConfig, StorageConfig};
use knn_indexer::clip::tokenizer::{train_bpe, PAD_TOKEN};
use knn_indexer::clip::{
    l2_normalize, ClipConfig, ClipImageProcessor, ClipModel, ClipTokenizer, ModalityMeans,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{nn, Device, Kind, Tensor};

/// What a `train-clip` run did.
#[derive(Clone, Debug, Serialize)]
pub struct ClipTrainSummary {
    /// Step resumed from (0: fresh start).
    pub resumed_from: u64,
    /// Step reached.
    pub step: u64,
    /// Trainable parameters.
    pub parameters: i64,
    /// Loss of the last step.
    pub last_loss: f64,
    /// The learned temperature at the end (`exp(logit_scale)`).
    pub temperature_inverse: f64,
    /// Rows trained on and held out.
    pub train_rows: usize,
    /// Rows held out for evaluation.
    pub holdout_rows: usize,
    /// Preparing the captions table (this rank).
    pub prepare: PrepareSummary,
    /// Held-out recall and the modality gap (rank 0, after the last step).
    pub eval: Option<ClipEval>,
    /// The exported HF directory (rank 0).
    pub export_dir: Option<String>,
    /// Newest checkpoint written.
    pub checkpoint: Option<String>,
    /// Mean seconds per optimiser step.
    pub step_time_s: f64,
    /// Fraction of the time spent waiting for data.
    pub data_wait_fraction: f64,
    /// The metrics file.
    pub metrics: PathBuf,
    /// This process's rank.
    pub rank: usize,
    /// Ranks that trained together.
    pub world_size: usize,
}

/// What a CLIP checkpoint records and a resume must agree with.
#[derive(Serialize)]
struct ClipTrajectory<'a> {
    model: &'a ClipConfig,
    optim: &'a crate::optim::OptimConfig,
    seed: u64,
    global_batch_size: usize,
    split: &'a SplitConfig,
    captions_version: u64,
    rows: u64,
    tokenizer_sha256: &'a str,
    caption_templates: &'a [String],
    random_crop_scale: f64,
    first_part_prob: f64,
}

/// One step's data, on the host.
struct ClipBatch {
    /// `[B, 3, S, S]`, normalised.
    pixels: Tensor,
    /// `[B, context]` token ids.
    tokens: Tensor,
}

/// Trains (or resumes) the CLIP per `cfg` and exports it. `progress` is called after every
/// step; `Break` stops at that step with a checkpoint (no export).
pub async fn train_clip(
    cfg: &TrainClipConfig,
    storage: &StorageConfig,
    rdv: &Rendezvous,
    progress: &mut dyn FnMut(&TrainProgress) -> ControlFlow<()>,
) -> Result<ClipTrainSummary> {
    cfg.validate()?;
    let mut run = ClipRun::set_up(cfg, storage, rdv).await?;
    let resumed_from = run.resume().await?;
    let mut loader = run.start_loader()?;
    let images_per_step = (cfg.batch_size * run.dp.world()) as u64;
    let mut metrics = MetricsLog::open(
        &run.out_dir.join("metrics.jsonl"),
        run.step,
        run.dp.is_primary(),
        images_per_step,
    )?;
    let schedule = Schedule {
        max_steps: cfg.max_steps,
        log_every: cfg.log_every,
        images_per_step,
        checkpoint: &cfg.checkpoint,
    };
    let end = run_steps(&mut run, &mut loader, &schedule, &mut metrics, progress).await?;
    drop(loader);
    let elapsed = end.elapsed_s;
    let (eval, export_dir) = if run.dp.is_primary() && !end.stopped {
        let (e, dir) = run.finish().await?;
        metrics.scalars(run.step, &e.scalars())?;
        (Some(e), Some(dir))
    } else {
        (None, None)
    };
    run.dp.wait_for_primary()?;
    Ok(ClipTrainSummary {
        resumed_from,
        step: run.step,
        parameters: run.n_params,
        last_loss: end.last_loss,
        temperature_inverse: f64::try_from(run.model.logit_scale())?.exp(),
        train_rows: run.rows.train.len(),
        holdout_rows: run.rows.holdout.len(),
        prepare: run.prepare.clone(),
        eval,
        export_dir,
        checkpoint: end.checkpoint,
        step_time_s: elapsed / end.steps_run.max(1) as f64,
        data_wait_fraction: if elapsed > 0.0 {
            metrics.total_wait_s() / elapsed
        } else {
            0.0
        },
        metrics: metrics.path().to_path_buf(),
        rank: run.dp.rank(),
        world_size: run.dp.world(),
    })
}

impl Stepping for ClipRun<'_> {
    type Batch = ClipBatch;

    fn step(&self) -> u64 {
        self.step
    }

    fn dp(&mut self) -> &mut DataParallel {
        &mut self.dp
    }

    fn optimiser_step(&mut self, loader: &mut Loader<ClipBatch>) -> Result<StepDone> {
        ClipRun::optimiser_step(self, loader)
    }

    fn metrics_fields(&self, done: &StepDone) -> Result<serde_json::Value> {
        Ok(serde_json::json!({
            "lr": done.lr,
            "grad_norm": done.grad_norm,
            "logit_scale": f64::try_from(self.model.logit_scale())?,
            "skipped_steps": self.opt.skipped_steps,
        }))
    }

    async fn save(&self, recent_losses: Vec<f64>) -> Result<String> {
        ClipRun::save(self, recent_losses).await
    }

    /// The held-out evaluation when due (rank 0; the others wait for it).
    async fn after_step(&mut self, step: u64, metrics: &mut MetricsLog) -> Result<bool> {
        let cfg = self.cfg;
        let at_eval =
            cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every) && step < cfg.max_steps;
        if self.dp.is_primary() && at_eval {
            let e = self.evaluate().await?;
            tracing::info!(step, "held-out: {e}");
            metrics.scalars(step, &e.scalars())?;
        }
        Ok(at_eval)
    }
}

/// A `train-clip` run once set up: where it runs, its captions and tokenizer, the model and
/// optimiser, its checkpoints, and the step it has reached.
struct ClipRun<'a> {
    cfg: &'a TrainClipConfig,
    clip_cfg: ClipConfig,
    device: Device,
    reduced: Option<AutocastDtype>,
    dp: DataParallel,
    out_dir: PathBuf,
    prepare: PrepareSummary,
    rows: Arc<CaptionRows>,
    layout: DataLayout,
    processor: ClipImageProcessor,
    tokenizer_json: String,
    tokenizer: Arc<ClipTokenizer>,
    model: ClipModel,
    params: Vec<(String, Tensor)>,
    n_params: i64,
    opt: Optimiser,
    checkpoints: TrainingCheckpoints,
    step: u64,
}

impl<'a> ClipRun<'a> {
    /// Device and precision, the process group, the captions table and tokenizer, a fresh
    /// model and optimiser, and the checkpoint store.
    async fn set_up(
        cfg: &'a TrainClipConfig,
        storage: &StorageConfig,
        rdv: &Rendezvous,
    ) -> Result<Self> {
        let clip_cfg = cfg.model.resolve()?;
        let (mut dp, reduced) = DataParallel::for_run(
            cfg.device,
            cfg.precision,
            &cfg.distributed,
            rdv,
            "train_clip",
        )?;
        let device = dp.device();
        let out_dir = PathBuf::from(&cfg.output_dir);
        std::fs::create_dir_all(&out_dir).map_err(|e| TrainerError::io(&out_dir, e))?;
        let processor =
            ClipImageProcessor::for_image_size(clip_cfg.vision_config.image_size as u32);
        let (prepare, rows, version) = open_captions(cfg, storage, &processor, &mut dp).await?;
        let layout = data_layout(cfg, &rows, &dp)?;
        let (tokenizer_json, tokenizer) = tokenizer(cfg, &clip_cfg, &rows, &mut dp).await?;
        let tokenizer_sha: String = Sha256::digest(tokenizer_json.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();

        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(device);
        let model = ClipModel::new(vs.root(), &clip_cfg);
        let params = named_parameters(&vs);
        define_gradients(&params);
        let n_params: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        tracing::info!(
            parameters = n_params,
            dim = clip_cfg.projection_dim,
            device = ?device,
            rank = dp.rank(),
            world = dp.world(),
            "CLIP with {:.2}M parameters",
            n_params as f64 / 1e6
        );
        let mut opt = Optimiser::new(&params, &cfg.optim, reduced == Some(AutocastDtype::F16));
        // Decay weight matrices only, as open_clip does.
        opt.adamw = AdamW::new(&params).decay_only(&params, |name, t| {
            t.dim() >= 2 && !name.contains("embedding")
        });
        let trajectory = Trajectory::of(&ClipTrajectory {
            model: &clip_cfg,
            optim: &cfg.optim,
            seed: cfg.seed,
            global_batch_size: cfg.batch_size * dp.world(),
            split: &cfg.split(),
            captions_version: version,
            rows: rows.rows(),
            tokenizer_sha256: &tokenizer_sha,
            caption_templates: &cfg.data.caption_templates,
            random_crop_scale: cfg.data.random_crop_scale,
            first_part_prob: cfg.data.first_part_prob,
        });
        let store =
            CheckpointStore::open(&cfg.checkpoint_url(), storage, cfg.checkpoint.keep_last)?;
        Ok(Self {
            cfg,
            clip_cfg,
            device,
            reduced,
            dp,
            out_dir,
            prepare,
            rows,
            layout,
            processor,
            tokenizer_json,
            tokenizer: Arc::new(tokenizer),
            model,
            params,
            n_params,
            opt,
            checkpoints: TrainingCheckpoints::new(store, trajectory),
            step: 0,
        })
    }

    /// Loads the newest valid checkpoint, if any, then makes every replica rank 0's.
    /// Returns the step resumed from (0: a fresh start).
    async fn resume(&mut self) -> Result<u64> {
        let layout = &self.layout;
        self.step = self
            .checkpoints
            .resume_run(&mut self.dp, &self.params, &mut self.opt, |step| {
                layout.cursor(step)
            })
            .await?;
        Ok(self.step)
    }

    /// The training batches, read `cfg.data.prefetch_batches` ahead from the current step to
    /// the last, each sample augmented from its own random stream (template, first part,
    /// crop of the image).
    fn start_loader(&self) -> Result<Loader<ClipBatch>> {
        let cfg = self.cfg;
        let side = self.clip_cfg.vision_config.image_size as u32;
        let (rows, tokenizer, processor, layout) = (
            self.rows.clone(),
            self.tokenizer.clone(),
            self.processor.clone(),
            self.layout,
        );
        let seed = cfg.seed;
        let templates = Arc::new(cfg.data.caption_templates.clone());
        let min_side = ((side as f64 * cfg.data.random_crop_scale).ceil() as u32).clamp(1, side);
        let first_part_prob = cfg.data.first_part_prob;
        Loader::start(
            move |m| {
                let (rows, tokenizer, processor, templates) = (
                    rows.clone(),
                    tokenizer.clone(),
                    processor.clone(),
                    templates.clone(),
                );
                async move {
                    let (epoch, positions) = layout.positions(m);
                    let perm = EpochPermutation::new(layout.train_rows(), seed, epoch);
                    let offsets: Vec<u64> = positions
                        .iter()
                        .map(|&p| rows.train[perm.apply(p) as usize])
                        .collect();
                    // Each sample's template from its own stream, like every other draw.
                    let augs: Vec<SampleAug> = positions
                        .iter()
                        .map(|&p| {
                            let mut rng = SampleRng::new(seed ^ AUGMENT_STREAM, epoch, p);
                            let t = (rng.next_u64() % templates.len() as u64) as usize;
                            let c =
                                min_side + (rng.next_u64() % (side - min_side + 1) as u64) as u32;
                            let x = (rng.next_u64() % (side - c + 1) as u64) as u32;
                            let y = (rng.next_u64() % (side - c + 1) as u64) as u32;
                            SampleAug {
                                template: templates[t].as_str(),
                                crop: (x, y, c),
                                first_part: rng.uniform() < first_part_prob,
                            }
                        })
                        .collect();
                    load_batch(&rows, &offsets, &tokenizer, &processor, Some(&augs)).await
                }
            },
            self.step..cfg.max_steps,
            cfg.data.prefetch_batches,
        )
    }

    /// One optimiser step on the global batch: both towers, the gathered loss, gradients
    /// averaged over ranks, AdamW, and the temperature kept in range.
    fn optimiser_step(&mut self, loader: &mut Loader<ClipBatch>) -> Result<StepDone> {
        let cfg = self.cfg;
        let lr = cfg.optim.lr_at(self.step, cfg.max_steps);
        zero_gradients(&self.params);
        let batch = loader.next_batch()?;
        let loss = contrastive_loss(&self.model, &batch, self.device, self.reduced, &mut self.dp)?;
        (&loss * self.opt.loss_factor(1)).backward();
        let local = f64::try_from(&loss)? / self.dp.world() as f64;
        self.dp.average_gradients(&self.params)?;
        let (grad_norm, _) = self.opt.step(&self.params, &cfg.optim, lr, self.step);
        tch::no_grad(|| {
            let _ = self
                .model
                .logit_scale()
                .shallow_clone()
                .clamp_(0.0, loss::MAX_LOGIT_SCALE);
        });
        self.step += 1;
        Ok(StepDone {
            loss: local,
            lr,
            grad_norm,
        })
    }

    /// Writes the checkpoint of the current step (rank 0).
    async fn save(&self, recent_losses: Vec<f64>) -> Result<String> {
        let at = SavePoint {
            step: self.step,
            cursor: self.layout.cursor(self.step),
            seed: self.cfg.seed,
            world_size: self.dp.world(),
            recent_losses,
        };
        self.checkpoints.save(at, &self.params, &self.opt).await
    }

    /// Embeds the held-out rows and scores them.
    async fn evaluate(&self) -> Result<ClipEval> {
        let rows = &self.rows;
        if rows.holdout.is_empty() {
            return Err(TrainerError::config(
                "train_clip.split.holdout_fraction",
                "no held-out rows to evaluate on; raise the fraction or add data",
            ));
        }
        let (img, txt) = self.embed_rows(&rows.holdout).await?;
        Ok(eval::evaluate(&img, &txt))
    }

    /// After the last step (rank 0): the held-out scores in `eval.json`, and the model with
    /// its tokenizer, processor and modality means as an HF directory. Returns the scores
    /// and the directory.
    async fn finish(&self) -> Result<(ClipEval, String)> {
        let e = self.evaluate().await?;
        tracing::info!("held-out after step {}: {e}", self.step);
        let path = self.out_dir.join("eval.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&e).expect("eval serialises"),
        )
        .map_err(|err| TrainerError::io(&path, err))?;
        let dir = self.cfg.export_dir();
        let cpu: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().to_device(Device::Cpu)))
            .collect();
        let means = self.modality_means().await?;
        export::write_hf_dir(
            Path::new(&dir),
            &self.clip_cfg,
            &cpu,
            &self.tokenizer_json,
            &self.processor,
            &means,
        )?;
        tracing::info!(dir = %dir, "exported the CLIP as an HF directory");
        Ok((e, dir))
    }

    /// L2-normalised image and text embeddings `[n, d]` of the rows at `offsets` (captions
    /// as they are, images not cropped).
    async fn embed_rows(&self, offsets: &[u64]) -> Result<(Tensor, Tensor)> {
        let (model, device) = (&self.model, self.device);
        let (mut imgs, mut txts) = (Vec::new(), Vec::new());
        for chunk in offsets.chunks(256) {
            let b = load_batch(&self.rows, chunk, &self.tokenizer, &self.processor, None).await?;
            tch::no_grad(|| {
                imgs.push(l2_normalize(
                    &model.image_features(&b.pixels.to_device(device)),
                ));
                txts.push(l2_normalize(
                    &model.text_features(&b.tokens.to_device(device)),
                ));
            });
        }
        Ok((Tensor::cat(&imgs, 0), Tensor::cat(&txts, 0)))
    }

    /// The mean text and image embeddings of (up to 8,192, evenly spread) training pairs.
    async fn modality_means(&self) -> Result<ModalityMeans> {
        let train = &self.rows.train;
        let every = train.len().div_ceil(8192).max(1);
        let offsets: Vec<u64> = train.iter().step_by(every).copied().collect();
        let (img, txt) = self.embed_rows(&offsets).await?;
        let mean = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(Vec::<f32>::try_from(
                t.mean_dim(0, false, Kind::Float).to_device(Device::Cpu),
            )?)
        };
        Ok(ModalityMeans {
            text_mean: mean(&txt)?,
            image_mean: mean(&img)?,
            pairs: offsets.len(),
        })
    }
}

/// The captions table, prepared (once, by every rank's share of the shards) and opened at
/// the version rank 0 saw, so that every rank reads the same rows.
async fn open_captions(
    cfg: &TrainClipConfig,
    storage: &StorageConfig,
    processor: &ClipImageProcessor,
    dp: &mut DataParallel,
) -> Result<(PrepareSummary, Arc<CaptionRows>, u64)> {
    let prepare = captions::prepare(cfg, storage, processor, dp).await?;
    let uri = captions::table_uri(cfg);
    let latest = knn_indexer::table::load_dataset(&uri, &storage.to_lance_options(), None)
        .await
        .map_err(|e| TrainerError::lance(&uri, e))?
        .version()
        .version;
    let version = dp.broadcast_u64(latest)?;
    let rows = Arc::new(CaptionRows::open(&uri, storage, version, &cfg.split()).await?);
    if dp.rank() == 0 {
        rows.pin_for(&cfg.output_dir).await;
    }
    tracing::info!(
        table = %uri,
        train = rows.train.len(),
        holdout = rows.holdout.len(),
        "captions table ready"
    );
    Ok((prepare, rows, version))
}

/// How the training pairs are split over ranks and steps.
fn data_layout(cfg: &TrainClipConfig, rows: &CaptionRows, dp: &DataParallel) -> Result<DataLayout> {
    DataLayout::new(rows.train.len() as u64, cfg.batch_size, dp.rank(), dp.world())
        .map_err(|_| TrainerError::config(
            "train_clip.batch_size",
            format!(
                "one global batch ({} x {} ranks) is larger than the {} training pairs; lower it or add data",
                cfg.batch_size,
                dp.world(),
                rows.train.len()
            ),
        ))
}

/// The run's tokenizer: trained by rank 0 on the training captions the first time and kept
/// in `<output_dir>/tokenizer.json`, so a resumed run tokenizes exactly as before. Returns its
/// JSON text and the loaded tokenizer.
async fn tokenizer(
    cfg: &TrainClipConfig,
    clip: &ClipConfig,
    rows: &CaptionRows,
    dp: &mut DataParallel,
) -> Result<(String, ClipTokenizer)> {
    let path = Path::new(&cfg.output_dir).join("tokenizer.json");
    if dp.is_primary() && !path.is_file() {
        let captions = rows.training_captions().await?;
        let vocab = clip.text_config.vocab_size as usize;
        let json = train_bpe(captions.iter().map(String::as_str), vocab).map_err(|r| {
            TrainerError::config(
                "train_clip.model.vocab_size",
                format!("training it on the captions failed: {r}"),
            )
        })?;
        let tmp = path.with_extension("json.partial");
        std::fs::write(&tmp, &json).map_err(|e| TrainerError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| TrainerError::io(&path, e))?;
        tracing::info!(path = %path.display(), captions = captions.len(), "trained the tokenizer");
    }
    dp.wait_for_primary()?;
    let json = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
    let tok = ClipTokenizer::from_file(
        &path,
        clip.text_config.max_position_embeddings as usize,
        PAD_TOKEN.1,
    )?;
    let model_vocab = clip.text_config.vocab_size as usize;
    if tok.vocab_size() > model_vocab {
        return Err(TrainerError::config(
            "train_clip.model.vocab_size",
            format!(
                "{} holds {} tokens but the model has {model_vocab}: it was trained for another \
                 model; use a new train_clip.output_dir (or delete the file to train a new one)",
                path.display(),
                tok.vocab_size()
            ),
        ));
    }
    Ok((json, tok))
}

/// Keys the augmentation draws apart from the data order's.
const AUGMENT_STREAM: u64 = 0x7E3A_11C0_5EED_0001;

/// What training changes in one sample: the template its caption is put in, whether the
/// caption is cut to its first part, and the square of its image (x, y, side) that is cut out
/// and scaled back to the input size.
struct SampleAug<'a> {
    template: &'a str,
    crop: (u32, u32, u32),
    first_part: bool,
}

/// Rows at `offsets` as model inputs, augmented by `augs[i]` when given (training).
async fn load_batch(
    rows: &CaptionRows,
    offsets: &[u64],
    tokenizer: &ClipTokenizer,
    processor: &ClipImageProcessor,
    augs: Option<&[SampleAug<'_>]>,
) -> Result<ClipBatch> {
    let b = rows.take(offsets).await?;
    let mut pixels = Vec::new();
    let mut side = 0;
    for (i, (id, png)) in b.ids.iter().zip(&b.images).enumerate() {
        let mut img = image::load_from_memory(png)
            .map_err(|e| TrainerError::BadRecord {
                table: rows.uri.clone(),
                id: *id,
                reason: format!("stored image does not decode: {e}"),
            })?
            .to_rgb8();
        let full = img.width();
        if let Some((x, y, c)) = augs.map(|a| a[i].crop).filter(|&(_, _, c)| c < full) {
            let cut = image::imageops::crop_imm(&img, x, y, c, c).to_image();
            img = knn_datasets::resize::resize(
                &cut,
                full,
                full,
                knn_datasets::resize::Filter::Bilinear,
            );
        }
        side = img.width() as i64;
        processor.normalize_into(&img, &mut pixels);
    }
    let texts: Vec<String> = match augs {
        Some(a) => b
            .captions
            .iter()
            .zip(a)
            .map(|(c, a)| {
                let c = if a.first_part {
                    c.split(',').next().unwrap_or(c).trim()
                } else {
                    c.as_str()
                };
                a.template.replace("{}", c)
            })
            .collect(),
        None => b.captions,
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokens = tokenizer
        .encode(&refs)
        .map_err(|e| TrainerError::Loader(format!("tokenizing captions: {e}")))?;
    Ok(ClipBatch {
        pixels: Tensor::from_slice(&pixels).view([offsets.len() as i64, 3, side, side]),
        tokens,
    })
}

/// This rank's part of the loss of the global batch: its own features against everyone's
/// (gathered without gradient, its own slice with), times the ranks, so that averaging the
/// ranks' gradients gives the gradient of the global loss.
fn contrastive_loss(
    model: &ClipModel,
    batch: &ClipBatch,
    device: Device,
    reduced: Option<AutocastDtype>,
    dp: &mut DataParallel,
) -> Result<Tensor> {
    if let Some(dtype) = reduced {
        set_cuda_autocast_dtype(dtype);
    }
    let (img, txt) = tch::autocast(reduced.is_some(), || {
        let img = model.image_features(&batch.pixels.to_device(device));
        let txt = model.text_features(&batch.tokens.to_device(device));
        (
            l2_normalize(&img.to_kind(Kind::Float)),
            l2_normalize(&txt.to_kind(Kind::Float)),
        )
    });
    let all_img = dp.gather_with_own(&img)?;
    let all_txt = dp.gather_with_own(&txt)?;
    // Every rank sees the whole temperature gradient (not a share, as for the features):
    // its value stays, its gradient is cut by the ranks, so the average is the true one.
    let w = dp.world() as f64;
    let scale = model.logit_scale();
    let scale = scale / w + scale.detach() * (1.0 - 1.0 / w);
    Ok(loss::clip_loss(&all_img, &all_txt, &scale) * w)
}
