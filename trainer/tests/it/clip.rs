//! `train-clip` on generated captioned shards: it learns (held-out recall far above chance),
//! resumes bit-identically, rejects bad records by reason, names a missing caption column,
//! and exports a directory that our loader and HF transformers read to the same embeddings.

use arrow_array::{BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use knn_cluster::rendezvous::Rendezvous;
use knn_datasets::StorageConfig;
use knn_indexer::clip::{l2_normalize, ClipCheckpoint};
use knn_trainer::{train_clip, TrainClipConfig, TrainProgress, TrainerError};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 200, 60]),
    ("blue", [30, 60, 220]),
    ("yellow", [240, 220, 30]),
    ("purple", [150, 40, 200]),
    ("black", [15, 15, 15]),
];
const SHAPES: [&str; 4] = ["square", "circle", "stripe", "cross"];

/// A 32 px image of a shape in a colour on white, shifted by `v`.
fn picture(colour: [u8; 3], shape: &str, v: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(32, 32, |x, y| {
        let (cx, cy) = (16 + v % 3, 16 - v % 2);
        let (dx, dy) = (x as i32 - cx as i32, y as i32 - cy as i32);
        let on = match shape {
            "square" => dx.abs() < 9 && dy.abs() < 9,
            "circle" => dx * dx + dy * dy < 100,
            "stripe" => dy.abs() < 4,
            _ => dx.abs() < 3 || dy.abs() < 3,
        };
        let c = if on { colour } else { [255, 255, 255] };
        image::Rgba([c[0], c[1], c[2], 255])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Parquet bytes with `key`, `png` and (unless `caption` is None) `caption` columns.
fn shard(rows: &[(String, Vec<u8>, String)], with_caption: bool) -> Vec<u8> {
    let mut fields = vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("png", DataType::Binary, false),
    ];
    let mut cols: Vec<Arc<dyn arrow_array::Array>> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.0.as_str()),
        )),
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.1.as_slice()),
        )),
    ];
    if with_caption {
        fields.push(Field::new("caption", DataType::Utf8, false));
        cols.push(Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.2.as_str()),
        )));
    }
    let schema = Arc::new(Schema::new(fields));
    crate::parquet::parquet_bytes(&RecordBatch::try_new(schema, cols).unwrap())
}

/// 6 colours x 4 shapes x 3 variants in two shards, plus three bad records.
fn captioned(dir: &Path) -> String {
    let data = dir.join("captioned");
    std::fs::create_dir_all(&data).unwrap();
    let mut rows = Vec::new();
    for (c, rgb) in COLOURS {
        for s in SHAPES {
            for v in 0..3 {
                rows.push((
                    format!("{c}-{s}-{v}"),
                    picture(rgb, s, v),
                    format!("a {c} {s}"),
                ));
            }
        }
    }
    rows.push((
        "bad-image".into(),
        b"not an image".to_vec(),
        "a red square".into(),
    ));
    rows.push((
        "no-caption".into(),
        picture([0, 0, 0], "square", 0),
        "  ".into(),
    ));
    rows.push((
        "long-caption".into(),
        picture([0, 0, 0], "square", 0),
        "x".repeat(500),
    ));
    let half = rows.len() / 2;
    std::fs::write(data.join("part-0.parquet"), shard(&rows[..half], true)).unwrap();
    std::fs::write(data.join("part-1.parquet"), shard(&rows[half..], true)).unwrap();
    data.to_string_lossy().into_owned()
}

