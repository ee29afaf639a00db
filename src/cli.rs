//! Command-line flags (clap types only; turned into validated config in `config.rs`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Train text-to-image diffusion models from image-only data (KNN-Diffusion).
///
/// Stages run from one config file (TOML). Values are layered: the file, then `KNN_`
/// environment variables (`KNN_EMBED__CLIP__BATCH_SIZE=32` sets `embed.clip.batch_size`),
/// then `--set key=value` flags.
#[derive(Debug, Parser)]
#[command(name = "knn-diffusion", version, propagate_version = true)]
pub struct Cli {
    /// Log format: `human` on a terminal, `json` (one object per line) for clusters.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,

    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Readable lines and a progress bar.
    Human,
    /// JSON lines, progress as periodic log events.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed images: decode every record of the source, CLIP-embed it, and write the rows
    /// (id, key, shard, image, width, height, emb) to a Lance table. Bad records go to a
    /// rejects table with a reason. Resumable: a rerun skips committed shards, and no shard
    /// is ever committed twice, even by two workers given the same shard.
    Embed(StageArgs),
}

/// Flags shared by the stages.
#[derive(Debug, Args)]
pub struct StageArgs {
    /// The config file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,

    /// This worker's index (0-based). Default: from SLURM_ARRAY_TASK_ID, SLURM_PROCID,
    /// RANK or JOB_COMPLETION_INDEX, else 0.
    #[arg(long)]
    pub worker: Option<usize>,

    /// Number of workers sharing the shards. Default: from SLURM_ARRAY_TASK_COUNT,
    /// SLURM_NTASKS or WORLD_SIZE, else 1.
    #[arg(long)]
    pub workers: Option<usize>,

    /// Override one config value, e.g. `--set embed.clip.batch_size=32` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}
