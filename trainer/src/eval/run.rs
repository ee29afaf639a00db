//! `knn-diffusion eval`: prepare what the comparisons need (a kNN table deep enough for the
//! kNN arm, the score column, the swap tables), train or find the arms of every seed, read
//! the held-out set, then per seed sample every comparison with the same noise, measure it
//! in the judge CLIP's space, and write the report.

use super::arms::{ensure_arm, train_arms, Arm, ArmLauncher};
use super::config::{ArmKind, EvalConfig};
use super::measure::{centroid, mean_colourfulness, style_shares, Measures, Reference};
use super::report::{claims, Claim, Report, RunFacts, SeedResult};
use super::sets::{held_out, split_rows, style_images, HeldOut};
use crate::config::TrainConfig;
use crate::judge::image_features;
use crate::model::TrainedModel;
use crate::sample::{retrieve, table_images, Retrieved};
use crate::sampling::{generate_all, write_grid};
use crate::{Result, TrainerError};
use knn_datasets::{SplitConfig, StorageConfig};
use knn_indexer::clip::{l2_normalize, ClipSettings, LoadedClip};
use knn_indexer::knn::precompute::existing_meta;
use knn_indexer::knn::{KnnConfig, KnnProgress, Retriever, ScoreBucket};
use knn_indexer::score::ScoreConfig;
use knn_indexer::{EmbedConfig, EmbedProgress};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

/// Everything `eval` reads from the project config, resolved by the CLI.
#[derive(Clone, Debug)]
pub struct EvalPlan {
    /// `[eval]`.
    pub eval: EvalConfig,
    /// Run `[eval.quick]`'s small form.
    pub quick: bool,
    /// `[train]`, its tables resolved: every arm starts from it.
    pub train: TrainConfig,
    /// `[knn]`, resolved: the kNN arm's table is made with it when `[knn]`'s own is too
    /// shallow.
    pub knn: KnnConfig,
    /// `[embed]`: the swap tables are embedded with its CLIP and output settings.
    pub embed: Option<EmbedConfig>,
    /// The pipeline's CLIP (the prompts' text side).
    pub clip: ClipSettings,
    /// The judge CLIP.
    pub judge: ClipSettings,
    /// The captions table.
    pub captions: String,
    /// `[score]`, resolved.
    pub score: ScoreConfig,
    /// The held-out split.
    pub split: SplitConfig,
    /// How to train arms in child processes on the CPU (None: all in this process).
    pub launcher: Option<ArmLauncher>,
}

impl EvalPlan {
    /// `[eval]`, or its `--quick` form.
    pub fn config(&self) -> EvalConfig {
        if self.quick {
            self.eval.quick()
        } else {
            self.eval.clone()
        }
    }
}

/// What `eval` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct EvalSummary {
    /// `report.md`.
    pub report_md: PathBuf,
    /// `report.json`.
    pub report_json: PathBuf,
    /// The claims and their verdicts.
    pub claims: Vec<Claim>,
    /// Arms trained by this run (0: all found trained).
    pub arms_trained: usize,
    /// Wall seconds.
    pub seconds: f64,
}

/// The loaded CLIPs and the held-out set as the judge reads it.
struct Judged {
    held: HeldOut,
    /// The prompts' condition embeddings, `n · d` row-major.
    queries: Vec<f32>,
    judge: LoadedClip,
    reference: Reference,
}

/// What every seed is sampled and read with: the held-out set, each comparison's
/// retrieved neighbours, the baselines and the style centroids.
struct Setting {
    j: Judged,
    /// Embedding dimension of the queries.
    dim: usize,
    /// The deepest k sampled.
    kmax: usize,
    /// The training table's neighbours of each prompt (held-out rows excluded), deepest k.
    found: Retrieved,
    /// Each swap table's, at the headline k.
    swap_found: Vec<(String, Retrieved)>,
    /// Each score bucket's, for the first `bucket_prompts` prompts.
    bucket_found: Vec<Retrieved>,
    bucket_prompts: usize,
    /// The top retrieved image per prompt (the NN-retrieval baseline).
    nn_images: Tensor,
    nn_retrieval: Measures,
    train_images: Measures,
    held_out_images: Measures,
    /// `own` then the swap tables' names, and their centroids `[styles, d]`.
    styles: Vec<String>,
    centroids: Tensor,
}

