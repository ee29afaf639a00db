//! A job: which stage runs with which config, on what resources, through which backend
//! (`configs/jobs/*.toml`), and what each backend makes of it: an sbatch script for Slurm, an
//! Indexed Job with a headless Service and a ConfigMap for Kubernetes, processes on this
//! machine for `local`.
//!
//! Batch stages (embed, precompute-knn) run as independent workers that split the shards (a
//! Slurm array, one Indexed Job pod per worker); `train` runs as one data-parallel job of
//! `nodes x tasks_per_node` ranks (`srun`, one pod per node running `launch`); build-index
//! and sample run once.

use crate::kubernetes::{self as kube, Object};
use crate::rendezvous::DEFAULT_MASTER_PORT;
use crate::ClusterError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The pipeline stage a job runs.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Decode and CLIP-embed the images (sharded over workers).
    Embed,
    /// Build the ANN index (once).
    BuildIndex,
    /// Every image's k neighbours (sharded over workers).
    PrecomputeKnn,
    /// Train the diffusion model (data-parallel ranks).
    Train,
    /// Sample images (once).
    Sample,
}

impl Stage {
    /// The subcommand.
    pub fn command(self) -> &'static str {
        match self {
            Stage::Embed => "embed",
            Stage::BuildIndex => "build-index",
            Stage::PrecomputeKnn => "precompute-knn",
            Stage::Train => "train",
            Stage::Sample => "sample",
        }
    }

    /// Whether the stage splits its shards over independent workers.
    pub fn is_sharded(self) -> bool {
        matches!(self, Stage::Embed | Stage::PrecomputeKnn)
    }
}

/// Where the job runs.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Processes on this machine.
    Local,
    /// An sbatch script submitted with `sbatch`.
    Slurm,
    /// A manifest applied with `kubectl`.
    Kubernetes,
}

/// `[job]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Job name (Slurm job name, Kubernetes object names: lowercase letters, digits, `-`).
    pub name: String,
    /// `embed`, `build-index`, `precompute-knn`, `train` or `sample`.
    pub stage: Stage,
    /// The stage's own config file, relative to this job file.
    pub config: PathBuf,
    /// Extra flags for the stage, e.g. `["--set", "train.max_steps=1000"]`.
    #[serde(default)]
    pub args: Vec<String>,
    /// `local`, `slurm` or `kubernetes` (`submit --backend` overrides).
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    /// Directory the stage runs in (relative paths in its config resolve from here);
    /// default: the directory `submit` is run from.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
}

fn default_backend() -> BackendKind {
    BackendKind::Local
}

/// `[resources]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Nodes (machines).
    #[serde(default = "one")]
    pub nodes: usize,
    /// GPUs per node (0: CPU).
    #[serde(default)]
    pub gpus_per_node: usize,
    /// Processes per node: training ranks, or batch workers (default: `gpus_per_node`, or 1).
    #[serde(default)]
    pub tasks_per_node: Option<usize>,
    /// CPU cores per process.
    #[serde(default = "one")]
    pub cpus_per_task: usize,
    /// Memory per node, e.g. `"64G"`.
    #[serde(default)]
    pub memory: Option<String>,
    /// Wall-clock limit `HH:MM:SS` (Slurm `--time`; Kubernetes `activeDeadlineSeconds`).
    #[serde(default)]
    pub time_limit: Option<String>,
    /// Sharded stages: workers, i.e. Slurm array tasks / Indexed Job pods (default:
    /// `nodes x tasks_per_node`).
    #[serde(default)]
    pub workers: Option<usize>,
}

fn one() -> usize {
    1
}

/// `[slurm]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSection {
    /// Partition.
    #[serde(default)]
    pub partition: Option<String>,
    /// Account.
    #[serde(default)]
    pub account: Option<String>,
    /// QOS.
    #[serde(default)]
    pub qos: Option<String>,
    /// Seconds before the time limit that Slurm sends SIGUSR1, so training checkpoints and
    /// the job requeues itself (0: no signal).
    #[serde(default = "default_grace")]
    pub signal_grace_s: u64,
    /// Requeue after preemption, node failure or the signal above.
    #[serde(default = "yes")]
    pub requeue: bool,
    /// Log file pattern (`%x` job name, `%j` job id, `%A`/`%a` array job/task).
    #[serde(default)]
    pub output: Option<String>,
    /// Further `#SBATCH` lines, e.g. `["--constraint=a100"]`.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// Shell lines run before the stage, e.g. `["module load cuda/12.8"]`.
    #[serde(default)]
    pub setup: Vec<String>,
}

