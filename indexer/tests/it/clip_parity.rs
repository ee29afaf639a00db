//! Parity with HF `transformers` 5.24 (`CLIPModel`, `CLIPImageProcessorPil`, the tokenizer):
//! the fixture is written by `python/make_clip_fixture.py` (scripts/test.sh runs it) from a
//! random tiny CLIP whose LayerNorms and biases are perturbed, so a misplaced weight shows.

use knn_indexer::clip::{ClipCheckpoint, LoadedClip};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

pub fn fixture_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures/clip-tiny");
    assert!(
        dir.join("reference.json").is_file(),
        "{} is missing: run `bash scripts/test.sh` (it runs python/make_clip_fixture.py)",
        dir.display()
    );
    dir
}

struct Reference {
    json: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn reference() -> Reference {
    let dir = fixture_dir();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tensors = Tensor::read_safetensors(dir.join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    Reference { json, tensors }
}

fn load() -> LoadedClip {
    ClipCheckpoint::open_dir(&fixture_dir())
        .unwrap()
        .load(Device::Cpu, Kind::Float)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let r = reference();
    let clip = load();
    // Our resampler may land one 8-bit level from Pillow's (16-bit against 22-bit
    // coefficients); after rescaling and normalising, a level is 1/255/std.
    let level = 1.0 / 255.0 / 0.26130258 + 1e-6;
    for (i, img) in r.json["images"].as_array().unwrap().iter().enumerate() {
        let file = fixture_dir().join(img["file"].as_str().unwrap());
        let rgb = image::open(&file).unwrap().to_rgb8();
        let geometry = clip.processor.geometry(&rgb);
        let ours_u8 = Tensor::from_slice(geometry.as_raw())
            .view([224, 224, 3])
            .permute([2, 0, 1]);
        let levels = max_abs_diff(&ours_u8, &r.tensors[&format!("pixel_u8_{i}")]);
        assert!(
            levels <= 1.0,
            "{}: {levels} levels from Pillow",
            file.display()
        );
        let mut ours = Vec::new();
        clip.processor.preprocess_into(&rgb, &mut ours);
        let ours = Tensor::from_slice(&ours).view([3, 224, 224]);
        let theirs = &r.tensors[&format!("pixel_values_{i}")];
        let err = max_abs_diff(&ours, theirs);
        assert!(
            err <= level,
            "{}: pixel_values max abs error {err}",
            file.display()
        );
    }
}

#[test]
fn image_embeddings_match_hf() {
    let r = reference();
    let clip = load();
    let n = r.json["images"].as_array().unwrap().len() as i64;
    let pixels = Tensor::stack(
        &(0..n)
            .map(|i| r.tensors[&format!("pixel_values_{i}")].shallow_clone())
            .collect::<Vec<_>>(),
        0,
    );
    let ours = tch::no_grad(|| clip.model.image_features(&pixels));
    let err = max_abs_diff(&ours, &r.tensors["image_embeds"]);
    assert!(err <= 1e-4, "image_embeds max abs error {err}");
}

#[test]
fn text_ids_and_embeddings_match_hf() {
    let r = reference();
    let clip = load();
    let tok = clip.tokenizer.as_ref().expect("fixture has tokenizer.json");
    let texts: Vec<String> = r.json["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap().to_string())
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = tok.encode(&refs).unwrap();
    let want_ids = &r.tensors["input_ids"];
    assert_eq!(
        Vec::<i64>::try_from(ids.view([-1])).unwrap(),
        Vec::<i64>::try_from(want_ids.view([-1])).unwrap(),
        "token ids differ from the HF tokenizer"
    );
    let ours = tch::no_grad(|| clip.model.text_features(&ids));
    let err = max_abs_diff(&ours, &r.tensors["text_embeds"]);
    assert!(err <= 1e-4, "text_embeds max abs error {err}");
}

#[test]
fn a_checkpoint_without_weights_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = ClipCheckpoint::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, knn_indexer::IndexerError::Checkpoint { path, .. } if path == dir.path()),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[tokio::test]
async fn a_checkpoint_at_an_object_store_url_is_fetched_and_cached() {
    use object_store::ObjectStoreExt;
    let storage = knn_datasets::StorageConfig::default();
    let loc = knn_datasets::SourceLocation::open("memory://models/clip-tiny/", &storage).unwrap();
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        let bytes = std::fs::read(fixture_dir().join(name)).unwrap();
        loc.store
            .put(&loc.prefix.clone().join(name), bytes.into())
            .await
            .unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    let ckpt = ClipCheckpoint::open("memory://models/clip-tiny/", &storage, cache.path())
        .await
        .unwrap();
    assert!(ckpt.dir.starts_with(cache.path()));
    let remote = ckpt.load(Device::Cpu, Kind::Float).unwrap();
    let local = load();
    let x = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let (a, b) = tch::no_grad(|| {
        (
            remote.model.image_features(&x),
            local.model.image_features(&x),
        )
    });
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // A missing required file is named with its URL.
    let err = ClipCheckpoint::open("memory://models/none/", &storage, cache.path())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("memory://models/none/config.json"),
        "{err}"
    );
}
