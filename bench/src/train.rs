//! `knn-diffusion bench train`: the training step of our U-Net against the same U-Net,
//! loss and optimiser in PyTorch eager (`python/bench_train_torch.py`), same batch, size and
//! thread count, measured in one run on this machine; the data loader's share of step time in
//! a real `train` run on the embedded default tables; and sampling throughput. Writes the
//! `train` section of BENCHMARKS.md.

use super::{machine, median, write_section, StepRounds};
use anyhow::{bail, Context, Result};
use clap::Args;
use knn_trainer::config::ModelConfig;
use knn_trainer::data::Batch;
use knn_trainer::diffusion::{DiffusionConfig, SamplerConfig};
use knn_trainer::model::{batch_loss, DiffusionModel};
use knn_trainer::optim::{zero_gradients, OptimConfig, Optimiser};
use knn_trainer::sampling::generate;
use knn_trainer::unet::{parameter_count, Condition};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Flags of `bench train`.
#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// U-Net preset: tiny, small, base or paper-400m.
    #[arg(long, default_value = "tiny", value_parser = crate::named::<knn_trainer::unet::UNetPreset>("tiny, small, base or paper-400m"))]
    pub preset: knn_trainer::unet::UNetPreset,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub image_size: usize,
    /// Images per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Neighbours.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Embedding dimension (the embedded default's tiny CLIP: 64).
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Rounds, each timing ours then the peer, so machine noise falls on both alike; the
    /// median over rounds is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// DDIM steps of the sampling measurement.
    #[arg(long, default_value_t = 50)]
    pub sample_steps: usize,
    /// Skip the PyTorch peer.
    #[arg(long)]
    pub no_python: bool,
    /// Steps of the real `train` run that measures data-loader wait (0: skip it).
    #[arg(long, default_value_t = 60)]
    pub loader_steps: u64,
    /// Config whose tables the data-loader run reads.
    #[arg(long, default_value = "configs/stickers.toml")]
    pub config: PathBuf,
    /// Scratch directory.
    #[arg(long, default_value = "target/bench-train")]
    pub workdir: PathBuf,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