fn default_grace() -> u64 {
    120
}
fn yes() -> bool {
    true
}

/// `[kubernetes]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Container image holding `knn-diffusion` (and libtorch).
    #[serde(default)]
    pub image: Option<String>,
    /// Service account (for object-storage credentials through workload identity).
    #[serde(default)]
    pub service_account: Option<String>,
    /// Secret whose keys become environment variables (storage credentials).
    #[serde(default)]
    pub env_secret: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when a pod is stopped.
    #[serde(default = "default_grace")]
    pub termination_grace_s: u64,
    /// Retries of a failed pod before the job fails.
    #[serde(default = "default_backoff")]
    pub backoff_limit: u32,
}

fn default_backoff() -> u32 {
    3
}

/// A job file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// What runs.
    pub job: JobSection,
    /// On what.
    pub resources: Resources,
    /// Slurm settings.
    #[serde(default)]
    pub slurm: SlurmSection,
    /// Kubernetes settings.
    #[serde(default)]
    pub kubernetes: KubernetesSection,
}

/// A validated job, its paths resolved.
#[derive(Clone, Debug)]
pub struct Job {
    /// The file it came from.
    pub file: PathBuf,
    /// Its settings.
    pub cfg: JobConfig,
    /// The stage config, absolute or relative to `workdir`.
    pub stage_config: PathBuf,
    /// Where the stage runs.
    pub workdir: PathBuf,
    /// The `knn-diffusion` binary the job runs.
    pub binary: PathBuf,
}

impl Job {
    /// Validates `cfg` read from `file`; `cwd` is where `submit` runs, `binary` the program
    /// to run (usually this one).
    pub fn new(
        file: &Path,
        cfg: JobConfig,
        cwd: &Path,
        binary: PathBuf,
    ) -> Result<Self, ClusterError> {
        let bad = |key, reason: String| ClusterError::InvalidJob {
            file: file.display().to_string(),
            key,
            reason,
        };
        let name_ok = !cfg.job.name.is_empty()
            && cfg.job.name.len() <= 52
            && cfg
                .job
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !cfg.job.name.starts_with('-');
        if !name_ok {
            return Err(bad(
                "job.name",
                format!(
                    "{:?}: use 1-52 lowercase letters, digits and `-` (it names Kubernetes objects)",
                    cfg.job.name
                ),
            ));
        }
        let r = &cfg.resources;
        if r.nodes == 0
            || r.cpus_per_task == 0
            || r.tasks_per_node == Some(0)
            || r.workers == Some(0)
        {
            return Err(bad(
                "resources",
                "nodes, cpus_per_task, tasks_per_node and workers must be at least 1".into(),
            ));
        }
        if let Some(t) = &r.time_limit {
            if parse_time_s(t).is_none() {
                return Err(bad(
                    "resources.time_limit",
                    format!("{t:?} is not [D-]HH:MM:SS"),
                ));
            }
        }
        if !cfg.job.stage.is_sharded()
            && cfg.job.stage != Stage::Train
            && (r.nodes > 1 || cfg.tasks_per_node() > 1)
        {
            return Err(bad(
                "resources",
                format!(
                    "{} runs as one process: set nodes = 1 and tasks_per_node = 1",
                    cfg.job.stage.command()
                ),
            ));
        }
        let base = file.parent().unwrap_or(Path::new("."));
        let stage_config = absolute(cwd, &base.join(&cfg.job.config));
        if !stage_config.is_file() {
            return Err(bad(
                "job.config",
                format!(
                    "{} does not exist (paths are relative to the job file)",
                    stage_config.display()
                ),
            ));
        }
        let workdir = absolute(cwd, cfg.job.workdir.as_deref().unwrap_or(Path::new(".")));
        Ok(Self {
            file: file.to_path_buf(),
            cfg,
            stage_config,
            workdir,
            binary,
        })
    }

    /// The stage.
    pub fn stage(&self) -> Stage {
        self.cfg.job.stage
    }

    /// Processes of a sharded stage, or ranks of training.
    pub fn processes(&self) -> usize {
        let r = &self.cfg.resources;
        match self.stage() {
            s if s.is_sharded() => r.workers.unwrap_or(r.nodes * self.cfg.tasks_per_node()),
            Stage::Train => r.nodes * self.cfg.tasks_per_node(),
            _ => 1,
        }
    }

