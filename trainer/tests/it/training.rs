//! Training on real Lance tables: overfitting a handful of images, sampling them back from
//! their own embeddings, bit-exact resume, corrupt-checkpoint fallback, and config errors.

use crate::fixtures::{image, tables, tables_with, SIDE};
use knn_cluster::rendezvous::Rendezvous;
use knn_datasets::StorageConfig;
use knn_trainer::checkpoint::CheckpointStore;
use knn_trainer::data::TrainingData;
use knn_trainer::diffusion::SamplerConfig;
use knn_trainer::model::TrainedModel;
use knn_trainer::sampling::generate;
use knn_trainer::unet::Condition;
use knn_trainer::{train, TrainConfig, TrainProgress, TrainerError};
use std::ops::ControlFlow;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A `[train]` config as a user writes it, for the tiny U-Net on the CPU.
fn config(dir: &Path, emb: &str, knn: &str) -> TrainConfig {
    let text = format!(
        "output_dir = {:?}\nk = 3\nbatch_size = 4\ndevice = \"cpu\"\nlog_every = 1\n\
         [data]\nembeddings = {emb:?}\nknn = {knn:?}\nknn_dropout = 0.0\nprefetch_batches = 2\n\
         [samples]\nevery_steps = 0\n",
        dir.join("run").to_string_lossy()
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn go(_: &TrainProgress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn model_bytes(dir: &Path, step: u64) -> Vec<u8> {
    std::fs::read(dir.join(format!("run/checkpoints/step-{step:010}/model.safetensors"))).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn overfits_a_handful_and_samples_them_back() {
    let _rng = crate::TORCH_RNG.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (emb, knn) = tables(dir.path(), 8, 3).await;
    let mut cfg = config(dir.path(), &emb, &knn);
    cfg.max_steps = 1000;
    cfg.cond_drop_prob = 0.0;
    cfg.diffusion.prediction = knn_trainer::diffusion::Prediction::V;
    cfg.batch_size = 8;
    cfg.data.flip = false;
    cfg.optim.lr = 2e-3;
    cfg.optim.warmup_steps = 20;
    cfg.optim.ema_decay = 0.0;
    cfg.checkpoint.every_steps = 1000;
    let s = train(
        &cfg,
        &StorageConfig::default(),
        &Rendezvous::single(),
        &mut go,
    )
    .await
    .unwrap();
    let l = losses(&s.metrics);
    let first: f64 = l[..10].iter().map(|x| x.1).sum::<f64>() / 10.0;
    let last: f64 = l[l.len() - 20..].iter().map(|x| x.1).sum::<f64>() / 20.0;
    eprintln!("loss {first:.4} -> {last:.4}");
    assert!(
        last < 0.05 && last < first / 10.0,
        "loss {first:.4} -> {last:.4}"
    );

    // Each image's own condition (its embedding and its neighbours') brings it back.
    let trained = TrainedModel::load(
        &cfg.checkpoint_url(),
        &StorageConfig::default(),
        Device::Cpu,
        false,
    )
    .await
    .unwrap();
    let data = TrainingData::open(&emb, &knn, &StorageConfig::default(), 3)
        .await
        .unwrap();
    let rows: Vec<u64> = (0..8).collect();
    let f = data.fetch(&rows).await.unwrap();
    let (c, present) = knn_trainer::data::condition_tensors(&f, 3, data.dim);
    let cond = Condition {
        emb: c,
        present,
        drop: Tensor::zeros([8], (Kind::Float, Device::Cpu)),
    };
    let sampler = SamplerConfig::default()
        .build(&trained.model.diffusion, "t")
        .unwrap();
    let out = generate(&trained.model, sampler.as_ref(), &cond, 1.0, 7, 0);
    let want = knn_trainer::data::image_tensor(&f, SIDE as usize);
    let mut report = Vec::new();
    for i in 0..8 {
        let mse =
            |j: i64| f64::try_from((out.get(i) - want.get(j)).square().mean(Kind::Float)).unwrap();
        let own = mse(i);
        let others = (0..8)
            .filter(|&j| j != i)
            .map(mse)
            .fold(f64::INFINITY, f64::min);
        report.push((f.ids[i as usize], own, others));
    }
    eprintln!("(id, own MSE, nearest other MSE): {report:.4?}");
    for (id, own, others) in report {
        assert!(
            own < 0.05 && own < others / 4.0,
            "id {id}: own {own:.4}, nearest other {others:.4}"
        );
    }
    // The fixture images are what the table holds.
    assert_eq!(f.ids[0], 100);
    let _ = image(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_is_bit_identical_and_survives_a_corrupt_checkpoint() {
    let _rng = crate::TORCH_RNG.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (emb, knn) = tables(dir.path(), 12, 3).await;
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    let mut a = config(&a_dir, &emb, &knn);
    a.max_steps = 8;
    a.cond_drop_prob = 0.3;
    a.optim.warmup_steps = 2;
    a.optim.ema_decay = 0.9;
    a.checkpoint.every_steps = 2;
    a.checkpoint.keep_last = 10;
    a.model.dropout = 0.1;
    let mut b = a.clone();
    b.output_dir = b_dir.join("run").to_string_lossy().to_string();
    let st = StorageConfig::default();

    let sa = train(&a, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap();
    assert_eq!((sa.resumed_from, sa.step), (0, 8));

    // Stop after step 3 (an odd step: the stop writes its own checkpoint), then resume.
    let mut stop_at_3 = |p: &TrainProgress| {
        if p.step == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let s1 = train(&b, &st, &Rendezvous::single(), &mut stop_at_3)
        .await
        .unwrap();
    assert_eq!(s1.step, 3);
    let s2 = train(&b, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap();
    assert_eq!((s2.resumed_from, s2.step), (3, 8));
    assert_eq!(
        model_bytes(&a_dir, 8),
        model_bytes(&b_dir, 8),
        "parameters after 8 steps"
    );
    assert_eq!(
        losses(&sa.metrics),
        losses(&s2.metrics),
        "losses of every step"
    );
    let ema = |d: &Path| {
        std::fs::read(d.join("run/checkpoints/step-0000000008/ema.safetensors")).unwrap()
    };
    assert_eq!(ema(&a_dir), ema(&b_dir), "EMA weights");

    // Corrupt the newest checkpoint: the previous one is used and training redoes the rest.
    let newest = b_dir.join("run/checkpoints/step-0000000008/model.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&newest, bytes).unwrap();
    let store = CheckpointStore::open(&b.checkpoint_url(), &st, 10).unwrap();
    let err = store.load(8).await.unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("SHA-256"),
        "{err}"
    );
    assert_eq!(store.latest_valid().await.unwrap().unwrap().step, 6);
    let s3 = train(&b, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap();
    assert_eq!((s3.resumed_from, s3.step), (6, 8));
    assert_eq!(model_bytes(&a_dir, 8), model_bytes(&b_dir, 8));

    // Three runs wrote three event files (steps 1-3, 4-8, then 7-8 again): TensorBoard's
    // reader shows every step once, with the loss metrics.jsonl holds.
    let events = std::fs::read_dir(b_dir.join("run/tensorboard"))
        .unwrap()
        .count();
    assert_eq!(events, 3);
    let tb = knn_test_support::tensorboard::read(&b_dir.join("run/tensorboard"));
    let want: Vec<(u64, f32)> = losses(&s3.metrics)
        .into_iter()
        .map(|(step, loss)| (step, loss as f32))
        .collect();
    let got: Vec<(u64, f32)> = tb["scalars"]["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap() as f32))
        .collect();
    assert_eq!(got, want, "{tb}");
    assert_eq!(want.len(), 8);
    for tag in [
        "lr",
        "grad_norm",
        "data_wait_s",
        "images_per_s",
        "mean_loss",
    ] {
        assert_eq!(
            tb["scalars"][tag].as_array().map(Vec::len),
            Some(8),
            "{tag}: {tb}"
        );
    }

    // A torn save (no manifest) is skipped the same way.
    std::fs::remove_file(b_dir.join("run/checkpoints/step-0000000008/MANIFEST.json")).unwrap();
    assert_eq!(store.latest_valid().await.unwrap().unwrap().step, 6);

    // Changing a setting that shapes the trajectory is refused, naming it.
    let mut changed = b.clone();
    changed.optim.lr = 5e-4;
    let err = train(&changed, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap_err();
    assert!(matches!(err, TrainerError::ConfigChanged { .. }), "{err}");
    assert!(err.to_string().contains("optim.lr"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn config_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (emb, knn) = tables(dir.path(), 8, 3).await;
    let st = StorageConfig::default();

    let mut c = config(dir.path(), &emb, &knn);
    c.k = 5;
    let e = train(&c, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            TrainerError::KTooLarge {
                k: 5,
                available: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("train.k"), "{e}");

    let mut c = config(dir.path(), &emb, &knn);
    c.model.channel_mult = Some(vec![1, 1, 1, 1, 1, 1]);
    let e = train(&c, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.model.image_size_px") && e.contains("16 px") && e.contains("32"),
        "{e}"
    );

    let missing = dir.path().join("nope.lance").to_string_lossy().to_string();
    let c = config(dir.path(), &emb, &missing);
    let e = train(&c, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap_err();
    assert!(
        matches!(e, TrainerError::MissingTable { ref table, .. } if table == &missing),
        "{e}"
    );

    let mut c = config(dir.path(), &emb, &knn);
    c.batch_size = 9;
    let e = train(&c, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.batch_size") && e.contains("8 training rows"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn accumulating_two_half_batches_equals_one_full_batch() {
    let _rng = crate::TORCH_RNG.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (emb, knn) = tables(dir.path(), 12, 3).await;
    let st = StorageConfig::default();
    let mut full = config(&dir.path().join("full"), &emb, &knn);
    full.max_steps = 3;
    full.optim.warmup_steps = 1;
    full.checkpoint.every_steps = 3;
    let mut halves = full.clone();
    halves.output_dir = dir.path().join("halves/run").to_string_lossy().to_string();
    halves.batch_size = 2;
    halves.grad_accum = 2;
    let a = train(&full, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap();
    let b = train(&halves, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap();
    let la = losses(&a.metrics);
    let lb = losses(&b.metrics);
    for ((sa, x), (sb, y)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb);
        assert!((x - y).abs() < 1e-5, "step {sa}: loss {x} vs {y}");
    }
    let read =
        |d: &Path| knn_trainer::checkpoint::from_safetensors(&model_bytes(d, 3), "model").unwrap();
    let (pa, pb) = (
        read(&dir.path().join("full")),
        read(&dir.path().join("halves")),
    );
    let mut worst = 0f64;
    for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        worst = worst.max(f64::try_from((ta - tb).abs().max()).unwrap());
    }
    assert!(worst < 1e-5, "largest parameter difference {worst:e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_go_to_s3_and_resume_from_there() {
    let _rng = crate::TORCH_RNG.lock().await;
    let server = crate::s3_server::S3Server::start(&["ckpt"]);
    let dir = tempfile::tempdir().unwrap();
    let (emb, knn) = tables(dir.path(), 8, 3).await;
    let st = StorageConfig {
        endpoint: Some(server.endpoint.clone()),
        region: Some("us-east-1".into()),
        allow_http: true,
        access_key_id: Some(server.access_key.clone()),
        secret_access_key: Some(knn_datasets::Secret::new(server.secret_key.clone())),
        ..Default::default()
    };
    let mut c = config(dir.path(), &emb, &knn);
    c.checkpoint.url = Some("s3://ckpt/runs/a".into());
    c.checkpoint.every_steps = 1;
    c.checkpoint.keep_last = 2;
    c.max_steps = 2;
    let s = train(&c, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap();
    assert_eq!(
        s.checkpoint.as_deref(),
        Some("s3://ckpt/runs/a/step-0000000002")
    );
    c.max_steps = 3;
    let s = train(&c, &st, &Rendezvous::single(), &mut go)
        .await
        .unwrap();
    assert_eq!((s.resumed_from, s.step), (2, 3));
    // keep_last = 2: step 1 is gone, its files and all.
    let on_disk = |step: u64| {
        server
            .root
            .path()
            .join(format!("ckpt/runs/a/step-{step:010}/MANIFEST.json"))
            .is_file()
    };
    assert!(!on_disk(1) && on_disk(2) && on_disk(3));
    let state = std::fs::read_to_string(
        server
            .root
            .path()
            .join("ckpt/runs/a/step-0000000003/state.json"),
    )
    .unwrap();
    assert!(
        !state.contains(&server.secret_key),
        "no credential in a checkpoint"
    );
    let trained = TrainedModel::load("s3://ckpt/runs/a", &st, Device::Cpu, true)
        .await
        .unwrap();
    assert_eq!(trained.state.step, 3);
}

/// Held-out rows (by a hash of their key) are marked in the kNN table, are nobody's
/// neighbour, and are never in a training batch.
#[tokio::test(flavor = "multi_thread")]
async fn held_out_rows_are_never_trained_on_nor_neighbours() {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    use futures::TryStreamExt;
    let dir = tempfile::tempdir().unwrap();
    let split = "split = { holdout_fraction = 0.25, salt = \"t\" }\n";
    let (emb, knn) = tables_with(dir.path(), 40, 5, split).await;
    let held: std::collections::HashSet<u64> = (0..40u64)
        .filter(|i| {
            knn_datasets::SplitConfig {
                holdout_fraction: 0.25,
                salt: "t".into(),
            }
            .is_holdout(&format!("img-{i}.png"))
        })
        .map(|i| 100 + i)
        .collect();
    assert!((4..=18).contains(&held.len()), "{}", held.len());
    let batches: Vec<arrow_array::RecordBatch> = lance::Dataset::open(&knn)
        .await
        .unwrap()
        .scan()
        .try_into_stream()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    for b in &batches {
        let ids = b.column_by_name("id").unwrap().as_primitive::<UInt64Type>();
        let flags = b.column_by_name("holdout").unwrap().as_boolean();
        let lists = b.column_by_name("knn_ids").unwrap().as_fixed_size_list();
        for r in 0..b.num_rows() {
            assert_eq!(
                flags.value(r),
                held.contains(&ids.value(r)),
                "id {}",
                ids.value(r)
            );
            let nbrs = lists.value(r);
            for n in nbrs.as_primitive::<UInt64Type>().iter().flatten() {
                assert!(
                    !held.contains(&n),
                    "held-out {n} is a neighbour of {}",
                    ids.value(r)
                );
            }
        }
    }
    let data = TrainingData::open(&emb, &knn, &StorageConfig::default(), 3)
        .await
        .unwrap();
    assert_eq!(data.split_rows.holdout_rows(), held.len());
    assert_eq!(data.split_rows.rows(), 40);
    let train: Vec<u64> = (0..data.split_rows.train_rows())
        .map(|p| data.split_rows.train_offset(p))
        .collect();
    let train_ids = data.fetch(&train).await.unwrap().ids;
    assert_eq!(train_ids.len() + held.len(), 40);
    assert!(train_ids.iter().all(|id| !held.contains(id)));
}

/// With `knn_dropout = 1`, every sample keeps a prefix of its neighbours, of every length
/// from 0 to k over a few batches; with 0, all of them.
#[tokio::test(flavor = "multi_thread")]
async fn neighbour_count_dropout_keeps_a_prefix() {
    use knn_trainer::data::{build_batch, DataLayout, SampleSpec};
    let dir = tempfile::tempdir().unwrap();
    let (emb, knn) = tables(dir.path(), 24, 4).await;
    let data = TrainingData::open(&emb, &knn, &StorageConfig::default(), 4)
        .await
        .unwrap();
    let layout = DataLayout::new(24, 8, 0, 1).unwrap();
    let spec = |knn_dropout| SampleSpec {
        seed: 3,
        timesteps: 1000,
        cond_drop_prob: 0.0,
        flip: false,
        knn_dropout,
    };
    let mut kept = std::collections::BTreeSet::new();
    for m in 0..6 {
        let b = build_batch(&data, &layout, &spec(1.0), m).await.unwrap();
        let p = Vec::<f32>::try_from(b.present.view([-1])).unwrap();
        for row in p.chunks(5) {
            assert_eq!(row[0], 1.0, "the query slot is always there");
            let n = row[1..].iter().take_while(|&&x| x == 1.0).count();
            assert!(
                row[1 + n..].iter().all(|&x| x == 0.0),
                "{row:?} is not a prefix"
            );
            kept.insert(n);
        }
        let full = build_batch(&data, &layout, &spec(0.0), m).await.unwrap();
        assert!(Vec::<f32>::try_from(full.present.view([-1]))
            .unwrap()
            .iter()
            .all(|&x| x == 1.0));
        // The other draws do not depend on it.
        assert!(full.noise.equal(&b.noise) && full.t.equal(&b.t));
    }
    assert_eq!(kept, (0..=4).collect(), "{kept:?}");
}

/// Flips are off unless asked for (a mirrored arrow is another image, and the condition is
/// the unflipped image's embedding); with `flip = true`, some images come out mirrored and
/// the rest unchanged, their conditions the same either way.
#[tokio::test(flavor = "multi_thread")]
async fn flips_are_off_by_default_and_mirror_when_on() {
    use knn_trainer::data::{build_batch, DataConfig, DataLayout, SampleSpec};
    assert!(!DataConfig::default().flip);
    let from_empty: DataConfig = serde_json::from_str("{}").unwrap();
    assert!(!from_empty.flip, "a config without `flip` must not flip");

    let dir = tempfile::tempdir().unwrap();
    let (emb, knn) = tables(dir.path(), 16, 2).await;
    let data = TrainingData::open(&emb, &knn, &StorageConfig::default(), 2)
        .await
        .unwrap();
    let layout = DataLayout::new(16, 16, 0, 1).unwrap();
    let spec = |flip| SampleSpec {
        seed: 5,
        timesteps: 1000,
        cond_drop_prob: 0.0,
        flip,
        knn_dropout: 0.0,
    };
    let plain = build_batch(&data, &layout, &spec(false), 0).await.unwrap();
    let flipped = build_batch(&data, &layout, &spec(true), 0).await.unwrap();
    assert_eq!(plain.ids, flipped.ids);
    assert!(plain.cond.equal(&flipped.cond));
    let (mut mirrored, mut same) = (0, 0);
    for i in 0..plain.ids.len() as i64 {
        let (a, b) = (plain.images.get(i), flipped.images.get(i));
        if a.equal(&b) {
            same += 1;
        } else {
            assert!(
                a.flip([2]).equal(&b),
                "image {i} changed but is not a mirror"
            );
            mirrored += 1;
        }
    }
    assert!(
        mirrored > 0 && same > 0,
        "{mirrored} mirrored, {same} unchanged"
    );
}
