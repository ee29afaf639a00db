//! Command-line flags (clap types only; turned into validated config in `config.rs`).

use clap::{Args, Parser, Subcommand, ValueEnum};
// A job file's stage is the subcommand it runs: one spelling of each name.
pub use knn_bench::BenchCommand;
use knn_cluster::job::Stage;
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
    #[command(name = Stage::Embed.command())]
    Embed(EmbedRunArgs),
    /// Build a Lance vector index (IVF_PQ, or IVF_HNSW_SQ) on the embeddings table's `emb`
    /// column, for the retriever used at sampling. Parameters default from the table size.
    #[command(name = Stage::BuildIndex.command())]
    BuildIndex(ConfigArgs),
    /// For every row of the embeddings table, find its k nearest other rows (cosine) and write
    /// `id, knn_ids, knn_sims` to a Lance table. Batched IVF search with a recall-calibrated
    /// number of probes; sharded by id range over workers; resumable, exactly once per
    /// shard; pinned to one version of the embeddings table.
    #[command(name = Stage::PrecomputeKnn.command())]
    PrecomputeKnn(EmbedArgs),
    /// Add a score column to an embeddings table that has none (`[score]`: `column`, default
    /// `score`), for score-bucket sampling. The scorer is a documented proxy, Hasler &
    /// Süsstrunk's colourfulness of each stored image; tables embedded from LAION-style
    /// parquet carry their own scores instead (`embed.source.columns`). One Lance commit:
    /// a crash leaves the table as it was. Run it after embed has finished (embed then skips the
    /// table's shards but refuses to add new rows to it).
    Score(ConfigArgs),
    /// Keep the sharded tables cheap to commit to and to open as they grow: checkpoint the
    /// shard ledger, compact small fragments, then remove versions older than both the
    /// checkpoint and `storage.tables.keep_versions_hours` (or --keep-versions-hours). Workers
    /// do this themselves every `storage.tables.every_commits` versions; run it after a run,
    /// or to reclaim space now. Safe while embed or precompute-knn workers commit, and the only
    /// safe way to remove old versions of these tables: another tool's clean-up loses the
    /// record of which shards are in. Then it deletes orphaned data files: files under a
    /// table's data/ that no version references, older than --older-than, which a worker
    /// killed between writing a shard and committing it leaves behind (--dry-run lists them
    /// and changes nothing). Tables: embed's table and rejects table and precompute-knn's
    /// output, where they exist, or those given as arguments or with --table.
    Gc(GcArgs),
    /// Train the kNN-conditioned diffusion model on the embeddings and kNN tables: each image
    /// is denoised given its own CLIP embedding and its k neighbours' (condition dropped with
    /// `train.cond_drop_prob` for classifier-free guidance). Writes metrics.jsonl, sample
    /// grids and checkpoints under `train.output_dir`; rerun the same command to resume from
    /// the newest valid checkpoint (a corrupted one is skipped with a warning).
    #[command(name = Stage::Train.command())]
    Train(TrainArgs),
    /// Train the project's own CLIP on captioned shards (img2dataset parquet with a caption
    /// column, or WebDataset with .txt): a ViT image tower and a causal text transformer,
    /// symmetric InfoNCE with a learned temperature, a byte-level BPE tokenizer learned from
    /// the captions. Records whose key falls in the held-out split are never trained on;
    /// held-out recall@1/5/10 (against chance) and the modality gap are reported. Writes an
    /// HF CLIP directory (`train_clip.output_dir`/model) that `embed.clip.checkpoint` loads.
    /// Resumable and data-parallel like `train`. `--judge` trains the judge CLIP instead
    /// (its own seed and held-out split, `[train_clip.judge]`), used only to score samples.
    TrainClip(TrainClipArgs),
    /// Fetch a captioned image set that ships in a package (npm or Debian) and write it as
    /// img2dataset parquet shards (key, png, caption, license, source): `twitter`,
    /// `openmoji`, `openclipart`, `fluent-3d`, or `all`. Packages are downloaded once into
    /// --cache; a set already complete at --out is left as it is.
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate images from text: each prompt's CLIP text embedding retrieves its k nearest
    /// image embeddings from `--retrieval-db` (any embeddings table: swap it to change the
    /// output distribution without retraining), then the model samples with classifier-free
    /// guidance. Writes a grid of samples (a row per prompt) and a grid of the retrieved
    /// neighbours' images.
    #[command(name = Stage::Sample.command())]
    Sample(Box<SampleArgs>),
    /// Measure whether kNN conditioning does what the paper claims, in one command: per
    /// seed it trains a kNN model (k = 20, neighbour-count dropout) and a no-kNN model under
    /// the same budget (or takes `[[eval.checkpoints]]`), samples the held-out captions with
    /// the same noise, and reads every sample with the judge CLIP: FD_CLIP, precision and
    /// recall against the held-out images, CLIP score and R-precision (99 distractors)
    /// against their captions; the inference-k sweep, the nearest-neighbour retrieval
    /// baseline, the retrieval-table swap (`[[eval.swap]]`, as shares of each style's
    /// centroid) and the score buckets. Writes report.md, report.json and grids under
    /// `eval.output_dir`, with mean ± std over seeds and a verdict per claim. Trained arms
    /// are cached: a rerun only evaluates. `--quick` runs the small form (`[eval.quick]`).
    Eval(EvalArgs),
    /// Submit a job file (configs/jobs/*.toml): a stage, its config, resources and a backend.
    /// `local` runs the processes here (training as data-parallel ranks, embed and
    /// precompute-knn as workers splitting the shards); `slurm` renders an sbatch script
    /// (array job for sharded stages, `srun` with one task per GPU for train, SIGUSR1 before
    /// the time limit so training checkpoints and requeues) and submits it, printing the job
    /// id; `kubernetes` renders an Indexed Job with a headless Service and applies it.
    Submit(SubmitArgs),
    /// Start data-parallel ranks (or shard workers) on this node, torchrun style: sets RANK,
    /// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each, tags
    /// their logs with the rank, forwards SIGTERM and stops the others when one fails.
    /// Example: `knn-diffusion launch --nproc-per-node 2 -- train --config configs/stickers.toml`.
    Launch(LaunchArgs),
    /// Measure a stage on this machine against its peers and write BENCHMARKS.md.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `data` subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Fetch packaged captioned sets into parquet shards.
    Fetch(DataFetchArgs),
}