    /// The stage's command line after the binary.
    pub fn stage_args(&self, config: &str) -> Vec<String> {
        let mut a = vec![
            self.stage().command().to_string(),
            "--config".into(),
            config.to_string(),
        ];
        a.extend(self.cfg.job.args.iter().cloned());
        a
    }

    /// The sbatch script.
    pub fn sbatch_script(&self) -> String {
        let c = &self.cfg;
        let r = &c.resources;
        let s = &c.slurm;
        let mut o = String::new();
        let _ = writeln!(o, "#!/bin/bash");
        let _ = writeln!(
            o,
            "# Rendered by `knn-diffusion submit {}`: stage {}.",
            self.file.display(),
            self.stage().command()
        );
        let mut sb = |line: String| {
            let _ = writeln!(o, "#SBATCH {line}");
        };
        sb(format!("--job-name={}", c.job.name));
        let sharded = self.stage().is_sharded();
        if sharded {
            sb(format!("--array=0-{}", self.processes() - 1));
            sb("--ntasks=1".into());
        } else {
            sb(format!("--nodes={}", r.nodes));
            sb(format!("--ntasks-per-node={}", c.tasks_per_node()));
        }
        if r.gpus_per_node > 0 {
            let gpus = if sharded {
                c.tasks_gpus()
            } else {
                r.gpus_per_node
            };
            sb(format!("--gpus-per-node={gpus}"));
        }
        sb(format!("--cpus-per-task={}", r.cpus_per_task));
        if let Some(m) = &r.memory {
            sb(format!("--mem={m}"));
        }
        if let Some(t) = &r.time_limit {
            sb(format!("--time={t}"));
        }
        for (flag, v) in [
            ("partition", &s.partition),
            ("account", &s.account),
            ("qos", &s.qos),
        ] {
            if let Some(v) = v {
                sb(format!("--{flag}={v}"));
            }
        }
        let default_out = if sharded { "%x-%A_%a.out" } else { "%x-%j.out" };
        sb(format!(
            "--output={}",
            s.output.as_deref().unwrap_or(default_out)
        ));
        sb("--open-mode=append".into());
        if self.stage() == Stage::Train && s.signal_grace_s > 0 {
            sb(format!("--signal=USR1@{}", s.signal_grace_s));
        }
        if s.requeue {
            sb("--requeue".into());
        } else {
            sb("--no-requeue".into());
        }
        for a in &s.sbatch_args {
            sb(a.clone());
        }
        let _ = writeln!(o, "set -euo pipefail");
        let _ = writeln!(o, "cd {}", sh(&self.workdir.display().to_string()));
        for line in &s.setup {
            let _ = writeln!(o, "{line}");
        }
        let cmd: Vec<String> = std::iter::once(self.binary.display().to_string())
            .chain(self.stage_args(&self.stage_config.display().to_string()))
            .map(|a| sh(&a))
            .collect();
        let cmd = cmd.join(" ");
        match self.stage() {
            Stage::Train => {
                let _ = writeln!(o, "# Rank 0 serves the rendezvous store on the first node.");
                let _ = writeln!(
                    o,
                    "export MASTER_ADDR=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\""
                );
                let _ = writeln!(o, "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))");
                let _ = writeln!(o, "export OMP_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\"");
                let _ = writeln!(
                    o,
                    "# On SIGUSR1/SIGTERM every rank checkpoints and exits 0; rank 0 leaves this marker."
                );
                let _ = writeln!(o, "REQUEUE_MARKER=\"$PWD/.knn-requeue-$SLURM_JOB_ID\"");
                let _ = writeln!(o, "rm -f \"$REQUEUE_MARKER\"");
                let _ = writeln!(
                    o,
                    "srun --kill-on-bad-exit=1 {cmd} --requeue-marker \"$REQUEUE_MARKER\""
                );
                let _ = writeln!(o, "if [ -e \"$REQUEUE_MARKER\" ]; then");
                let _ = writeln!(o, "  rm -f \"$REQUEUE_MARKER\"");
                if s.requeue {
                    let _ = writeln!(o, "  scontrol requeue \"$SLURM_JOB_ID\"");
                } else {
                    let _ = writeln!(
                        o,
                        "  echo \"stopped early with a checkpoint; resubmit to resume\" >&2"
                    );
                }
                let _ = writeln!(o, "fi");
            }
            _ => {
                let _ = writeln!(o, "export OMP_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\"");
                let _ = writeln!(o, "{cmd}");
            }
        }
        o
    }

