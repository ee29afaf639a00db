//! `knn-diffusion bench embed`: measures the embed stage on this machine and writes the
//! numbers into BENCHMARKS.md beside its peers, measured in the same run:
//! - end to end: `knn-diffusion embed` in a fresh process (so its peak RSS is its own) on
//!   the image set at 1x and at each larger scale (the set linked several times);
//! - model only: the same CLIP on random input at the same batch size;
//! - the Python reference (`python/bench_embed_reference.py`: PIL + HF processor in a torch
//!   DataLoader, `CLIPModel.get_image_features`) on the same images, model and batch.

use crate::{build_profile, machine, python_json, write_section};
use anyhow::{bail, Context, Result};
use clap::Args;
use knn_cluster::job::Stage;
use knn_indexer::clip::RandomPreset;
use knn_indexer::EmbedSummary;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags of `bench embed`.
#[derive(Debug, Args)]
pub struct BenchEmbedArgs {
    /// Folder of images (the 1x input).
    #[arg(long, default_value = "data/emoji-google/images")]
    pub images: PathBuf,
    /// Random-weight CLIP shape: tiny, vit-b-32 or vit-l-14.
    #[arg(long, default_value = "tiny", value_parser = crate::named::<RandomPreset>("tiny, vit-b-32 or vit-l-14"))]
    pub model: RandomPreset,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Input scales for the end-to-end runs, e.g. `1,4`.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub scales: Vec<usize>,
    /// Use only the first N images of the folder (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Skip the Python reference.
    #[arg(long)]
    pub no_python: bool,
    /// DataLoader workers of the Python reference.
    #[arg(long, default_value_t = 2)]
    pub python_workers: usize,
    /// Repeats of each 1x measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

/// What to measure.
#[derive(Debug)]
pub struct EmbedBench {
    /// Folder of images (the 1x set).
    pub images: PathBuf,
    /// Random-weight CLIP architecture.
    pub model: RandomPreset,
    /// Images per CLIP batch (pipeline, model-only and Python alike).
    pub batch_size: usize,
    /// Input scales to run end to end (1 = the set once).
    pub scales: Vec<usize>,
    /// Use at most this many images of the set (0: all).
    pub limit: usize,
    /// Also run the Python reference.
    pub python: bool,
    /// DataLoader workers for the Python reference.
    pub python_workers: usize,
    /// Markdown file to update.
    pub write: Option<PathBuf>,
    /// Times each 1x measurement is repeated (medians are reported).
    pub repeats: usize,
}

fn image_files(dir: &Path, limit: usize) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading image folder `{}`", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if limit > 0 {
        files.truncate(limit);
    }
    if files.is_empty() {
        bail!("no images in `{}`", dir.display());
    }
    Ok(files)
}

/// Lays out `scale` copies of `files` (hard links) under `root/copyK/`.
fn layout(files: &[PathBuf], root: &Path, scale: usize) -> Result<()> {
    for k in 0..scale {
        let dir = root.join(format!("copy{k}"));
        std::fs::create_dir_all(&dir)?;
        for f in files {
            let target = dir.join(f.file_name().context("file name")?);
            if std::fs::hard_link(f, &target).is_err() {
                std::fs::copy(f, &target).with_context(|| format!("copying `{}`", f.display()))?;
            }
        }
    }
    Ok(())
}