/// Runs the evaluation per `plan`.
pub async fn eval(plan: &EvalPlan, storage: &StorageConfig) -> Result<EvalSummary> {
    let started = Instant::now();
    let cfg = plan.config();
    cfg.validate()?;
    let run_dir = cfg.output_dir.trim_end_matches('/').to_string();
    let tables_dir = format!("{}/tables", plan.eval.output_dir.trim_end_matches('/'));
    let device = plan
        .train
        .device
        .resolve()
        .map_err(|e| TrainerError::config("train.device", e.to_string()))?;
    let table = plan
        .train
        .data
        .embeddings
        .clone()
        .ok_or_else(|| TrainerError::config("train.data.embeddings", "no training table"))?;
    let knn_table = deep_enough_knn(plan, &cfg, &tables_dir, storage).await?;
    if cfg.buckets.count > 0 {
        ensure_score(&plan.score, &table, storage).await?;
    }
    let swaps = swap_tables(plan, &cfg, &tables_dir, storage).await?;
    let launcher = plan.launcher.as_ref().filter(|_| device == Device::Cpu);
    let arms = train_arms(&plan.train, &cfg, (&run_dir, &knn_table), launcher, storage).await?;
    let train_seconds = started.elapsed().as_secs_f64();

    let measuring = Instant::now();
    // The first seed's kNN arm also gives the image side and the CLIP the set is read with.
    let mut models = load_arms(&arms, cfg.seeds[0], storage, device).await?;
    let set = setting(plan, &cfg, (&table, &swaps), &models.0, storage, device).await?;
    let (mut seeds, mut grids) = (Vec::new(), Vec::new());
    for (i, &seed) in cfg.seeds.iter().enumerate() {
        if i > 0 {
            models = load_arms(&arms, seed, storage, device).await?;
        }
        let (result, grid) = measure_seed(&cfg, &set, (&models.0, &models.1), seed, &run_dir)?;
        seeds.push(result);
        grids.push(grid);
    }
    let claims = claims(&seeds, &set.styles, cfg.headline_k);
    let seconds = started.elapsed().as_secs_f64();
    let sampler = &cfg.samples.sampler;
    let report = Report {
        facts: RunFacts {
            quick: plan.quick,
            table: table.clone(),
            prompts: set.j.held.ids.len(),
            held_out_rows: set.j.held.all_ids.len(),
            uncaptioned: set.j.held.uncaptioned.0,
            steps: cfg.steps,
            batch_size: cfg.batch_size,
            knn_k: cfg.knn_k,
            headline_k: cfg.headline_k,
            sampler: format!(
                "{:?} {} steps, guidance {}",
                sampler.kind, sampler.steps, cfg.samples.guidance
            )
            .to_lowercase(),
            distractors: set.j.reference.distractors,
            pr_k: cfg.pr_k,
            clip: plan.clip.checkpoint.clone().unwrap_or_default(),
            judge: plan.judge.checkpoint.clone().unwrap_or_default(),
            device: format!("{device:?}"),
            bucket_prompts: set.bucket_prompts,
        },
        arms: arms.clone(),
        seeds,
        nn_retrieval: set.nn_retrieval,
        train_images: set.train_images,
        held_out_images: set.held_out_images,
        styles: set.styles.clone(),
        held_out_score: mean_colourfulness(&set.j.held.images)?,
        claims: claims.clone(),
        seconds: (seconds, train_seconds, measuring.elapsed().as_secs_f64()),
        grids,
    };
    report.write(Path::new(&run_dir))?;
    Ok(EvalSummary {
        report_md: Path::new(&run_dir).join("report.md"),
        report_json: Path::new(&run_dir).join("report.json"),
        claims,
        arms_trained: arms.iter().filter(|a| a.trained_now > 0).count(),
        seconds,
    })
}

/// The `(kNN, no-kNN)` arms of `seed`, loaded with their EMA weights.
async fn load_arms(
    arms: &[Arm],
    seed: u64,
    storage: &StorageConfig,
    device: Device,
) -> Result<(TrainedModel, TrainedModel)> {
    let arm = |kind| {
        arms.iter()
            .find(|a: &&Arm| a.seed == seed && a.kind == kind)
            .expect("every seed has both arms")
    };
    let knn = TrainedModel::load(&arm(ArmKind::Knn).checkpoints, storage, device, true).await?;
    let none = TrainedModel::load(&arm(ArmKind::None).checkpoints, storage, device, true).await?;
    Ok((knn, none))
}