fn config(dir: &Path, data: &str) -> TrainClipConfig {
    let text = format!(
        "output_dir = {:?}\nbatch_size = 24\nmax_steps = 120\ndevice = \"cpu\"\nlog_every = 10\n\
         split = {{ holdout_fraction = 0.25, salt = \"test\" }}\n\
         [data]\nurl = {data:?}\n[model]\npreset = \"tiny\"\nvocab_size = 320\ncontext_tokens = 8\n\
         [optim]\nlr = 3e-3\nwarmup_steps = 10\nweight_decay = 0.01\n\
         [checkpoint]\nevery_steps = 60\n",
        dir.join("run").to_string_lossy()
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn go(_: &TrainProgress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

#[tokio::test(flavor = "multi_thread")]
async fn learns_exports_and_matches_transformers() {
    let _rng = crate::TORCH_RNG.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = captioned(dir.path());
    let cfg = config(dir.path(), &data);
    let s = train_clip(
        &cfg,
        &StorageConfig::default(),
        &Rendezvous::single(),
        &mut go,
    )
    .await
    .unwrap();
    eprintln!("{s:#?}");
    // Bad records are counted by reason, not fatal.
    let r = &s.prepare.rejected;
    assert_eq!(r.get("empty_caption"), Some(&1), "{r:?}");
    assert_eq!(r.get("caption_too_long"), Some(&1), "{r:?}");
    assert_eq!(r.values().sum::<u64>(), 3, "{r:?}");
    assert_eq!(s.train_rows + s.holdout_rows, 72);
    assert!(s.holdout_rows > 5, "{}", s.holdout_rows);
    // Held-out pairs are concepts it has seen in other variants: recall far above chance.
    let e = s.eval.as_ref().unwrap();
    let at5 = e.at(5).unwrap();
    assert!(
        at5.text_to_image >= 2.0 * at5.chance && at5.image_to_text >= 2.0 * at5.chance,
        "{e}"
    );
    // TensorBoard holds the loss of every metrics line and the final held-out scores.
    let tb = knn_test_support::tensorboard::read(&dir.path().join("run/tensorboard"));
    let lines = std::fs::read_to_string(&s.metrics).unwrap().lines().count();
    assert_eq!(
        tb["scalars"]["loss"].as_array().map(Vec::len),
        Some(lines),
        "{tb}"
    );
    let r5 = &tb["scalars"]["held_out/recall@5/text_to_image"][0];
    assert_eq!(r5[0].as_u64(), Some(s.step), "{tb}");
    assert_eq!(r5[1].as_f64().unwrap() as f32, at5.text_to_image as f32);

    // The export loads in our loader and in transformers to the same embeddings.
    let export = s.export_dir.clone().unwrap();
    let ckpt = ClipCheckpoint::open_dir(Path::new(&export)).unwrap();
    let clip = ckpt.load(Device::Cpu, Kind::Float).unwrap();
    // The modality means came along: prompts move towards the images' side of the gap.
    let m = clip.modality.clone().expect("modality.json");
    assert_eq!(m.text_mean.len(), 64);
    let raw = clip.embed_texts(&["a red circle"]).unwrap();
    let moved = clip.embed_prompts(&["a red circle"]).unwrap();
    let img_mean = Tensor::from_slice(&m.image_mean);
    let toward = |t: &Tensor| f64::try_from(t.get(0).dot(&img_mean)).unwrap();
    assert!(
        toward(&moved) > toward(&raw),
        "{} vs {}",
        toward(&moved),
        toward(&raw)
    );
    let texts = [
        "a red circle",
        "a blue cross with a longer caption than eight tokens",
    ];
    let imgs = [dir.path().join("a.png"), dir.path().join("b.png")];
    std::fs::write(&imgs[0], picture(COLOURS[0].1, "circle", 1)).unwrap();
    std::fs::write(&imgs[1], picture(COLOURS[2].1, "cross", 2)).unwrap();
    let ids = clip.tokenize(&texts).unwrap();
    let ours_txt = tch::no_grad(|| clip.model.text_features(&ids));
    let mut px = Vec::new();
    for p in &imgs {
        let img = image::open(p).unwrap().to_rgb8();
        clip.processor.preprocess_into(&img, &mut px);
    }
    let ours_img = tch::no_grad(|| {
        clip.model
            .image_features(&Tensor::from_slice(&px).view([2, 3, 32, 32]))
    });
    let out = dir.path().join("hf.json");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/check_clip_export.py");
    let status = std::process::Command::new(python)
        .arg(script)
        .args(["--model", &export, "--out"])
        .arg(&out)
        .arg("--images")
        .args(&imgs)
        .arg("--texts")
        .args(texts)
        .status()
        .expect("run .venv/bin/python (scripts/setup.sh makes it)");
    assert!(status.success());
    let hf: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(
        hf["missing_keys"].as_array().unwrap().len(),
        0,
        "{}",
        hf["missing_keys"]
    );
    let hf_ids: Vec<i64> = serde_json::from_value::<Vec<Vec<i64>>>(hf["input_ids"].clone())
        .unwrap()
        .concat();
    assert_eq!(hf_ids, Vec::<i64>::try_from(ids.view([-1])).unwrap());
    let close = |ours: &Tensor, key: &str| {
        let theirs: Vec<Vec<f32>> = serde_json::from_value(hf[key].clone()).unwrap();
        let theirs = Tensor::from_slice(&theirs.concat()).view([2, -1]);
        let diff = f64::try_from((ours - &theirs).abs().max()).unwrap();
        assert!(diff < 1e-4, "{key}: max |diff| {diff}");
    };
    close(&ours_img, "image_embeds");
    close(&ours_txt, "text_embeds");
    // The exported CLIP still retrieves: the red circle's caption finds a red circle first.
    let t = l2_normalize(&ours_txt);
    let i = l2_normalize(&ours_img);
    let sims = t.matmul(&i.tr());
    assert!(
        f64::try_from(sims.get(0).get(0)).unwrap() > f64::try_from(sims.get(0).get(1)).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_is_bit_identical() {
    let _rng = crate::TORCH_RNG.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = captioned(dir.path());
    let weights = |d: &Path| std::fs::read(d.join("run/model/model.safetensors")).unwrap();
    let mut a = config(&dir.path().join("a"), &data);
    a.max_steps = 8;
    a.checkpoint.every_steps = 2;
    train_clip(
        &a,
        &StorageConfig::default(),
        &Rendezvous::single(),
        &mut go,
    )
    .await
    .unwrap();
    let mut b = config(&dir.path().join("b"), &data);
    b.max_steps = 8;
    b.checkpoint.every_steps = 2;
    let mut stop_at_3 = |p: &TrainProgress| {
        if p.step == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let first = train_clip(
        &b,
        &StorageConfig::default(),
        &Rendezvous::single(),
        &mut stop_at_3,
    )
    .await
    .unwrap();
    assert_eq!(first.step, 3);
    assert!(first.export_dir.is_none());
    let second = train_clip(
        &b,
        &StorageConfig::default(),
        &Rendezvous::single(),
        &mut go,
    )
    .await
    .unwrap();
    assert_eq!((second.resumed_from, second.step), (3, 8));
    // Shards already in the captions table are not read again.
    assert_eq!((second.prepare.committed, second.prepare.skipped), (0, 2));
    assert_eq!(
        weights(&dir.path().join("a")),
        weights(&dir.path().join("b"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_without_captions_names_the_key_to_set() {
    let _rng = crate::TORCH_RNG.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("captioned");
    std::fs::create_dir_all(&data).unwrap();
    let rows: Vec<_> = (0..4)
        .map(|i| {
            (
                format!("k{i}"),
                picture([200, 0, 0], "square", i),
                "a red square".to_string(),
            )
        })
        .collect();
    std::fs::write(data.join("part-0.parquet"), shard(&rows, false)).unwrap();
    let cfg = config(dir.path(), data.to_str().unwrap());
    let err = train_clip(
        &cfg,
        &StorageConfig::default(),
        &Rendezvous::single(),
        &mut go,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, TrainerError::PrepareFailed { shard, reason }
            if shard == "part-0.parquet" && reason.contains("train_clip.data.caption_column")),
        "{err}"
    );
}
