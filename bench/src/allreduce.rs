//! `knn-diffusion bench allreduce`: the gradient all-reduce of data-parallel training (our
//! process group: TCP ring on the CPU, NCCL on GPUs) against torch.distributed (gloo / NCCL,
//! `python/bench_allreduce_torch.py`) on the same buffer, world size and machine, in one run.
//! Reports time per all-reduce, algorithm bandwidth (bytes / time) and bus bandwidth
//! (algbw x 2(n-1)/n, the nccl-tests convention: what each link carries in a ring).

use super::{machine, write_section};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use knn_cluster::group::{self, Backend, GroupOptions};
use knn_cluster::launch::free_port;
use knn_cluster::rendezvous::Rendezvous;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// `--backend`: which transport of the process group is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The TCP ring on CPU tensors.
    Tcp,
    /// NCCL, one GPU per rank.
    Nccl,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Tcp => Backend::Tcp,
            BackendArg::Nccl => Backend::Nccl,
        }
    }
}

/// Flags of `bench allreduce`.
#[derive(Debug, Args)]
pub struct BenchAllReduceArgs {
    /// The process group's transport.
    #[arg(long, value_enum, default_value = "tcp")]
    pub backend: BackendArg,
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

/// Our seconds per all-reduce: one thread per rank, each with its own group member.
fn ours(args: &BenchAllReduceArgs, backend: Backend) -> Result<f64> {
    let port = free_port()?;
    let n = (args.mib * 1024 * 1024 / 4) as i64;
    let results: Vec<Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.world)
            .map(|rank| {
                s.spawn(move || -> Result<f64> {
                    let rdv = Rendezvous {
                        rank,
                        world: args.world,
                        local_rank: rank,
                        local_world: args.world,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        source: "bench",
                    };
                    let device = match backend {
                        Backend::Tcp => Device::Cpu,
                        Backend::Nccl => Device::Cuda(rank),
                    };
                    let opts = GroupOptions {
                        timeout: Duration::from_secs(300),
                        // One bucket: the buffer is the bucket.
                        bucket_bytes: usize::MAX,
                    };
                    let mut g = group::join(&rdv, backend, device, opts)?;
                    let t = Tensor::ones([n], (Kind::Float, device));
                    for _ in 0..args.warmup {
                        g.all_reduce_mean(&[t.shallow_clone()])?;
                    }
                    g.barrier()?;
                    let start = Instant::now();
                    for _ in 0..args.rounds {
                        g.all_reduce_mean(&[t.shallow_clone()])?;
                    }
                    Ok(start.elapsed().as_secs_f64() / args.rounds as f64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a rank panicked")))
            .collect()
    });
    let mut worst = 0f64;
    for r in results {
        worst = worst.max(r?);
    }
    Ok(worst)
}

fn torch(args: &BenchAllReduceArgs, backend: Backend) -> Result<f64> {
    let peer = match backend {
        Backend::Tcp => "gloo",
        Backend::Nccl => "nccl",
    };
    let out = Command::new(".venv/bin/python")
        .args(["python/bench_allreduce_torch.py", "--backend", peer])
        .args(["--world", &args.world.to_string()])
        .args(["--mib", &args.mib.to_string()])
        .args(["--rounds", &args.rounds.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--port", &free_port()?.to_string()])
        .output()
        .context("running python/bench_allreduce_torch.py (run scripts/setup.sh first)")?;
    if !out.status.success() {
        bail!(
            "python/bench_allreduce_torch.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .rfind(|l| l.starts_with(b"{"))
            .unwrap_or(b"{}"),
    )?;
    v["seconds_per_op"]
        .as_f64()
        .context("python/bench_allreduce_torch.py printed no seconds_per_op")
}

/// Runs both sides `rounds` times alternately (VM noise), writes the section, returns it.
pub fn run(args: &BenchAllReduceArgs) -> Result<String> {
    let backend = Backend::from(args.backend);
    if backend == Backend::Nccl && (tch::Cuda::device_count() as usize) < args.world {
        bail!(
            "--backend nccl --world {} needs {} GPUs; libtorch sees {}",
            args.world,
            args.world,
            tch::Cuda::device_count()
        );
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        a.push(ours(args, backend)?);
        if !args.no_peer {
            b.push(torch(args, backend)?);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let bytes = (args.mib * 1024 * 1024) as f64;
    let w = args.world as f64;
    let row = |name: &str, secs: f64| {
        let alg = bytes / secs / 1e9;
        let bus = alg * 2.0 * (w - 1.0) / w;
        format!("| {name} | {:.2} | {alg:.2} | {bus:.2} |\n", secs * 1e3)
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### all-reduce: {backend}, {} ranks, {} MiB float32\n",
        args.world, args.mib
    );
    let _ = writeln!(md, "Machine: {}. Median of {} runs of {} timed all-reduces each (after {} warm-up), ours and the peer alternating; one thread per rank for ours, one process per rank for torch.\n", machine(), args.repeats, args.rounds, args.warmup);
    let _ = writeln!(
        md,
        "| implementation | ms / all-reduce | algbw GB/s | busbw GB/s |\n|---|---|---|---|"
    );
    md += &row(&format!("knn-diffusion {backend} group"), med(&mut a));
    if !b.is_empty() {
        let peer = match backend {
            Backend::Tcp => "torch.distributed gloo",
            Backend::Nccl => "torch.distributed nccl",
        };
        md += &row(peer, med(&mut b));
    }
    md.push('\n');
    let name = format!("allreduce:{backend}:w{}:{}MiB", args.world, args.mib);
    write_section(&args.out, &name, &md)?;
    Ok(md)
}