/// Trains arm `(seed, kind)` of `plan` on `knn_table` in this process: what a child
/// process started by [`ArmLauncher`] does.
pub async fn train_arm(
    plan: &EvalPlan,
    job: (u64, ArmKind),
    knn_table: &str,
    storage: &StorageConfig,
) -> Result<Arm> {
    let cfg = plan.config();
    cfg.validate()?;
    let run_dir = cfg.output_dir.trim_end_matches('/');
    ensure_arm(&plan.train, &cfg, run_dir, knn_table, job, storage).await
}

/// Reads the held-out set and everything retrieved for it, the baselines and the style
/// centroids; `model` (the first arm) gives the image side and the CLIP it was trained
/// with.
async fn setting(
    plan: &EvalPlan,
    cfg: &EvalConfig,
    (table, swaps): (&str, &[(String, String)]),
    model: &TrainedModel,
    storage: &StorageConfig,
    device: Device,
) -> Result<Setting> {
    let side = model.model.unet.config().image_size_px;
    let rows = split_rows(table, &plan.split, storage).await?;
    let j = judged(plan, cfg, (table, &rows.held), model, storage, device).await?;
    let n = j.held.ids.len();
    let dim = j.queries.len() / n;
    let kmax = cfg.sweep_k.iter().copied().max().unwrap_or(1);
    let own = Retriever::open(table, storage)
        .await?
        .excluding(rows.held_ids());
    let found = retrieve(&own, &j.queries, dim, kmax, None).await?;
    let top1: Vec<u64> = found
        .ids
        .iter()
        .filter_map(|v| v.first().copied())
        .collect();
    let nn_images = table_images(table, storage, &[top1], n, side).await?;
    let nn_retrieval = j
        .reference
        .measure(&image_features(&j.judge, &nn_images)?)?;
    let train_imgs = style_images(table, &rows.kept, n, side, storage).await?;
    let train_images =
        j.reference
            .measure_parts(&image_features(&j.judge, &train_imgs)?, true, false)?;
    let held_out_images = j.reference.measure_parts(&j.reference.real, false, true)?;

    let mut styles = vec!["own".to_string()];
    let own_style = style_images(table, &rows.kept, cfg.style_images, side, storage).await?;
    let mut centroids = vec![centroid(&image_features(&j.judge, &own_style)?)];
    let mut swap_found = Vec::new();
    for (name, uri) in swaps {
        styles.push(name.clone());
        let rows = split_rows(uri, &plan.split, storage).await?;
        let imgs = style_images(uri, &rows.kept, cfg.style_images, side, storage).await?;
        centroids.push(centroid(&image_features(&j.judge, &imgs)?));
        let r = Retriever::open(uri, storage)
            .await?
            .excluding(rows.held_ids());
        let got = retrieve(&r, &j.queries, dim, cfg.headline_k, None).await?;
        swap_found.push((name.clone(), got));
    }
    let bucket_prompts = cfg.buckets.prompts.min(n);
    let mut bucket_found = Vec::new();
    for b in 1..=cfg.buckets.count {
        let bucket = ScoreBucket {
            column: plan.score.column.clone(),
            bucket: b,
            of: cfg.buckets.count,
            pool: cfg.buckets.pool,
        };
        let queries = &j.queries[..bucket_prompts * dim];
        bucket_found.push(retrieve(&own, queries, dim, cfg.headline_k, Some(&bucket)).await?);
    }
    Ok(Setting {
        j,
        dim,
        kmax,
        found,
        swap_found,
        bucket_found,
        bucket_prompts,
        nn_images,
        nn_retrieval,
        train_images,
        held_out_images,
        styles,
        centroids: Tensor::stack(&centroids, 0),
    })
}

