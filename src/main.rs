//! `knn-diffusion`: the command line. Thin subcommands that parse flags, load and validate
//! the config, and call one library function each.

mod cli;
mod config;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, ConfigArgs, EmbedArgs, LogFormat, SampleArgs, SamplerArg};
use knn_bench::BenchCommand;
use knn_cluster::WorkerSlot;
use knn_indexer::knn::KnnProgress;
use knn_indexer::{EmbedProgress, IndexerError};
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    ensure_passive_openmp();
    patient_lance_commits();
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.verbose);
    if let Err(err) = try_main(cli) {
        if JSON_LOGS.load(Ordering::Relaxed) {
            let causes: Vec<String> = err.chain().skip(1).map(|c| c.to_string()).collect();
            let fields =
                serde_json::json!({ "message": format!("error: {err}"), "causes": causes });
            json_event("ERROR", fields);
        } else {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
        }
        std::process::exit(1);
    }
}

/// Set under `--log-format json`: then every line this process writes to stderr is JSON.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes one event to stderr in the shape of tracing's JSON lines (timestamp, level,
/// fields, target).
fn json_event(level: &str, fields: serde_json::Value) {
    let line = serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
        "level": level,
        "fields": fields,
        "target": "knn_diffusion",
    });
    eprintln!("{line}");
}

/// Writes a report (a stage's closing summary, a status line) to stderr: as text, or under
/// `--log-format json` as one event whose message is the text and whose `summary` field,
/// where given, holds what `--summary-json` writes.
fn report(text: &str, summary: Option<serde_json::Value>) {
    let text = text.trim_end();
    if JSON_LOGS.load(Ordering::Relaxed) {
        let mut fields = serde_json::json!({ "message": text });
        if let Some(s) = summary {
            fields["summary"] = s;
        }
        json_event("INFO", fields);
    } else {
        eprintln!("{text}");
    }
}

/// [`report`] of a formatted text without a summary.
macro_rules! say {
    ($($arg:tt)*) => { report(&format!($($arg)*), None) };
}

/// Reports a stage's summary (its `Display`) with its fields, and writes `--summary-json`.
fn finish<S: std::fmt::Display + serde::Serialize>(
    summary: &S,
    path: Option<&std::path::Path>,
) -> Result<()> {
    report(&summary.to_string(), serde_json::to_value(summary).ok());
    write_summary(path, summary)
}

/// libtorch's OpenMP threads spin while they wait for work. Beside the decode threads that
/// share the cores this steals their CPU: on 2 cores the embed stage ran at 1546 img/s with
/// spinning and 1976 img/s with passive waiting (BENCHMARKS.md). libgomp reads
/// `OMP_WAIT_POLICY` when it is loaded, before `main`, so the process re-executes itself once
/// with it set, unless the user has set it either way.
fn ensure_passive_openmp() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // `exec` returns only if it failed; then run on with the default policy.
    let _ = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
}

/// Lance gives a commit that loses races to other writers 30 s of retries, unless
/// `LANCE_COMMIT_RETRY_TIMEOUT_SECS` says otherwise, and its compaction has no other way to
/// set it. Upkeep's compaction competes with every worker's shard commits, and at that limit
/// it lost rounds to them (BENCHMARKS.md, "scale: commit and ledger cost"). Shard commits
/// already wait up to 600 s; this gives compaction the same, unless the user set the
/// variable. Set here, before any thread starts (Lance reads it once, at its first commit).
fn patient_lance_commits() {
    const VAR: &str = "LANCE_COMMIT_RETRY_TIMEOUT_SECS";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "600");
    }
}

fn init_logging(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "info,usvg=error,resvg=error,lance=warn,lance_core=warn,lance_table=warn,lance_io=warn,lance_file=warn,lance_encoding=warn",
        1 => "debug,lance=info,datafusion=info,h2=info,hyper=info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, Ordering::Relaxed);
            builder.json().init()
        }
    }
}

