//! A flaky object store: the loopback S3 server behind a proxy that answers `503 SlowDown`,
//! resets connections, cuts response bodies short and adds latency. Under a few percent of
//! faults every stage gives what it gives without them; under an outage a stage fails after
//! its bounded retries, naming the operation and the URL, and a rerun completes exactly once.

use crate::cli::{bin, ids, run, text, write_config, write_images};
use crate::fault_proxy::{FaultProxy, Faults};
use crate::s3_server::S3Server;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A job on `endpoint` (the proxy) embedding `s3://data/imgs/` into `s3://data/{run}/`, with
/// its kNN table and checkpoints there too; `retry` is the `[storage.retry]` table.
fn job(dir: &Path, server: &S3Server, endpoint: &str, run: &str, retry: &str) -> PathBuf {
    let train_dir = dir.join(format!("{run}-train"));
    let rest = format!(
        r#"[storage]
endpoint = "{endpoint}"
region = "us-east-1"
allow_http = true
access_key_id = "{key}"
[storage.retry]
{retry}
[knn]
k = 3
output = "s3://data/{run}/knn.lance"
[train]
output_dir = "{train}"
k = 3
batch_size = 4
max_steps = 3
device = "cpu"
log_every = 1
[train.optim]
warmup_steps = 1
[train.checkpoint]
url = "s3://data/{run}/ckpt"
every_steps = 1
keep_last = 2
[train.samples]
every_steps = 0
"#,
        key = server.access_key,
        train = train_dir.display(),
    );
    write_config(
        dir,
        "s3://data/imgs/",
        &format!("s3://data/{run}/emb.lance"),
        &rest,
    )
}

fn stage(name: &str, cfg: &Path, server: &S3Server) -> std::process::Output {
    run(bin()
        .args([name, "--config"])
        .arg(cfg)
        .env("AWS_SECRET_ACCESS_KEY", &server.secret_key))
}

/// The files of the newest checkpoint under `s3://data/{run}/ckpt`, by name.
fn checkpoint_files(server: &S3Server, run: &str) -> BTreeMap<String, Vec<u8>> {
    let ckpt = server.root.path().join(format!("data/{run}/ckpt"));
    let newest = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("MANIFEST.json").is_file())
        .max()
        .unwrap_or_else(|| panic!("no checkpoint under {}", ckpt.display()));
    std::fs::read_dir(&newest)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Everything a run left: its embeddings and kNN rows by id, and its last checkpoint.
struct Results {
    embeddings: BTreeMap<u64, String>,
    neighbours: BTreeMap<u64, String>,
    checkpoint: BTreeMap<String, Vec<u8>>,
}