/// Samples and measures every comparison of one seed with its arms `(knn, none)`, all with
/// the seed's noise; writes the seed's grid (a row per comparison, the first 8 prompts).
fn measure_seed(
    cfg: &EvalConfig,
    set: &Setting,
    (knn, none): (&TrainedModel, &TrainedModel),
    seed: u64,
    run_dir: &str,
) -> Result<(SeedResult, String)> {
    let started = Instant::now();
    check_arm(knn, set.kmax, "knn")?;
    let sample = |model: &TrainedModel, found: &Retrieved, queries: &[f32], k: usize| {
        let slots = model.model.unet.config().knn + 1;
        let (e, p) = found.conditions(queries, k, slots);
        let sampler = cfg
            .samples
            .sampler
            .build(&model.model.diffusion, "eval.samples.sampler")?;
        Ok::<_, TrainerError>(generate_all(
            &model.model,
            sampler.as_ref(),
            (&e, &p),
            cfg.samples.guidance,
            seed,
            cfg.samples.batch_size,
        ))
    };
    let (j, q) = (&set.j, &set.j.queries);
    let features = |imgs: &Tensor| image_features(&j.judge, imgs);
    let mut rows = vec![j.held.images.shallow_clone(), set.nn_images.shallow_clone()];
    let none_images = sample(none, &set.found, q, 0)?;
    let no_knn = j.reference.measure(&features(&none_images)?)?;
    rows.push(none_images);
    let (mut sweep, mut headline) = (Vec::new(), None);
    for &k in &cfg.sweep_k {
        let imgs = sample(knn, &set.found, q, k)?;
        let feats = features(&imgs)?;
        sweep.push((k, j.reference.measure(&feats)?));
        if k == cfg.headline_k {
            headline = Some(feats);
        }
        rows.push(imgs);
    }
    let mut swap = Vec::new();
    if !set.swap_found.is_empty() {
        let feats = headline.expect("validate: headline_k is one of sweep_k");
        swap.push(("own".to_string(), style_shares(&feats, &set.centroids)?));
        for (name, found) in &set.swap_found {
            let imgs = sample(knn, found, q, cfg.headline_k)?;
            swap.push((
                name.clone(),
                style_shares(&features(&imgs)?, &set.centroids)?,
            ));
            rows.push(imgs);
        }
    }
    let mut buckets = Vec::new();
    for found in &set.bucket_found {
        let imgs = sample(
            knn,
            found,
            &q[..set.bucket_prompts * set.dim],
            cfg.headline_k,
        )?;
        buckets.push(mean_colourfulness(&imgs)?);
    }
    let cols = j.held.ids.len().min(8) as i64;
    let grid: Vec<Tensor> = rows.iter().map(|r| r.narrow(0, 0, cols)).collect();
    let path = Path::new(run_dir)
        .join("grids")
        .join(format!("seed-{seed}.png"));
    write_grid(&Tensor::cat(&grid, 0), cols as usize, &path)?;
    let sample_seconds = started.elapsed().as_secs_f64();
    tracing::info!(seed, seconds = sample_seconds, "seed sampled and measured");
    Ok((
        SeedResult {
            seed,
            no_knn,
            sweep,
            swap,
            buckets,
            sample_seconds,
        },
        path.display().to_string(),
    ))
}

/// A loaded kNN arm must have been trained with at least `k` neighbours.
fn check_arm(model: &TrainedModel, k: usize, arm: &str) -> Result<()> {
    let trained = model.model.unet.config().knn;
    model.check_k(
        k,
        "eval.sweep_k",
        &format!("the {arm} arm"),
        &format!(
            "lower `eval.sweep_k` to at most {trained} or train the arm with a larger `train.k`"
        ),
    )
}

/// Loads both CLIPs, reads the held-out rows `held` of `table` and embeds them for the model
/// and the judge.
async fn judged(
    plan: &EvalPlan,
    cfg: &EvalConfig,
    (table, held): (&str, &[(u64, String)]),
    model: &TrainedModel,
    storage: &StorageConfig,
    device: Device,
) -> Result<Judged> {
    let side = model.model.unet.config().image_size_px;
    let held = held_out(
        table,
        held,
        (&plan.captions, &cfg.caption_column),
        cfg.prompts,
        side,
        storage,
    )
    .await?;
    tracing::info!(
        prompts = held.ids.len(),
        held_out = held.all_ids.len(),
        uncaptioned = held.uncaptioned.0,
        examples = ?held.uncaptioned.1,
        "held-out set"
    );
    let (clip, clip_id) = plan.clip.load(storage, device).await?;
    if let Some(trained_on) = model.trajectory.clip.as_deref() {
        if trained_on != clip_id {
            return Err(TrainerError::Indexer(
                knn_indexer::IndexerError::ClipMismatch {
                    table: format!("{} (the arm's training table)", model.location),
                    table_clip: trained_on.to_string(),
                    query_clip: clip_id,
                },
            ));
        }
    }
    let refs: Vec<&str> = held.captions.iter().map(String::as_str).collect();
    let q = clip.embed_prompts(&refs)?;
    let queries = Vec::<f32>::try_from(&q.to_device(Device::Cpu).view([-1]))?;
    let (judge, judge_id) = plan.judge.load(storage, device).await?;
    if judge_id == clip_id {
        tracing::warn!(judge = %judge_id, "the judge CLIP is the pipeline's CLIP: its measures are not independent");
    }
    let real = image_features(&judge, &held.images)?;
    let texts = l2_normalize(&judge.embed_texts(&refs)?);
    let reference = Reference::new(real, texts, &held.captions, cfg.distractors, cfg.pr_k, 0)?;
    Ok(Judged {
        held,
        queries,
        judge,
        reference,
    })
}

