//! `knn-diffusion bench`: each stage measured on this machine beside its peers, in the same
//! run, with the numbers written into BENCHMARKS.md (a section per benchmark, between
//! `<!-- bench:NAME -->` markers). Speed and memory goals are met here, never in timed
//! tests. The CLI parses [`BenchCommand`] and hands it to [`run`]; `bench train`'s
//! data-loader run needs the CLI's config loading, so the CLI measures it and passes it to
//! [`train::run`].
//!
//! ```text
//! embed        the embed stage end to end, the model alone, the Python reference
//! knn          precompute-knn vs faiss-cpu IVF-Flat and per-query Lance ANN
//! train        a U-Net step vs PyTorch eager; the loader's share; sampling images/s
//! train-clip   a CLIP step vs HF transformers in PyTorch eager
//! allreduce    our process group vs torch.distributed
//! scale        commits, the loader and embed as the table grows
//! image-path   one decode thread vs Pillow + HF's processor
//! plot         BENCHMARKS.md's figures from their measured points
//! ```
//!
//! A benchmark run from its flags, as `knn-diffusion bench allreduce …` runs it; its section
//! lands between its markers in the file `--out` names (here two in-process ranks over TCP,
//! without the torch.distributed peer):
//!
//! ```
//! use clap::Parser;
//! use knn_bench::BenchCommand;
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(subcommand)]
//!     bench: BenchCommand,
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let out = dir.path().join("BENCHMARKS.md");
//! let cli = Cli::try_parse_from([
//!     "bench", "allreduce", "--mib", "1", "--rounds", "2", "--warmup", "1", "--repeats", "1",
//!     "--no-peer", "--out", out.to_str().unwrap(),
//! ])?;
//! knn_bench::run(cli.bench, &tokio::runtime::Runtime::new()?)?;
//! let written = std::fs::read_to_string(&out)?;
//! assert!(written.contains("<!-- bench:allreduce"), "{written}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod allreduce;
pub mod embed;
pub mod image_path;
pub mod knn;
pub mod loader;
pub mod plot;
pub mod scale;
pub mod scale_embed;
pub mod train;
pub mod train_clip;

use knn_test_support::s3_server;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use tokio::runtime::Runtime;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The embed stage: end to end at several input sizes (peak RSS each), the model alone,
    /// and the Python reference (PIL + HF processor + DataLoader + transformers CLIP), on the
    /// same images, model and batch size.
    Embed(embed::BenchEmbedArgs),
    /// precompute-knn at generated clustered data (normalised, d = 512 by default): queries/s
    /// and recall@10 against exact search, beside faiss-cpu IVF-Flat batch search tuned to
    /// the same recall and per-query Lance ANN search (IVF_PQ, tuned likewise).
    Knn(knn::BenchKnnArgs),
    /// One training step of the U-Net against the same U-Net, loss and optimiser in PyTorch
    /// eager (python/bench_train_torch.py) at the same batch and size; the data loader's
    /// share of step time in a real `train` run on the embedded default tables (run
    /// scripts/demo.sh first); and guided sampling images/s.
    Train(train::BenchTrainArgs),
    /// One `train-clip` step of our CLIP against HF transformers' CLIPModel trained the same
    /// way in PyTorch eager (python/bench_train_clip_torch.py), same preset, batch and
    /// threads.
    TrainClip(train_clip::BenchTrainClipArgs),
    /// The gradient all-reduce: our process group (TCP ring on the CPU, NCCL on GPUs)
    /// against torch.distributed (gloo / NCCL) on the same buffer and world size; time per
    /// all-reduce, algorithm and bus bandwidth.
    Allreduce(allreduce::BenchAllReduceArgs),
    /// What each stage costs as the table grows, at several sizes, with growth exponents.
    #[command(subcommand)]
    Scale(BenchScaleCommand),
    /// One decode thread's work on generated photo-like JPEGs (longest side 512, 4:2:0,
    /// quality 90): decode (drafted and not), the 224 px CLIP input, the stored image in each
    /// format (bytes and time); beside Pillow + HF's processor doing the same on one thread
    /// (python/bench_image_path.py).
    ImagePath(image_path::BenchImagePathArgs),
    /// Draws the figures of BENCHMARKS.md: every `<name>.json` in --dir (measured points,
    /// log–log axes, dashed goal slopes) becomes `<name>.png` beside it.
    Plot(plot::BenchPlotArgs),
}

