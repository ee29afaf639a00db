//! Starting a job: processes on this machine (the `local` backend and `knn-diffusion launch`,
//! torchrun's role), `sbatch` for Slurm, `kubectl apply` for Kubernetes.

use crate::job::{BackendKind, Job};
use crate::ClusterError;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Processes started on this node, each told its place through the environment
/// (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`),
/// which training reads as its rendezvous and batch stages as their worker slot.
#[derive(Clone, Debug)]
pub struct LocalLaunch {
    /// The program (usually this `knn-diffusion`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Processes on this node.
    pub nproc_per_node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index.
    pub node_rank: usize,
    /// Rank 0's host.
    pub master_addr: String,
    /// Rank 0's store port (0: a free port here; one node only).
    pub master_port: u16,
    /// Working directory of the processes (default: this one).
    pub workdir: Option<PathBuf>,
    /// Seconds the others get to stop after one fails or a stop is asked.
    pub grace_s: u64,
}

impl LocalLaunch {
    /// Runs the processes to the end. When one fails the others are sent SIGTERM (they
    /// checkpoint and exit), then killed after the grace period; `stop` set by the caller
    /// (a signal to the launcher) is forwarded the same way.
    pub fn run(&self, stop: &AtomicBool) -> Result<Vec<ExitStatus>, ClusterError> {
        let port = self.rendezvous_port()?;
        let world = self.nproc_per_node * self.nnodes;
        let (mut children, printers) = self.spawn_all(world, port)?;
        tracing::info!(
            world,
            node = self.node_rank,
            port,
            "started {} processes",
            children.len()
        );
        let statuses = self.supervise(&mut children, stop);
        for p in printers {
            let _ = p.join();
        }
        let bad: Vec<String> = children
            .iter()
            .zip(&statuses)
            .filter(|(_, s)| !s.success())
            .map(|((rank, _), s)| format!("rank {rank} {s}"))
            .collect();
        if bad.is_empty() {
            Ok(statuses)
        } else {
            Err(ClusterError::Failed {
                failed: bad.len(),
                total: statuses.len(),
                detail: bad.join(", "),
                codes: statuses.iter().map(|s| s.code()).collect(),
            })
        }
    }

    /// The layout checked, and the port rank 0's store listens on.
    fn rendezvous_port(&self) -> Result<u16, ClusterError> {
        if self.nproc_per_node == 0 || self.nnodes == 0 || self.node_rank >= self.nnodes {
            return Err(ClusterError::Unrunnable(format!(
                "node {} of {} with {} processes per node is not a valid layout",
                self.node_rank, self.nnodes, self.nproc_per_node
            )));
        }
        match self.master_port {
            0 if self.nnodes > 1 => Err(ClusterError::Unrunnable(
                "a job over several nodes needs --master-port".into(),
            )),
            0 => free_port().map_err(|source| ClusterError::Io {
                path: "127.0.0.1:0".into(),
                source,
            }),
            p => Ok(p),
        }
    }