/// Flags of `data fetch`.
#[derive(Debug, Args)]
pub struct DataFetchArgs {
    /// The set: twitter, openmoji, openclipart, fluent-3d, or all.
    pub set: String,

    /// Where the shards go (a local path or an s3/gs/az URL); `all` and the default put
    /// each set in `<out>/<set>/`.
    #[arg(long, default_value = "data/captioned")]
    pub out: String,

    /// Where downloaded packages are kept.
    #[arg(long, default_value = ".cache/packages")]
    pub cache: PathBuf,

    /// Rows per parquet shard.
    #[arg(long, default_value_t = 1000)]
    pub rows_per_shard: usize,

    /// Longer side of the stored images at most (larger ones are shrunk).
    #[arg(long, default_value_t = 256)]
    pub max_side_px: u32,

    /// A config file whose `[storage]` gives credentials for --out.
    #[arg(long, short)]
    pub config: Option<PathBuf>,

    /// Also write the summaries as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
}

/// Flags of `train-clip`.
#[derive(Debug, Args)]
pub struct TrainClipArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Train the judge CLIP (`[train_clip.judge]`: its own seed, split and directory).
    #[arg(long)]
    pub judge: bool,
}

/// Flags of `submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job file (TOML with `[job]`, `[resources]`, `[slurm]`, `[kubernetes]`).
    pub job: PathBuf,

    /// Override the job's backend.
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,

    /// Print the sbatch script / manifest / command lines instead of submitting.
    #[arg(long)]
    pub dry_run: bool,

    /// The knn-diffusion binary the job runs (default: this one).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// Where a job runs.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BackendArg {
    /// Processes on this machine.
    Local,
    /// Slurm's sbatch.
    Slurm,
    /// kubectl apply.
    Kubernetes,
}

/// Flags of `launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Processes on this node (one per GPU for training).
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,

    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,

    /// This node's index (a Kubernetes Indexed Job passes its completion index).
    #[arg(long, default_value_t = 0, env = "JOB_COMPLETION_INDEX")]
    pub node_rank: usize,

    /// Rank 0's host.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,

    /// Rank 0's rendezvous port (0: any free port, one node only).
    #[arg(long, default_value_t = 0)]
    pub master_port: u16,

    /// Seconds the others get to checkpoint and exit after one fails or a stop is asked.
    #[arg(long, default_value_t = 120)]
    pub grace_s: u64,

    /// The knn-diffusion subcommand and its flags, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Flags of `embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub stage: StageArgs,

    /// Also write the run's summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
}

/// Flags of `embed`: the sharded stage's, and `--retry-rejects`.
#[derive(Debug, Args)]
pub struct EmbedRunArgs {
    #[command(flatten)]
    pub run: EmbedArgs,

    /// Embed again only the records earlier runs rejected (after raising a limit such as
    /// `embed.decode.max_pixels`, or fixing a decoder). Those that now succeed become rows,
    /// exactly once, and get a `retried` row in the rejects table; those that fail again
    /// get a new reject row. Rejects are never deleted. `corrupt_shard`, `duplicate_key`
    /// and `id_collision` rejects are left alone: a retry would meet them again.
    #[arg(long)]
    pub retry_rejects: bool,
}

/// Flags of the single-process stages (`build-index`, `train`).
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The config file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,

    /// Override one config value, e.g. `--set train.max_steps=5000` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,

    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
}