fn try_main(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Embed(args) => runtime.block_on(run_embed(args, cli.log_format)),
        Command::BuildIndex(args) => runtime.block_on(run_build_index(args)),
        Command::Score(args) => runtime.block_on(run_score(args)),
        Command::Gc(args) => runtime.block_on(run_gc(args)),
        Command::PrecomputeKnn(args) => runtime.block_on(run_precompute_knn(args, cli.log_format)),
        Command::Train(args) => runtime.block_on(run_train(args, cli.log_format)),
        Command::Sample(args) => runtime.block_on(run_sample(*args)),
        Command::Eval(args) => runtime.block_on(run_eval(args, cli.log_format)),
        Command::TrainClip(args) => runtime.block_on(run_train_clip(args, cli.log_format)),
        Command::Data(cli::DataCommand::Fetch(args)) => runtime.block_on(run_data_fetch(args)),
        Command::Submit(args) => {
            let _guard = runtime.enter();
            run_submit(args)
        }
        Command::Launch(args) => {
            let _guard = runtime.enter();
            run_launch(args)
        }
        Command::Bench(BenchCommand::Train(args)) => {
            let wait = runtime.block_on(loader_wait(&args))?;
            let md = runtime.block_on(knn_bench::train::run(&args, wait))?;
            println!("{md}");
            Ok(())
        }
        Command::Bench(other) => knn_bench::run(other, &runtime),
    }
}

async fn run_embed(args: cli::EmbedRunArgs, log_format: LogFormat) -> Result<()> {
    let retry_rejects = args.retry_rejects;
    let (args, summary_json) = (args.run.stage, args.run.summary_json);
    let project = config::load(&args.config, &args.overrides)?;
    let mut embed = project.embed.with_context(|| {
        format!(
            "config `{}` has no [embed] table; see configs/stickers.toml for an example",
            args.config.display()
        )
    })?;
    embed.retry_rejects = retry_rejects;
    let slot = WorkerSlot::from_flags_or_env(args.worker, args.workers)?;
    let progress = Arc::new(EmbedProgress::default());
    let (stop_reporting, stopped) = tokio::sync::oneshot::channel();
    let reporter = tokio::spawn(report_progress(progress.clone(), log_format, stopped));
    let result = knn_indexer::embed(
        &embed,
        &project.storage,
        (slot.index(), slot.count()),
        progress,
    )
    .await;
    // The bar is cleared before the summary is printed, so that it cannot draw over it.
    let _ = stop_reporting.send(());
    let _ = reporter.await;
    let summary = result?;
    finish(&summary, summary_json.as_deref())?;
    if let Some(reason) = &summary.stopped {
        anyhow::bail!("embed stopped: {reason}");
    }
    if !summary.shards_failed.is_empty() {
        return Err(IndexerError::ShardsFailed {
            failed: summary.shards_failed.len(),
            total: summary.shards_assigned,
            first: format!(
                "{}: {}",
                summary.shards_failed[0].0, summary.shards_failed[0].1
            ),
        }
        .into());
    }
    Ok(())
}

async fn run_build_index(args: ConfigArgs) -> Result<()> {
    let project = config::load(&args.config, &args.overrides)?;
    let cfg = project.index(&args.config)?;
    let summary = knn_indexer::knn::build_index(&cfg, &project.storage).await?;
    finish(&summary, args.summary_json.as_deref())
}

async fn run_score(args: ConfigArgs) -> Result<()> {
    let project = config::load(&args.config, &args.overrides)?;
    let cfg = project.score(&args.config)?;
    let summary = knn_indexer::score::score(&cfg, &project.storage).await?;
    finish(&summary, args.summary_json.as_deref())
}

