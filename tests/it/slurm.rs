//! Jobs really run by Slurm: a controller and a node on 127.0.0.1 that scripts/test.sh starts
//! (scripts/slurm.sh) and names through `SLURM_CONF`.

use crate::cli::{bin, local_job, run, text};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The test cluster's config; without one the test is skipped here and fails in CI.
fn slurm_conf() -> Option<PathBuf> {
    match std::env::var_os("SLURM_CONF") {
        Some(c) => Some(PathBuf::from(c)),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI runs scripts/test.sh, which starts Slurm and sets SLURM_CONF")
        }
        None => {
            eprintln!("skipped: no SLURM_CONF (scripts/test.sh starts a loopback Slurm)");
            None
        }
    }
}

/// Submits `job` with `knn-diffusion submit` and returns the job id it prints.
fn submit(conf: &Path, job: &Path) -> String {
    let o = run(bin()
        .env("SLURM_CONF", conf)
        .args(["submit", job.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(id.parse::<u64>().is_ok(), "job id {id:?}: {}", text(&o));
    id
}

/// Waits until every task of job `id` has ended; returns their states.
fn wait(conf: &Path, id: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let o = Command::new("scontrol")
            .env("SLURM_CONF", conf)
            .args(["show", "job", id])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let states: Vec<String> = out
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("JobState="))
            .map(String::from)
            .collect();
        let ended = |s: &String| {
            [
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ]
            .contains(&s.as_str())
        };
        if !states.is_empty() && states.iter().all(ended) {
            return states;
        }
        assert!(Instant::now() < deadline, "job {id} still running: {out}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn logs(dir: &Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "out") {
            all += &format!("== {}\n", e.path().display());
            all += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    all
}

fn job_file(dir: &Path, cfg: &Path, stage: &str, resources: &str, args: &[String]) -> PathBuf {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    let path = dir.join(format!("{stage}.job.toml"));
    std::fs::write(
        &path,
        format!(
            "[job]\nname = \"it-{stage}\"\nstage = \"{stage}\"\nconfig = {:?}\nargs = [{}]\nbackend = \"slurm\"\nworkdir = {:?}\n\n[resources]\n{resources}\ncpus_per_task = 1\ntime_limit = \"00:10:00\"\n\n[slurm]\nsignal_grace_s = 30\n",
            cfg.display().to_string(),
            args.join(", "),
            dir.display().to_string(),
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_as_a_two_task_array_job_then_train_with_two_slurm_tasks() {
    let Some(conf) = slurm_conf() else { return };
    let (dir, cfg, table) = local_job(20, "slurm.lance");
    let set_table = format!("embed.output.table={}", table.display());

    // Embed: an array of 2 tasks splitting the 4 shards.
    let job = job_file(
        dir.path(),
        &cfg,
        "embed",
        "workers = 2",
        &["--set".into(), set_table.clone()],
    );
    let id = submit(&conf, &job);
    let states = wait(&conf, &id);
    let log = logs(dir.path());
    assert_eq!(states, ["COMPLETED", "COMPLETED"], "{log}");
    assert!(
        log.contains("worker 0 of 2") && log.contains("worker 1 of 2"),
        "{log}"
    );
    let ids = crate::cli::ids(table.to_str().unwrap()).await;
    let unique: std::collections::HashSet<u64> = ids.iter().copied().collect();
    assert_eq!((ids.len(), unique.len()), (20, 20), "every image once");

    let o = run(bin().args([
        "precompute-knn",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &set_table,
    ]));
    assert!(o.status.success(), "{}", text(&o));

    // Train: one job step of 2 tasks (srun), data-parallel over the TCP ring.
    let out = dir.path().join("train");
    let sets = [
        set_table.as_str(),
        &format!("train.output_dir={}", out.display()),
        "train.k=3",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.device=\"cpu\"",
        "train.checkpoint.every_steps=3",
        "train.samples.every_steps=0",
        "train.distributed.timeout_s=60",
    ];
    let args: Vec<String> = sets
        .iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect();
    let job = job_file(
        dir.path(),
        &cfg,
        "train",
        "nodes = 1\ntasks_per_node = 2",
        &args,
    );
    let id = submit(&conf, &job);
    let states = wait(&conf, &id);
    let log = logs(dir.path());
    assert_eq!(states, ["COMPLETED"], "{log}");
    assert!(log.contains("Slurm (SLURM_PROCID/SLURM_NTASKS)"), "{log}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("checkpoints/step-0000000003/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2, "{log}");
    assert_eq!(state["step"], 3);
}
