//! `knn-diffusion bench train-clip`: one `train-clip` step of our CLIP against the same CLIP,
//! loss and optimiser in PyTorch eager (HF transformers' `CLIPModel`,
//! `python/bench_train_clip_torch.py`), same preset, batch and thread count, rounds
//! alternating the two. Writes the `train-clip` section of BENCHMARKS.md.

use super::{machine, median, write_section, StepRounds};
use anyhow::{bail, Context, Result};
use clap::Args;
use knn_indexer::clip::{l2_normalize, ClipModel};
use knn_trainer::model::named_parameters;
use knn_trainer::optim::{zero_gradients, AdamW, OptimConfig, Optimiser};
use knn_trainer::train_clip::config::ClipModelConfig;
use knn_trainer::train_clip::export::hf_config;
use knn_trainer::train_clip::loss::{clip_loss, MAX_LOGIT_SCALE};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// Flags of `bench train-clip`.
#[derive(Debug, Args)]
pub struct BenchTrainClipArgs {
    /// CLIP preset: tiny, small or base.
    #[arg(long, default_value = "small", value_parser = crate::named::<knn_trainer::train_clip::config::ClipPreset>("tiny, small or base"))]
    pub preset: knn_trainer::train_clip::config::ClipPreset,
    /// Pairs per step.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Timed steps per round.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps per round.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Rounds, alternating ours and the peer.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip the PyTorch peer.
    #[arg(long)]
    pub no_python: bool,
    /// Scratch directory.
    #[arg(long, default_value = "target/bench-train-clip")]
    pub workdir: PathBuf,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

/// Our median step time (s) and parameter count.
fn ours(args: &BenchTrainClipArgs) -> Result<(f64, i64)> {
    let cfg = ClipModelConfig {
        preset: args.preset,
        ..Default::default()
    }
    .resolve()?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ClipModel::new(vs.root(), &cfg);
    let params = named_parameters(&vs);
    let optim = OptimConfig {
        lr: 1e-3,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.1,
        warmup_steps: 0,
        ema_decay: 0.0,
        ..Default::default()
    };
    let mut opt = Optimiser::new(&params, &optim, false);
    opt.adamw =
        AdamW::new(&params).decay_only(&params, |n, t| t.dim() >= 2 && !n.contains("embedding"));
    let (b, s) = (args.batch as i64, cfg.vision_config.image_size);
    let ctx = cfg.text_config.max_position_embeddings;
    let pixels = Tensor::randn([b, 3, s, s], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(
        3,
        cfg.text_config.vocab_size,
        [b, ctx],
        (Kind::Int64, Device::Cpu),
    );
    let _ = ids
        .narrow(1, ctx - 1, 1)
        .fill_(cfg.text_config.eos_token_id);
    let mut times = Vec::new();
    for step in 0..(args.warmup + args.steps) as u64 {
        let t0 = Instant::now();
        zero_gradients(&params);
        let img = l2_normalize(&model.image_features(&pixels));
        let txt = l2_normalize(&model.text_features(&ids));
        let loss = clip_loss(&img, &txt, model.logit_scale());
        loss.backward();
        let _ = f64::try_from(&loss)?;
        opt.step(&params, &optim, 1e-3, step);
        tch::no_grad(|| {
            let _ = model
                .logit_scale()
                .shallow_clone()
                .clamp_(0.0, MAX_LOGIT_SCALE);
        });
        if step >= args.warmup as u64 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let n: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
    Ok((median(&times), n))
}

fn python(args: &BenchTrainClipArgs, config: &std::path::Path) -> Result<Value> {
    let out_file = args.workdir.join("torch-clip.json");
    let out = Command::new(".venv/bin/python")
        .arg("python/bench_train_clip_torch.py")
        .arg("--config")
        .arg(config)
        .args(["--batch", &args.batch.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--threads", &tch::get_num_threads().to_string()])
        .arg("--out")
        .arg(&out_file)
        .output()
        .context("running python/bench_train_clip_torch.py (run scripts/setup.sh first)")?;
    if !out.status.success() {
        bail!(
            "python/bench_train_clip_torch.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_str(&std::fs::read_to_string(&out_file)?)
        .context("python/bench_train_clip_torch.py output")
}

/// Runs the benchmark and returns the markdown section.
pub fn run(args: &BenchTrainClipArgs) -> Result<String> {
    std::fs::create_dir_all(&args.workdir)?;
    let cfg = ClipModelConfig {
        preset: args.preset,
        ..Default::default()
    }
    .resolve()?;
    let config = args.workdir.join("config.json");
    std::fs::write(&config, serde_json::to_vec_pretty(&hf_config(&cfg))?)?;
    let rounds = StepRounds::run(
        args.rounds,
        !args.no_python,
        || ours(args),
        || python(args, &config),
    )?;
    let params = rounds.params;
    let preset = serde_json::to_value(args.preset)?;
    let preset = preset.as_str().unwrap_or("?");
    let mut md = String::new();
    writeln!(
        md,
        "## train-clip: one CLIP training step vs PyTorch eager (`{preset}`, batch {})\n",
        args.batch
    )?;
    writeln!(
        md,
        "Machine: {}. CLIP preset `{preset}` ({params} parameters; {} px input, {} px patches, \
         width {}, {} layers a tower, context {} tokens, d = {}), batch {}, f32 on the CPU, {} \
         threads both. A step = both towers, L2-normalise, symmetric InfoNCE, backward, clip, \
         AdamW (decay on weight matrices only), temperature clamp. The peer is HF \
         transformers' `CLIPModel` built from the same `config.json`. Median of {} steps after \
         {} warm-up per round; {} rounds alternating ours and the peer, median over rounds. \
         Measured by `knn-diffusion bench train-clip` on {}.\n",
        machine(),
        cfg.vision_config.image_size,
        cfg.vision_config.patch_size,
        cfg.vision_config.hidden_size,
        cfg.vision_config.num_hidden_layers,
        cfg.text_config.max_position_embeddings,
        cfg.projection_dim,
        args.batch,
        tch::get_num_threads(),
        args.steps,
        args.warmup,
        args.rounds.max(1),
        super::knn::chrono_free_date()
    )?;
    rounds.table(&mut md, "pairs", args.batch, |p| {
        format!(
            "PyTorch {} eager + transformers (`python/bench_train_clip_torch.py`)",
            p["torch_version"].as_str().unwrap_or("?")
        )
    })?;
    write_section(
        &args.write,
        &format!("train-clip:{preset}:b{}", args.batch),
        &md,
    )?;
    Ok(md)
}
