//! Runs the real binary as a user would.

use crate::images::png;
use crate::s3_server::S3Server;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knn-diffusion"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    // Keep the user's environment from leaking config into tests.
    for (k, _) in std::env::vars() {
        let launcher = k.starts_with("SLURM_")
            || [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "JOB_COMPLETION_INDEX",
            ]
            .contains(&k.as_str());
        if k.starts_with("KNN_") || k.starts_with("AWS_") || launcher {
            c.env_remove(k);
        }
    }
    c
}

pub(crate) fn write_images(dir: &Path, n: u32) {
    write_images_in(dir, 0..n);
}

/// PNGs number `range` (each its own colour) in `dir`.
pub(crate) fn write_images_in(dir: &Path, range: std::ops::Range<u32>) {
    std::fs::create_dir_all(dir).unwrap();
    for i in range {
        std::fs::write(dir.join(format!("{i:05}.png")), png(24, 18, i as u8)).unwrap();
    }
}

/// A folder-source embed config (`source` into `table`, shards of 5 at 16 px, one shard at
/// a time) written to `dir/job.toml`, with `extra` TOML before its `[embed.*]` tables.
pub(crate) fn write_config(dir: &Path, source: &str, table: &str, extra: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"{extra}
[embed.source]
url = "{source}"
format = "folder"
folder_shard_size = 5
[embed.output]
table = "{table}"
image_size_px = 16
[embed.clip]
batch_size = 5
device = "cpu"
[embed.pipeline]
shards_in_flight = 1
"#
        ),
    )
    .unwrap();
    path
}

/// A folder source of `images` PNGs (shards of 5) and a config writing to `table` below a
/// fresh temporary directory, which the caller keeps alive.
pub(crate) fn local_job(images: u32, table: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_images(&src, images);
    let table = dir.path().join(table);
    let cfg = write_config(
        dir.path(),
        src.to_str().unwrap(),
        table.to_str().unwrap(),
        "",
    );
    (dir, cfg, table)
}

/// A config embedding `s3://data/imgs/` into `s3://data/out/emb.lance` on `server` (the
/// secret left to the environment), with `extra` TOML after its `[storage]` keys.
fn s3_config(dir: &Path, server: &S3Server, extra: &str) -> PathBuf {
    let storage = format!(
        "[storage]\nendpoint = \"{}\"\nregion = \"us-east-1\"\nallow_http = true\n\
         access_key_id = \"{}\"\n{extra}",
        server.endpoint, server.access_key
    );
    write_config(dir, "s3://data/imgs/", "s3://data/out/emb.lance", &storage)
}