/// Stages of `bench scale`.
#[derive(Debug, Subcommand)]
pub enum BenchScaleCommand {
    /// One more shard commit (time, bytes written) and a new worker's start-up (open the
    /// table, read the shard ledger; local and through the loopback S3 server) against a
    /// table of 1k, 10k and 50k committed one-row shards, with `[storage.tables]` upkeep
    /// at its defaults and with `keep_versions_hours = 0`; beside the same table without
    /// upkeep, grown to --peer-sizes.
    Commits(scale::BenchScaleCommitsArgs),
    /// The trainer's data loader against tables of --sizes rows (synthetic 32 px rows,
    /// random neighbours): peak RSS of a fresh process that opens the tables and loads
    /// micro-batches, its time per batch, and the data wait at --step-ms a step; beside the
    /// id → row map the loader kept before it read rows by address.
    Loader(loader::BenchScaleLoaderArgs),
    /// One measurement of `bench scale loader`, in a process of its own (run by it).
    #[command(hide = true)]
    LoaderProbe(loader::BenchScaleLoaderProbeArgs),
    /// The embed stage at --sizes records of generated photo-like JPEGs in parquet shards on
    /// the loopback S3 server, run by --workers processes with the tiny random CLIP: img/s,
    /// peak RSS per worker and S3 requests per record (from the server's log), with how
    /// each grows from the smallest size to the largest.
    Embed(scale_embed::BenchScaleEmbedArgs),
}

/// Runs a benchmark other than `bench train` (see the crate docs) and prints what it
/// measured: the markdown section it wrote, or the figures it drew.
pub fn run(cmd: BenchCommand, runtime: &Runtime) -> Result<()> {
    let md = match cmd {
        BenchCommand::Train(_) => {
            bail!("`bench train` needs the CLI's data-loader run: call train::run")
        }
        BenchCommand::TrainClip(args) => train_clip::run(&args)?,
        BenchCommand::Allreduce(args) => allreduce::run(&args)?,
        BenchCommand::Scale(BenchScaleCommand::Commits(args)) => {
            runtime.block_on(scale::commits(&args))?
        }
        BenchCommand::Scale(BenchScaleCommand::Loader(args)) => {
            runtime.block_on(loader::run(&args))?
        }
        BenchCommand::Scale(BenchScaleCommand::Embed(args)) => scale_embed::run(&args)?,
        BenchCommand::Scale(BenchScaleCommand::LoaderProbe(args)) => {
            return runtime.block_on(loader::probe(&args));
        }
        BenchCommand::Plot(args) => {
            for png in plot::render_dir(&args.dir, args.font.as_deref())? {
                println!("{}", png.display());
            }
            return Ok(());
        }
        BenchCommand::ImagePath(args) => image_path::run(&args)?,
        BenchCommand::Knn(args) => runtime.block_on(knn::run(&args))?,
        BenchCommand::Embed(args) => embed::run(&embed::EmbedBench {
            images: args.images,
            model: args.model,
            batch_size: args.batch_size,
            scales: args.scales,
            limit: args.limit,
            python: !args.no_python,
            python_workers: args.python_workers,
            write: Some(args.write),
            repeats: args.repeats,
        })?,
    };
    println!("{md}");
    Ok(())
}

