//! A full disk. The outputs live on a small tmpfs mounted in a private mount namespace
//! (`unshare -rm`: no root needed where unprivileged user namespaces are allowed), filled
//! with a filler file so that a write meets ENOSPC, then freed by removing the filler.
//! embed, precompute-knn and a checkpoint save each fail naming the path; what was written
//! before still validates; after space is freed a rerun completes exactly once. A
//! read-only output is named as one.

use crate::cli::{bin, write_config, write_images, write_images_in};
use std::collections::BTreeMap;
use std::path::Path;

/// The scenario, run by `sh` inside the namespace: `T` is the tmpfs, `OUT` (outside it)
/// gets each step's log and exit status and copies of the tables as they were.
const SCENARIO: &str = r#"
set -u
mount -t tmpfs -o size=64m tmpfs "$T" || { echo "cannot mount a tmpfs" >&2; exit 90; }
fill() { dd if=/dev/zero of="$T/filler" bs=64k 2>/dev/null; truncate -s "-$1" "$T/filler"; }
step() { name=$1; shift; "$B" "$@" --config "$CFG" >"$OUT/$name.log" 2>&1; echo $? >"$OUT/$name.rc"; }
step embed-1 embed
cp "$MORE"/* "$SRC"/
fill 16k; step embed-full embed; cp -a "$T/emb.lance" "$OUT/emb-full.lance"; rm "$T/filler"
step embed-2 embed
fill 8k; step knn-full precompute-knn; rm "$T/filler"
step knn-2 precompute-knn
step train-1 train
fill 0; step train-full train --set train.max_steps=4; cp -a "$T/ckpt" "$OUT/ckpt-full"; rm "$T/filler"
step train-2 train --set train.max_steps=4 --summary-json "$OUT/train-2.json"
mkdir "$OUT/final"; cp -a "$T/emb.lance" "$T/knn.lance" "$T/ckpt" "$OUT/final/"
mount -o remount,ro "$T"; step embed-ro embed --set "embed.output.table=\"$T/new.lance\""
"#;

struct Step {
    ok: bool,
    log: String,
}

fn steps(out: &Path) -> BTreeMap<String, Step> {
    let mut all = BTreeMap::new();
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rc") {
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            let rc = std::fs::read_to_string(&p).unwrap();
            let log = std::fs::read_to_string(p.with_extension("log")).unwrap();
            all.insert(
                name,
                Step {
                    ok: rc.trim() == "0",
                    log,
                },
            );
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_named_leaves_valid_outputs_and_a_rerun_after_freeing_is_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let [src, more, t, out] = ["src", "more", "t", "out"].map(|d| dir.path().join(d));
    write_images(&src, 20);
    write_images_in(&more, 20..40);
    std::fs::create_dir_all(&t).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let at = |name: &str| t.join(name).to_string_lossy().to_string();
    let rest = format!(
        "[knn]\nk = 3\noutput = \"{knn}\"\n[train]\noutput_dir = \"{train}\"\nk = 3\n\
         batch_size = 4\nmax_steps = 2\ndevice = \"cpu\"\nlog_every = 1\n[train.optim]\n\
         warmup_steps = 1\n[train.checkpoint]\nurl = \"{ckpt}\"\nevery_steps = 1\n\
         keep_last = 2\n[train.samples]\nevery_steps = 0\n",
        knn = at("knn.lance"),
        train = dir.path().join("train").display(),
        ckpt = at("ckpt"),
    );
    let cfg = write_config(dir.path(), src.to_str().unwrap(), &at("emb.lance"), &rest);
    let knn_diffusion = bin().get_program().to_owned();
    let o = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", SCENARIO])
        .env("T", &t)
        .env("OUT", &out)
        .env("B", knn_diffusion)
        .env("CFG", &cfg)
        .env("SRC", &src)
        .env("MORE", &more)
        .output()
        .expect("util-linux `unshare` runs (the full-disk test mounts a tmpfs in a namespace)");
    assert!(
        o.status.success(),
        "the scenario failed; unprivileged user namespaces must be allowed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = steps(&out);
    let full = "no space left on the device holding";
    for name in ["embed-1", "embed-2", "knn-2", "train-1", "train-2"] {
        assert!(s[name].ok, "{name}: {}", s[name].log);
    }

    // embed: stops at the first shard it cannot write, naming the table.
    let e = &s["embed-full"];
    assert!(!e.ok, "{}", e.log);
    assert!(
        e.log.contains(&format!("{full} `{}`", at("emb.lance"))),
        "{}",
        e.log
    );
    assert!(
        e.log.contains("STOPPED") && !e.log.contains(".rs:"),
        "{}",
        e.log
    );
    let partial =
        crate::tables::rows_by_id(out.join("emb-full.lance").to_str().unwrap(), &[]).await;
    let fin = out.join("final");
    let all = crate::tables::rows_by_id(fin.join("emb.lance").to_str().unwrap(), &[]).await;
    assert!(
        partial.len() >= 20 && partial.len() < 40,
        "{} rows",
        partial.len()
    );
    assert_eq!(all.len(), 40);
    assert!(partial.iter().all(|(id, row)| all.get(id) == Some(row)));

    // precompute-knn: names what it could not write; the rerun makes every row's list.
    let k = &s["knn-full"];
    assert!(
        !k.ok && k.log.contains(full) && k.log.contains(&at("knn")),
        "{}",
        k.log
    );
    let knn = crate::tables::rows_by_id(fin.join("knn.lance").to_str().unwrap(), &[]).await;
    assert_eq!(knn.len(), 40);

    // A checkpoint save: fails naming the checkpoint location and the file; the newest
    // checkpoint before it stays valid, and the rerun resumes from it.
    let c = &s["train-full"];
    assert!(!c.ok, "{}", c.log);
    assert!(
        c.log.contains(&at("ckpt"))
            && c.log.contains("No space left")
            && c.log.contains("free space"),
        "{}",
        c.log
    );
    let storage = knn_datasets::StorageConfig::default();
    let store = knn_trainer::checkpoint::CheckpointStore::open_existing(
        out.join("ckpt-full").to_str().unwrap(),
        &storage,
    )
    .unwrap();
    let newest = store
        .latest_valid()
        .await
        .unwrap()
        .expect("a valid checkpoint");
    assert_eq!(newest.step, 2);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train-2.json")).unwrap()).unwrap();
    assert_eq!(summary["resumed_from"], 2, "{summary}");
    assert_eq!(summary["step"], 4, "{summary}");

    // A read-only output says so, with the path, once.
    let r = &s["embed-ro"];
    let said = format!("`{}` is on a read-only file system", at("new.lance"));
    assert!(!r.ok && r.log.contains(&said), "{}", r.log);
    assert!(
        !r.log.contains("not found") && !r.log.contains(".rs:"),
        "{}",
        r.log
    );
}
