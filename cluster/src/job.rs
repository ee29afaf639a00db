//! A job: which stage runs with which config, on what resources, through which backend
//! (`configs/jobs/*.toml`), and what each backend makes of it: an sbatch script for Slurm, an
//! Indexed Job with a headless Service and a ConfigMap for Kubernetes, processes on this
//! machine for `local`.
//!
//! Batch stages (embed, precompute-knn) run as independent workers that split the shards (a
//! Slurm array, one Indexed Job pod per worker); `train` runs as one data-parallel job of
//! `nodes x tasks_per_node` ranks (`srun`, one pod per node running `launch`); build-index
//! and sample run once.

use crate::rendezvous::DEFAULT_MASTER_PORT;
use crate::ClusterError;
use serde::{Deserialize, Serialize};
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

    /// The Kubernetes manifest: a ConfigMap with the stage config, a headless Service for
    /// rendezvous (training), and an Indexed Job. Credentials in the config's `[storage]`
    /// are left out of the ConfigMap; the pods get them from `kubernetes.env_secret`, which
    /// must then be set.
    pub fn kubernetes_manifest(&self, stage_config_text: &str) -> Result<String, ClusterError> {
        let c = &self.cfg;
        let k = &c.kubernetes;
        let r = &c.resources;
        let image = k.image.as_deref().ok_or_else(|| ClusterError::InvalidJob {
            file: self.file.display().to_string(),
            key: "kubernetes.image",
            reason: "set the container image that holds knn-diffusion".into(),
        })?;
        let name = &c.job.name;
        let ns = k.namespace.as_deref().unwrap_or("default");
        let q = |v: &str| serde_json::to_string(v).expect("strings serialise");
        let mount = "/etc/knn-diffusion";
        let cfg_path = format!("{mount}/config.toml");
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
        args.extend(self.stage_args(&cfg_path));
        if self.stage().is_sharded() {
            args.extend(["--workers".to_string(), pods.to_string()]);
        }
        let gpus = if self.stage().is_sharded() {
            c.tasks_gpus()
        } else {
            r.gpus_per_node
        };
        let cpus = r.cpus_per_task * if train { c.tasks_per_node() } else { 1 };

        let mut o = String::new();
        let _ = writeln!(
            o,
            "# Rendered by `knn-diffusion submit {}`: stage {}.",
            self.file.display(),
            self.stage().command()
        );
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
        let _ = writeln!(o, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}-config\n  namespace: {ns}\ndata:\n  config.toml: |");
        for line in config_text.lines() {
            let _ = writeln!(o, "    {line}");
        }
        if train {
            let _ = writeln!(o, "---\n# Headless: pod <job>-<index> resolves as {name}-<index>.{name}, so rank 0 is {name}-0.{name}.");
            let _ = writeln!(o, "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  clusterIP: None\n  selector:\n    job-name: {name}\n  ports:\n    - name: rendezvous\n      port: {DEFAULT_MASTER_PORT}");
        }
        let _ = writeln!(o, "---\napiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:");
        let _ = writeln!(o, "  completionMode: Indexed\n  completions: {pods}\n  parallelism: {pods}\n  backoffLimit: {}", k.backoff_limit);
        if let Some(t) = r.time_limit.as_deref().and_then(parse_time_s) {
            let _ = writeln!(o, "  activeDeadlineSeconds: {t}");
        }
        if train {
            let _ = writeln!(o, "  podFailurePolicy:\n    rules:\n      - action: Ignore\n        onExitCodes:\n          containerName: train\n          operator: In\n          values: [143]");
        }
        let _ = writeln!(o, "  template:\n    metadata:\n      labels:\n        job-name: {name}\n    spec:\n      restartPolicy: Never");
        if train {
            let _ = writeln!(o, "      subdomain: {name}");
        }
        let _ = writeln!(
            o,
            "      terminationGracePeriodSeconds: {}",
            k.termination_grace_s
        );
        if let Some(sa) = &k.service_account {
            let _ = writeln!(o, "      serviceAccountName: {sa}");
        }
        let _ = writeln!(
            o,
            "      containers:\n        - name: {}\n          image: {}",
            c.job.stage.command(),
            q(image)
        );
        if train {
            // SIGTERM reaches `launch` (the container's PID 1), which passes it to the ranks;
            // they checkpoint and exit 143, so the Job recreates the pod (podFailurePolicy
            // does not count it as a failure) and the new pod resumes.
            args.extend(["--stopped-exit-code".to_string(), "143".to_string()]);
        }
        let _ = writeln!(o, "          command: [\"knn-diffusion\"]");
        let _ = writeln!(
            o,
            "          args: [{}]",
            args.iter().map(|a| q(a)).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            o,
            "          env:\n            - name: OMP_NUM_THREADS\n              value: \"{}\"",
            r.cpus_per_task
        );
        if let Some(secret) = &k.env_secret {
            let _ = writeln!(
                o,
                "          envFrom:\n            - secretRef:\n                name: {secret}"
            );
        }
        let _ = writeln!(
            o,
            "          resources:\n            limits:\n              cpu: \"{cpus}\""
        );
        if let Some(m) = &r.memory {
            let _ = writeln!(o, "              memory: {}", q(&kube_memory(m)));
        }
        if gpus > 0 {
            let _ = writeln!(o, "              nvidia.com/gpu: {gpus}");
        }
        let _ = writeln!(
            o,
            "          volumeMounts:\n            - name: config\n              mountPath: {mount}"
        );
        if train {
            // NCCL needs more shared memory than a container's default 64 MiB.
            let _ = writeln!(
                o,
                "            - name: shm\n              mountPath: /dev/shm"
            );
        }
        let _ = writeln!(o, "      volumes:\n        - name: config\n          configMap:\n            name: {name}-config");
        if train {
            let _ = writeln!(
                o,
                "        - name: shm\n          emptyDir:\n            medium: Memory"
            );
        }
        Ok(o)
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