    /// This node's processes, each with its rank, and the threads that print their stderr
    /// tagged with it. A failed spawn kills the ones already started.
    fn spawn_all(&self, world: usize, port: u16) -> Result<Spawned, ClusterError> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .div_euclid(self.nproc_per_node)
            .max(1);
        let mut children: Vec<(usize, Child)> = Vec::new();
        let mut printers = Vec::new();
        for local in 0..self.nproc_per_node {
            let rank = self.node_rank * self.nproc_per_node + local;
            let mut cmd = Command::new(&self.program);
            cmd.args(&self.args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string())
                .env("MASTER_ADDR", &self.master_addr)
                .env("MASTER_PORT", port.to_string())
                .stdin(Stdio::null())
                .stderr(if world > 1 {
                    Stdio::piped()
                } else {
                    Stdio::inherit()
                });
            if std::env::var_os("OMP_NUM_THREADS").is_none() {
                cmd.env("OMP_NUM_THREADS", threads.to_string());
            }
            if let Some(d) = &self.workdir {
                cmd.current_dir(d);
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(source) => {
                    signal_all(&children, libc::SIGKILL);
                    return Err(ClusterError::Spawn {
                        program: self.program.display().to_string(),
                        hint: "",
                        source,
                    });
                }
            };
            if let Some(err) = child.stderr.take() {
                printers.push(std::thread::spawn(move || {
                    // Each line tagged with its rank, so interleaved logs stay readable.
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
                    }
                }));
            }
            children.push((rank, child));
        }
        Ok((children, printers))
    }

    /// Waits for every process; once one fails or `stop` is set, SIGTERM to the rest, and
    /// a kill after the grace period.
    fn supervise(&self, children: &mut [(usize, Child)], stop: &AtomicBool) -> Vec<ExitStatus> {
        let mut status: Vec<Option<ExitStatus>> = vec![None; children.len()];
        let mut stopping_since: Option<Instant> = None;
        loop {
            for (i, (_, c)) in children.iter_mut().enumerate() {
                if status[i].is_none() {
                    if let Ok(Some(s)) = c.try_wait() {
                        status[i] = Some(s);
                    }
                }
            }
            if status.iter().all(Option::is_some) {
                break;
            }
            let failed = status.iter().any(|s| s.is_some_and(|s| !s.success()));
            if (failed || stop.load(Ordering::SeqCst)) && stopping_since.is_none() {
                for (i, (_, c)) in children.iter().enumerate() {
                    if status[i].is_none() {
                        // SAFETY: signalling our own child by its pid.
                        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                    }
                }
                stopping_since = Some(Instant::now());
            }
            if stopping_since.is_some_and(|t| t.elapsed() > Duration::from_secs(self.grace_s)) {
                for (i, (_, c)) in children.iter_mut().enumerate() {
                    if status[i].is_none() {
                        let _ = c.kill();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        status.into_iter().map(|s| s.expect("all exited")).collect()
    }
}

/// This node's processes with their ranks, and the threads printing their stderr.
type Spawned = (Vec<(usize, Child)>, Vec<std::thread::JoinHandle<()>>);

fn signal_all(children: &[(usize, Child)], sig: i32) {
    for (_, c) in children {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(c.id() as i32, sig) };
    }
}

/// A TCP port free on 127.0.0.1 right now (for a rendezvous on this machine).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What `submit` did.
#[derive(Debug)]
pub enum Submitted {
    /// Printed, not submitted.
    DryRun(String),
    /// Ran here to the end.
    Local { processes: usize },
    /// Queued on Slurm.
    Slurm { job_id: String, script: PathBuf },
    /// Applied to Kubernetes.
    Kubernetes { output: String },
}

/// Submits `job` through `backend`.
pub fn submit(
    job: &Job,
    backend: BackendKind,
    dry_run: bool,
    stop: &AtomicBool,
) -> Result<Submitted, ClusterError> {
    match backend {
        BackendKind::Local => submit_local(job, dry_run, stop),
        BackendKind::Slurm => submit_slurm(job, dry_run),
        BackendKind::Kubernetes => submit_kubernetes(job, dry_run),
    }
}

/// Runs the job's processes on this machine to the end.
fn submit_local(job: &Job, dry_run: bool, stop: &AtomicBool) -> Result<Submitted, ClusterError> {
    let r = &job.cfg.resources;
    if r.nodes > 1 {
        return Err(ClusterError::Unrunnable(format!(
            "job `{}` asks for {} nodes; the local backend runs on this machine only (use slurm or kubernetes)",
            job.file.display(),
            r.nodes
        )));
    }
    let launch = LocalLaunch {
        program: job.binary.clone(),
        args: job.stage_args(&job.stage_config.display().to_string()),
        nproc_per_node: job.processes(),
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
        workdir: Some(job.workdir.clone()),
        grace_s: job.cfg.slurm.signal_grace_s.max(30),
    };
    if dry_run {
        let env = match job.processes() {
            1 => String::new(),
            n => format!("RANK=0..{} WORLD_SIZE={n} MASTER_ADDR=127.0.0.1 ", n - 1),
        };
        return Ok(Submitted::DryRun(format!(
            "cd {} && {env}{} {}\n",
            job.workdir.display(),
            launch.program.display(),
            launch.args.join(" ")
        )));
    }
    launch.run(stop)?;
    Ok(Submitted::Local {
        processes: job.processes(),
    })
}

/// Writes the sbatch script under `.knn-jobs/` and queues it.
fn submit_slurm(job: &Job, dry_run: bool) -> Result<Submitted, ClusterError> {
    let script = job.sbatch_script();
    if dry_run {
        return Ok(Submitted::DryRun(script));
    }
    let dir = job.workdir.join(".knn-jobs");
    std::fs::create_dir_all(&dir).map_err(|source| ClusterError::Io {
        path: dir.clone(),
        source,
    })?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let path = dir.join(format!("{}-{stamp}.sbatch", job.cfg.job.name));
    std::fs::write(&path, &script).map_err(|source| ClusterError::Io {
        path: path.clone(),
        source,
    })?;
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(&path)
        .current_dir(&job.workdir)
        .output()
        .map_err(|source| ClusterError::Spawn {
            program: "sbatch".into(),
            hint: "; is this a Slurm login node? `--dry-run` prints the script instead",
            source,
        })?;
    succeeded("sbatch", &out)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let job_id = text.trim().split(';').next().unwrap_or("").to_string();
    Ok(Submitted::Slurm {
        job_id,
        script: path,
    })
}

/// `out`'s exit status as a result: a failure is `program` refusing, with its stderr.
fn succeeded(program: &str, out: &std::process::Output) -> Result<(), ClusterError> {
    if out.status.success() {
        return Ok(());
    }
    Err(ClusterError::Refused {
        program: program.into(),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Pipes the manifest to `kubectl apply`.
fn submit_kubernetes(job: &Job, dry_run: bool) -> Result<Submitted, ClusterError> {
    let text = std::fs::read_to_string(&job.stage_config).map_err(|source| ClusterError::Io {
        path: job.stage_config.clone(),
        source,
    })?;
    let manifest = job.kubernetes_manifest(&text)?;
    if dry_run {
        return Ok(Submitted::DryRun(manifest));
    }
    let mut child = Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ClusterError::Spawn {
            program: "kubectl".into(),
            hint: "; install kubectl and select a context, or use `--dry-run` and apply the manifest yourself",
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(manifest.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| ClusterError::Spawn {
            program: "kubectl".into(),
            hint: "",
            source,
        })?;
    succeeded("kubectl apply", &out)?;
    Ok(Submitted::Kubernetes {
        output: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    })
}
