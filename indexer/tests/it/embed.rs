//! The embed stage end to end on real Lance tables on disk: counts, rejects with reasons,
//! resume, racing duplicate workers, two workers, and the table read back by pylance.

use crate::images::{bomb_png, png, tar};
use arrow_array::Array;
use knn_datasets::StorageConfig;
use knn_indexer::{embed, EmbedConfig, EmbedProgress, EmbedSummary, IndexerError};
use lance::Dataset;
use std::collections::HashSet;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

fn rgba_png() -> Vec<u8> {
    let img = image::RgbaImage::from_fn(20, 10, |x, _| image::Rgba([200, 0, 0, (x * 12) as u8]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Writes `good` images over a few directories plus one of each bad kind; returns the
/// number of files.
fn write_source(dir: &Path, good: usize) -> usize {
    for i in 0..good {
        let sub = dir.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join(format!("{i:04}.png")),
            png(30 + i as u32, 20, i as u8),
        )
        .unwrap();
    }
    let bad = dir.join("d0");
    std::fs::write(bad.join("empty.png"), b"").unwrap();
    let full = png(50, 50, 1);
    std::fs::write(bad.join("truncated.png"), &full[..full.len() / 2]).unwrap();
    std::fs::write(bad.join("text.png"), b"this is not an image").unwrap();
    std::fs::write(bad.join("bomb.png"), bomb_png(200_000, 200_000)).unwrap();
    std::fs::write(bad.join("alpha.png"), rgba_png()).unwrap();
    good + 5
}

fn config(source: &Path, out: &Path, extra: &str) -> EmbedConfig {
    let text = format!(
        r#"
        [source]
        url = "{}"
        format = "folder"
        folder_shard_size = 4
        [output]
        table = "{}"
        image_size_px = 16
        [clip]
        batch_size = 3
        device = "cpu"
        {extra}
        "#,
        source.display(),
        out.join("emb.lance").display()
    );
    toml::from_str(&text).unwrap()
}

async fn run(cfg: &EmbedConfig, worker: (usize, usize)) -> EmbedSummary {
    embed(
        cfg,
        &StorageConfig::default(),
        worker,
        Arc::new(EmbedProgress::default()),
    )
    .await
    .unwrap()
}

async fn column_u64(uri: &str, column: &str) -> Vec<u64> {
    crate::tables::u64_column(uri, column).await
}

fn uri(out: &Path, name: &str) -> String {
    out.join(name).to_string_lossy().into_owned()
}

/// The error of an embed run that must fail, as text.
async fn embed_error(cfg: &EmbedConfig) -> String {
    embed(
        cfg,
        &StorageConfig::default(),
        (0, 1),
        Arc::new(EmbedProgress::default()),
    )
    .await
    .unwrap_err()
    .to_string()
}

/// The `columns` of the table at `uri` in one batch, after Lance's `validate()`.
async fn read_columns(uri: &str, columns: &[&str]) -> arrow_array::RecordBatch {
    let ds = Dataset::open(uri).await.unwrap();
    ds.validate().await.unwrap();
    ds.scan()
        .project(columns)
        .unwrap()
        .try_into_batch()
        .await
        .unwrap()
}

/// Column `i` of `batch` as the array type `A`.
fn col<A: 'static>(batch: &arrow_array::RecordBatch, i: usize) -> &A {
    batch.column(i).as_any().downcast_ref::<A>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_embedded_or_rejected_with_a_reason() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let total = write_source(src.path(), 12);
    let cfg = config(src.path(), out.path(), "");
    let s = run(&cfg, (0, 1)).await;
    assert_eq!(s.images_ok + s.rejected_total(), total as u64, "{s}");
    assert_eq!(s.images_ok, 13, "12 good + the RGBA one: {s}");
    for reason in ["empty", "not_an_image", "too_many_pixels"] {
        assert_eq!(s.rejected.get(reason), Some(&1), "{reason}: {s}");
    }
    assert_eq!(s.rejected_total(), 4, "{s}");
    assert!(s.shards_failed.is_empty());

    let ids = column_u64(&uri(out.path(), "emb.lance"), "id").await;
    assert_eq!(ids.len(), 13);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 13);
    let rejected = column_u64(&uri(out.path(), "emb-rejects.lance"), "id").await;
    assert_eq!(rejected.len(), 4);
    assert!(rejected.iter().all(|id| !ids.contains(id)));

    let ds = Dataset::open(&uri(out.path(), "emb.lance")).await.unwrap();
    ds.validate().await.unwrap();
    // Embeddings are unit vectors; stored images decode at the configured size.
    let batch = ds
        .scan()
        .project(&["image", "emb", "width"])
        .unwrap()
        .try_into_batch()
        .await
        .unwrap();
    let emb = col::<arrow_array::FixedSizeListArray>(&batch, 1);
    assert_eq!(emb.value_length(), 64);
    let values = emb
        .values()
        .as_any()
        .downcast_ref::<arrow_array::Float32Array>()
        .unwrap();
    for row in 0..emb.len() {
        let v = &values.values()[row * 64..(row + 1) * 64];
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "row {row} norm {norm}");
    }
    let images = col::<arrow_array::BinaryArray>(&batch, 0);
    let first = image::load_from_memory(images.value(0)).unwrap();
    assert_eq!((first.width(), first.height()), (16, 16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_skips_committed_shards_and_adds_nothing() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_source(src.path(), 9);
    let cfg = config(src.path(), out.path(), "");
    let first = run(&cfg, (0, 1)).await;
    let again = run(&cfg, (0, 1)).await;
    assert_eq!(again.shards_committed, 0, "{again}");
    assert_eq!(again.shards_skipped, first.shards_assigned, "{again}");
    let ids = column_u64(&uri(out.path(), "emb.lance"), "id").await;
    assert_eq!(ids.len() as u64, first.images_ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_workers_racing_on_the_same_shards_commit_each_once() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_source(src.path(), 20);
    let cfg = config(src.path(), out.path(), "");
    // The same slot launched twice at once: both read every shard; the ledger lets one
    // commit of each shard through.
    let (a, b) = tokio::join!(run(&cfg, (0, 1)), run(&cfg, (0, 1)));
    assert_eq!(
        a.shards_committed + b.shards_committed,
        a.shards_assigned,
        "a: {a}\nb: {b}"
    );
    let ids = column_u64(&uri(out.path(), "emb.lance"), "id").await;
    assert_eq!(ids.len(), 21, "a: {a}\nb: {b}");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 21);
    let rejected = column_u64(&uri(out.path(), "emb-rejects.lance"), "id").await;
    assert_eq!(rejected.len(), 4);
    Dataset::open(&uri(out.path(), "emb.lance"))
        .await
        .unwrap()
        .validate()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_the_shards_and_cover_them_all() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_source(src.path(), 15);
    let cfg = config(src.path(), out.path(), "");
    let (a, b) = tokio::join!(run(&cfg, (0, 2)), run(&cfg, (1, 2)));
    assert!(
        a.shards_committed > 0 && b.shards_committed > 0,
        "a: {a}\nb: {b}"
    );
    assert_eq!(a.images_ok + b.images_ok, 16);
    let ids = column_u64(&uri(out.path(), "emb.lance"), "id").await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 16);
    assert_eq!(ids.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_from_another_clip_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_source(src.path(), 3);
    run(&config(src.path(), out.path(), ""), (0, 1)).await;
    let other = config(src.path(), out.path(), "random_seed = 7");
    let err = embed(
        &other,
        &StorageConfig::default(),
        (0, 1),
        Arc::new(EmbedProgress::default()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, knn_indexer::IndexerError::SchemaMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("random-tiny(seed=0)"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hf_checkpoint_embeds_and_pylance_reads_the_table() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_source(src.path(), 4);
    let ckpt = crate::clip_parity::fixture_dir();
    let cfg = config(
        src.path(),
        out.path(),
        &format!("checkpoint = \"{}\"", ckpt.display()),
    );
    let s = run(&cfg, (0, 1)).await;
    assert_eq!((s.images_ok, s.dim), (5, 48), "{s}");

    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = r#"
import sys, lance
ds = lance.dataset(sys.argv[1])
print([f"{f.name}:{f.type}" for f in ds.schema])
t = ds.to_table(limit=1)
row = t.to_pylist()[0]
print(ds.count_rows(), len(row["emb"]), row["width"] > 0, row["image"][:4] == b"\x89PNG")
"#;
    let outp = std::process::Command::new(&python)
        .args(["-c", script, &uri(out.path(), "emb.lance")])
        .output()
        .expect("run .venv/bin/python (scripts/setup.sh makes it)");
    let stdout = String::from_utf8_lossy(&outp.stdout);
    assert!(
        outp.status.success(),
        "pylance failed: {}",
        String::from_utf8_lossy(&outp.stderr)
    );
    assert!(stdout.contains("'id:uint64'"), "{stdout}");
    assert!(
        stdout.contains("emb:fixed_size_list<item: float>[48]"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("5 48 True True"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_refuses_a_second_commit_of_a_shard_even_from_a_stale_version() {
    use knn_indexer::table::{rejects_schema, ShardedTable};
    use lance::deps::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    let out = tempfile::tempdir().unwrap();
    let uri = uri(out.path(), "t.lance");
    let schema = rejects_schema();
    let batch = |id: u64| {
        arrow_array::RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(arrow_array::UInt64Array::from(vec![id])),
                Arc::new(arrow_array::StringArray::from(vec!["k"])),
                Arc::new(arrow_array::StringArray::from(vec!["s"])),
                Arc::new(arrow_array::StringArray::from(vec!["r"])),
                Arc::new(arrow_array::StringArray::from(vec!["d"])),
            ],
        )
        .unwrap()
    };
    // Two writers open the table at the same version and both prepare shard "s".
    let a = ShardedTable::open_or_create(&uri, schema.clone(), &Default::default())
        .await
        .unwrap();
    let b = ShardedTable::open_or_create(&uri, schema.clone(), &Default::default())
        .await
        .unwrap();
    let ds = Arc::new(a.open().await.unwrap());
    let stream = |id| {
        Box::pin(RecordBatchStreamAdapter::new(
            schema.clone(),
            futures::stream::iter([Ok(batch(id))]),
        )) as _
    };
    let ta = a.write_uncommitted(&ds, stream(1)).await.unwrap();
    let tb = b.write_uncommitted(&ds, stream(2)).await.unwrap();
    assert!(a.commit_shard(ds.clone(), "s", ta).await.unwrap());
    // b's commit is rebased past a's version, sees shard "s" there, and is refused.
    assert!(!b.commit_shard(ds.clone(), "s", tb).await.unwrap());
    assert_eq!(column_u64(&uri, "id").await, vec![1]);
    // Another shard still commits.
    let tc = b.write_uncommitted(&ds, stream(3)).await.unwrap();
    assert!(b.commit_shard(ds, "other", tc).await.unwrap());
    let mut ids = column_u64(&uri, "id").await;
    ids.sort();
    assert_eq!(ids, vec![1, 3]);
}

/// A webdataset source of a good `a.tar` (keys 1, 2) and `b.tar`, the tar `whole` less its
/// last `cut` bytes; the embed config reading it into `out`.
fn good_and_cut_tars(src: &Path, out: &Path, whole: &[u8], cut: usize) -> EmbedConfig {
    let good = tar(&[("1.png", png(9, 9, 1)), ("2.png", png(9, 9, 2))]);
    std::fs::write(src.join("a.tar"), good).unwrap();
    std::fs::write(src.join("b.tar"), &whole[..whole.len() - cut]).unwrap();
    let mut cfg = config(src, out, "");
    cfg.source.format = knn_datasets::ShardFormat::WebDataset;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_shard_fails_alone_and_is_retried_by_the_next_run() {
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = tar(&[("3.png", png(40, 40, 3)), ("4.png", png(40, 40, 4))]);
    let mut cfg = good_and_cut_tars(src.path(), out.path(), &whole, 1500);
    cfg.salvage_corrupt_shards = false;

    let first = run(&cfg, (0, 1)).await;
    assert_eq!(first.shards_committed, 1, "{first}");
    assert_eq!(first.shards_failed.len(), 1, "{first}");
    assert_eq!(first.shards_failed[0].0, "b.tar", "{first}");
    assert!(
        first.to_string().contains("FAILED shard `b.tar`"),
        "{first}"
    );
    assert_eq!(
        column_u64(&uri(out.path(), "emb.lance"), "id").await.len(),
        2
    );

    // Repaired, the next run commits only the shard that failed.
    std::fs::write(src.path().join("b.tar"), whole).unwrap();
    let second = run(&cfg, (0, 1)).await;
    assert_eq!(
        (second.shards_skipped, second.shards_committed),
        (1, 1),
        "{second}"
    );
    assert_eq!(
        column_u64(&uri(out.path(), "emb.lance"), "id").await.len(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_shard_is_salvaged_once_by_default() {
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = tar(&[
        ("3.png", png(40, 40, 3)),
        ("4.png", png(40, 40, 4)),
        ("5.png", png(48, 48, 5)),
    ]);
    // Cut inside the last member: 3 and 4 read, 5 is the unreadable rest.
    let cfg = good_and_cut_tars(src.path(), out.path(), &whole, 1124);
    assert!(cfg.salvage_corrupt_shards, "the documented default");

    let first = run(&cfg, (0, 1)).await;
    assert_eq!(first.shards_committed, 2, "{first}");
    assert!(first.shards_failed.is_empty(), "{first}");
    assert_eq!(first.images_ok, 4, "{first}");
    assert_eq!(first.rejected.get("corrupt_shard"), Some(&1), "{first}");
    let rejects = uri(out.path(), "emb-rejects.lance");
    let batch = read_columns(&rejects, &["key", "detail"]).await;
    let keys = col::<arrow_array::StringArray>(&batch, 0);
    assert_eq!(keys.value(0), "#unreadable-after-2");
    let detail = col::<arrow_array::StringArray>(&batch, 1).value(0);
    assert!(detail.contains("first 2 records"), "{detail}");

    // Exactly once: the rerun skips both shards and adds no row and no reject.
    let second = run(&cfg, (0, 1)).await;
    assert_eq!(
        (second.shards_skipped, second.shards_committed),
        (2, 0),
        "{second}"
    );
    assert_eq!(
        column_u64(&uri(out.path(), "emb.lance"), "id").await.len(),
        4
    );
    assert_eq!(column_u64(&rejects, "id").await.len(), 1);
}

/// A PNG of `side` x `side` black pixels, quick to write and slow to decode and resize.
fn huge_png(side: u32) -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let pixels = vec![0u8; side as usize * side as usize * 3];
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::NoFilter)
        .write_image(&pixels, side, side, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_past_its_decode_budget_is_a_timeout_reject_and_the_rest_go_on() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    for i in 0..5 {
        std::fs::write(src.path().join(format!("{i}.png")), png(20, 20, i as u8)).unwrap();
    }
    // 81M pixels, under max_pixels: inflating, resizing and preprocessing it takes several
    // hundred milliseconds, where a 20 px image takes well under one.
    std::fs::write(src.path().join("huge.png"), huge_png(9000)).unwrap();
    let cfg = config(src.path(), out.path(), "[decode]\ntimeout_ms = 100");
    assert_eq!(cfg.decode.timeout_ms, 100);
    let s = run(&cfg, (0, 1)).await;
    assert_eq!(s.images_ok + s.rejected_total(), 6, "{s}");
    assert!(s.shards_failed.is_empty(), "{s}");
    // Only the huge one must time out; a small one may too on a machine busy enough to
    // leave a thread unscheduled for 100 ms, and is then counted, never lost.
    assert!(s.images_ok >= 1, "{s}");
    let timed_out: Vec<&str> = s
        .reject_examples
        .iter()
        .filter(|(_, _, _, why)| why.starts_with("timeout"))
        .map(|(_, key, _, _)| key.as_str())
        .collect();
    assert!(timed_out.iter().any(|k| k.contains("huge")), "{s}");
    let rejects = read_columns(&uri(out.path(), "emb-rejects.lance"), &["key", "detail"]).await;
    let details = col::<arrow_array::StringArray>(&rejects, 1);
    assert!(
        (0..details.len()).any(|i| details.value(i).contains("timeout_ms = 100")),
        "{rejects:?}"
    );
}

/// An img2dataset parquet shard of `rows` records from key `first`: `key`, `jpg` (PNG bytes
/// here), `aesthetic` (f32 `i / 2`, null for the second row; or the text "high" instead of
/// each number) and `caption` (`sticker <key>`).
fn scored_shard(first: usize, rows: usize, aesthetic_as_text: bool) -> Vec<u8> {
    use arrow_array::{ArrayRef, BinaryArray, Float32Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let keys: Vec<String> = (first..first + rows).map(|i| format!("{i:05}")).collect();
    let images: Vec<Vec<u8>> = (first..first + rows)
        .map(|i| png(20 + i as u32, 20, i as u8))
        .collect();
    let scores: Vec<Option<f32>> = (first..first + rows)
        .map(|i| (i != first + 1).then_some(i as f32 * 0.5))
        .collect();
    let aesthetic: ArrayRef = if aesthetic_as_text {
        Arc::new(StringArray::from_iter(
            scores.iter().map(|s| s.map(|_| "high".to_string())),
        ))
    } else {
        Arc::new(Float32Array::from(scores))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("jpg", DataType::Binary, false),
        Field::new("aesthetic", aesthetic.data_type().clone(), true),
        Field::new("caption", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(&keys)),
        Arc::new(BinaryArray::from_iter_values(
            images.iter().map(|b| b.as_slice()),
        )),
        aesthetic,
        Arc::new(StringArray::from_iter_values(
            keys.iter().map(|k| format!("sticker {k}")),
        )),
    ];
    crate::parquet::parquet_bytes(&RecordBatch::try_new(schema, cols).unwrap())
}

fn parquet_config(source: &Path, out: &Path, columns: &str) -> EmbedConfig {
    let mut cfg = config(source, out, "");
    cfg.source.format = knn_datasets::ShardFormat::Parquet;
    cfg.source.columns = columns
        .split(',')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    cfg
}

/// `embed.source.columns` carries a score and a caption into the table, typed from the
/// first shard (the f32 score as a nullable Float64, nulls kept); a later shard whose score
/// is text has each such record rejected as `bad_column`, naming the column; a column the
/// source lacks is an error naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_columns_are_carried_typed_and_misfits_are_rejected() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("a-00000.parquet"),
        scored_shard(0, 4, false),
    )
    .unwrap();
    std::fs::write(src.path().join("a-00001.parquet"), scored_shard(4, 3, true)).unwrap();
    let cfg = parquet_config(src.path(), out.path(), "aesthetic,caption");
    let s = run(&cfg, (0, 1)).await;
    assert_eq!(s.images_ok, 5, "{s}");
    assert_eq!(s.rejected.get("bad_column"), Some(&2), "{s}");

    let ds = Dataset::open(&uri(out.path(), "emb.lance")).await.unwrap();
    let schema = ds.schema();
    let names: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "id",
            "key",
            "shard",
            "image",
            "width",
            "height",
            "emb",
            "aesthetic",
            "caption"
        ]
    );
    let batch = read_columns(
        &uri(out.path(), "emb.lance"),
        &["key", "aesthetic", "caption"],
    )
    .await;
    let keys = col::<arrow_array::StringArray>(&batch, 0);
    let scores = col::<arrow_array::Float64Array>(&batch, 1);
    let captions = col::<arrow_array::StringArray>(&batch, 2);
    let mut got: Vec<(String, Option<f64>, String)> = (0..batch.num_rows())
        .map(|r| {
            (
                keys.value(r).to_string(),
                scores.is_valid(r).then(|| scores.value(r)),
                captions.value(r).to_string(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let want: Vec<(String, Option<f64>, String)> = [
        (0, Some(0.0)),
        (1, None),
        (2, Some(1.0)),
        (3, Some(1.5)),
        (5, None),
    ]
    .into_iter()
    .map(|(i, s)| (format!("{i:05}"), s, format!("sticker {i:05}")))
    .collect();
    assert_eq!(
        got, want,
        "the text scores of keys 00004 and 00006 are rejected, 00005's null kept"
    );

    let batch = read_columns(&uri(out.path(), "emb-rejects.lance"), &["key", "detail"]).await;
    let detail = col::<arrow_array::StringArray>(&batch, 1);
    assert!(
        detail
            .value(0)
            .contains("column `aesthetic` is \"high\", not a number"),
        "{}",
        detail.value(0)
    );

    let out2 = tempfile::tempdir().unwrap();
    let cfg = parquet_config(src.path(), out2.path(), "aesthetic,similarity");
    let err = embed_error(&cfg).await;
    assert!(
        err.contains("embed.source.columns") && err.contains("no column `similarity`"),
        "{err}"
    );
}

/// `score` adds a colourfulness column in one commit, each value that of the row's stored
/// image; a second run into the same column is refused, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_adds_a_colourfulness_column_once() {
    use knn_indexer::score::{colourfulness, score, ScoreConfig};
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_source(src.path(), 6);
    run(&config(src.path(), out.path(), ""), (0, 1)).await;
    let table = uri(out.path(), "emb.lance");
    let before = Dataset::open(&table).await.unwrap().version().version;
    let cfg = ScoreConfig {
        table: Some(table.clone()),
        ..Default::default()
    };
    let s = score(&cfg, &StorageConfig::default()).await.unwrap();
    assert_eq!((s.scored, s.unscored_total), (7, 0), "{s}");
    assert_eq!(s.version, before + 1, "one commit");

    let batch = read_columns(&table, &["image", "score"]).await;
    let images = col::<arrow_array::BinaryArray>(&batch, 0);
    let scores = col::<arrow_array::Float64Array>(&batch, 1);
    assert_eq!(scores.len(), 7);
    let mut distinct = HashSet::new();
    for r in 0..scores.len() {
        let rgb = image::load_from_memory(images.value(r)).unwrap().to_rgb8();
        assert_eq!(scores.value(r), colourfulness(rgb.as_raw()), "row {r}");
        distinct.insert(scores.value(r).to_bits());
    }
    assert!(distinct.len() > 1, "the scores tell the images apart");

    // A rerun of embed skips its committed shards on the scored table; new images need a
    // new table, and the error says so.
    let again = run(&config(src.path(), out.path(), ""), (0, 1)).await;
    assert_eq!(
        (again.images_ok, again.shards_skipped),
        (0, again.shards_assigned)
    );
    std::fs::write(src.path().join("late.png"), png(33, 21, 9)).unwrap();
    let late = embed_error(&config(src.path(), out.path(), "")).await;
    assert!(
        late.contains("columns added after embedding (score)")
            && late.contains("embed.output.table"),
        "{late}"
    );

    let err = score(&cfg, &StorageConfig::default()).await.unwrap_err();
    assert!(
        matches!(&err, IndexerError::Config { key, reason }
            if key == "score.column" && reason.contains("already has a column `score`")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_jpegs_are_drafted_and_the_stored_image_takes_the_configured_format() {
    use knn_datasets::stored::StoredFormat;
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("a")).unwrap();
    // 512 x 384 JPEGs: the tiny CLIP's input and the 16 px stored image allow a 1/8 draft.
    for i in 0..3u8 {
        let img = image::RgbImage::from_fn(512, 384, |x, y| {
            image::Rgb([(x / 2) as u8, (y / 2) as u8, i * 60])
        });
        let mut jpg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpg), image::ImageFormat::Jpeg)
            .unwrap();
        std::fs::write(src.path().join(format!("a/{i}.jpg")), jpg).unwrap();
    }
    let mut stored = Vec::new();
    for format in [StoredFormat::Raw, StoredFormat::Jpeg] {
        let out = tempfile::tempdir().unwrap();
        let mut cfg = config(src.path(), out.path(), "");
        cfg.output.image_format = format;
        let s = run(&cfg, (0, 1)).await;
        assert_eq!((s.images_ok, s.rejected_total()), (3, 0), "{s}");
        let batch = read_columns(&uri(out.path(), "emb.lance"), &["image", "width", "emb"]).await;
        // The original size is recorded, not the drafted one.
        let widths = col::<arrow_array::UInt32Array>(&batch, 1);
        assert!(widths.values().iter().all(|&w| w == 512));
        let images = col::<arrow_array::BinaryArray>(&batch, 0);
        for row in 0..images.len() {
            let bytes = images.value(row);
            let magic: &[u8] = if format == StoredFormat::Raw {
                b"P6"
            } else {
                &[0xFF, 0xD8]
            };
            assert!(bytes.starts_with(magic), "{format:?}: {:02x?}", &bytes[..4]);
            let img = image::load_from_memory(bytes).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (16, 16));
            stored.push(img);
        }
    }
    // Raw is exact; JPEG at quality 90 stays near it on a smooth gradient.
    for (raw, jpeg) in stored[..3].iter().zip(&stored[3..]) {
        let worst = raw
            .as_raw()
            .iter()
            .zip(jpeg.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(worst <= 16, "JPEG stored image {worst} levels from raw");
    }

    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(src.path(), out.path(), "");
    cfg.output.jpeg_quality = 0;
    let err = embed_error(&cfg).await;
    assert!(err.contains("embed.output.jpeg_quality"), "{err}");
}