/// `[knn]`'s table when it holds at least `eval.knn_k` neighbours and marks held-out rows;
/// else one made with `[knn]`'s settings at that k under the eval's tables.
async fn deep_enough_knn(
    plan: &EvalPlan,
    cfg: &EvalConfig,
    tables_dir: &str,
    storage: &StorageConfig,
) -> Result<String> {
    let configured = plan
        .train
        .data
        .knn
        .clone()
        .ok_or_else(|| TrainerError::config("train.data.knn", "no kNN table"))?;
    let opts = storage.to_lance_options();
    if let Some(meta) = existing_meta(&configured, &opts).await? {
        if meta.k >= cfg.knn_k && meta.split.is_some() {
            return Ok(configured);
        }
    }
    let mut knn = plan.knn.clone();
    knn.k = cfg.knn_k;
    knn.output = Some(format!("{tables_dir}/knn-k{}.lance", cfg.knn_k));
    knn.split = Some(plan.split.clone());
    let out = knn.output_uri()?;
    tracing::info!(k = cfg.knn_k, output = %out, "the kNN arm needs a deeper kNN table: precompute-knn");
    let summary =
        knn_indexer::precompute_knn(&knn, storage, (0, 1), Arc::new(KnnProgress::default()))
            .await?;
    tracing::info!("{summary}");
    Ok(out)
}

/// Adds the `[score]` column to `table` when it has none.
async fn ensure_score(score: &ScoreConfig, table: &str, storage: &StorageConfig) -> Result<()> {
    let ds = knn_indexer::table::load_dataset(table, &storage.to_lance_options(), None)
        .await
        .map_err(|e| TrainerError::lance(table, e))?;
    if ds.schema().field(&score.column).is_some() {
        return Ok(());
    }
    tracing::info!(column = %score.column, table, "the buckets need a score column: scoring");
    let mut cfg = score.clone();
    cfg.table = Some(table.to_string());
    let summary = knn_indexer::score::score(&cfg, storage).await?;
    tracing::info!("{summary}");
    Ok(())
}

/// Each `[[eval.swap]]` source embedded (or found embedded) with the pipeline's CLIP:
/// `(name, table)`.
async fn swap_tables(
    plan: &EvalPlan,
    cfg: &EvalConfig,
    tables_dir: &str,
    storage: &StorageConfig,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for s in &cfg.swap {
        let template = plan.embed.as_ref().ok_or_else(|| {
            TrainerError::config(
                "eval.swap",
                "the swap tables are embedded with [embed]'s CLIP and settings: add [embed]",
            )
        })?;
        let mut e = template.clone();
        e.source = s.source.clone();
        e.output.table = format!("{tables_dir}/{}.lance", s.name);
        e.output.rejects_table = None;
        e.pipeline.max_shards = 0;
        let summary =
            knn_indexer::embed(&e, storage, (0, 1), Arc::new(EmbedProgress::default())).await?;
        if let Some((shard, why)) = summary.shards_failed.first() {
            return Err(TrainerError::config(
                "eval.swap",
                format!("embedding `{}` failed on shard {shard}: {why}", s.name),
            ));
        }
        tracing::info!(name = %s.name, table = %e.output.table, rows = summary.images_ok, skipped_shards = summary.shards_skipped, "swap table");
        out.push((s.name.clone(), e.output.table));
    }
    Ok(out)
}