    /// The Kubernetes manifest: the stage config as a ConfigMap (credentials left out: the
    /// pods read them from `kubernetes.env_secret`), for training a headless Service that
    /// names rank 0, and an Indexed Job with a pod per worker (sharded stages) or per node.
    pub fn kubernetes_manifest(&self, stage_config_text: &str) -> Result<String, ClusterError> {
        let k = &self.cfg.kubernetes;
        let image = k.image.as_deref().ok_or_else(|| ClusterError::InvalidJob {
            file: self.file.display().to_string(),
            key: "kubernetes.image",
            reason: "set the container image that holds knn-diffusion".into(),
        })?;
        let (config_text, secrets) = without_secrets(stage_config_text);
        if let (Some(first), None) = (secrets.first(), &k.env_secret) {
            return Err(ClusterError::InvalidJob {
                file: self.file.display().to_string(),
                key: "kubernetes.env_secret",
                reason: format!(
                    "the stage config sets `storage.{first}`, and a ConfigMap is not secret: \
                     put it in a Kubernetes Secret (as KNN_STORAGE__{} or the store's own \
                     variable, e.g. AWS_SECRET_ACCESS_KEY) and name that Secret here",
                    first.to_uppercase()
                ),
            });
        }
        let name = &self.cfg.job.name;
        let ns = k.namespace.as_deref().unwrap_or("default");
        let data = BTreeMap::from([("config.toml".to_string(), config_text)]);
        let config_map = kube::ConfigMapBody { data };
        let config_map = Object::new("v1", "ConfigMap", &format!("{name}-config"), ns, config_map);
        let rendered = format!(
            "Rendered by `knn-diffusion submit {}`: stage {}.",
            self.file.display(),
            self.stage().command()
        );
        let mut docs = vec![(vec![rendered], kube::to_yaml(&config_map))];
        if self.stage() == Stage::Train {
            let service = kube::ServiceBody {
                spec: kube::ServiceSpec {
                    cluster_ip: "None",
                    selector: BTreeMap::from([("job-name".to_string(), name.clone())]),
                    ports: vec![kube::ServicePort {
                        name: "rendezvous".into(),
                        port: DEFAULT_MASTER_PORT,
                    }],
                },
            };
            let headless = format!(
                "Headless: pod <job>-<index> resolves as {name}-<index>.{name}, so rank 0 is \
                 {name}-0.{name}."
            );
            let service = Object::new("v1", "Service", name, ns, service);
            docs.push((vec![headless], kube::to_yaml(&service)));
        }
        let spec = self.kube_job_spec(image);
        let job = Object::new("batch/v1", "Job", name, ns, kube::JobBody { spec });
        docs.push((vec![], kube::to_yaml(&job)));
        Ok(kube::documents(&docs))
    }

