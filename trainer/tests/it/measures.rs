//! The evaluation measures against numpy and scipy: `python/make_eval_fixture.py` (run by
//! scripts/test.sh) computes the Fréchet distance as pytorch-fid does (`scipy.linalg.sqrtm`),
//! improved precision/recall and R-precision by brute force, on fixed random inputs.

use knn_trainer::eval::metrics::{frechet_distance, precision_recall, r_precision};
use knn_trainer::TrainerError;
use serde_json::Value;
use std::path::PathBuf;
use tch::{Kind, Tensor};

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures/eval/measures.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `bash scripts/test.sh` (it runs python/make_eval_fixture.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn matrix(v: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let d = rows[0].len() as i64;
    let flat: Vec<f64> = rows.concat();
    Tensor::from_slice(&flat).view([-1, d])
}

#[test]
fn frechet_distance_matches_scipy_sqrtm() {
    let fx = fixture();
    for case in fx["frechet"].as_array().unwrap() {
        let (a, b) = (matrix(&case["a"]), matrix(&case["b"]));
        let want = case["fd"].as_f64().unwrap();
        let got = frechet_distance(&a, &b).unwrap();
        assert!(
            (got - want).abs() <= 1e-8 * want.abs().max(1.0),
            "{}: ours {got}, scipy {want}",
            case["name"]
        );
        // f32 features (what a CLIP gives) are computed in f64 all the same.
        let got32 = frechet_distance(&a.to_kind(Kind::Float), &b.to_kind(Kind::Float)).unwrap();
        assert!(
            (got32 - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{got32} vs {want}"
        );
    }
}

#[test]
fn precision_and_recall_match_brute_force() {
    let fx = &fixture()["precision_recall"];
    let k = fx["k"].as_u64().unwrap() as usize;
    let (p, r) = precision_recall(&matrix(&fx["real"]), &matrix(&fx["fake"]), k).unwrap();
    assert_eq!(p, fx["precision"].as_f64().unwrap(), "precision");
    assert_eq!(r, fx["recall"].as_f64().unwrap(), "recall");
}

#[test]
fn r_precision_matches_numpy() {
    let fx = &fixture()["r_precision"];
    let candidates: Vec<Vec<usize>> = serde_json::from_value(fx["candidates"].clone()).unwrap();
    let got = r_precision(&matrix(&fx["images"]), &matrix(&fx["texts"]), &candidates).unwrap();
    assert_eq!(got, fx["r_precision"].as_f64().unwrap());
}

#[test]
fn bad_inputs_name_what_is_wrong() {
    let a = Tensor::zeros([1, 4], (Kind::Float, tch::Device::Cpu));
    let b = Tensor::zeros([5, 3], (Kind::Float, tch::Device::Cpu));
    // Each names its measure and what is wrong with the input.
    let said = |e: TrainerError| match e {
        TrainerError::Measure { measure, reason } => (measure, reason),
        other => panic!("not a Measure error: {other:?}"),
    };
    let (m, why) = said(frechet_distance(&a, &b).unwrap_err());
    assert_eq!(m, "Fréchet distance");
    assert!(
        why.contains("the first set has 1 rows; it needs at least 2"),
        "{why}"
    );
    let zeros = Tensor::zeros([5, 4], (Kind::Float, tch::Device::Cpu));
    let (m, why) = said(frechet_distance(&b, &zeros).unwrap_err());
    assert_eq!(m, "Fréchet distance");
    assert!(why.contains("3 and 4 dimensions"), "{why}");
    let (m, why) = said(r_precision(&b, &b, &vec![vec![0, 9]; 5]).unwrap_err());
    assert_eq!(m, "R-precision");
    assert!(why.contains("among 5 captions"), "{why}");
}
