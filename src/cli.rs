//! Command-line flags (clap types only; turned into validated config in `config.rs`).

use clap::{Args, Parser, Subcommand, ValueEnum};
// A job file's stage is the subcommand it runs: one spelling of each name.
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
    /// The job file (TOML with [job], [resources], [slurm], [kubernetes]).
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

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The embed stage: end to end at several input sizes (peak RSS each), the model alone,
    /// and the Python reference (PIL + HF processor + DataLoader + transformers CLIP), on the
    /// same images, model and batch size.
    Embed(BenchEmbedArgs),
    /// precompute-knn at generated clustered data (normalised, d = 512 by default): queries/s
    /// and recall@10 against exact search, beside faiss-cpu IVF-Flat batch search tuned to
    /// the same recall and per-query Lance ANN search (IVF_PQ, tuned likewise).
    Knn(BenchKnnArgs),
    /// One training step of the U-Net against the same U-Net, loss and optimiser in PyTorch
    /// eager (python/bench_train_torch.py) at the same batch and size; the data loader's
    /// share of step time in a real `train` run on the embedded default tables (run
    /// scripts/demo.sh first); and guided sampling images/s.
    Train(BenchTrainArgs),
    /// One `train-clip` step of our CLIP against HF transformers' CLIPModel trained the same
    /// way in PyTorch eager (python/bench_train_clip_torch.py), same preset, batch and
    /// threads.
    TrainClip(BenchTrainClipArgs),
    /// The gradient all-reduce: our process group (TCP ring on the CPU, NCCL on GPUs)
    /// against torch.distributed (gloo / NCCL) on the same buffer and world size; time per
    /// all-reduce, algorithm and bus bandwidth.
    Allreduce(BenchAllReduceArgs),
    /// What each stage costs as the table grows, at several sizes, with growth exponents.
    #[command(subcommand)]
    Scale(BenchScaleCommand),
    /// One decode thread's work on generated photo-like JPEGs (longest side 512, 4:2:0,
    /// quality 90): decode (drafted and not), the 224 px CLIP input, the stored image in each
    /// format (bytes and time); beside Pillow + HF's processor doing the same on one thread
    /// (python/bench_image_path.py).
    ImagePath(BenchImagePathArgs),
    /// Draws the figures of BENCHMARKS.md: every `<name>.json` in --dir (measured points,
    /// log–log axes, dashed goal slopes) becomes `<name>.png` beside it.
    Plot(BenchPlotArgs),
}

/// Flags of `bench plot`.
#[derive(Debug, Args)]
pub struct BenchPlotArgs {
    /// Folder of figures (`<name>.json`); each PNG is written beside its JSON.
    #[arg(long, default_value = "docs/bench")]
    pub dir: PathBuf,
    /// TrueType font for the text (default: DejaVu Sans from Debian's fonts-dejavu-core).
    #[arg(long, env = "KNN_PLOT_FONT")]
    pub font: Option<PathBuf>,
}