async fn run_gc(args: cli::GcArgs) -> Result<()> {
    use knn_indexer::table::maintain;
    let c = &args.config;
    let project = config::load(&c.config, &c.overrides)?;
    let mut upkeep = project.storage.tables.clone();
    if let Some(h) = args.keep_versions_hours {
        upkeep.keep_versions_hours = h;
    }
    upkeep.compact = !args.no_compact;
    let named: Vec<String> = args.tables.iter().chain(&args.table).cloned().collect();
    let tables = if named.is_empty() {
        project.sharded_tables(&c.config)?
    } else {
        named.clone()
    };
    let storage = project.storage.to_lance_options();
    let mut done = Vec::new();
    for uri in &tables {
        match knn_indexer::table::load_dataset(uri, &storage, None).await {
            Err(lance::Error::DatasetNotFound { .. }) if named.is_empty() => {
                say!("{uri}: no table yet, skipped");
                continue;
            }
            _ => {}
        }
        let upkept = if args.dry_run {
            None
        } else {
            let s = maintain::gc(uri, &storage, &upkeep).await?;
            say!(
                "{}: {} shards in the ledger (checkpoint at version {}); fragments {} -> {}; \
                 {} versions and {:.1} MB removed in {:.1} s",
                s.table,
                s.shards,
                s.checkpoint_version,
                s.fragments_before,
                s.fragments_after,
                s.versions_removed,
                s.bytes_removed as f64 / 1e6,
                s.seconds
            );
            Some(s)
        };
        let o = maintain::sweep_orphans(uri, &storage, args.older_than, args.dry_run).await?;
        let grace = humantime::format_duration(args.older_than);
        let text = if args.dry_run {
            // The URLs on stdout, one a line; under JSON logs they are the event's
            // `orphan_paths` instead, so that every line is JSON.
            if !JSON_LOGS.load(Ordering::Relaxed) {
                for p in &o.orphan_paths {
                    println!("{p}");
                }
            }
            format!(
                "{uri}: dry run, nothing changed: {} orphaned data files ({:.1} MB) older than \
                 {grace} would be deleted; {} younger unreferenced files would be kept; {} \
                 data files, {} versions read",
                o.orphans,
                o.orphan_bytes as f64 / 1e6,
                o.young_unreferenced,
                o.data_files,
                o.versions_read
            )
        } else {
            format!(
                "{uri}: {} orphaned data files ({:.1} MB) older than {grace} deleted; {} younger \
                 unreferenced files kept (a live writer's, or --older-than is longer)",
                o.removed,
                o.orphan_bytes as f64 / 1e6,
                o.young_unreferenced
            )
        };
        report(&text, serde_json::to_value(&o).ok());
        done.push(serde_json::json!({ "table": uri, "upkeep": upkept, "orphans": o }));
    }
    write_summary(c.summary_json.as_deref(), &done)
}

async fn run_eval(args: cli::EvalArgs, log_format: LogFormat) -> Result<()> {
    let c = &args.config;
    let project = config::load(&c.config, &c.overrides)?;
    let mut plan = project.eval_plan(&c.config, args.quick)?;
    if let Some(job) = args.train_arm {
        let table = args
            .arm_knn_table
            .context("--train-arm needs --arm-knn-table")?;
        let arm = knn_trainer::eval::train_arm(&plan, job, &table, &project.storage).await?;
        return write_summary(c.summary_json.as_deref(), &arm);
    }
    // Arms train side by side in copies of this process, loading the same config and
    // logging in the same format.
    let format = match log_format {
        LogFormat::Human => "human",
        LogFormat::Json => "json",
    };
    let mut args_again: Vec<std::ffi::OsString> = vec![
        "--log-format".into(),
        format.into(),
        "eval".into(),
        "--config".into(),
        c.config.clone().into(),
    ];
    for o in &c.overrides {
        args_again.extend(["--set".into(), o.into()]);
    }
    if args.quick {
        args_again.push("--quick".into());
    }
    plan.launcher = std::env::current_exe()
        .ok()
        .map(|program| knn_trainer::eval::ArmLauncher {
            program,
            args: args_again,
        });
    let summary = knn_trainer::eval::eval(&plan, &project.storage).await?;
    say!(
        "eval: {} in {:.1} min ({} arms trained now); report: {}",
        if args.quick { "quick form" } else { "full" },
        summary.seconds / 60.0,
        summary.arms_trained,
        summary.report_md.display()
    );
    for claim in &summary.claims {
        say!("  {:?}: {} ({})", claim.verdict, claim.claim, claim.detail);
    }
    write_summary(c.summary_json.as_deref(), &summary)
}

