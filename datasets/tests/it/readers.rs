//! Each reader on generated shards: records, keys, ids, and bad records with reasons.

use crate::fixtures::{bomb_png, parquet, png, tar};
use futures::TryStreamExt;
use knn_datasets::{
    decode_image, list_shards, read_shard, DatasetError, DecodeLimits, RawRecord, ReaderOptions,
    RejectReason, ShardFormat, SourceLocation, StorageConfig,
};
use object_store::{path::Path, ObjectStoreExt};
use std::collections::HashSet;

async fn put(loc: &SourceLocation, name: &str, bytes: Vec<u8>) {
    let path = Path::from(format!("{}/{name}", loc.prefix));
    loc.store.put(&path, bytes.into()).await.unwrap();
}

async fn read_all(loc: &SourceLocation, format: ShardFormat) -> Vec<RawRecord> {
    let mut out = Vec::new();
    for shard in list_shards(loc, format, 1000).await.unwrap() {
        let recs: Vec<RawRecord> = read_shard(loc, &shard, &ReaderOptions::default())
            .try_collect()
            .await
            .unwrap();
        out.extend(recs);
    }
    out
}

#[tokio::test]
async fn folder_shards_split_directories_and_keep_every_file() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["a", "b/c"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    for i in 0..5 {
        std::fs::write(dir.path().join(format!("a/{i}.png")), png(8, 8, i)).unwrap();
    }
    std::fs::write(dir.path().join("b/c/x.PNG"), png(4, 4, 9)).unwrap();
    std::fs::write(dir.path().join("b/c/notes.txt"), b"not listed").unwrap();
    let loc =
        SourceLocation::open(dir.path().to_str().unwrap(), &StorageConfig::default()).unwrap();
    let shards = list_shards(&loc, ShardFormat::Folder, 2).await.unwrap();
    let ids: Vec<&str> = shards.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a/@00000", "a/@00001", "a/@00002", "b/c/@00000"]);
    let recs = read_all(&loc, ShardFormat::Folder).await;
    assert_eq!(recs.len(), 6);
    let keys: Vec<&str> = recs.iter().map(|r| r.key.as_str()).collect();
    assert!(
        keys.contains(&"a/0.png") && keys.contains(&"b/c/x.PNG"),
        "{keys:?}"
    );
    let first = recs.iter().find(|r| r.key == "a/3.png").unwrap();
    assert_eq!(
        first.payload.as_ref().unwrap().as_ref(),
        png(8, 8, 3).as_slice()
    );
    let unique: HashSet<u64> = recs.iter().map(|r| r.id).collect();
    assert_eq!(unique.len(), 6);
}

#[tokio::test]
async fn webdataset_groups_members_by_key() {
    let loc = SourceLocation::open("memory://wds/shards/", &StorageConfig::default()).unwrap();
    let shard = tar(&[
        ("000001.png", png(6, 6, 1)),
        ("000001.txt", b"a cat".to_vec()),
        ("000002.json", b"{}".to_vec()),
        ("000002.jpg", b"definitely not a jpeg".to_vec()),
        ("000003.txt", b"caption without image".to_vec()),
        ("sub/000004.webp", Vec::new()),
    ]);
    put(&loc, "00000.tar", shard).await;
    let recs = read_all(&loc, ShardFormat::WebDataset).await;
    let keys: Vec<&str> = recs.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["000001", "000002", "000003", "sub/000004"]);
    assert_eq!(
        recs[0].payload.as_ref().unwrap().as_ref(),
        png(6, 6, 1).as_slice()
    );
    assert_eq!(
        recs[1].payload.as_ref().unwrap().as_ref(),
        b"definitely not a jpeg"
    );
    assert!(matches!(recs[2].payload, Err(RejectReason::NoImage { .. })));
    assert!(recs[3].payload.as_ref().unwrap().is_empty());
    assert!(recs.iter().all(|r| r.shard.as_str() == "00000.tar"));
}

