//! Each reader on generated shards: records, keys, ids, and bad records with reasons.

use crate::fixtures::{bomb_png, parquet, png, tar};
use futures::TryStreamExt;
use knn_datasets::{
    decode_image, list_shards, read_shard, DatasetError, DecodeLimits, ListOptions, RawRecord,
    ReaderOptions, RejectReason, ShardFormat, SourceLocation, StorageConfig,
};
use object_store::{path::Path, ObjectStoreExt};
use std::collections::HashSet;

async fn put(loc: &SourceLocation, name: &str, bytes: Vec<u8>) {
    let path = Path::from(format!("{}/{name}", loc.prefix));
    loc.store.put(&path, bytes.into()).await.unwrap();
}

async fn read_all(loc: &SourceLocation, format: ShardFormat) -> Vec<RawRecord> {
    let mut out = Vec::new();
    for shard in list_shards(loc, format, &ListOptions::default())
        .await
        .unwrap()
    {
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
    let shards = list_shards(
        &loc,
        ShardFormat::Folder,
        &ListOptions {
            folder_shard_size: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
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
async fn folder_symlinks_out_of_the_source_are_refused_unless_allowed_and_dangling_ones_counted() {
    use std::os::unix::fs::symlink;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("pool.png"), png(4, 4, 1)).unwrap();
    std::fs::write(outside.path().join("secret.png"), b"root:x:0:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/real.png"), png(4, 4, 2)).unwrap();
    symlink(
        dir.path().join("d/real.png"),
        dir.path().join("d/inside.png"),
    )
    .unwrap();
    symlink(
        outside.path().join("pool.png"),
        dir.path().join("d/pool.png"),
    )
    .unwrap();
    symlink("/nonexistent/gone.png", dir.path().join("d/dangling.png")).unwrap();
    symlink(outside.path(), dir.path().join("d/farm")).unwrap();
    let loc =
        SourceLocation::open(dir.path().to_str().unwrap(), &StorageConfig::default()).unwrap();
    let read = |follow: bool| {
        let loc = loc.clone();
        async move {
            let opts = ListOptions {
                follow_symlinks: follow,
                ..Default::default()
            };
            let mut out: Vec<(String, String)> = Vec::new();
            for shard in list_shards(&loc, ShardFormat::Folder, &opts).await.unwrap() {
                let recs: Vec<RawRecord> = read_shard(&loc, &shard, &ReaderOptions::default())
                    .try_collect()
                    .await
                    .unwrap();
                for r in recs {
                    let code = match &r.payload {
                        Ok(bytes) => format!("row {}", bytes.len()),
                        Err(why) => format!("{} {}", why.code(), why.detail()),
                    };
                    out.push((r.key, code));
                }
            }
            out.sort();
            out
        }
    };
    let strict = read(false).await;
    let keys: Vec<(&str, &str)> = strict
        .iter()
        .map(|(k, c)| (k.as_str(), c.split(' ').next().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            ("d/dangling.png", "not_a_file"),
            ("d/farm", "unsafe_path"),
            ("d/inside.png", "row"),
            ("d/pool.png", "unsafe_path"),
            ("d/real.png", "row"),
        ]
    );
    let pool = &strict.iter().find(|(k, _)| k == "d/pool.png").unwrap().1;
    assert!(pool.contains("embed.source.follow_symlinks"), "{pool}");
    // Allowed, the farm's links are read as the user's records, under the link's name.
    let open = read(true).await;
    let keys: Vec<(&str, &str)> = open
        .iter()
        .map(|(k, c)| (k.as_str(), c.split(' ').next().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            ("d/dangling.png", "not_a_file"),
            ("d/farm/pool.png", "row"),
            ("d/farm/secret.png", "row"),
            ("d/inside.png", "row"),
            ("d/pool.png", "row"),
            ("d/real.png", "row"),
        ]
    );
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

/// A tar member written byte for byte, so names the `tar` crate's builder refuses (`..`,
/// absolute) and link members can be made.
fn raw_member(out: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
    let mut header = tar::Header::new_ustar();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    if kind.is_symlink() {
        header.set_link_name("/etc/passwd").unwrap();
    }
    header.set_cksum();
    out.append(&header, data).unwrap();
}

#[tokio::test]
async fn hostile_tar_members_are_refused_and_counted_never_read_or_dropped() {
    let loc = SourceLocation::open("memory://wds-hostile/", &StorageConfig::default()).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let file = tar::EntryType::Regular;
    raw_member(&mut b, "ok.png", file, &png(4, 4, 1));
    raw_member(&mut b, "../escape.png", file, &png(4, 4, 2));
    raw_member(&mut b, "/abs/evil.png", file, &png(4, 4, 3));
    raw_member(&mut b, "link.png", tar::EntryType::Symlink, &[]);
    raw_member(&mut b, "dup.png", file, &png(4, 4, 4));
    raw_member(&mut b, "dup.png", file, &png(4, 4, 5));
    raw_member(&mut b, "a.png", file, &png(4, 4, 6));
    raw_member(&mut b, "b.png", file, &png(4, 4, 7));
    raw_member(&mut b, "a.jpg", file, &png(4, 4, 8));
    put(&loc, "hostile.tar", b.into_inner().unwrap()).await;
    let recs = read_all(&loc, ShardFormat::WebDataset).await;
    let got: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| {
            let code = match &r.payload {
                Ok(_) => "row",
                Err(why) => why.code(),
            };
            (r.key.as_str(), code)
        })
        .collect();
    assert_eq!(
        got,
        [
            ("ok", "row"),
            ("../escape", "unsafe_path"),
            ("/abs/evil", "unsafe_path"),
            ("link", "not_a_file"),
            ("dup", "duplicate_key"),
            ("dup", "row"),
            ("a", "row"),
            ("b", "row"),
            ("a", "duplicate_key"),
        ]
    );
    // The first `dup.png` and the first `a` are the ones kept.
    let kept = |key: &str| {
        recs.iter()
            .find(|r| r.key == key && r.payload.is_ok())
            .unwrap()
    };
    assert_eq!(
        kept("dup").payload.as_ref().unwrap().as_ref(),
        png(4, 4, 4).as_slice()
    );
    assert_eq!(
        kept("a").payload.as_ref().unwrap().as_ref(),
        png(4, 4, 6).as_slice()
    );
    let reason = recs[3].payload.as_ref().unwrap_err().detail();
    assert!(reason.contains("symlink"), "{reason}");
    assert!(
        !reason.contains("root:"),
        "the link's target was read: {reason}"
    );
}

/// The records of the one shard under `loc`, with `embed.salvage_corrupt_shards` as given.
async fn read_only_shard(
    loc: &SourceLocation,
    format: ShardFormat,
    salvage: bool,
) -> Result<Vec<RawRecord>, DatasetError> {
    let shards = list_shards(loc, format, &ListOptions::default()).await?;
    assert_eq!(shards.len(), 1, "{shards:?}");
    let opts = ReaderOptions {
        salvage_corrupt_shards: salvage,
        parquet_batch_rows: 2,
        ..Default::default()
    };
    read_shard(loc, &shards[0], &opts).try_collect().await
}

fn keys(records: &[RawRecord]) -> Vec<&str> {
    records.iter().map(|r| r.key.as_str()).collect()
}

/// The last record: the one reject for the unread rest, with its detail.
fn rest_reject(records: &[RawRecord]) -> String {
    let last = records.last().expect("a record for the rest");
    let why = last.payload.as_ref().expect_err("the rest is a reject");
    assert_eq!(why.code(), "corrupt_shard", "{why:?}");
    why.detail()
}

#[tokio::test]
async fn a_truncated_tar_fails_its_shard_or_is_salvaged_up_to_the_cut() {
    let loc = SourceLocation::open("memory://wds-cut/", &StorageConfig::default()).unwrap();
    let full = tar(&[
        ("a.png", png(32, 32, 1)),
        ("b.png", png(32, 32, 2)),
        ("c.png", png(48, 48, 3)),
    ]);
    // Cut inside the last member (the archive ends with 1024 zero bytes).
    put(&loc, "cut.tar", full[..full.len() - 1124].to_vec()).await;

    match read_only_shard(&loc, ShardFormat::WebDataset, false).await {
        Err(DatasetError::CorruptShard { shard, .. }) => assert_eq!(shard, "cut.tar"),
        other => panic!("expected CorruptShard, got {other:?}"),
    }
    let got = read_only_shard(&loc, ShardFormat::WebDataset, true)
        .await
        .unwrap();
    assert_eq!(keys(&got), ["a", "b", "#unreadable-after-2"]);
    assert!(got[..2].iter().all(|r| r.payload.is_ok()));
    let detail = rest_reject(&got);
    assert!(detail.contains("first 2 records"), "{detail}");
    // The same file makes the same reject row: a rerun cannot add a second one.
    let again = read_only_shard(&loc, ShardFormat::WebDataset, true)
        .await
        .unwrap();
    assert_eq!(got.last().unwrap().id, again.last().unwrap().id);
}

#[tokio::test]
async fn a_parquet_file_with_a_bad_footer_or_page_is_salvaged_to_what_reads() {
    use parquet::file::metadata::ParquetMetaDataReader;
    let loc = SourceLocation::open("memory://pq-cut/", &StorageConfig::default()).unwrap();
    let rows: Vec<(String, Option<Vec<u8>>)> = (0..6)
        .map(|i| (format!("k{i}"), Some(png(6, 6, i as u8))))
        .collect();
    let borrowed: Vec<(&str, Option<Vec<u8>>)> =
        rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let good = parquet(&borrowed); // row groups of 3 rows

    // A footer that is not one: nothing reads, one reject stands for the whole file.
    let mut footer = good.clone();
    let n = footer.len();
    footer[n - 4..].copy_from_slice(b"XXXX");
    put(&loc, "footer.parquet", footer).await;
    assert!(matches!(
        read_only_shard(&loc, ShardFormat::Parquet, false).await,
        Err(DatasetError::CorruptShard { .. })
    ));
    let got = read_only_shard(&loc, ShardFormat::Parquet, true)
        .await
        .unwrap();
    assert_eq!(keys(&got), ["#unreadable-after-0"]);
    let detail = rest_reject(&got);
    assert!(detail.contains("parquet footer"), "{detail}");
    loc.store
        .delete(&Path::from(format!("{}/footer.parquet", loc.prefix)))
        .await
        .unwrap();

    // A broken page in the second row group: the first row group's rows are kept.
    let meta = ParquetMetaDataReader::new()
        .parse_and_finish(&bytes::Bytes::from(good.clone()))
        .unwrap();
    let page = meta.row_group(1).column(1).data_page_offset() as usize;
    let mut broken = good.clone();
    broken[page..page + 24].fill(0xff);
    put(&loc, "page.parquet", broken).await;
    let got = read_only_shard(&loc, ShardFormat::Parquet, true)
        .await
        .unwrap();
    assert_eq!(keys(&got), ["k0", "k1", "k2", "#unreadable-after-3"]);
}

#[tokio::test]
async fn a_connection_cut_in_the_middle_of_a_shard_is_a_store_error_never_salvaged() {
    let plain = SourceLocation::open("memory://wds-reset/", &StorageConfig::default()).unwrap();
    let full = tar(&[("a.png", png(32, 32, 1)), ("b.png", png(32, 32, 2))]);
    let size = full.len() as u64;
    put(&plain, "whole.tar", full).await;
    let loc = SourceLocation {
        store: std::sync::Arc::new(crate::cut_store::CutBodies {
            inner: plain.store.clone(),
            after: size / 2,
        }),
        ..plain.clone()
    };
    for salvage in [false, true] {
        match read_only_shard(&loc, ShardFormat::WebDataset, salvage).await {
            Err(e @ DatasetError::Store { .. }) => {
                let text = e.to_string();
                assert!(text.contains("whole.tar"), "{text}");
                assert!(text.contains("connection reset"), "{text}");
            }
            other => panic!("salvage {salvage}: expected a store error, got {other:?}"),
        }
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
async fn a_repeated_parquet_key_is_counted_once_as_a_row_and_once_as_a_reject() {
    let loc = SourceLocation::open("memory://pq-dup/", &StorageConfig::default()).unwrap();
    let rows = [
        ("k0", Some(png(5, 5, 0))),
        ("k1", Some(png(5, 5, 1))),
        ("k0", Some(png(5, 5, 2))),
    ];
    put(&loc, "part-00000.parquet", parquet(&rows)).await;
    let recs = read_all(&loc, ShardFormat::Parquet).await;
    let codes: Vec<&str> = recs
        .iter()
        .map(|r| r.payload.as_ref().map_or_else(|w| w.code(), |_| "row"))
        .collect();
    assert_eq!(codes, ["row", "row", "duplicate_key"]);
    assert_eq!(
        recs[0].payload.as_ref().unwrap().as_ref(),
        png(5, 5, 0).as_slice()
    );
}

#[test]
fn two_keys_with_one_id_are_a_collision_naming_both_never_a_merge() {
    // No two real keys are known to collide in 63 bits, so the ids here are forged.
    let record = |key: &str, id: u64, payload: Result<bytes::Bytes, RejectReason>| RawRecord {
        id,
        key: key.into(),
        shard: knn_datasets::ShardId::new("s.tar"),
        payload,
        text: Vec::new(),
    };
    let mut ids = knn_datasets::UniqueIds::default();
    let ok = || Ok(bytes::Bytes::from_static(b"x"));
    assert!(ids.admit(&record("cat", 7, ok())).is_ok());
    // A reject sharing the id is not a row, so it is admitted and does not take the id.
    assert!(ids
        .admit(&record("dog", 9, Err(RejectReason::Empty)))
        .is_ok());
    assert!(ids.admit(&record("dog", 9, ok())).is_ok());
    let why = ids.admit(&record("bird", 7, ok())).unwrap_err();
    assert_eq!(why.code(), "id_collision");
    assert!(
        why.detail().contains("`cat`") && why.detail().contains("`bird`"),
        "{}",
        why.detail()
    );
    assert_eq!(
        ids.admit(&record("cat", 7, ok())).unwrap_err().code(),
        "duplicate_key"
    );
}

#[tokio::test]
async fn parquet_missing_column_names_the_config_key() {
    let loc = SourceLocation::open("memory://pq-col/", &StorageConfig::default()).unwrap();
    put(&loc, "p.parquet", parquet(&[("k", Some(png(2, 2, 0)))])).await;
    let shard = list_shards(&loc, ShardFormat::Parquet, &ListOptions::default())
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
