//! Data-parallel training across real processes on loopback: equivalence with one process,
//! a stop signal that every rank obeys, a killed rank, and the job files' rendered scripts.

use crate::cli::{bin, knn_tables, local_job, run, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `train` flags for a small CPU run into `out`.
fn train_sets(base: &[String], out: &Path, batch: usize, steps: u64, every: u64) -> Vec<String> {
    let mut sets: Vec<String> = base.to_vec();
    sets.extend([
        format!("train.output_dir={}", out.display()),
        "train.k=3".into(),
        format!("train.batch_size={batch}"),
        format!("train.max_steps={steps}"),
        "train.device=\"cpu\"".into(),
        format!("train.checkpoint.every_steps={every}"),
        "train.samples.every_steps=0".into(),
        "train.log_every=1".into(),
        "train.optim.warmup_steps=1".into(),
        "train.optim.lr=1e-3".into(),
        "train.distributed.timeout_s=20".into(),
    ]);
    sets
}

fn with_sets(cmd: &mut Command, sets: &[String]) {
    for s in sets {
        cmd.args(["--set", s]);
    }
}

fn weights(dir: &Path, step: u64) -> Vec<(String, tch::Tensor)> {
    let path = dir.join(format!("checkpoints/step-{step:010}/model.safetensors"));
    let mut w =
        tch::Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// A job file for `submit`.
fn job_file(dir: &Path, cfg: &Path, stage: &str, tasks: usize, sets: &[String]) -> PathBuf {
    let args: Vec<String> = sets
        .iter()
        .flat_map(|s| ["--set".to_string(), s.clone()])
        .map(|a| format!("{a:?}"))
        .collect();
    let path = dir.join(format!("{stage}-job.toml"));
    std::fs::write(
        &path,
        format!(
            "[job]\nname = \"t-{stage}\"\nstage = \"{stage}\"\nconfig = {:?}\nargs = [{}]\nbackend = \"local\"\n\n[resources]\ntasks_per_node = {tasks}\n",
            cfg.display().to_string(),
            args.join(", ")
        ),
    )
    .unwrap();
    path
}

#[test]
fn two_ranks_end_where_one_process_with_twice_the_batch_ends() {
    let (dir, cfg, set_table) = knn_tables();
    let base = [set_table];
    let steps = 4;
    // Two local processes, 4 images each, through `submit --backend local`.
    let two = dir.path().join("two");
    let job = job_file(
        dir.path(),
        &cfg,
        "train",
        2,
        &train_sets(&base, &two, 4, steps, 4),
    );
    let o = run(bin().args(["submit", job.to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("[rank 1]") && t.contains("world=2"), "{t}");
    // One process, 8 images.
    let one = dir.path().join("one");
    let mut c = bin();
    c.args(["train", "--config", cfg.to_str().unwrap()]);
    with_sets(&mut c, &train_sets(&base, &one, 8, steps, 4));
    let o = run(&mut c);
    assert!(o.status.success(), "{}", text(&o));

    let (a, b) = (weights(&two, steps), weights(&one, steps));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    let mut moved = 0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        worst = worst.max((ta - tb).abs().max().double_value(&[]));
        moved = moved.max(ta.abs().max().double_value(&[]));
    }
    eprintln!("2 ranks x 4 vs 1 x 8, {steps} steps: largest parameter difference {worst:e}, largest parameter {moved:e}");
    assert!(worst <= 1e-5, "largest parameter difference {worst}");
    assert!(moved > 0.0);
    // Both runs have the same trajectory (global batch 8), recorded with their world size.
    let state = |d: &Path| -> serde_json::Value {
        let p = d.join(format!("checkpoints/step-{steps:010}/state.json"));
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    assert_eq!(state(&two)["config"], state(&one)["config"]);
    assert_eq!(state(&two)["config_hash"], state(&one)["config_hash"]);
    assert_eq!(state(&two)["world_size"], 2);
    // Rank 1 wrote nothing: one metrics file with one line per step.
    let lines = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), steps as usize);
}

fn spawn_rank(cfg: &Path, sets: &[String], rank: usize, port: u16, marker: &Path) -> Child {
    let mut c = bin();
    c.args(["train", "--config", cfg.to_str().unwrap()]);
    with_sets(&mut c, sets);
    c.env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .arg("--requeue-marker")
        .arg(marker)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c.spawn().unwrap()
}

fn free_port() -> u16 {
    knn_cluster::launch::free_port().unwrap()
}

fn wait_for_steps(metrics: &Path, n: usize, children: &mut [Child]) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let lines = std::fs::read_to_string(metrics).map_or(0, |t| t.lines().count());
        if lines >= n {
            return;
        }
        for c in children.iter_mut() {
            if let Some(status) = c.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = c.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("a rank ended early ({status}): {err}");
            }
        }
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(c: Child) -> (std::process::ExitStatus, String) {
    let o = c.wait_with_output().unwrap();
    (o.status, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn ctrl_c_like_sigterm_checkpoints_every_rank_and_the_job_resumes() {
    let (dir, cfg, set_table) = knn_tables();
    let base = [set_table];
    let out = dir.path().join("run");
    let sets = train_sets(&base, &out, 4, 10_000, 10_000);
    let marker = dir.path().join("requeue");
    let port = free_port();
    let mut ranks = vec![
        spawn_rank(&cfg, &sets, 0, port, &marker),
        spawn_rank(&cfg, &sets, 1, port, &marker),
    ];
    wait_for_steps(&out.join("metrics.jsonl"), 2, &mut ranks);
    // Only rank 1 is signalled, with SIGINT (Ctrl-C): it must act as SIGTERM does (a
    // preempted node), and both ranks must stop at the same step. SIGTERM itself reaches the
    // ranks through `launch` in the Kubernetes test below.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(ranks[1].id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let r1 = ranks.pop().unwrap();
    let r0 = ranks.pop().unwrap();
    let ((s0, e0), (s1, e1)) = (stderr_of(r0), stderr_of(r1));
    assert!(s0.success(), "rank 0: {e0}");
    assert!(s1.success(), "rank 1: {e1}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let stopped: u64 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((2..10_000).contains(&stopped), "{stopped}");
    assert!(out
        .join(format!("checkpoints/step-{stopped:010}/MANIFEST.json"))
        .is_file());
    assert!(e1.contains(&format!("trained to step {stopped} ")), "{e1}");

    // Requeued: the same job resumes from that checkpoint on both ranks.
    let sets = train_sets(&base, &out, 4, stopped + 2, 10_000);
    let port = free_port();
    let other = dir.path().join("requeue-2");
    let ranks = [
        spawn_rank(&cfg, &sets, 0, port, &other),
        spawn_rank(&cfg, &sets, 1, port, &other),
    ];
    for (r, c) in ranks.into_iter().enumerate() {
        let (s, e) = stderr_of(c);
        assert!(s.success(), "rank {r}: {e}");
        assert!(
            e.contains(&format!("resuming step={stopped}")) || e.contains("resuming"),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "trained to step {} (resumed from {stopped})",
                stopped + 2
            )),
            "{e}"
        );
    }
    assert!(!other.exists(), "a finished run leaves no requeue marker");
}

#[test]
fn a_killed_rank_makes_the_other_fail_naming_it() {
    let (dir, cfg, set_table) = knn_tables();
    let base = [set_table];
    let out = dir.path().join("run");
    let mut sets = train_sets(&base, &out, 4, 10_000, 10_000);
    sets.push("train.distributed.timeout_s=3".into());
    let port = free_port();
    let marker = dir.path().join("m");
    let mut ranks = vec![
        spawn_rank(&cfg, &sets, 0, port, &marker),
        spawn_rank(&cfg, &sets, 1, port, &marker),
    ];
    wait_for_steps(&out.join("metrics.jsonl"), 2, &mut ranks);
    let mut r1 = ranks.pop().unwrap();
    r1.kill().unwrap(); // SIGKILL: no checkpoint, no goodbye
    r1.wait().unwrap();
    let started = Instant::now();
    let (s0, e0) = stderr_of(ranks.pop().unwrap());
    assert!(!s0.success(), "{e0}");
    assert!(e0.contains("rank 1"), "{e0}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn embed_as_two_local_workers_fills_one_table() {
    let (dir, cfg, table) = local_job(30, "w.lance");
    let set = format!("embed.output.table={}", table.display());
    let job = job_file(dir.path(), &cfg, "embed", 2, &[set]);
    let o = run(bin().args(["submit", job.to_str().unwrap()]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("[rank 0]") && t.contains("[rank 1]"), "{t}");
    assert!(t.contains("worker 1 of 2"), "{t}");
}

/// The rendered sbatch scripts and manifests of the shipped job files, against
/// tests/golden/ (`UPDATE_GOLDEN=1` rewrites them after a deliberate change).
#[test]
fn rendered_jobs_match_the_golden_files() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let golden = repo.join("tests/golden");
    let cases = [
        ("stickers-train", "slurm", "sbatch"),
        ("stickers-train", "kubernetes", "yaml"),
        ("stickers-embed", "slurm", "sbatch"),
        ("stickers-embed", "kubernetes", "yaml"),
        ("stickers-knn", "slurm", "sbatch"),
        ("train-400m", "slurm", "sbatch"),
        ("train-400m", "kubernetes", "yaml"),
    ];
    let mut stale = Vec::new();
    for (job, backend, ext) in cases {
        let o = run(bin().args([
            "submit",
            &format!("configs/jobs/{job}.toml"),
            "--backend",
            backend,
            "--dry-run",
            "--binary",
            "/opt/knn/bin/knn-diffusion",
        ]));
        assert!(o.status.success(), "{job} {backend}: {}", text(&o));
        let got = String::from_utf8_lossy(&o.stdout).replace(repo.to_str().unwrap(), "<repo>");
        let path = golden.join(format!("{job}.{ext}"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(&golden).unwrap();
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            stale.push(format!("{}:\n{got}", path.display()));
        }
    }
    assert!(
        stale.is_empty(),
        "rendered jobs differ from the golden files (UPDATE_GOLDEN=1 to accept):\n{}",
        stale.join("\n")
    );
}

#[test]
fn bad_job_files_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("j.toml");
    std::fs::write(
        &job,
        "[job]\nname = \"Bad Name\"\nstage = \"train\"\nconfig = \"x.toml\"\n[resources]\n",
    )
    .unwrap();
    let o = run(bin().args(["submit", job.to_str().unwrap(), "--dry-run"]));
    assert!(!o.status.success());
    assert!(text(&o).contains("job.name"), "{}", text(&o));
    std::fs::write(
        &job,
        "[job]\nname = \"ok\"\nstage = \"train\"\nconfig = \"missing.toml\"\n[resources]\n",
    )
    .unwrap();
    let o = run(bin().args(["submit", job.to_str().unwrap(), "--dry-run"]));
    assert!(
        text(&o).contains("job.config") && text(&o).contains("missing.toml"),
        "{}",
        text(&o)
    );
    std::fs::write(
        &job,
        "[job]\nname = \"ok\"\nstage = \"trian\"\nconfig = \"x.toml\"\n[resources]\n",
    )
    .unwrap();
    let o = run(bin().args(["submit", job.to_str().unwrap(), "--dry-run"]));
    assert!(text(&o).contains("trian"), "{}", text(&o));
}

/// The Kubernetes path: SIGTERM reaches `launch` (a pod's PID 1), which passes it to every
/// rank; they checkpoint, exit with `--stopped-exit-code`, and `launch` exits with it too.
#[test]
fn sigterm_to_launch_reaches_every_rank_and_passes_their_code_on() {
    let (dir, cfg, set_table) = knn_tables();
    let base = [set_table];
    let out = dir.path().join("run");
    let mut c = bin();
    c.args(["launch", "--nproc-per-node", "2", "--", "train", "--config"])
        .arg(&cfg);
    with_sets(&mut c, &train_sets(&base, &out, 4, 10_000, 10_000));
    c.args(["--stopped-exit-code", "143"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut launcher = [c.spawn().unwrap()];
    wait_for_steps(&out.join("metrics.jsonl"), 2, &mut launcher);
    let [launcher] = launcher;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let (status, err) = stderr_of(launcher);
    assert_eq!(status.code(), Some(143), "{err}");
    for rank in 0..2 {
        assert!(
            err.contains(&format!("[rank {rank}] trained to step")),
            "{err}"
        );
    }
    let store = std::fs::read_dir(out.join("checkpoints")).unwrap().count();
    assert_eq!(store, 1, "one checkpoint, written at the stop: {err}");
}

/// 24 captioned 32 px pictures in one img2dataset parquet shard under `dir/captioned/`, and a
/// config training the tiny CLIP on them.
fn captioned_job(dir: &Path) -> PathBuf {
    use arrow_array::{BinaryArray, RecordBatch, StringArray};
    let data = dir.join("captioned");
    std::fs::create_dir_all(&data).unwrap();
    let colours = [
        ("red", [220u8, 30, 30]),
        ("green", [30, 200, 60]),
        ("blue", [30, 60, 220]),
    ];
    let (mut keys, mut pngs, mut caps) = (Vec::new(), Vec::new(), Vec::new());
    for (name, rgb) in colours {
        for v in 0..8u32 {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let on = (x + v) % 16 < 8 || y < 4 * (v % 4);
                image::Rgb(if on { rgb } else { [255, 255, 255] })
            });
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            keys.push(format!("{name}-{v}"));
            pngs.push(png);
            caps.push(format!("a {name} pattern number {v}"));
        }
    }
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("key", arrow_schema::DataType::Utf8, false),
        arrow_schema::Field::new("png", arrow_schema::DataType::Binary, false),
        arrow_schema::Field::new("caption", arrow_schema::DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            std::sync::Arc::new(StringArray::from(keys)),
            std::sync::Arc::new(BinaryArray::from_iter_values(
                pngs.iter().map(Vec::as_slice),
            )),
            std::sync::Arc::new(StringArray::from(caps)),
        ],
    )
    .unwrap();
    let bytes = crate::parquet::parquet_bytes(&batch);
    std::fs::write(data.join("part-0.parquet"), bytes).unwrap();
    let cfg = dir.join("clip.toml");
    std::fs::write(
        &cfg,
        format!(
            "[split]\nholdout_fraction = 0.2\nsalt = \"t\"\n[train_clip]\ndevice = \"cpu\"\nlog_every = 1\n\
             max_steps = 3\n[train_clip.data]\nurl = {:?}\n[train_clip.model]\npreset = \"tiny\"\n\
             vocab_size = 300\ncontext_tokens = 8\n[train_clip.optim]\nlr = 1e-2\nwarmup_steps = 1\n\
             [train_clip.distributed]\ntimeout_s = 30\n",
            data.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn two_ranks_of_train_clip_end_where_one_process_with_twice_the_batch_ends() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = captioned_job(dir.path());
    let sets = |out: &Path, batch: usize| {
        vec![
            "--set".to_string(),
            format!("train_clip.output_dir={}", out.display()),
            "--set".to_string(),
            format!("train_clip.batch_size={batch}"),
        ]
    };
    let two = dir.path().join("two");
    let o = run(bin()
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "train-clip",
            "--config",
        ])
        .arg(&cfg)
        .args(sets(&two, 4)));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("[rank 1]") && t.contains("world=2"), "{t}");
    let one = dir.path().join("one");
    let o = run(bin()
        .args(["train-clip", "--config"])
        .arg(&cfg)
        .args(sets(&one, 8)));
    assert!(o.status.success(), "{}", text(&o));
    let (a, b) = (weights(&two, 3), weights(&one, 3));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        // Attention is blind to the key bias (softmax ignores a constant added to every
        // score), so its true gradient is 0 and what it gets is rounding noise, which AdamW
        // divides by its own size: it moves by ~lr either way, differently in each run.
        if na.ends_with("k_proj.bias") {
            continue;
        }
        worst = worst.max((ta - tb).abs().max().double_value(&[]));
    }
    eprintln!("train-clip, 2 ranks x 4 vs 1 x 8, 3 steps: largest parameter difference {worst:e}");
    assert!(worst <= 1e-5, "largest parameter difference {worst}");
    // Both exported the same directory layout; rank 1 wrote no metrics of its own.
    assert!(two.join("model/config.json").is_file());
    let lines = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
}