/// Our median step time (s) and parameter count.
fn ours(args: &BenchTrainArgs, device: Device) -> Result<(f64, i64, Vec<f64>)> {
    let model_cfg = ModelConfig {
        preset: args.preset,
        ..Default::default()
    };
    let unet = model_cfg.resolve(args.image_size, args.dim, args.k)?;
    let model = DiffusionModel::new(&unet, &DiffusionConfig::default(), device, 0)?;
    let params = model.named_parameters();
    let optim = OptimConfig {
        warmup_steps: 0,
        ..Default::default()
    };
    let mut opt = Optimiser::new(&params, &optim, false);
    let batch = synthetic_batch(args, device);
    let mut times = Vec::new();
    for step in 0..(args.warmup + args.steps) as u64 {
        let t0 = Instant::now();
        zero_gradients(&params);
        let loss = batch_loss(&model, &batch, None);
        loss.backward();
        let _ = f64::try_from(&loss)?;
        opt.step(&params, &optim, 1e-4, step);
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        if step >= args.warmup as u64 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok((median(&times), parameter_count(&model.vs), times))
}

fn synthetic_batch(args: &BenchTrainArgs, device: Device) -> Batch {
    let (b, s, n, d) = (
        args.batch as i64,
        args.image_size as i64,
        (args.k + 1) as i64,
        args.dim as i64,
    );
    tch::manual_seed(1);
    let opts = (Kind::Float, device);
    Batch {
        cursor: Default::default(),
        ids: (0..b as u64).collect(),
        images: Tensor::rand([b, 3, s, s], opts) * 2.0 - 1.0,
        cond: Tensor::randn([b, n, d], opts),
        present: Tensor::ones([b, n], opts),
        drop: Tensor::zeros([b], opts),
        t: Tensor::randint(1000, [b], (Kind::Int64, device)),
        noise: Tensor::randn([b, 3, s, s], opts),
        weight: Tensor::ones([b], opts),
        problems: Vec::new(),
    }
}

fn python(args: &BenchTrainArgs) -> Result<Value> {
    let out_file = args.workdir.join("torch.json");
    std::fs::create_dir_all(&args.workdir)?;
    let preset = serde_json::to_value(args.preset)?;
    let out = Command::new(".venv/bin/python")
        .args(["python/bench_train_torch.py", "--preset"])
        .arg(preset.as_str().unwrap_or("tiny"))
        .args(["--image-size", &args.image_size.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--k", &args.k.to_string()])
        .args(["--dim", &args.dim.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--device", "cpu", "--precision", "f32", "--out"])
        .arg(&out_file)
        .output()
        .context("running python/bench_train_torch.py (run scripts/setup.sh first)")?;
    if !out.status.success() {
        bail!(
            "python/bench_train_torch.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&out_file)?;
    serde_json::from_str(&text).context("python/bench_train_torch.py output")
}

/// Images/s of guided DDIM sampling with the benchmarked U-Net.
fn sampling(args: &BenchTrainArgs, device: Device) -> Result<f64> {
    let model_cfg = ModelConfig {
        preset: args.preset,
        ..Default::default()
    };
    let unet = model_cfg.resolve(args.image_size, args.dim, args.k)?;
    let model = DiffusionModel::new(&unet, &DiffusionConfig::default(), device, 0)?;
    let b = args.batch as i64;
    let n = (args.k + 1) as i64;
    let cond = Condition {
        emb: Tensor::randn([b, n, args.dim as i64], (Kind::Float, device)),
        present: Tensor::ones([b, n], (Kind::Float, device)),
        drop: Tensor::zeros([b], (Kind::Float, device)),
    };
    let sampler = SamplerConfig {
        steps: args.sample_steps,
        ..Default::default()
    }
    .build(&model.diffusion, "bench")?;
    let t0 = Instant::now();
    let _ = generate(&model, sampler.as_ref(), &cond, 3.0, 0, 0);
    Ok(b as f64 / t0.elapsed().as_secs_f64())
}

/// Runs the benchmark and returns the markdown section.
pub async fn run(args: &BenchTrainArgs, data_wait: Option<(f64, f64, u64)>) -> Result<String> {
    let device = Device::Cpu;
    let rounds = StepRounds::run(
        args.rounds,
        !args.no_python,
        || ours(args, device).map(|(s, p, _)| (s, p)),
        || python(args),
    )?;
    let params = rounds.params;
    let sample_ips = sampling(args, device)?;
    let preset = serde_json::to_value(args.preset)?;
    let mut md = String::new();
    writeln!(
        md,
        "## train: one U-Net training step vs PyTorch eager (`{}`, {} px, batch {})\n",
        preset.as_str().unwrap_or("?"),
        args.image_size,
        args.batch
    )?;
    writeln!(
        md,
        "Machine: {}. U-Net preset `{}` ({params} parameters), {} px, batch {}, k = {}, d = {}; \
         f32 on the CPU; a step = q_sample, forward, per-sample MSE, backward, clip, AdamW, \
         EMA. Median of {} steps after {} warm-up per round; {} rounds alternating ours and the \
         peer, median over rounds. Measured by `knn-diffusion bench train` on {}.\n",
        machine(),
        preset.as_str().unwrap_or("?"),
        args.image_size,
        args.batch,
        args.k,
        args.dim,
        args.steps,
        args.warmup,
        args.rounds.max(1),
        super::knn::chrono_free_date()
    )?;
    rounds.table(&mut md, "images", args.batch, |p| {
        format!(
            "PyTorch {} eager (`python/bench_train_torch.py`, {} threads)",
            p["torch_version"].as_str().unwrap_or("?"),
            p["threads"]
        )
    })?;
    writeln!(
        md,
        "\nSampling: guided DDIM ({} steps, guidance 3, both branches in one batch of {}): \
         {sample_ips:.2} images/s.",
        args.sample_steps, args.batch
    )?;
    if let Some((wait, step_s, steps)) = data_wait {
        writeln!(
            md,
            "\nData loader: a real `train` run of {steps} steps on the embedded default tables \
             (`configs/stickers.toml`, Lance `take` + PNG decode on the prefetch thread) spent \
             {:.2}% of its time waiting for data ({step_s:.3} s/step).",
            100.0 * wait
        )?;
    }
    let section = format!(
        "train:{}:{}px:b{}",
        preset.as_str().unwrap_or("?"),
        args.image_size,
        args.batch
    );
    write_section(&args.write, &section, &md)?;
    Ok(md)
}