    /// The Indexed Job: a pod per worker of a sharded stage or per node of training (whose
    /// `launch` starts the node's ranks), else one; its container runs the stage on the
    /// mounted config.
    fn kube_job_spec(&self, image: &str) -> kube::JobSpec {
        let (c, k, r) = (&self.cfg, &self.cfg.kubernetes, &self.cfg.resources);
        let name = &c.job.name;
        let mount = "/etc/knn-diffusion";
        let train = self.stage() == Stage::Train;
        let pods = match self.stage() {
            s if s.is_sharded() => self.processes(),
            Stage::Train => r.nodes,
            _ => 1,
        };
        let mut args: Vec<String> = Vec::new();
        if train {
            args.extend(
                [
                    "launch",
                    "--nproc-per-node",
                    &c.tasks_per_node().to_string(),
                    "--nnodes",
                    &r.nodes.to_string(),
                    "--node-rank",
                    "$(JOB_COMPLETION_INDEX)",
                    "--master-addr",
                    &format!("{name}-0.{name}"),
                    "--master-port",
                    &DEFAULT_MASTER_PORT.to_string(),
                    "--",
                ]
                .map(String::from),
            );
        }
        args.extend(self.stage_args(&format!("{mount}/config.toml")));
        if self.stage().is_sharded() {
            args.extend(["--workers".to_string(), pods.to_string()]);
        }
        if train {
            // SIGTERM reaches `launch` (the container's PID 1), which passes it to the ranks;
            // they checkpoint and exit 143, so the Job recreates the pod (podFailurePolicy
            // does not count it as a failure) and the new pod resumes.
            args.extend(["--stopped-exit-code".to_string(), "143".to_string()]);
        }
        let mut volumes = vec![kube::Volume {
            name: "config".into(),
            source: kube::VolumeSource::ConfigMap {
                name: format!("{name}-config"),
            },
        }];
        if train {
            // NCCL needs more shared memory than a container's default 64 MiB.
            volumes.push(kube::Volume {
                name: "shm".into(),
                source: kube::VolumeSource::EmptyDir { medium: "Memory" },
            });
        }
        let container = self.kube_container(image, args, mount);
        kube::JobSpec {
            completion_mode: "Indexed",
            completions: pods,
            parallelism: pods,
            backoff_limit: k.backoff_limit,
            active_deadline_seconds: r.time_limit.as_deref().and_then(parse_time_s),
            pod_failure_policy: train.then(|| kube::PodFailurePolicy {
                rules: vec![kube::PodFailurePolicyRule {
                    action: "Ignore",
                    on_exit_codes: kube::OnExitCodes {
                        container_name: c.job.stage.command().to_string(),
                        operator: "In",
                        values: vec![143],
                    },
                }],
            }),
            template: kube::PodTemplateSpec {
                metadata: kube::PodMeta {
                    labels: BTreeMap::from([("job-name".to_string(), name.clone())]),
                },
                spec: kube::PodSpec {
                    restart_policy: "Never",
                    subdomain: train.then(|| name.clone()),
                    termination_grace_period_seconds: k.termination_grace_s,
                    service_account_name: k.service_account.clone(),
                    containers: vec![container],
                    volumes,
                },
            },
        }
    }

    /// The stage's container: the command line, its CPU, memory and GPU limits, the config
    /// mount (and for training /dev/shm), and the Secret's variables when one is named.
    fn kube_container(&self, image: &str, args: Vec<String>, mount: &str) -> kube::Container {
        let (c, r) = (&self.cfg, &self.cfg.resources);
        let train = self.stage() == Stage::Train;
        let gpus = if self.stage().is_sharded() {
            c.tasks_gpus()
        } else {
            r.gpus_per_node
        };
        let cpus = r.cpus_per_task * if train { c.tasks_per_node() } else { 1 };
        let mut limits = BTreeMap::from([("cpu".to_string(), cpus.to_string())]);
        if let Some(m) = &r.memory {
            limits.insert("memory".into(), kube_memory(m));
        }
        if gpus > 0 {
            limits.insert("nvidia.com/gpu".into(), gpus.to_string());
        }
        let volume = |name: &str, mount_path: &str| kube::VolumeMount {
            name: name.into(),
            mount_path: mount_path.into(),
        };
        let mut volume_mounts = vec![volume("config", mount)];
        if train {
            volume_mounts.push(volume("shm", "/dev/shm"));
        }
        kube::Container {
            name: c.job.stage.command().to_string(),
            image: image.to_string(),
            command: vec!["knn-diffusion".into()],
            args,
            env: vec![kube::EnvVar {
                name: "OMP_NUM_THREADS".into(),
                value: r.cpus_per_task.to_string(),
            }],
            env_from: c
                .kubernetes
                .env_secret
                .iter()
                .map(|s| kube::EnvFromSource {
                    secret_ref: kube::SecretRef { name: s.clone() },
                })
                .collect(),
            resources: kube::ResourceRequirements { limits },
            volume_mounts,
        }
    }
}

impl JobConfig {
    /// Processes per node.
    pub fn tasks_per_node(&self) -> usize {
        self.resources
            .tasks_per_node
            .unwrap_or(self.resources.gpus_per_node.max(1))
    }

    /// GPUs for one worker of a sharded stage.
    fn tasks_gpus(&self) -> usize {
        (self.resources.gpus_per_node / self.tasks_per_node()).max(1)
    }
}

/// `"64G"` (Slurm) as Kubernetes writes it (`"64Gi"`).
fn kube_memory(m: &str) -> String {
    let m = m.trim();
    match m.chars().last() {
        Some(u @ ('K' | 'M' | 'G' | 'T')) => format!("{}{u}i", &m[..m.len() - 1]),
        _ => m.to_string(),
    }
}

