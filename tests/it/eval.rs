//! `knn-diffusion eval --quick` end to end on a small fixture: an image folder (the
//! training set), a captioned parquet set (the CLIP's captions and the swap table), random
//! tiny CLIPs (the pipeline's and the judge's), and the real stages before it.

use crate::cli::{bin, run, text, write_images};
use crate::images::png;
use crate::parquet::parquet_bytes;
use arrow_array::{BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// A parquet shard of the same keys as the folder, with captions and other pictures.
fn captioned(path: &Path, n: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let keys: Vec<String> = (0..n).map(|i| format!("{i:05}")).collect();
    let pngs: Vec<Vec<u8>> = (0..n).map(|i| png(20, 20, (i * 7 + 3) as u8)).collect();
    let captions: Vec<String> = (0..n).map(|i| format!("picture number {i}")).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("png", DataType::Binary, false),
        Field::new("caption", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(keys)),
            Arc::new(BinaryArray::from_iter_values(pngs.iter())),
            Arc::new(StringArray::from(captions)),
        ],
    )
    .unwrap();
    std::fs::write(path, parquet_bytes(&batch)).unwrap();
}

fn config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let d = dir.display();
    let path = dir.join("eval.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[split]
holdout_fraction = 0.25
salt = "eval"

[embed.source]
url = "{d}/images"
format = "folder"
folder_shard_size = 40
[embed.output]
table = "{d}/t.lance"
image_size_px = 16
[embed.clip]
device = "cpu"

[knn]
k = 3

[train]
output_dir = "{d}/train"
device = "cpu"
batch_size = 4
[train.model]
preset = "tiny"

[train_clip]
output_dir = "{d}/clip"
[train_clip.data]
url = "{d}/captioned/"

[eval]
output_dir = "{d}/eval"
knn_k = 4
sweep_k = [1, 2, 4]
headline_k = 2
distractors = 9
style_images = 8
arm_processes = 2
[eval.judge]
random_seed = 5
device = "cpu"
[eval.buckets]
pool = 20
[[eval.swap]]
name = "alt"
source = {{ url = "{d}/captioned/", format = "parquet", image_column = "png" }}
[eval.quick]
steps = 3
prompts = 12
bucket_prompts = 3
sampler_steps = 2
{extra}
"#
        ),
    )
    .unwrap();
    path
}