async fn run_precompute_knn(args: EmbedArgs, log_format: LogFormat) -> Result<()> {
    let (args, summary_json) = (args.stage, args.summary_json);
    let project = config::load(&args.config, &args.overrides)?;
    let cfg = project.knn(&args.config)?;
    let slot = WorkerSlot::from_flags_or_env(args.worker, args.workers)?;
    let progress = Arc::new(KnnProgress::default());
    let (stop_reporting, stopped) = tokio::sync::oneshot::channel();
    let reporter = tokio::spawn(report_knn_progress(progress.clone(), log_format, stopped));
    let result = knn_indexer::precompute_knn(
        &cfg,
        &project.storage,
        (slot.index(), slot.count()),
        progress,
    )
    .await;
    // The bar is cleared before the summary is printed, so that it cannot draw over it.
    let _ = stop_reporting.send(());
    let _ = reporter.await;
    let summary = result?;
    finish(&summary, summary_json.as_deref())
}

async fn run_train(args: cli::TrainArgs, log_format: LogFormat) -> Result<()> {
    let requeue_marker = args.requeue_marker;
    let stopped_exit_code = args.stopped_exit_code;
    let args = args.config;
    let project = config::load(&args.config, &args.overrides)?;
    let cfg = project.train(&args.config)?;
    let rdv = knn_cluster::rendezvous::Rendezvous::from_env()?;
    let (bar, stop) = step_reporter(cfg.max_steps, rdv.rank, log_format)?;
    let mut on_step = |p: &knn_trainer::TrainProgress| on_step(&bar, &stop, p);
    let summary = knn_trainer::train(&cfg, &project.storage, &rdv, &mut on_step).await?;
    // Stopped early, by a signal, after writing its checkpoint.
    let stopped_early = summary.step < cfg.max_steps;
    if stopped_early && summary.rank == 0 {
        // Stopped by a signal with its checkpoint written: tell a Slurm script to requeue.
        if let Some(marker) = requeue_marker {
            std::fs::write(&marker, format!("{}\n", summary.step))
                .with_context(|| format!("writing the requeue marker {}", marker.display()))?;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    report(&format!(
        "trained to step {} (resumed from {}): loss {:.4}, {:.3} s/step, data wait {:.1}% of the time, {} unusable rows\n  checkpoint: {}\n  metrics: {}",
        summary.step,
        summary.resumed_from,
        summary.last_loss,
        summary.step_time_s,
        100.0 * summary.data_wait_fraction,
        summary.bad_rows,
        summary.checkpoint.as_deref().unwrap_or("(none written this run)"),
        summary.metrics.display()
    ), serde_json::to_value(&summary).ok());
    write_summary(args.summary_json.as_deref(), &summary)?;
    if stopped_early && stopped_exit_code != 0 {
        // Stopped early with a checkpoint: a non-zero code makes Kubernetes recreate the pod.
        std::process::exit(stopped_exit_code);
    }
    Ok(())
}

/// A progress bar over optimiser steps on a terminal (rank 0), and the stop flag: the
/// `progress` callback of both training loops.
fn step_reporter(
    max_steps: u64,
    rank: usize,
    log_format: LogFormat,
) -> Result<(
    Option<indicatif::ProgressBar>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
)> {
    let stop = stop_on_signals()?;
    let show_bar = log_format == LogFormat::Human && std::io::stderr().is_terminal();
    let bar = (show_bar && rank == 0).then(|| {
        let bar = indicatif::ProgressBar::new(max_steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  eta {eta}",
            )
            .expect("valid template"),
        );
        bar
    });
    Ok((bar, stop))
}

/// Shows a step on the bar and says whether a signal asked to stop.
fn on_step(
    bar: &Option<indicatif::ProgressBar>,
    stop: &std::sync::atomic::AtomicBool,
    p: &knn_trainer::TrainProgress,
) -> std::ops::ControlFlow<()> {
    if let Some(bar) = bar {
        bar.set_position(p.step);
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.1} img/s",
            p.loss, p.lr, p.images_per_s
        ));
    }
    match stop.load(std::sync::atomic::Ordering::SeqCst) {
        true => std::ops::ControlFlow::Break(()),
        false => std::ops::ControlFlow::Continue(()),
    }
}