/// A flag's value parser for an enum that serde names (`tiny`, `vit-b-32`, …): the flag
/// takes exactly the names a config file does; `choices` lists them in the error.
pub fn named<T>(choices: &'static str) -> impl Fn(&str) -> Result<T, String> + Clone
where
    T: DeserializeOwned,
{
    move |s: &str| {
        serde_json::from_value(Value::String(s.to_string()))
            .map_err(|_| format!("`{s}`: use {choices}"))
    }
}

/// Runs `.venv/bin/python SCRIPT ARGS…` from the repository root and parses the one JSON
/// object it prints on stdout.
pub fn python_json(script: &str, args: &[std::ffi::OsString]) -> Result<Value> {
    let out = Command::new(".venv/bin/python")
        .arg(script)
        .args(args)
        .output()
        .with_context(|| {
            format!("running .venv/bin/python {script} (from the repository root; scripts/setup.sh makes .venv)")
        })?;
    if !out.status.success() {
        bail!("{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{script}'s JSON output"))
}

/// How this binary was built, for a benchmark's "Build:" line.
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev profile (our crates and the image codecs optimised, other deps, Lance among them, not)"
    } else {
        "optimised"
    }
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let gpu = if tch::Cuda::is_available() {
        format!("{} CUDA device(s)", tch::Cuda::device_count())
    } else {
        "no GPU".into()
    };
    format!("{cpu}, {cores} cores, {gpu}")
}

/// Replaces (or appends) the block between `<!-- bench:NAME -->` markers in `path`.
pub fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let block = format!("{start}\n{body}{end}");
    let new = match (old.find(&start), old.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &old[..a], &old[b + end.len()..]),
        _ => format!("{}\n{block}\n", old.trim_end()),
    };
    std::fs::write(path, new).with_context(|| format!("writing `{}`", path.display()))
}

/// The middle value (the upper one of an even count; NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Step times of ours and the PyTorch peer over rounds that alternate the two, so that
/// the machine's drift falls on both (the training benchmarks).
pub struct StepRounds {
    /// Our median step time (s) in each round.
    pub ours: Vec<f64>,
    /// The peer's, from its `step_time_s_median`.
    pub peer: Vec<f64>,
    /// Our parameter count.
    pub params: i64,
    /// The peer's last JSON report (`torch_version`, `parameters`, …); None without a peer.
    pub peer_report: Option<Value>,
}

impl StepRounds {
    /// Runs `rounds` rounds of `ours` (median step seconds, parameters) then `peer`.
    pub fn run(
        rounds: usize,
        with_peer: bool,
        mut ours: impl FnMut() -> Result<(f64, i64)>,
        mut peer: impl FnMut() -> Result<Value>,
    ) -> Result<Self> {
        let mut r = Self {
            ours: Vec::new(),
            peer: Vec::new(),
            params: 0,
            peer_report: None,
        };
        for _ in 0..rounds.max(1) {
            let (s, n) = ours()?;
            r.ours.push(s);
            r.params = n;
            if with_peer {
                let p = peer()?;
                r.peer
                    .push(p["step_time_s_median"].as_f64().unwrap_or(f64::NAN));
                r.peer_report = Some(p);
            }
        }
        Ok(r)
    }

    /// Our median step time over the rounds.
    pub fn ours_s(&self) -> f64 {
        median(&self.ours)
    }

    /// The step-time table (`per` items a step: "images", "pairs"), the peer's row named
    /// `peer_label` (given its report), and each round's times and ratios below it.
    pub fn table(
        &self,
        md: &mut String,
        per: &str,
        batch: usize,
        peer_label: impl Fn(&Value) -> String,
    ) -> std::fmt::Result {
        let ours_s = self.ours_s();
        writeln!(
            md,
            "| peer | step time (s) | {per}/s | parameters | ratio (ours / peer) |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|")?;
        writeln!(
            md,
            "| **ours** (tch, libtorch 2.13) | {ours_s:.4} | {:.1} | {} | |",
            batch as f64 / ours_s,
            self.params
        )?;
        let Some(p) = &self.peer_report else {
            return Ok(());
        };
        let ps = median(&self.peer);
        writeln!(
            md,
            "| {} | {ps:.4} | {:.1} | {} | {:.3} |",
            peer_label(p),
            batch as f64 / ps,
            p["parameters"],
            ours_s / ps
        )?;
        let ratios: Vec<f64> = self
            .ours
            .iter()
            .zip(&self.peer)
            .map(|(a, b)| a / b)
            .collect();
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            md,
            "\nPer round: ours {} s; peer {} s; ratio {}.",
            fmt(&self.ours),
            fmt(&self.peer),
            fmt(&ratios)
        )
    }
}