fn stage(cfg: &Path, args: &[&str]) -> String {
    let o = run(bin().arg(args[0]).arg("--config").arg(cfg).args(&args[1..]));
    let t = text(&o);
    assert!(o.status.success(), "{}: {t}", args[0]);
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_eval_reports_every_comparison_and_reruns_from_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let n = 60;
    write_images(&dir.path().join("images"), n);
    captioned(&dir.path().join("captioned/part-00000.parquet"), n);
    let cfg = config(dir.path(), "");
    stage(&cfg, &["embed"]);
    stage(&cfg, &["precompute-knn"]);
    // train-clip's first part writes the captions table eval reads held-out captions from.
    stage(
        &cfg,
        &[
            "train-clip",
            "--set",
            "train_clip.max_steps=1",
            "--set",
            "train_clip.batch_size=8",
            "--set",
            "train_clip.model.preset=\"tiny\"",
        ],
    );

    let t = stage(&cfg, &["eval", "--quick"]);
    assert!(t.contains("6 arms trained now"), "{t}");
    let out = dir.path().join("eval/quick");
    // Two child processes trained the arms, each writing what it trained.
    assert!(t.contains("training the arms in child processes"), "{t}");
    let child: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("arms/seed-1/none.summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (child["steps"].as_u64(), child["trained_now"].as_u64()),
        (Some(3), Some(3))
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let prompts = assert_report(&report, dir.path(), &out);
    // One grid row each: held-out, NN retrieval, k = 0, the sweep's three, the swap.
    let grid = image::open(out.join("grids/seed-0.png")).unwrap();
    let cols = prompts.min(8) as u32;
    assert_eq!((grid.width(), grid.height()), (cols * 16, 7 * 16));

    // A rerun finds every arm trained and measures the same numbers (same noise).
    let t = stage(&cfg, &["eval", "--quick"]);
    assert!(t.contains("0 arms trained now"), "{t}");
    assert!(
        !t.contains("in child processes"),
        "nothing left to train: {t}"
    );
    let again: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(again["seeds"][0]["sweep"], report["seeds"][0]["sweep"]);
    assert_eq!(again["claims"], report["claims"]);

    assert_a_given_checkpoint_is_taken(dir.path(), &out, &report);

    assert_bad_settings_are_named(&cfg, dir.path());
}

/// Checks each seed's sweep, k = 0, swap and buckets, the tables eval made and the claims;
/// returns how many held-out prompts were scored.
fn assert_report(report: &Value, dir: &Path, out: &Path) -> u64 {
    let seeds = report["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 3, "three seeds by default");
    let prompts = report["facts"]["prompts"].as_u64().unwrap();
    assert!((6..=12).contains(&prompts), "{prompts} held-out captions");
    for s in seeds {
        let ks: Vec<u64> = s["sweep"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        assert_eq!(ks, vec![1, 2, 4]);
        for m in s["sweep"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| &p[1])
            .chain([&s["no_knn"]])
        {
            let fd = m["fd_clip"].as_f64().unwrap();
            let rp = m["r_precision"].as_f64().unwrap();
            assert!(fd.is_finite() && fd >= 0.0, "{m}");
            assert!((0.0..=1.0).contains(&rp), "{m}");
        }
        let swap = s["swap"].as_array().unwrap();
        assert_eq!(swap.len(), 2, "own and alt: {s}");
        let shares: f64 = swap[1][1]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((shares - 1.0).abs() < 1e-9, "shares sum to one: {s}");
        assert_eq!(s["buckets"].as_array().unwrap().len(), 5);
    }
    assert_eq!(report["styles"], serde_json::json!(["own", "alt"]));
    // The swap table was embedded with the pipeline's CLIP; the kNN arm needed k = 4 > 3.
    assert!(dir.join("eval/tables/alt.lance").is_dir());
    assert!(dir.join("eval/tables/knn-k4.lance").is_dir());
    let claims: Vec<&str> = report["claims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(
        claims.len(),
        3 + 1 + 1,
        "{claims:?}: kNN vs none thrice, swap, buckets"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## Claims",
        "NN retrieval",
        "| 4 |",
        "| alt |",
        "## Score buckets",
    ] {
        assert!(md.contains(needle), "{needle}: {md}");
    }
    prompts
}

/// An arm given as a checkpoint is taken as it is (here the one just trained, copied).
fn assert_a_given_checkpoint_is_taken(dir: &Path, out: &Path, report: &Value) {
    let copy = dir.join("given");
    let from = out.join("arms/seed-0/none/checkpoints");
    let o = std::process::Command::new("cp")
        .arg("-r")
        .arg(&from)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(o.status.success());
    let given = format!(
        "[[eval.checkpoints]]\nseed = 0\narm = \"none\"\nurl = \"{}\"\n",
        copy.display()
    );
    let t = stage(&config(dir, &given), &["eval", "--quick"]);
    assert!(t.contains("0 arms trained now"), "{t}");
    let with_given: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let arm = &with_given["arms"][1];
    assert_eq!(
        (arm["kind"].as_str(), arm["steps"].as_u64()),
        (Some("none"), None),
        "{arm}"
    );
    assert!(
        arm["checkpoints"].as_str().unwrap().ends_with("given"),
        "{arm}"
    );
    assert_eq!(
        with_given["seeds"][0]["no_knn"],
        report["seeds"][0]["no_knn"]
    );
}

/// Errors name the key or the table, and arms trained with other settings are refused.
fn assert_bad_settings_are_named(cfg: &Path, dir: &Path) {
    let o = run(bin()
        .args(["eval", "--quick", "--config"])
        .arg(cfg)
        .args(["--set", "eval.sweep_k=[1, 9]"]));
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("eval.sweep_k") && t.contains("k = 9"),
        "{t}"
    );
    // The headline k is one of the sweep's (its samples are the ones compared with k = 0).
    let o = run(bin()
        .args(["eval", "--quick", "--config"])
        .arg(cfg)
        .args(["--set", "eval.headline_k=3"]));
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("eval.headline_k") && t.contains("not in eval.sweep_k"),
        "{t}"
    );
    let o = run(bin().args(["eval", "--quick", "--config"]).arg(cfg).args([
        "--set",
        &format!("eval.captions={}/nowhere.lance", dir.display()),
    ]));
    let t = text(&o);
    assert!(!o.status.success() && t.contains("nowhere.lance"), "{t}");
    // Arms trained with other settings are not silently reused nor overwritten: each child
    // says which directory to delete, and eval which arms failed.
    let o = run(bin().args(["eval", "--quick", "--config"]).arg(cfg).args([
        "--set",
        "eval.lr=0.003",
        "--set",
        "eval.quick.steps=4",
    ]));
    let t = text(&o);
    assert!(
        !o.status.success()
            && t.contains("seed-0/knn` was trained with other settings")
            && t.contains("optim.lr")
            && t.contains("training failed for")
            && t.contains("seed 0 arm knn (exit status: 1)"),
        "{t}"
    );
}