async fn run_train_clip(args: cli::TrainClipArgs, log_format: LogFormat) -> Result<()> {
    let judge = args.judge;
    let args = args.config;
    let project = config::load(&args.config, &args.overrides)?;
    let cfg = project.train_clip(&args.config, judge)?;
    let rdv = knn_cluster::rendezvous::Rendezvous::from_env()?;
    let (bar, stop) = step_reporter(cfg.max_steps, rdv.rank, log_format)?;
    let summary = knn_trainer::train_clip(&cfg, &project.storage, &rdv, &mut |p| {
        on_step(&bar, &stop, p)
    })
    .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let p = &summary.prepare;
    say!(
        "train-clip{}: step {} (resumed from {}), loss {:.4}, {:.3} s/step, data wait {:.1}%\n  \
         captions: {} training pairs, {} held out; this rank: {} shards read, {} already in, {} rows, {} rejected {:?}",
        if judge { " --judge" } else { "" },
        summary.step,
        summary.resumed_from,
        summary.last_loss,
        summary.step_time_s,
        100.0 * summary.data_wait_fraction,
        summary.train_rows,
        summary.holdout_rows,
        p.committed,
        p.skipped,
        p.rows_written,
        p.rejected.values().sum::<u64>(),
        p.rejected,
    );
    for (key, shard, why) in &p.reject_examples {
        say!("    rejected `{key}` in `{shard}`: {why}");
    }
    if let Some(e) = &summary.eval {
        say!("  {e}");
    }
    if let Some(dir) = &summary.export_dir {
        say!("  CLIP written to {dir} (set embed.clip.checkpoint to it)");
    }
    write_summary(args.summary_json.as_deref(), &summary)
}

async fn run_data_fetch(args: cli::DataFetchArgs) -> Result<()> {
    use knn_datasets::packaged::{fetch, FetchOptions, PackagedSet};
    let sets: Vec<PackagedSet> = match args.set.as_str() {
        "all" => PackagedSet::ALL.to_vec(),
        name => vec![PackagedSet::from_name(name).with_context(|| {
            format!("unknown set `{name}`: use twitter, openmoji, openclipart, fluent-3d or all")
        })?],
    };
    let storage = match &args.config {
        Some(path) => config::load(path, &[])?.storage,
        None => Default::default(),
    };
    let mut summaries = Vec::new();
    for set in sets {
        let opts = FetchOptions {
            out: format!("{}/{}", args.out.trim_end_matches('/'), set.name()),
            cache_dir: args.cache.clone(),
            rows_per_shard: args.rows_per_shard,
            max_side_px: args.max_side_px,
        };
        let summary = fetch(set, &opts, &storage)
            .await
            .with_context(|| format!("data fetch {}", set.name()))?;
        say!("{summary}");
        summaries.push(summary);
    }
    write_summary(args.summary_json.as_deref(), &summaries)
}

fn run_submit(args: cli::SubmitArgs) -> Result<()> {
    use knn_cluster::job::{BackendKind, Job, JobConfig};
    use knn_cluster::launch::Submitted;
    let text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("reading the job file {}", args.job.display()))?;
    let cfg: JobConfig =
        toml::from_str(&text).with_context(|| format!("job file {}", args.job.display()))?;
    let binary = match args.binary {
        Some(b) => b,
        None => std::env::current_exe().context("finding this binary")?,
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let job = Job::new(&args.job, cfg, &cwd, binary)?;
    let backend = match args.backend {
        Some(cli::BackendArg::Local) => BackendKind::Local,
        Some(cli::BackendArg::Slurm) => BackendKind::Slurm,
        Some(cli::BackendArg::Kubernetes) => BackendKind::Kubernetes,
        None => job.cfg.job.backend,
    };
    let stop = stop_on_signals()?;
    match knn_cluster::launch::submit(&job, backend, args.dry_run, &stop)? {
        Submitted::DryRun(text) => print!("{text}"),
        Submitted::Local { processes } => say!(
            "job `{}` ({}) finished: {processes} process(es) on this machine",
            job.cfg.job.name,
            job.stage().command()
        ),
        Submitted::Slurm { job_id, script } => {
            println!("{job_id}");
            say!(
                "submitted Slurm job {job_id} (script {}); watch it with `squeue -j {job_id}`",
                script.display()
            );
        }
        Submitted::Kubernetes { output } => {
            println!("{output}");
            say!(
                "applied; watch it with `kubectl get pods -l job-name={}`",
                job.cfg.job.name
            );
        }
    }
    Ok(())
}