/// Flags of `gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Tables to upkeep instead of the config's.
    #[arg(value_name = "TABLE")]
    pub tables: Vec<String>,

    /// A table to upkeep instead of the config's (repeatable; the same as TABLE).
    #[arg(long, value_name = "URI")]
    pub table: Vec<String>,

    /// Delete orphaned data files only once they are this old (`90s`, `30m`, `1h`, `2d`).
    /// Must be longer than any live worker takes to write and commit one shard, or one
    /// compaction: a younger unreferenced file may be a live writer's, not yet committed.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub older_than: std::time::Duration,

    /// List the orphaned data files (and count the young unreferenced ones) without
    /// deleting anything, and skip the checkpoint, compaction and version removal.
    #[arg(long)]
    pub dry_run: bool,

    /// Keep versions younger than this many hours (default: `storage.tables.keep_versions_hours`).
    /// 0 is safe for the ledger; use it when no reader is pinned to an old version.
    #[arg(long, value_name = "HOURS")]
    pub keep_versions_hours: Option<f64>,

    /// Checkpoint and remove old versions, but do not compact.
    #[arg(long)]
    pub no_compact: bool,
}

/// Flags of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// The small form the tests run (`[eval.quick]`: fewer steps, prompts and sampler
    /// steps, every comparison and seed kept), into `<eval.output_dir>/quick`.
    #[arg(long)]
    pub quick: bool,

    /// Internal: train only this arm (`SEED:knn` or `SEED:none`) in this process; eval
    /// starts itself with it to train arms side by side.
    #[arg(long, hide = true, value_parser = knn_trainer::eval::parse_arm)]
    pub train_arm: Option<(u64, knn_trainer::eval::config::ArmKind)>,

    /// Internal: the kNN table the `--train-arm` arm trains on.
    #[arg(long, hide = true, requires = "train_arm")]
    pub arm_knn_table: Option<String>,
}

/// Flags of `train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// When a signal (SIGTERM, SIGUSR1) stops training early, rank 0 writes the step it
    /// checkpointed to this file, so a batch script knows to requeue the job.
    #[arg(long, value_name = "FILE")]
    pub requeue_marker: Option<PathBuf>,

    /// Exit code when a signal stopped training early (after its checkpoint). 0 suits Slurm
    /// (the script requeues); Kubernetes jobs use 143 so the Job recreates the pod, which
    /// resumes.
    #[arg(long, default_value_t = 0, value_name = "CODE")]
    pub stopped_exit_code: i32,
}

/// Flags of `sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// The config file (TOML): gives the CLIP (`embed.clip`), the checkpoints
    /// (`train.output_dir` / `train.checkpoint.url`) and the default retrieval table.
    #[arg(long, short)]
    pub config: PathBuf,

    /// Override one config value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,

    /// A text prompt (repeatable; one grid row each).
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,

    /// Embeddings table to retrieve neighbours from (local path or s3/gs/az URL).
    /// Default: the training embeddings table.
    #[arg(long, value_name = "URL")]
    pub retrieval_db: Option<String>,

    /// Neighbours per prompt (default: the k the model was trained with).
    #[arg(long)]
    pub k: Option<usize>,

    /// Condition on one score bucket (PAPER.md §4.2): `i/n` cuts the `--pool` nearest rows
    /// into n equal quantile buckets of `--score-column` and takes the k nearest of bucket i
    /// (1: lowest scores, n: highest).
    #[arg(long, value_name = "I/N")]
    pub bucket: Option<String>,

    /// The float column `--bucket` ranks by (`knn-diffusion score` writes `score`; LAION
    /// tables carry `aesthetic`).
    #[arg(long, default_value = "score")]
    pub score_column: String,

    /// Nearest rows `--bucket` cuts its buckets from.
    #[arg(long, default_value_t = 1000)]
    pub pool: usize,

    /// Classifier-free guidance scale (1: no guidance). Default: `train.samples.guidance`.
    #[arg(long)]
    pub guidance: Option<f64>,

    /// Reverse-process sampler. Default: `train.samples.sampler.kind`.
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,

    /// Sampling steps. Default: `train.samples.sampler.steps`.
    #[arg(long)]
    pub steps: Option<usize>,

    /// DDIM eta (0: deterministic). Default: `train.samples.sampler.eta`.
    #[arg(long)]
    pub eta: Option<f64>,

    /// Images per prompt (grid columns).
    #[arg(long, default_value_t = 4)]
    pub per_prompt: usize,

    /// Seed of the noise (same seed, same images).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Images per model batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,

    /// Sample grid PNG.
    #[arg(long, default_value = "samples.png")]
    pub out: PathBuf,

    /// Neighbours grid PNG (default: `<out stem>-neighbours.png`).
    #[arg(long)]
    pub neighbours_out: Option<PathBuf>,

    /// Checkpoint directory or URL (default: the training run's).
    #[arg(long)]
    pub checkpoint: Option<String>,

    /// Use the raw weights rather than their EMA.
    #[arg(long)]
    pub raw_weights: bool,

    /// Read the samples with this judge CLIP (an HF CLIP directory, e.g. the one
    /// `train-clip --judge` writes) and report the share nearest their own prompt.
    #[arg(long, value_name = "DIR")]
    pub judge_clip: Option<String>,

    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
}

/// Reverse-process samplers.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SamplerArg {
    /// DDIM.
    Ddim,
    /// Ancestral DDPM.
    Ddpm,
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