fn run_embed(bench: &EmbedBench, source: &Path, work: &Path) -> Result<EmbedSummary> {
    let cfg = work.join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[embed.source]\nurl = {:?}\nformat = \"folder\"\nfolder_shard_size = 500\n\
             [embed.output]\ntable = {:?}\n\
             [embed.clip]\nbatch_size = {}\nrandom_preset = \"{}\"\n",
            source.display().to_string(),
            work.join("emb.lance").display().to_string(),
            bench.batch_size,
            bench.model.name()
        ),
    )?;
    let json = work.join("summary.json");
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([Stage::Embed.command(), "--config"])
        .arg(&cfg)
        .arg("--summary-json")
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .context("running knn-diffusion embed")?;
    if !out.status.success() {
        bail!(
            "embed failed during the benchmark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&json)?;
    serde_json::from_str(&text).context("reading embed's --summary-json")
}

fn run_python(bench: &EmbedBench, images: &Path, config: &Path) -> Result<Value> {
    python_json(
        "python/bench_embed_reference.py",
        &[
            "--images".into(),
            images.into(),
            "--config".into(),
            config.into(),
            "--batch-size".into(),
            bench.batch_size.to_string().into(),
            "--workers".into(),
            bench.python_workers.to_string().into(),
        ],
    )
}

/// Runs the benchmark and returns the markdown section.
pub fn run(bench: &EmbedBench) -> Result<String> {
    let files = image_files(&bench.images, bench.limit)?;
    let n = files.len();
    let work = tempfile::tempdir()?;
    // One 1x copy of the images serves both our runs and Python's.
    let one_x = work.path().join("x1");
    layout(&files, &one_x.join("src"), 1)?;
    let repeats = alternate(bench, &one_x, n)?;
    let spread = repeats
        .ours
        .iter()
        .map(|s| format!("{:.1}", s.images_per_s()))
        .collect::<Vec<_>>();
    let median = repeats.ours[repeats.ours.len() / 2].clone();
    let mut runs = vec![(1usize, median)];
    for &scale in bench.scales.iter().filter(|&&s| s != 1) {
        let dir = work.path().join(format!("x{scale}"));
        layout(&files, &dir.join("src"), scale)?;
        eprintln!("end to end at {scale}x ({} images)...", n * scale);
        runs.push((scale, run_embed(bench, &dir.join("src"), &dir)?));
    }
    let md = report(bench, n, &runs, &spread, &repeats)?;
    if let Some(path) = &bench.write {
        write_section(path, &format!("embed:{}", bench.model.name()), &md)?;
    }
    Ok(md)
}

/// The 1x measurements, each sorted by rate.
struct Repeats {
    ours: Vec<EmbedSummary>,
    model_only: f64,
    python: Option<Value>,
}

/// Repeated 1x measurements of the `n` images under `one_x/src`. They alternate between
/// ours, the model alone and Python, so that noise from a shared machine falls on all three
/// alike; each reports its median.
fn alternate(bench: &EmbedBench, one_x: &Path, n: usize) -> Result<Repeats> {
    let device = tch::Device::cuda_if_available();
    let batches = n.div_ceil(bench.batch_size).clamp(3, 200);
    let hf_config = one_x.join("hf-config.json");
    if bench.python {
        std::fs::write(&hf_config, serde_json::to_string(&bench.model.config())?)?;
    }
    let (mut ours, mut model, mut python) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..bench.repeats.max(1) {
        eprintln!(
            "repeat {}/{}: end to end ({n} images)...",
            r + 1,
            bench.repeats.max(1)
        );
        let dir = one_x.join(format!("run{r}"));
        std::fs::create_dir_all(&dir)?;
        ours.push(run_embed(bench, &one_x.join("src"), &dir)?);
        eprintln!("repeat {}: model only...", r + 1);
        let clip = knn_indexer::clip::checkpoint::random_clip(&bench.model.config(), 0, device);
        model.push(knn_indexer::bench::model_only_img_per_s(
            &clip,
            device,
            bench.batch_size,
            batches,
            2,
        ));
        drop(clip);
        if bench.python {
            eprintln!("repeat {}: python reference...", r + 1);
            python.push(run_python(bench, &one_x.join("src"), &hf_config)?);
        }
    }
    ours.sort_by(|a, b| a.images_per_s().total_cmp(&b.images_per_s()));
    model.sort_by(f64::total_cmp);
    let py_rate = |v: &Value| v["end_to_end_img_per_s"].as_f64().unwrap_or(f64::NAN);
    python.sort_by(|a, b| py_rate(a).total_cmp(&py_rate(b)));
    let model_only = model[model.len() / 2];
    let python = (!python.is_empty()).then(|| python[python.len() / 2].clone());
    Ok(Repeats {
        ours,
        model_only,
        python,
    })
}

/// The markdown section: the 1x table beside the model alone and Python, then the scales.
fn report(
    bench: &EmbedBench,
    n: usize,
    runs: &[(usize, EmbedSummary)],
    spread: &[String],
    repeats: &Repeats,
) -> Result<String> {
    let (model_only, python) = (repeats.model_only, &repeats.python);
    let (_, base) = &runs[0];
    let e2e = base.images_per_s();
    let mut md = String::new();
    let profile = build_profile();
    writeln!(
        md,
        "### embed, random-weight CLIP `{}`, batch {}",
        bench.model.name(),
        bench.batch_size
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "Machine: {}. Build: {profile}. Images: {} x {n} real 64 px emoji PNGs (`{}`).",
        machine(),
        runs.iter()
            .map(|r| r.0.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        bench.images.display()
    )?;
    writeln!(
        md,
        "Medians of {} alternating repeats (ours end to end: {} img/s).",
        bench.repeats.max(1),
        spread.join(", ")
    )?;
    writeln!(md)?;
    writeln!(md, "| measure | img/s | ratio |")?;
    writeln!(md, "|---|---:|---|")?;
    writeln!(
        md,
        "| model only (same model, batch, device; random input) | {model_only:.1} | |"
    )?;
    writeln!(md, "| end to end, 1x (`knn-diffusion embed`, list → Lance commit) | {e2e:.1} | {:.2} x model only |", e2e / model_only)?;
    writeln!(
        md,
        "| stage: CLIP thread while busy | {:.1} | |",
        base.images_ok as f64 / base.model_busy_s.max(1e-9)
    )?;
    writeln!(
        md,
        "| stage: decode + resize + preprocess, per thread while busy | {:.1} | |",
        base.images_ok as f64 / base.decode_busy_s.max(1e-9)
    )?;
    if let Some(p) = &python {
        let pe = p["end_to_end_img_per_s"].as_f64().unwrap_or(f64::NAN);
        writeln!(md, "| Python reference end to end (PIL, HF processor, DataLoader {} workers) | {pe:.1} | ours = {:.2} x Python |", bench.python_workers, e2e / pe)?;
        writeln!(
            md,
            "| Python reference model only | {:.1} | |",
            p["model_only_img_per_s"].as_f64().unwrap_or(f64::NAN)
        )?;
        writeln!(
            md,
            "| Python reference decode + preprocess, 1 thread | {:.1} | |",
            p["decode_preprocess_img_per_s"]
                .as_f64()
                .unwrap_or(f64::NAN)
        )?;
    }
    writeln!(md)?;
    writeln!(md, "| input | images | end-to-end img/s | peak RSS MiB |")?;
    writeln!(md, "|---|---:|---:|---:|")?;
    for (scale, s) in runs {
        writeln!(
            md,
            "| {scale}x | {} | {:.1} | {:.0} |",
            s.images_ok,
            s.images_per_s(),
            s.peak_rss_mib.unwrap_or(f64::NAN)
        )?;
    }
    if let Some(p) = &python {
        writeln!(
            md,
            "| Python 1x | {} | {:.1} | {:.0} (main) + {:.0} (workers) |",
            p["images"],
            p["end_to_end_img_per_s"].as_f64().unwrap_or(f64::NAN),
            p["peak_rss_self_mb"].as_f64().unwrap_or(f64::NAN),
            p["peak_rss_children_mb"].as_f64().unwrap_or(f64::NAN)
        )?;
    }
    Ok(md)
}