fn run_launch(args: cli::LaunchArgs) -> Result<()> {
    let launch = knn_cluster::launch::LocalLaunch {
        program: std::env::current_exe().context("finding this binary")?,
        args: args.command,
        nproc_per_node: args.nproc_per_node,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr,
        master_port: args.master_port,
        workdir: None,
        grace_s: args.grace_s,
    };
    let stop = stop_on_signals()?;
    match launch.run(&stop) {
        Ok(_) => Ok(()),
        // Every process ended with the same code (a stop for requeueing): pass it on.
        Err(knn_cluster::ClusterError::Failed { codes, detail, .. })
            if codes
                .first()
                .is_some_and(|c| c.is_some() && codes.iter().all(|x| x == c)) =>
        {
            say!("launch: {detail}");
            std::process::exit(codes[0].unwrap_or(1))
        }
        Err(e) => Err(e.into()),
    }
}

/// A flag set by SIGTERM or SIGUSR1 (Slurm's `--signal`, Kubernetes' pod termination) or
/// SIGINT (Ctrl-C): the trainer then checkpoints at the end of the current step, on every
/// rank, and exits 0. A second Ctrl-C does not wait for the checkpoint: it exits 130 at once,
/// as a shell expects, and the run resumes from its last saved checkpoint.
fn stop_on_signals() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (kind, name) in [
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::user_defined1(), "SIGUSR1"),
        (SignalKind::interrupt(), "SIGINT"),
    ] {
        let mut stream = signal(kind).with_context(|| format!("listening for {name}"))?;
        let flag = flag.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                let again = flag.swap(true, std::sync::atomic::Ordering::SeqCst);
                if again && name == "SIGINT" {
                    tracing::error!(
                        "SIGINT again: exiting now, without a checkpoint for this step; \
                         the run resumes from its last saved checkpoint"
                    );
                    std::process::exit(130);
                }
                tracing::warn!(
                    "{name}: checkpointing at the end of this step, then exiting \
                     (Ctrl-C again to exit at once)"
                );
            }
        });
    }
    Ok(flag)
}

/// `bench train`'s data-loader measurement: a real `train` run of `loader_steps` steps on
/// the config's tables, into a scratch directory. Returns (wait fraction, s/step, steps).
async fn loader_wait(args: &knn_bench::train::BenchTrainArgs) -> Result<Option<(f64, f64, u64)>> {
    if args.loader_steps == 0 {
        return Ok(None);
    }
    let project = config::load(&args.config, &[])?;
    let mut cfg = project.train(&args.config)?;
    let out = args.workdir.join("loader-run");
    let _ = std::fs::remove_dir_all(&out);
    cfg.output_dir = out.to_string_lossy().into_owned();
    cfg.checkpoint.url = None;
    cfg.max_steps = args.loader_steps;
    cfg.checkpoint.every_steps = args.loader_steps;
    cfg.samples.every_steps = 0;
    cfg.batch_size = args.batch;
    let single = knn_cluster::rendezvous::Rendezvous::single();
    let summary = knn_trainer::train(&cfg, &project.storage, &single, &mut |_| {
        std::ops::ControlFlow::Continue(())
    })
    .await
    .context(
        "the data-loader run needs the embedded default's tables: run `bash scripts/demo.sh` first",
    )?;
    Ok(Some((
        summary.data_wait_fraction,
        summary.step_time_s,
        summary.step,
    )))
}