/// Flags of `bench image-path`.
#[derive(Debug, Args)]
pub struct BenchImagePathArgs {
    /// Generated JPEGs.
    #[arg(long, default_value_t = 200)]
    pub images: usize,
    /// Longest side of the generated JPEGs.
    #[arg(long, default_value_t = 512)]
    pub max_side: u32,
    /// CLIP input side (shortest edge and crop).
    #[arg(long, default_value_t = 224)]
    pub clip_px: u32,
    /// Side of the stored training image.
    #[arg(long, default_value_t = 64)]
    pub stored_px: u32,
    /// Timed passes over the images (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Skip the Python reference.
    #[arg(long)]
    pub no_python: bool,
    /// Where the JPEGs are written.
    #[arg(long, default_value = "target/bench-image-path")]
    pub work: PathBuf,
    /// Markdown file whose section for this benchmark is replaced; `-` prints it only.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// Stages of `bench scale`.
#[derive(Debug, Subcommand)]
pub enum BenchScaleCommand {
    /// One more shard commit (time, bytes written) and a new worker's start-up (open the
    /// table, read the shard ledger; local and through the loopback S3 server) against a
    /// table of 1k, 10k and 50k committed one-row shards, with `[storage.tables]` upkeep
    /// at its defaults and with `keep_versions_hours = 0`; beside the same table without
    /// upkeep, grown to --peer-sizes.
    Commits(BenchScaleCommitsArgs),
    /// The trainer's data loader against tables of --sizes rows (synthetic 32 px rows,
    /// random neighbours): peak RSS of a fresh process that opens the tables and loads
    /// micro-batches, its time per batch, and the data wait at --step-ms a step; beside the
    /// id → row map the loader kept before it read rows by address.
    Loader(BenchScaleLoaderArgs),
    /// One measurement of `bench scale loader`, in a process of its own (run by it).
    #[command(hide = true)]
    LoaderProbe(BenchScaleLoaderProbeArgs),
    /// The embed stage at --sizes records of generated photo-like JPEGs in parquet shards on
    /// the loopback S3 server, run by --workers processes with the tiny random CLIP: img/s,
    /// peak RSS per worker and S3 requests per record (from the server's log), with how
    /// each grows from the smallest size to the largest.
    Embed(BenchScaleEmbedArgs),
}

/// Flags of `bench scale embed`.
#[derive(Debug, Args)]
pub struct BenchScaleEmbedArgs {
    /// Records at which to measure, increasing.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub sizes: Vec<usize>,
    /// Embed worker processes at once.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Records a parquet shard.
    #[arg(long, default_value_t = 2000)]
    pub shard_rows: usize,
    /// Distinct generated JPEGs, cycled through the records.
    #[arg(long, default_value_t = 500)]
    pub pool: usize,
    /// JPEG quality of the generated images.
    #[arg(long, default_value_t = 85)]
    pub quality: u8,
    /// Where the image pool, the configs and the workers' logs go.
    #[arg(long, default_value = "target/bench-scale-embed")]
    pub work: PathBuf,
    /// Markdown file whose section for this benchmark is replaced; `-` prints it only.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// Flags of `bench scale loader`.
#[derive(Debug, Args)]
pub struct BenchScaleLoaderArgs {
    /// Rows of the tables at which to measure, increasing.
    #[arg(long, value_delimiter = ',', default_value = "250000,1000000,4000000")]
    pub sizes: Vec<usize>,
    /// Micro-batch size.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Batches the loader reads ahead (`train.data.prefetch_batches`).
    #[arg(long, default_value_t = 2)]
    pub prefetch: usize,
    /// Micro-batches timed in each of the two passes.
    #[arg(long, default_value_t = 100)]
    pub batches: usize,
    /// The consumer's time per step in the second pass, ms (a tiny U-Net step at 32 px,
    /// batch 16, on 2 cores, is about this).
    #[arg(long, default_value_t = 250)]
    pub step_ms: u64,
    /// Neighbours per row.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Where the synthetic tables are written (kept, and reused by a later run).
    #[arg(long, default_value = "target/bench-scale-loader")]
    pub dir: PathBuf,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// Flags of the hidden `bench scale loader-probe`.
#[derive(Debug, Args)]
pub struct BenchScaleLoaderProbeArgs {
    /// Embeddings table URI.
    #[arg(long)]
    pub embeddings: String,
    /// kNN table URI.
    #[arg(long)]
    pub knn: String,
    /// Neighbours used.
    #[arg(long)]
    pub k: usize,
    /// Micro-batch size.
    #[arg(long)]
    pub batch_size: usize,
    /// Batches read ahead.
    #[arg(long)]
    pub prefetch: usize,
    /// Micro-batches timed in each pass.
    #[arg(long)]
    pub batches: usize,
    /// The consumer's time per step, ms.
    #[arg(long)]
    pub step_ms: u64,
}

/// Flags of `bench scale commits`.
#[derive(Debug, Args)]
pub struct BenchScaleCommitsArgs {
    /// Committed shards at which to measure, increasing.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub sizes: Vec<usize>,
    /// Sizes for the peer without upkeep (its total cost grows with the square of the
    /// shards; keep them small). `--peer-sizes` with no value skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1000,3000")]
    pub peer_sizes: Vec<usize>,
    /// Workers committing at once while the table grows.
    #[arg(long, default_value_t = 4)]
    pub committers: usize,
    /// Timed commits by one warm worker at each size.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Skip the loopback S3 server (start-up through S3 is then not measured).
    #[arg(long)]
    pub no_s3: bool,
    /// Skip the arm with upkeep that keeps no old versions (`keep_versions_hours = 0`).
    #[arg(long)]
    pub no_keep_0: bool,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// Flags of `bench allreduce`.
#[derive(Debug, Args)]
pub struct BenchAllReduceArgs {
    /// `tcp` (CPU tensors) or `nccl` (one GPU per rank).
    #[arg(long, default_value = "tcp")]
    pub backend: String,
    /// Ranks (threads of this process; GPUs 0..world for NCCL).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Buffer size in MiB (float32).
    #[arg(long, default_value_t = 64)]
    pub mib: usize,
    /// Timed all-reduces per run.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Untimed all-reduces first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Runs of each side, alternating.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip the torch.distributed peer.
    #[arg(long)]
    pub no_peer: bool,
    /// File whose section to rewrite.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// Flags of `bench train-clip`.
#[derive(Debug, Args)]
pub struct BenchTrainClipArgs {
    /// CLIP preset: tiny, small or base.
    #[arg(long, default_value = "small", value_parser = parse_clip_preset)]
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

fn parse_clip_preset(s: &str) -> Result<knn_trainer::train_clip::config::ClipPreset, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("`{s}`: use tiny, small or base"))
}

/// Flags of `bench train`.
#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// U-Net preset: tiny, small, base or paper-400m.
    #[arg(long, default_value = "tiny", value_parser = parse_preset)]
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

fn parse_preset(s: &str) -> Result<knn_trainer::unet::UNetPreset, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("`{s}`: use tiny, small, base or paper-400m"))
}

/// Flags of `bench knn`.
#[derive(Debug, Args)]
pub struct BenchKnnArgs {
    /// Table sizes, e.g. `100000,1000000`.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub rows: Vec<usize>,
    /// Dimension.
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    /// Clusters in the generated data (0: rows / 100).
    #[arg(long, default_value_t = 0)]
    pub clusters: usize,
    /// Spread of points around their cluster centre, relative to the centres' spread.
    #[arg(long, default_value_t = 0.5)]
    pub noise: f64,
    /// Sample queries for recall (exact neighbours by brute force).
    #[arg(long, default_value_t = 1000)]
    pub recall_queries: usize,
    /// Queries timed for the per-query Lance peer.
    #[arg(long, default_value_t = 1000)]
    pub lance_queries: usize,
    /// Skip the faiss-cpu peer.
    #[arg(long)]
    pub no_faiss: bool,
    /// Skip the per-query Lance peer.
    #[arg(long)]
    pub no_lance: bool,
    /// Where generated tables go.
    #[arg(long, default_value = "target/bench-knn")]
    pub workdir: PathBuf,
    /// Markdown file whose section for this benchmark is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

/// Flags of `bench embed`.
#[derive(Debug, Args)]
pub struct BenchEmbedArgs {
    /// Folder of images (the 1x input).
    #[arg(long, default_value = "data/emoji-google/images")]
    pub images: PathBuf,
    /// Random-weight CLIP shape: tiny, vit-b-32 or vit-l-14.
    #[arg(long, default_value = "tiny")]
    pub model: String,
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