/// `[D-]HH:MM:SS`, `MM:SS` or minutes, as Slurm reads a time limit, in seconds.
pub fn parse_time_s(t: &str) -> Option<u64> {
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, t),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let secs = match parts.as_slice() {
        [m] => m * 60,
        [m, s] => m * 60 + s,
        [h, m, s] => h * 3600 + m * 60 + s,
        _ => return None,
    };
    Some(days * 86_400 + secs)
}

fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Quotes a shell word when it needs it.
fn sh(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// `[storage]` keys that hold credentials (`knn_datasets::StorageConfig`'s `Secret` fields).
const SECRET_KEYS: [&str; 3] = ["secret_access_key", "session_token", "azure_access_key"];

/// The config text with every line that sets a credential replaced by a comment, and the
/// keys it set. A line-level edit keeps the rest of the file (comments, order) as written.
fn without_secrets(text: &str) -> (String, Vec<&'static str>) {
    let mut found = Vec::new();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        let key = key.strip_prefix("storage.").unwrap_or(key);
        match SECRET_KEYS
            .iter()
            .find(|s| **s == key && line.contains('='))
        {
            Some(secret) => {
                found.push(*secret);
                out.push_str(&format!(
                    "# {secret}: left out; the pods read it from their Secret\n"
                ));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    (out, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits() {
        assert_eq!(parse_time_s("04:00:00"), Some(14_400));
        assert_eq!(parse_time_s("1-00:00:30"), Some(86_430));
        assert_eq!(parse_time_s("90"), Some(5_400));
        assert_eq!(parse_time_s("4h"), None);
    }

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(sh("train.max_steps=10"), "train.max_steps=10");
        assert_eq!(sh("a b"), "'a b'");
        assert_eq!(sh("it's"), "'it'\\''s'");
        assert_eq!(kube_memory("64G"), "64Gi");
    }

    #[test]
    fn the_kubernetes_manifest_reads_back_as_the_objects_it_was_built_from() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        std::fs::write(dir.path().join("stage.toml"), "").unwrap();
        let cfg: JobConfig = serde_json::from_value(serde_json::json!({
            "job": {"name": "t", "stage": "train", "config": "stage.toml"},
            "resources": {"nodes": 2, "gpus_per_node": 4, "memory": "64G"},
            "kubernetes": {"image": "img:1", "env_secret": "creds"},
        }))
        .unwrap();
        let job = Job::new(&file, cfg, dir.path(), "/bin/knn".into()).unwrap();
        // A tab, trailing spaces, a quote and a credential: the copy must come back exact.
        let text =
            "[train]\n\tk = 10   \nname = \"it's: #1\"\n[storage]\nsecret_access_key = \"s\"\n";
        let yaml = job.kubernetes_manifest(text).unwrap();
        let docs: Vec<yaml_serde::Value> = yaml_serde::Deserializer::from_str(&yaml)
            .map(|d| yaml_serde::Value::deserialize(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["ConfigMap", "Service", "Job"]);
        assert_eq!(
            docs[0]["data"]["config.toml"].as_str().unwrap(),
            without_secrets(text).0,
            "{yaml}"
        );
        assert_eq!(docs[1]["spec"]["clusterIP"].as_str(), Some("None"));
        let spec = &docs[2]["spec"];
        assert_eq!(spec["completions"].as_u64(), Some(2), "one pod per node");
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["subdomain"].as_str(), Some("t"));
        let c = &pod["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[..3], ["launch", "--nproc-per-node", "4"]);
        assert_eq!(args[args.len() - 2..], ["--stopped-exit-code", "143"]);
        assert_eq!(c["envFrom"][0]["secretRef"]["name"].as_str(), Some("creds"));
        assert_eq!(c["resources"]["limits"]["memory"].as_str(), Some("64Gi"));
        assert_eq!(
            c["resources"]["limits"]["nvidia.com/gpu"].as_str(),
            Some("4")
        );
    }

    #[test]
    fn credentials_are_left_out_of_the_config_map_copy() {
        let text =
            "[storage]\nendpoint = \"http://x\"\nsecret_access_key = \"s3cr3t\"\n# a comment\n\
                    storage.session_token = \"t0k\"\n";
        let (out, found) = without_secrets(text);
        assert_eq!(found, ["secret_access_key", "session_token"]);
        assert!(!out.contains("s3cr3t") && !out.contains("t0k"), "{out}");
        assert!(out.contains("endpoint = \"http://x\"") && out.contains("# a comment"));
    }
}