/// Kills `child` with SIGKILL once the Lance table at `table` has `versions` versions,
/// polling every `poll`; fails if the child finishes first or nothing appears in 2 minutes.
fn kill_at_version(child: &mut std::process::Child, table: &Path, versions: usize, poll: Duration) {
    let dir = table.join("_versions");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        if n >= versions {
            break;
        }
        assert!(Instant::now() < deadline, "no commits appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(poll);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

pub(crate) fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run knn-diffusion")
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub(crate) async fn ids(table: &str) -> Vec<u64> {
    crate::tables::u64_column(table, "id").await
}

#[test]
fn help_explains_train_and_sample() {
    let t = text(&run(bin().args(["train", "--help"])));
    assert!(t.contains("resume") && t.contains("neighbours"), "{t}");
    let t = text(&run(bin().args(["sample", "--help"])));
    assert!(
        t.contains("--retrieval-db") && t.contains("--guidance") && t.contains("--prompt"),
        "{t}"
    );
}

#[test]
fn help_explains_the_knn_stages() {
    let o = run(bin().args(["precompute-knn", "--help"]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("exactly once") && t.contains("--workers"), "{t}");
    let o = run(bin().args(["build-index", "--help"]));
    assert!(text(&o).contains("IVF_PQ"), "{}", text(&o));
}

#[test]
fn help_explains_the_embed_stage() {
    let o = run(bin().args(["embed", "--help"]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in ["--config", "--worker", "--workers", "--set", "rejects"] {
        assert!(t.contains(needle), "missing {needle}: {t}");
    }
    let top = text(&run(bin().arg("--help")));
    assert!(top.contains("KNN_EMBED__CLIP__BATCH_SIZE"), "{top}");
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "x", "y.lance", "");
    let o = run(bin()
        .args(["embed", "--config"])
        .arg(&cfg)
        .args(["--set", "embed.clip.batch_size=\"many\""]));
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("batch_size"), "{t}");

    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("batch_size = 5", "batch_size = -3"),
    )
    .unwrap();
    let t = text(&run(bin().args(["embed", "--config"]).arg(&cfg)));
    assert!(
        t.contains("embed.clip.batch_size") && t.contains("job.toml"),
        "{t}"
    );

    std::fs::write(
        &cfg,
        "[embed.source]\nurl = \"x\"\nformat = \"folder\"\nshard_sise = 3\n",
    )
    .unwrap();
    let t = text(&run(bin().args(["embed", "--config"]).arg(&cfg)));
    assert!(t.contains("shard_sise"), "{t}");

    let t = text(&run(bin().args([
        "embed",
        "--config",
        "/no/such/file.toml",
    ])));
    assert!(
        t.contains("/no/such/file.toml") && t.contains("not found"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_resume_gives_every_id_exactly_once() {
    let (_dir, cfg, table) = local_job(150, "out/emb.lance");
    let mut child = bin()
        .args(["embed", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a few shards are committed, then kill without warning.
    kill_at_version(&mut child, &table, 4, Duration::from_millis(20));
    let partial = ids(table.to_str().unwrap()).await;
    assert!(
        !partial.is_empty() && partial.len() < 150,
        "{}",
        partial.len()
    );

    let o = run(bin().args(["embed", "--config"]).arg(&cfg));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("skipped"), "{t}");
    let all = ids(table.to_str().unwrap()).await;
    assert_eq!(all.len(), 150, "{t}");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_share_one_table() {
    let (_dir, cfg, table) = local_job(40, "emb.lance");
    let spawn = |w: &str| {
        bin()
            .args(["embed", "--config"])
            .arg(&cfg)
            .args(["--worker", w, "--workers", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("0"), spawn("1"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    assert!(text(&a).contains("worker 0 of 2"), "{}", text(&a));
    let all = ids(table.to_str().unwrap()).await;
    assert_eq!(all.len(), 40);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeds_from_and_into_s3_on_loopback() {
    let server = S3Server::start(&["data"]);
    write_images(&server.root.path().join("data/imgs"), 12);
    let dir = tempfile::tempdir().unwrap();
    let cfg = s3_config(dir.path(), &server, "");
    // The secret comes from the environment, as it should in production.
    let o = run(bin()
        .args(["embed", "--config"])
        .arg(&cfg)
        .env("AWS_SECRET_ACCESS_KEY", &server.secret_key));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("12 ok"), "{t}");
    assert!(!t.contains(&server.secret_key), "secret leaked: {t}");
    assert!(server
        .root
        .path()
        .join("data/out/emb.lance/_versions")
        .is_dir());

    let o = run(bin()
        .args(["embed", "--config"])
        .arg(&cfg)
        .env("AWS_SECRET_ACCESS_KEY", "a-wrong-secret"));
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("access denied") && t.contains("s3://data/imgs"),
        "{t}"
    );
    assert!(!t.contains("a-wrong-secret"), "secret leaked: {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_checkpoints_compacts_and_cleans_a_table_on_s3_and_a_rerun_still_adds_nothing() {
    let server = S3Server::start(&["data"]);
    write_images(&server.root.path().join("data/imgs"), 20);
    let dir = tempfile::tempdir().unwrap();
    // Upkeep every 2 versions during embed (4 shards of 5), nothing kept back by age.
    let cfg = s3_config(
        dir.path(),
        &server,
        "[storage.tables]\nevery_commits = 2\nkeep_versions_hours = 0.0\n",
    );
    let embed = || {
        run(bin()
            .args(["embed", "--config"])
            .arg(&cfg)
            .env("AWS_SECRET_ACCESS_KEY", &server.secret_key))
    };
    let o = embed();
    assert!(o.status.success(), "{}", text(&o));
    let table = server.root.path().join("data/out/emb.lance");
    let local = table.to_str().unwrap();
    assert!(
        table.join("_knn_ledger").is_dir(),
        "the upkeep during embed wrote a ledger checkpoint"
    );

    let summary = dir.path().join("gc.json");
    let o = run(bin()
        .args(["gc", "--config"])
        .arg(&cfg)
        .arg("--summary-json")
        .arg(&summary)
        .env("AWS_SECRET_ACCESS_KEY", &server.secret_key));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(!t.contains(&server.secret_key), "secret leaked: {t}");
    let done: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let emb = done
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["table"] == "s3://data/out/emb.lance")
        .unwrap_or_else(|| panic!("no summary for the embed table: {done}"));
    assert_eq!(emb["upkeep"]["shards"], 4, "{emb}");
    assert_eq!(emb["upkeep"]["fragments_after"], 1, "{emb}");
    assert_eq!(emb["orphans"]["orphans"], 0, "{emb}");
    let versions = std::fs::read_dir(table.join("_versions")).unwrap().count();
    assert!(versions <= 3, "{versions} manifests left after gc: {emb}");
    assert_eq!(ids(local).await.len(), 20);

    // The history is gone; the ledger checkpoint still knows every shard.
    let o = embed();
    assert!(o.status.success(), "{}", text(&o));
    let all = ids(local).await;
    assert_eq!(all.len(), 20, "the rerun added nothing");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_config_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("data/emoji-google/.complete").is_file(),
        "run `bash scripts/setup.sh` first (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("stickers.lance");
    let o = embed_default(&table, &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("random weights"),
        "warns about the random CLIP: {t}"
    );
    assert_eq!(ids(table.to_str().unwrap()).await.len(), 500, "{t}");

    // The next stages read embed's table by default.
    let set_table = format!("embed.output.table={}", table.display());
    let t = default_stage("build-index", &[&set_table], &[]);
    assert!(t.contains("IvfPq") && t.contains("500 rows"), "{t}");
    let t = default_stage("precompute-knn", &[&set_table], &[]);
    assert!(t.contains("500 written"), "{t}");
    assert_eq!(
        ids(dir.path().join("stickers-knn.lance").to_str().unwrap())
            .await
            .len(),
        500
    );

    // train reads both tables by default; a few steps here (the demo runs more).
    let run_dir = dir.path().join("train");
    let set_out = format!("train.output_dir={}", run_dir.display());
    let t = default_stage(
        "train",
        &[
            &set_table,
            &set_out,
            "train.max_steps=4",
            "train.batch_size=4",
            "train.samples.every_steps=4",
            "train.samples.sampler.steps=3",
        ],
        &[],
    );
    assert!(
        t.contains("trained to step 4") && t.contains("parameters"),
        "{t}"
    );
    let checkpoint = run_dir.join("checkpoints/step-0000000004/MANIFEST.json");
    assert!(checkpoint.is_file(), "{t}");
    assert!(run_dir.join("samples/step-0000000004.png").is_file(), "{t}");
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
    // The same line and the grid, as TensorBoard reads them.
    let tb = knn_test_support::tensorboard::read(&run_dir.join("tensorboard"));
    let line: serde_json::Value = serde_json::from_str(metrics.trim()).unwrap();
    let loss = tb["scalars"]["loss"][0].as_array().unwrap();
    assert_eq!(loss[0], 4, "{tb}");
    assert_eq!(
        loss[1].as_f64().unwrap() as f32,
        line["loss"].as_f64().unwrap() as f32
    );
    let grid = tb["images"]["samples"][0].as_array().unwrap();
    let png = std::fs::read(run_dir.join("samples/step-0000000004.png")).unwrap();
    assert_eq!(grid[0], 4, "{tb}");
    assert_eq!(grid[3].as_u64().unwrap() as usize, png.len(), "{tb}");

    // sample: text -> retrieval from the embeddings table -> guided DDIM -> two grids.
    let grid = dir.path().join("grid.png");
    let t = default_stage(
        "sample",
        &[&set_table, &set_out, "embed.clip.checkpoint=\"\""],
        &[
            "--prompt",
            "a red cat",
            "--prompt",
            "a rocket",
            "--steps",
            "3",
            "--per-prompt",
            "2",
            "--out",
            grid.to_str().unwrap(),
        ],
    );
    let img = image::open(&grid).unwrap();
    assert_eq!((img.width(), img.height()), (2 * 32, 2 * 32), "{t}");
    let nb = image::open(dir.path().join("grid-neighbours.png")).unwrap();
    assert_eq!((nb.width(), nb.height()), (10 * 32, 2 * 32), "{t}");
    assert!(
        t.contains("grid-neighbours.png"),
        "says where the grids are: {t}"
    );
    assert!(t.contains("denoising steps"), "shows progress: {t}");

    assert_sample_refuses_mistakes(dir.path(), &set_table, &set_out, &grid);
}

/// `embed` on the embedded default's first shard with a random CLIP, into `table`, with
/// `--set` for each of `sets` too.
fn embed_default(table: &Path, sets: &[&str]) -> std::process::Output {
    let mut cmd = bin();
    cmd.args(["embed", "--config", "configs/stickers.toml"]);
    let out = format!("embed.output.table={}", table.display());
    for s in [
        "embed.pipeline.max_shards=1",
        "embed.clip.checkpoint=\"\"",
        &out,
    ]
    .into_iter()
    .chain(sets.iter().copied())
    {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

/// `sample` on the default's model refuses what a new user mistypes, naming the flag and
/// leaving nothing behind, and refuses a prompt or table from another CLIP.
fn assert_sample_refuses_mistakes(dir: &Path, set_table: &str, set_out: &str, grid: &Path) {
    let other = |extra: &[&str]| {
        let mut cmd = bin();
        cmd.args(["sample", "--config", "configs/stickers.toml"]);
        for s in [set_table, set_out, "embed.clip.checkpoint=\"\""] {
            cmd.args(["--set", s]);
        }
        cmd.args(extra).args([
            "--prompt",
            "x",
            "--steps",
            "2",
            "--out",
            grid.to_str().unwrap(),
        ]);
        let o = run(&mut cmd);
        assert!(!o.status.success(), "{}", text(&o));
        text(&o)
    };
    // What a new user mistypes is refused naming the flag, and leaves nothing behind.
    let t = other(&["--k", "1000"]);
    assert!(
        t.contains("--k") && t.contains("trained with k = ") && !t.contains("precompute-knn"),
        "the limit is the model's k, not a table's: {t}"
    );
    let t = other(&["--prompt", " "]);
    assert!(t.contains("prompt 1 of 2 is empty"), "{t}");
    let missing = dir.join("no/such/checkpoints");
    let t = other(&["--checkpoint", missing.to_str().unwrap()]);
    assert!(t.contains("does not exist"), "{t}");
    assert!(!dir.join("no").exists(), "sample created {missing:?}");
    let t = other(&["--checkpoint", "README.md"]);
    assert!(t.contains("is a file, not a checkpoint directory"), "{t}");
    let t = other(&["--set", "embed.clip.random_seed=7"]);
    assert!(
        t.contains("random-tiny(seed=0)") && t.contains("random-tiny(seed=7)"),
        "names both CLIPs: {t}"
    );
    // A retrieval table of another CLIP is refused too, naming it.
    let table7 = dir.join("seed7.lance");
    let o = embed_default(&table7, &["embed.clip.random_seed=7"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = other(&["--retrieval-db", table7.to_str().unwrap()]);
    assert!(
        t.contains("seed7.lance") && t.contains("random-tiny(seed=7)"),
        "refuses the table: {t}"
    );
}

/// Runs `stage --config configs/stickers.toml` with `--set` for each of `sets`, then
/// `extra`; asserts it succeeded and returns its output.
fn default_stage(stage: &str, sets: &[&str], extra: &[&str]) -> String {
    let mut cmd = bin();
    cmd.args([stage, "--config", "configs/stickers.toml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let o = run(cmd.args(extra));
    let t = text(&o);
    assert!(o.status.success(), "{stage}: {t}");
    t
}

/// Embeddings and kNN tables (embed + precompute-knn) of 40 small images below a temporary
/// directory: the directory, the stage config, and the `--set` pointing stages at the table.
pub(crate) fn knn_tables() -> (tempfile::TempDir, PathBuf, String) {
    let (dir, cfg, table) = local_job(40, "t.lance");
    let set_table = format!("embed.output.table={}", table.display());
    for stage in ["embed", "precompute-knn"] {
        let o = run(bin().args([
            stage,
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            &set_table,
        ]));
        assert!(o.status.success(), "{}", text(&o));
    }
    (dir, cfg, set_table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_killed_mid_run_resumes_bit_identically() {
    let (dir, cfg, set_table) = knn_tables();
    let train = |out: &Path| {
        let mut c = bin();
        c.args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            &set_table,
            "--set",
            &format!("train.output_dir={}", out.display()),
            "--set",
            "train.k=3",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.max_steps=10",
            "--set",
            "train.device=\"cpu\"",
            "--set",
            "train.checkpoint.every_steps=1",
            "--set",
            "train.checkpoint.keep_last=20",
            "--set",
            "train.samples.every_steps=0",
            "--set",
            "train.log_every=1",
            "--set",
            "train.optim.warmup_steps=2",
        ]);
        c
    };
    let straight = dir.path().join("straight");
    let o = run(&mut train(&straight));
    assert!(o.status.success(), "{}", text(&o));

    let resumed = dir.path().join("resumed");
    let mut child = train(&resumed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = resumed.join("checkpoints/step-0000000004/MANIFEST.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !marker.is_file() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let o = run(&mut train(&resumed));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("resuming"), "{t}");
    let model =
        |d: &Path| std::fs::read(d.join("checkpoints/step-0000000010/model.safetensors")).unwrap();
    assert_eq!(
        model(&straight),
        model(&resumed),
        "parameters after 10 steps"
    );
    let losses = |d: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    assert_eq!(losses(&straight), losses(&resumed));
    assert_eq!(losses(&straight).len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompute_knn_killed_mid_run_resumes_to_every_id_exactly_once() {
    use knn_indexer::knn::synthetic::{clustered, write_vectors};
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(6000, 16, 60, 1.0, 3);
    let table = dir.path().join("v.lance");
    write_vectors(table.to_str().unwrap(), &data.ids, &data.emb, false)
        .await
        .unwrap();
    let out = dir.path().join("knn.lance");
    let cfg = dir.path().join("knn.toml");
    std::fs::write(
        &cfg,
        format!(
            "[knn]\ntable = \"{}\"\noutput = \"{}\"\n[knn.compute]\nshards = 60\ndevice = \"cpu\"\n",
            table.display(),
            out.display()
        ),
    )
    .unwrap();
    let mut child = bin()
        .args(["precompute-knn", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The output's creation is version 1; kill once a few shards have been committed.
    kill_at_version(&mut child, &out, 4, Duration::from_millis(10));
    let partial = ids(out.to_str().unwrap()).await;
    assert!(
        !partial.is_empty() && partial.len() < 6000,
        "{}",
        partial.len()
    );

    let o = run(bin().args(["precompute-knn", "--config"]).arg(&cfg));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("skipped (already done)"), "{t}");
    let all = ids(out.to_str().unwrap()).await;
    assert_eq!(all.len(), 6000, "{t}");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 6000);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let (_dir, cfg, _table) = local_job(7, "emb.lance");
    let o = run(bin()
        .args(["--log-format", "json", "embed", "--config"])
        .arg(&cfg));
    assert!(o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let committed = events
        .iter()
        .filter(|e| e["fields"]["message"] == "shard committed")
        .count();
    assert_eq!(committed, 2, "{stderr}");
}

#[test]
fn bench_plot_draws_each_figure_and_names_what_it_cannot_draw() {
    let dir = tempfile::tempdir().unwrap();
    let figure = |title: &str, points: serde_json::Value| {
        serde_json::json!({
            "title": title, "x_label": "shards", "y_label": "ms", "source": "a test",
            "series": [
                {"name": "measured", "points": points, "goal_slope": 0.18},
                {"name": "peer", "points": [[1000, 50.0], [10000, 500.0]]}
            ]
        })
        .to_string()
    };
    let good = serde_json::json!([[1000, 7.0], [10000, 7.5], [50000, 9.0]]);
    std::fs::write(
        dir.path().join("a.json"),
        figure("commit time", good.clone()),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.json"), figure("start-up time", good)).unwrap();
    let o = run(bin().args(["bench", "plot", "--dir"]).arg(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    let png = |name: &str| {
        let path = dir.path().join(name);
        assert!(
            text(&o).contains(&path.display().to_string()),
            "{}",
            text(&o)
        );
        image::open(&path).unwrap().to_rgb8()
    };
    let (a, b) = (png("a.png"), png("b.png"));
    assert_eq!(a.dimensions(), (900, 560));
    // Both series are drawn, each in its own colour.
    let count = |c: [u8; 3]| a.pixels().filter(|p| p.0 == c).count();
    assert!(count([31, 119, 180]) > 200, "first series not drawn");
    assert!(count([214, 39, 40]) > 200, "second series not drawn");
    // Text is drawn: figures that differ only in their titles differ in the top rows alone.
    let differs = |y0: u32, y1: u32| {
        (y0..y1).any(|y| (0..a.width()).any(|x| a.get_pixel(x, y) != b.get_pixel(x, y)))
    };
    assert!(differs(0, 50), "the titles were not drawn");
    assert!(!differs(60, 560), "a title changed the plot below it");

    // A missing font is named.
    let o = run(bin()
        .args(["bench", "plot", "--font", "/no/such/font.ttf", "--dir"])
        .arg(dir.path()));
    assert!(
        !o.status.success() && text(&o).contains("/no/such/font.ttf"),
        "{}",
        text(&o)
    );
    // A point a log axis cannot show is named, with its series and figure file.
    let bad = serde_json::json!([[1000, 7.0], [0, 7.5]]);
    std::fs::write(dir.path().join("b.json"), figure("start-up time", bad)).unwrap();
    let o = run(bin().args(["bench", "plot", "--dir"]).arg(dir.path()));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("b.json") && t.contains("series `measured`, point 1"),
        "{t}"
    );
}

/// On a terminal (a pty from util-linux `script`), embed's progress bar is cleared before
/// the summary is printed, so nothing draws over the summary's last line.
#[test]
fn the_progress_bar_leaves_the_summary_whole_on_a_terminal() {
    // Enough images that the bar (drawn every 250 ms) draws a few times.
    let (dir, cfg, _) = local_job(600, "emb.lance");
    let program = bin().get_program().to_string_lossy().to_string();
    let line = format!("{program} embed --config {}", cfg.display());
    let out = dir.path().join("pty.out");
    let o = std::process::Command::new("script")
        .args(["-qec", &line])
        .arg(&out)
        .env_remove("RUST_LOG")
        // indicatif hides its bar when TERM is unset (as it is in CI and under `env -i`).
        .env("TERM", "xterm")
        .output()
        .expect("util-linux `script` runs");
    assert!(o.status.success(), "{}", text(&o));
    let said = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(said.contains(" shards "), "the bar never drew: {said:?}");
    let summary = said.rfind("embed summary").expect("a summary");
    let tail = &said[summary..];
    assert!(
        !tail.contains('\u{1b}') && tail.trim_end().lines().last().unwrap().contains("time:"),
        "something drew over the summary: {tail:?}"
    );
}

/// `embed --retry-rejects` embeds only what was rejected: after `max_pixels` is raised the
/// big images become rows once, their rejects stay with a `retried` row each, and another
/// retry has nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_rejects_embeds_only_the_rejected_records_exactly_once() {
    let (dir, cfg, table) = local_job(10, "emb.lance");
    let src = dir.path().join("src");
    for i in 0..4u8 {
        std::fs::write(
            src.join(format!("big-{i}.png")),
            crate::images::png(64, 64, i),
        )
        .unwrap();
    }
    let embed = |extra: &[&str]| {
        let o = run(bin().args(["embed", "--config"]).arg(&cfg).args(extra));
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let t = embed(&["--set", "embed.decode.max_pixels=1000"]);
    assert!(t.contains("too_many_pixels: 4"), "{t}");
    let uri = table.to_str().unwrap();
    let before = ids(uri).await;
    assert_eq!(before.len(), 10);
    let rejects = dir.path().join("emb-rejects.lance");
    let rejects = rejects.to_str().unwrap();

    // Still too small a limit: they fail again, and stay open.
    let t = embed(&["--retry-rejects", "--set", "embed.decode.max_pixels=2000"]);
    assert!(
        t.contains("too_many_pixels: 4") && t.contains("0 ok"),
        "{t}"
    );
    let t = embed(&["--retry-rejects"]);
    assert!(t.contains("4 ok, 0 rejected"), "{t}");
    let after = ids(uri).await;
    assert_eq!(after.len(), 14);
    assert_eq!(
        after.iter().collect::<std::collections::HashSet<_>>().len(),
        14
    );
    assert!(before.iter().all(|id| after.contains(id)));
    let mut codes = crate::tables::string_column(rejects, "reason").await;
    codes.sort();
    let mut want = vec!["retried"; 4];
    want.extend(["too_many_pixels"; 8]); // the first run's and the failed retry's
    assert_eq!(codes, want, "rejects are kept, with a `retried` row each");

    // Nothing open: nothing to do, nothing added.
    let t = embed(&["--retry-rejects"]);
    assert!(t.contains("0 assigned"), "{t}");
    assert_eq!(ids(uri).await.len(), 14);
    assert_eq!(crate::tables::u64_column(rejects, "id").await.len(), 12);
}

/// Two records of different shards whose 63-bit ids collide (a real SHA-256 prefix
/// collision, found by a rho search): embed keeps both as rows, and precompute-knn names
/// both keys and shards, keeps them apart by row address and merges nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_ids_of_two_shards_are_named_by_precompute_knn_and_never_merged() {
    const ID: u64 = 0x733b_6e55_d537_03e8;
    let twins = [
        ("a/562a81e06966463a.png", "a/@00000"),
        ("b/5ad6b4b8578f0baf.png", "b/@00000"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for (d, (twin, _)) in twins.iter().enumerate() {
        let base = 10 * d as u32;
        write_images_in(&src.join(&twin[..1]), base..base + 3);
        std::fs::write(src.join(twin), png(24, 18, 200 + d as u8)).unwrap();
    }
    let table = dir.path().join("emb.lance");
    let cfg = write_config(
        dir.path(),
        src.to_str().unwrap(),
        table.to_str().unwrap(),
        "[knn]\nk = 3\n[knn.compute]\ndevice = \"cpu\"\n",
    );
    let o = run(bin().args(["embed", "--config"]).arg(&cfg));
    assert!(o.status.success(), "{}", text(&o));
    let uri = table.to_str().unwrap();
    let all = ids(uri).await;
    assert_eq!(all.len(), 8, "both twins are rows");
    assert_eq!(all.iter().filter(|&&i| i == ID).count(), 2);
    let keys: HashSet<String> = crate::tables::string_column(uri, "key")
        .await
        .into_iter()
        .collect();
    assert!(twins.iter().all(|(k, _)| keys.contains(*k)), "{keys:?}");

    let summary = dir.path().join("knn.json");
    let o = run(bin()
        .args(["precompute-knn", "--config"])
        .arg(&cfg)
        .arg("--summary-json")
        .arg(&summary));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("id collisions: 1 id held by more than one record"),
        "{t}"
    );
    for (key, shard) in twins {
        assert!(t.contains(&format!("`{key}` (shard {shard})")), "{t}");
    }
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    let found = s["id_collisions"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{s}");
    assert_eq!(found[0]["id"].as_u64(), Some(ID));
    let mut named: Vec<(&str, &str)> = found[0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["key"].as_str().unwrap(), r["shard"].as_str().unwrap()))
        .collect();
    named.sort();
    assert_eq!(named, twins);

    // The kNN table has a row for each twin, at its own row address.
    let knn = dir.path().join("emb-knn.lance");
    let knn = knn.to_str().unwrap();
    let knn_ids = crate::tables::u64_column(knn, "id").await;
    assert_eq!(knn_ids.len(), 8);
    assert_eq!(knn_ids.iter().filter(|&&i| i == ID).count(), 2);
    let addrs: HashSet<u64> = crate::tables::u64_column(knn, "row_addr")
        .await
        .into_iter()
        .collect();
    assert_eq!(addrs.len(), 8, "every row keeps its own address");
}
