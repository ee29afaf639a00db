//! Secrets: credentials given in `[storage]` and in the environment never appear in what a
//! run leaves: log lines (human and JSON, at debug level), summaries, tables, checkpoints
//! (`state.json`, `MANIFEST.json`), metrics, sample grids, or rendered job files. Kubernetes
//! manifests name a Secret instead of inlining a value. Under `--log-format json` every
//! line of every stage is a JSON event, its closing summary included.

use crate::cli::{bin, run, text, write_images};
use crate::s3_server::S3Server;
use std::path::Path;

/// A value that must never be written anywhere, set through `KNN_` in the environment.
const ENV_CANARY: &str = "canary-azure-key-from-env-7f3b9e";

/// Every file below `root` that holds one of `secrets`, with the secret.
fn files_holding(root: &Path, secrets: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            for s in secrets {
                if bytes.windows(s.len()).any(|w| w == s.as_bytes()) {
                    found.push(format!("{} holds `{s}`", p.display()));
                }
            }
        }
    }
    found
}

#[test]
fn credentials_appear_in_no_log_summary_table_checkpoint_or_job_file() {
    let server = S3Server::start(&["data"]);
    write_images(&server.root.path().join("data/imgs"), 20);
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("secret_access_key = \"{}\"", server.secret_key);
    let endpoint = server.endpoint.clone();
    let cfg = crate::faults::job_with(dir.path(), &server, &endpoint, "run", "", &secret);
    let secrets = [server.secret_key.as_str(), ENV_CANARY];
    let mut said = String::new();
    let mut stage = |args: &[&str]| {
        for format in ["human", "json"] {
            let summary = dir.path().join(format!("{}-{format}.json", args[0]));
            let mut cmd = bin();
            cmd.args(["-v", "--log-format", format])
                .args(args)
                .arg("--config")
                .arg(&cfg)
                .env("AWS_SECRET_ACCESS_KEY", &server.secret_key)
                .env("KNN_STORAGE__AZURE_ACCESS_KEY", ENV_CANARY);
            cmd.arg("--summary-json").arg(&summary);
            if args[0] == "score" {
                // Each run adds its own column.
                cmd.args(["--set", &format!("score.column=\"score_{format}\"")]);
            }
            let o = run(&mut cmd);
            let t = text(&o);
            assert!(o.status.success(), "{args:?} ({format}): {t}");
            if format == "json" {
                // Every line is JSON, the closing summary included.
                for line in t.lines().filter(|l| !l.trim().is_empty()) {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}\n{t}"));
                    assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
                }
                let summary = t.lines().find(|l| l.contains(r#""summary":{"#));
                assert!(summary.is_some(), "{args:?}: no summary event: {t}");
            }
            said.push_str(&t);
        }
    };
    stage(&["embed"]);
    stage(&["precompute-knn"]);
    stage(&["train"]);
    let grid = dir.path().join("grid.png");
    let grid = grid.to_str().unwrap();
    stage(&[
        "sample",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--per-prompt",
        "1",
        "--out",
        grid,
    ]);
    stage(&["score"]);
    stage(&["gc", "--dry-run"]);
    stage(&["gc"]);

    said.push_str(&submit_dry_runs(dir.path(), &cfg, &server));

    for s in secrets {
        let lines: Vec<&str> = said.lines().filter(|l| l.contains(s)).collect();
        assert!(lines.is_empty(), "`{s}` was printed: {lines:#?}");
    }
    let leaks: Vec<String> = [server.root.path(), dir.path()]
        .iter()
        .flat_map(|root| files_holding(root, &secrets))
        .filter(|f| !f.contains("job.toml holds")) // the config the user wrote it in
        .collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
}

/// What `submit --dry-run` prints for each backend's job file, rendered with the
/// credentials in the environment, and the refusal of a manifest that would inline them.
fn submit_dry_runs(dir: &Path, cfg: &Path, server: &S3Server) -> String {
    let mut said = String::new();
    // Job files for each backend, rendered with the same environment.
    let job = dir.join("job.toml").with_file_name("submit.toml");
    std::fs::write(
        &job,
        format!(
            "[job]\nname = \"secrets\"\nstage = \"embed\"\nconfig = \"{}\"\n\
             [resources]\nworkers = 2\ncpus_per_task = 1\nmemory = \"4G\"\n\
             time_limit = \"00:30:00\"\n[slurm]\npartition = \"debug\"\n\
             [kubernetes]\nimage = \"registry.example.com/knn:1\"\nenv_secret = \"knn-storage\"\n",
            cfg.display()
        ),
    )
    .unwrap();
    for backend in ["local", "slurm", "kubernetes"] {
        let o = run(bin()
            .args([
                "submit",
                job.to_str().unwrap(),
                "--backend",
                backend,
                "--dry-run",
            ])
            .env("AWS_SECRET_ACCESS_KEY", &server.secret_key)
            .env("KNN_STORAGE__AZURE_ACCESS_KEY", ENV_CANARY));
        let t = text(&o);
        assert!(o.status.success(), "{backend}: {t}");
        if backend == "kubernetes" {
            assert!(
                t.contains("secretRef:") && t.contains("name: knn-storage"),
                "the manifest names the Secret: {t}"
            );
        }
        said.push_str(&t);
    }

    // Without a Secret to carry them, a manifest would have to inline them: refused.
    let bare = job.with_file_name("submit-bare.toml");
    let written = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&bare, written.replace("env_secret = \"knn-storage\"\n", "")).unwrap();
    let o = run(bin().args([
        "submit",
        bare.to_str().unwrap(),
        "--backend",
        "kubernetes",
        "--dry-run",
    ]));
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("kubernetes.env_secret"),
        "{t}"
    );
    said.push_str(&t);
    said
}