/// `sample`'s guidance and sampler: each flag given wins, the rest come from `[train.samples]`.
fn sampling_settings(
    args: &SampleArgs,
    grid: &knn_trainer::config::SampleGridConfig,
) -> (f64, knn_trainer::diffusion::SamplerConfig) {
    use knn_trainer::diffusion::{SamplerConfig, SamplerKind};
    let sampler = SamplerConfig {
        kind: match args.sampler {
            Some(SamplerArg::Ddim) => SamplerKind::Ddim,
            Some(SamplerArg::Ddpm) => SamplerKind::Ddpm,
            None => grid.sampler.kind,
        },
        steps: args.steps.unwrap_or(grid.sampler.steps),
        eta: args.eta.unwrap_or(grid.sampler.eta),
        ..grid.sampler.clone()
    };
    (args.guidance.unwrap_or(grid.guidance), sampler)
}

async fn run_sample(args: SampleArgs) -> Result<()> {
    let project = config::load(&args.config, &args.overrides)?;
    let train = project.train(&args.config)?;
    let clip = project
        .embed
        .as_ref()
        .map(|e| e.clip.clone())
        .unwrap_or_default();
    let (guidance, sampler) = sampling_settings(&args, &train.samples);
    let req = knn_trainer::SampleRequest {
        prompts: args.prompts,
        checkpoint: args.checkpoint.unwrap_or_else(|| train.checkpoint_url()),
        retrieval_db: args
            .retrieval_db
            .or(train.data.embeddings.clone())
            .context("no --retrieval-db and no embeddings table in the config")?,
        k: args.k,
        bucket: args
            .bucket
            .as_deref()
            .map(|spec| {
                knn_indexer::knn::ScoreBucket::parse(
                    &args.score_column,
                    spec,
                    args.pool,
                    "--bucket",
                )
            })
            .transpose()?,
        guidance,
        sampler,
        per_prompt: args.per_prompt,
        seed: args.seed,
        batch_size: args.batch_size,
        out: args.out,
        neighbours_out: args.neighbours_out,
        raw_weights: args.raw_weights,
        device: train.device,
        judge: args.judge_clip.map(|dir| knn_indexer::clip::ClipSettings {
            checkpoint: Some(dir),
            ..clip.clone()
        }),
    };
    let summary = knn_trainer::sample(&req, &clip, &project.storage).await?;
    let mut text = format!(
        "sampled {} images ({:.2} img/s) from {} (step {})\n  samples:    {}\n  neighbours: {}",
        summary.images,
        summary.images_per_s,
        summary.checkpoint,
        summary.step,
        summary.grid.display(),
        summary.neighbours_grid.display()
    );
    if let Some(j) = &summary.judge {
        text += &format!(
            "\n  judge CLIP {}: {:.0}% of the samples are nearest their own prompt ({}); CLIP score {:.3}",
            j.judge,
            100.0 * j.on_prompt,
            j.per_prompt
                .iter()
                .map(|(p, s)| format!("{p:?}: {:.0}%", 100.0 * s))
                .collect::<Vec<_>>()
                .join(", "),
            j.clip_score
        );
    }
    report(&text, serde_json::to_value(&summary).ok());
    write_summary(args.summary_json.as_deref(), &summary)
}

fn write_summary(path: Option<&std::path::Path>, summary: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(summary)?)
            .with_context(|| format!("writing --summary-json `{}`", path.display()))?;
    }
    Ok(())
}

/// A progress bar over `unit` with rate and ETA on a terminal; a log line every 10 s
/// otherwise. `tick(elapsed_s, log)` reads the counters, logs them when `log` is set, and
/// returns the bar's length, position and message.
async fn report_every(
    log_format: LogFormat,
    unit: &str,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    mut tick: impl FnMut(f64, bool) -> (u64, u64, String),
) {
    let start = Instant::now();
    let bar = (log_format == LogFormat::Human && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}  eta {{eta}}"
            ))
            .expect("valid template"),
        );
        bar
    });
    let mut last_log = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = &mut stop => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                return;
            }
        }
        let log = bar.is_none() && last_log.elapsed() >= knn_indexer::embed::PROGRESS_LOG_INTERVAL;
        if log {
            last_log = Instant::now();
        }
        let (len, pos, msg) = tick(start.elapsed().as_secs_f64().max(1e-3), log);
        if let Some(bar) = &bar {
            bar.set_length(len);
            bar.set_position(pos);
            bar.set_message(msg);
        }
    }
}