async fn results(server: &S3Server, run: &str) -> Results {
    let table = |name: &str| {
        server
            .root
            .path()
            .join(format!("data/{run}/{name}"))
            .to_string_lossy()
            .to_string()
    };
    Results {
        embeddings: crate::tables::rows_by_id(&table("emb.lance"), &[]).await,
        // Row addresses follow the order shards were committed in; ids and similarities
        // are what a run must agree on.
        neighbours: crate::tables::rows_by_id(&table("knn.lance"), &["row_addr", "knn_row_addrs"])
            .await,
        checkpoint: checkpoint_files(server, run),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_faults_change_no_row_and_no_checkpoint_byte() {
    let server = S3Server::start(&["data"]);
    write_images(&server.root.path().join("data/imgs"), 30);
    // FAULT_SEED=N picks other requests to fail (the test passes for any seed).
    let seed = std::env::var("FAULT_SEED").map_or(7, |s| s.parse().expect("FAULT_SEED: a number"));
    let proxy = FaultProxy::start(&server.endpoint, seed);
    let dir = tempfile::tempdir().unwrap();
    // Short backoffs keep the test quick; the retry counts are the defaults.
    let retry = "init_backoff_ms = 10\nmax_backoff_s = 0.2\n";
    // Both runs write to the same URLs (checkpoints record their tables' URLs), one after
    // the other: the first run's results are read and its files removed before the second.
    let cfg = job(dir.path(), &server, &proxy.endpoint, "run", retry);
    let mut logs = BTreeMap::new();
    let mut got = Vec::new();
    let mut clean_requests = 0;
    for (run, faults) in [("clean", Faults::None), ("flaky", Faults::Mixed(0.05))] {
        clean_requests = proxy.injected().requests;
        proxy.set(faults);
        for name in ["embed", "precompute-knn", "train"] {
            let o = stage(name, &cfg, &server);
            let t = text(&o);
            assert!(o.status.success(), "{run} {name}: {t}");
            logs.insert(format!("{run} {name}"), t);
        }
        proxy.set(Faults::None);
        got.push(results(&server, "run").await);
        std::fs::remove_dir_all(server.root.path().join("data/run")).unwrap();
        std::fs::remove_dir_all(dir.path().join("run-train")).unwrap();
    }
    let injected = proxy.injected();
    let flaky_requests = injected.requests - clean_requests;
    let share = injected.failed() as f64 / flaky_requests as f64;
    eprintln!(
        "faults injected: {injected:?}: {:.1} % of the flaky run's {flaky_requests} requests failed",
        100.0 * share
    );
    assert!(
        share >= 0.03 && injected.cut > 0 && injected.reset > 0 && injected.slow_down > 0,
        "too few faults to test anything: {injected:?}"
    );
    let retried = logs
        .iter()
        .filter(|(run, _)| run.starts_with("flaky"))
        .map(|(_, t)| t.matches("backing off").count())
        .sum::<usize>();
    assert!(retried > 0, "no retry was logged: {logs:?}");
    let (clean, flaky) = (&got[0], &got[1]);
    assert_eq!(clean.embeddings.len(), 30);
    assert_eq!(clean.neighbours.len(), 30);
    assert!(clean.embeddings == flaky.embeddings, "embeddings differ");
    assert!(clean.neighbours == flaky.neighbours, "kNN lists differ");
    assert_eq!(
        clean.checkpoint.keys().collect::<Vec<_>>(),
        flaky.checkpoint.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &clean.checkpoint {
        assert!(
            bytes == &flaky.checkpoint[name],
            "checkpoint file {name} differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_after_bounded_retries_naming_the_url_and_a_rerun_is_exactly_once() {
    let server = S3Server::start(&["data"]);
    write_images(&server.root.path().join("data/imgs"), 20);
    let proxy = FaultProxy::start(&server.endpoint, 11);
    let dir = tempfile::tempdir().unwrap();
    let retry = "max_retries = 2\nretry_timeout_s = 5\ninit_backoff_ms = 20\nmax_backoff_s = 0.2\n";
    let cfg = job(dir.path(), &server, &proxy.endpoint, "out", retry);
    proxy.set(Faults::Outage);
    let started = Instant::now();
    let o = stage("embed", &cfg, &server);
    let t = text(&o);
    let took = started.elapsed();
    assert!(!o.status.success(), "{t}");
    assert!(took.as_secs() < 60, "gave up only after {took:?}: {t}");
    assert!(t.contains("s3://data/"), "names the URL: {t}");
    assert!(
        t.contains("GET") || t.contains("LIST") || t.contains("PUT"),
        "names the operation: {t}"
    );
    assert!(
        t.contains("storage.retry"),
        "says which settings gave up: {t}"
    );
    assert!(!t.contains(&server.secret_key), "secret leaked: {t}");
    let during = proxy.injected().requests;
    eprintln!("outage: embed gave up after {took:?} and {during} requests");
    assert!(during > 0, "the outage saw no request");

    // Back up: the rerun embeds every image once.
    proxy.set(Faults::None);
    let o = stage("embed", &cfg, &server);
    assert!(o.status.success(), "{}", text(&o));
    let table = server.root.path().join("data/out/emb.lance");
    let all = ids(table.to_str().unwrap()).await;
    assert_eq!(all.len(), 20);
    assert_eq!(
        all.iter().collect::<std::collections::HashSet<_>>().len(),
        20
    );
}