#[tokio::test]
async fn truncated_tar_fails_the_shard_by_name() {
    let loc = SourceLocation::open("memory://wds-cut/", &StorageConfig::default()).unwrap();
    let full = tar(&[("a.png", png(32, 32, 1)), ("b.png", png(32, 32, 2))]);
    put(&loc, "cut.tar", full[..full.len() - 1800].to_vec()).await;
    let shard = list_shards(&loc, ShardFormat::WebDataset, 1)
        .await
        .unwrap()
        .remove(0);
    let got: Result<Vec<RawRecord>, _> = read_shard(&loc, &shard, &ReaderOptions::default())
        .try_collect()
        .await;
    match got {
        Err(DatasetError::CorruptShard { shard, .. }) => assert_eq!(shard, "cut.tar"),
        other => panic!("expected CorruptShard, got {other:?}"),
    }
}

#[tokio::test]
async fn parquet_reads_key_and_image_columns() {
    let loc = SourceLocation::open("memory://pq/", &StorageConfig::default()).unwrap();
    let rows: Vec<(String, Option<Vec<u8>>)> = (0..7)
        .map(|i| (format!("k{i}"), (i != 4).then(|| png(5, 5, i as u8))))
        .collect();
    let borrowed: Vec<(&str, Option<Vec<u8>>)> =
        rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    put(&loc, "part-00000.parquet", parquet(&borrowed)).await;
    put(&loc, "_SUCCESS", Vec::new()).await;
    let recs = read_all(&loc, ShardFormat::Parquet).await;
    assert_eq!(recs.len(), 7);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.key, format!("k{i}"));
        if i == 4 {
            assert!(matches!(r.payload, Err(RejectReason::NoImage { .. })));
        } else {
            assert_eq!(
                r.payload.as_ref().unwrap().as_ref(),
                png(5, 5, i as u8).as_slice()
            );
        }
    }
}

#[tokio::test]
async fn parquet_missing_column_names_the_config_key() {
    let loc = SourceLocation::open("memory://pq-col/", &StorageConfig::default()).unwrap();
    put(&loc, "p.parquet", parquet(&[("k", Some(png(2, 2, 0)))])).await;
    let shard = list_shards(&loc, ShardFormat::Parquet, 1)
        .await
        .unwrap()
        .remove(0);
    let opts = ReaderOptions {
        image_column: "image".into(),
        ..Default::default()
    };
    let err = read_shard(&loc, &shard, &opts)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DatasetError::MissingColumn { column, key, .. } if column == "image" && key == "embed.source.image_column"),
        "{err}"
    );
    assert!(
        err.to_string().contains("jpg"),
        "lists available columns: {err}"
    );
}

#[test]
fn bombs_are_refused_from_the_header() {
    let bomb = bomb_png(100_000, 100_000);
    let started = std::time::Instant::now();
    let err = decode_image(&bomb, &DecodeLimits::default()).unwrap_err();
    assert_eq!(
        err,
        RejectReason::TooManyPixels {
            width: 100_000,
            height: 100_000,
            max_pixels: DecodeLimits::default().max_pixels
        }
    );
    // A 10-gigapixel buffer was never allocated (that alone would take seconds).
    assert!(started.elapsed().as_secs() < 2);
}

#[test]
fn every_bad_input_has_a_reason() {
    let limits = DecodeLimits::default();
    let good = png(40, 30, 5);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (Vec::new(), "empty"),
        (good[..8].to_vec(), "truncated"),
        (b"plain text".to_vec(), "not_an_image"),
        (good[..good.len() / 3].to_vec(), "truncated"),
    ];
    for (bytes, want) in cases {
        let err = decode_image(&bytes, &limits).unwrap_err();
        assert!(
            err.code() == want || (want == "truncated" && err.code() == "corrupt"),
            "{want}: got {err:?}"
        );
    }
    let img = decode_image(&good, &limits).unwrap();
    assert_eq!((img.width, img.height), (40, 30));
}

#[test]
fn a_missing_local_source_is_named() {
    let err = SourceLocation::open("/definitely/not/here/", &StorageConfig::default()).unwrap_err();
    assert!(matches!(err, DatasetError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("/definitely/not/here"), "{err}");
}