/// embed's progress: shards, images and rejects.
async fn report_progress(
    progress: Arc<EmbedProgress>,
    log_format: LogFormat,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    report_every(log_format, "shards", stop, |elapsed_s, log| {
        let todo = progress.shards_todo.load(Ordering::Relaxed);
        let done = progress.shards_finished.load(Ordering::Relaxed);
        let ok = progress.images_ok.load(Ordering::Relaxed);
        let rejected = progress.images_rejected.load(Ordering::Relaxed);
        let rate = ok as f64 / elapsed_s;
        if log {
            tracing::info!(
                shards_done = done,
                shards_todo = todo,
                images_ok = ok,
                rejected,
                img_per_s = rate,
                "progress"
            );
        }
        let msg = format!("{ok} images ({rate:.0} img/s), {rejected} rejected");
        (todo, done, msg)
    })
    .await
}

/// precompute-knn's progress: query rows and shards.
async fn report_knn_progress(
    progress: Arc<KnnProgress>,
    log_format: LogFormat,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    report_every(log_format, "rows", stop, |elapsed_s, log| {
        let shards = progress.shards_finished.load(Ordering::Relaxed);
        let shards_todo = progress.shards_todo.load(Ordering::Relaxed);
        let done = progress.queries_done.load(Ordering::Relaxed);
        let todo = progress.queries_todo.load(Ordering::Relaxed);
        let rate = done as f64 / elapsed_s;
        if log {
            tracing::info!(
                shards_done = shards,
                shards_todo,
                rows_done = done,
                rows_todo = todo,
                rows_per_s = rate,
                "progress"
            );
        }
        let msg = format!("{shards}/{shards_todo} shards, {rate:.0} rows/s");
        (todo.max(done), done, msg)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use knn_bench::BenchScaleCommand;
    use knn_trainer::config::SampleGridConfig;
    use knn_trainer::diffusion::SamplerKind;

    fn sample_args(extra: &[&str]) -> SampleArgs {
        let mut argv = vec![
            "knn-diffusion",
            "sample",
            "-c",
            "x.toml",
            "--prompt",
            "a cat",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Sample(a) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bench_scale_commits_skips_the_peer_when_its_sizes_are_empty() {
        let peer = |extra: &[&str]| {
            let mut argv = vec!["knn-diffusion", "bench", "scale", "commits"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).expect("parses").command {
                Command::Bench(BenchCommand::Scale(BenchScaleCommand::Commits(a))) => a.peer_sizes,
                other => panic!("parsed as {other:?}"),
            }
        };
        assert_eq!(peer(&[]), vec![1000, 3000]);
        assert_eq!(peer(&["--peer-sizes", "--no-s3"]), Vec::<usize>::new());
        assert_eq!(peer(&["--peer-sizes", "500,700"]), vec![500, 700]);
    }

    #[test]
    fn sample_takes_the_config_sampler_unless_a_flag_overrides_it() {
        let mut grid = SampleGridConfig {
            guidance: 2.0,
            ..Default::default()
        };
        grid.sampler.kind = SamplerKind::Ddpm;
        grid.sampler.steps = 100;
        grid.sampler.clip_denoised = false;

        let (g, s) = sampling_settings(&sample_args(&[]), &grid);
        assert_eq!(
            (g, s.kind, s.steps, s.eta),
            (2.0, SamplerKind::Ddpm, 100, 0.0)
        );
        assert!(
            !s.clip_denoised,
            "settings without a flag come from the config"
        );

        let flags = [
            "--guidance",
            "4",
            "--sampler",
            "ddim",
            "--steps",
            "20",
            "--eta",
            "0.5",
        ];
        let (g, s) = sampling_settings(&sample_args(&flags), &grid);
        assert_eq!(
            (g, s.kind, s.steps, s.eta),
            (4.0, SamplerKind::Ddim, 20, 0.5)
        );
    }
}
