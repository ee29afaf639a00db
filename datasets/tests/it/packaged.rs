//! `data fetch` on small packages laid out as the real ones (emoji.json and PNGs; openmoji's
//! CSV and SVGs), placed in the cache so nothing is downloaded: the shards it writes read
//! back through the parquet reader with their captions, bad files are counted and named, and
//! a second run finds the set complete.

use crate::fixtures::png;
use futures::TryStreamExt;
use knn_datasets::packaged::{fetch, FetchOptions, PackagedSet};
use knn_datasets::{
    list_shards, read_shard, ListOptions, RawRecord, ReaderOptions, ShardFormat, SourceLocation,
    StorageConfig, TextColumn,
};

/// A gzipped tar with these members.
fn tgz(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, path, data.as_slice()).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    gz.finish().unwrap()
}

async fn read_back(dir: &std::path::Path) -> Vec<RawRecord> {
    let loc = SourceLocation::open(dir.to_str().unwrap(), &StorageConfig::default()).unwrap();
    let opts = ReaderOptions {
        image_column: "png".into(),
        text_columns: vec![TextColumn {
            name: "caption".into(),
            config_key: "caption".into(),
        }],
        ..Default::default()
    };
    let mut out = Vec::new();
    for shard in list_shards(&loc, ShardFormat::Parquet, &ListOptions::default())
        .await
        .unwrap()
    {
        let recs: Vec<RawRecord> = read_shard(&loc, &shard, &opts).try_collect().await.unwrap();
        out.extend(recs);
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[tokio::test]
async fn twitter_shards_carry_captions_and_count_what_they_leave_out() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let json = br#"[
      {"name":"HEAVY BLACK HEART","image":"2764-fe0f.png","short_names":["heart"],"has_img_twitter":true},
      {"name":"WAVING HAND SIGN","image":"1f44b.png","short_names":["wave"],"has_img_twitter":true,
       "skin_variations":{"1F3FB":{"image":"1f44b-1f3fb.png","has_img_twitter":true}}}]"#;
    let pkg = tgz(&[
        ("package/emoji.json", json.to_vec()),
        ("package/img/twitter/64/2764-fe0f.png", png(64, 64, 1)),
        ("package/img/twitter/64/1f44b.png", png(64, 64, 2)),
        (
            "package/img/twitter/64/1f44b-1f3fb.png",
            b"not a png".to_vec(),
        ),
        ("package/img/twitter/64/1f600.png", png(64, 64, 3)),
        ("package/img/twitter/32/1f600.png", png(32, 32, 3)),
    ]);
    std::fs::write(cache.join("emoji-datasource-twitter-16.0.0.tgz"), pkg).unwrap();
    // Twitter's captions start with the CLDR names OpenMoji's CSV gives.
    let csv = "emoji,hexcode,group,subgroups,annotation,tags\n❤️,2764,smileys-emotion,heart,red heart,\"heart, love\"\n";
    let om = tgz(&[("package/data/openmoji.csv", csv.as_bytes().to_vec())]);
    std::fs::write(cache.join("openmoji-17.0.0.tgz"), om).unwrap();
    let out = dir.path().join("out");
    let opts = FetchOptions {
        out: out.to_string_lossy().into_owned(),
        cache_dir: cache.clone(),
        rows_per_shard: 1,
        max_side_px: 32,
    };
    let s = fetch(PackagedSet::Twitter, &opts, &StorageConfig::default())
        .await
        .unwrap();
    assert_eq!((s.rows, s.shards, s.already_complete), (2, 2, false));
    let rejected: u64 = s.rejected.values().sum();
    assert_eq!(rejected, 2, "{:?}", s.rejected);
    let keys: Vec<&str> = s.reject_examples.iter().map(|r| r.0.as_str()).collect();
    assert!(
        keys.contains(&"1f44b-1f3fb") && keys.contains(&"1f600"),
        "{keys:?}"
    );

    let recs = read_back(&out).await;
    let got: Vec<(&str, Option<&str>)> = recs
        .iter()
        .map(|r| (r.key.as_str(), r.text[0].as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("1f44b", Some("waving hand sign, wave")),
            ("2764-fe0f", Some("red heart, heavy black heart"))
        ]
    );
    // Shrunk to the longer side asked for, alpha kept.
    let img = image::load_from_memory(recs[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    assert!(img.color().has_alpha());

    let again = fetch(PackagedSet::Twitter, &opts, &StorageConfig::default())
        .await
        .unwrap();
    assert!(again.already_complete);
    assert_eq!(again.rows, 2);
}

#[tokio::test]
async fn openmoji_svgs_are_rasterised_with_csv_captions() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let csv = "emoji,hexcode,group,subgroups,annotation,tags\n\
               ❤️,2764,smileys-emotion,heart,red heart,\"emotion, heart, love, red\"\n\
               😺,1F63A,smileys-emotion,cat-face,grinning cat,\"animal, cat, face\"\n";
    let red = br##"<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><rect x="0" y="0" width="72" height="36" fill="#FF0000"/></svg>"##;
    let pkg = tgz(&[
        ("package/data/openmoji.csv", csv.as_bytes().to_vec()),
        ("package/color/svg/2764.svg", red.to_vec()),
        ("package/color/svg/1F63A.svg", b"<svg broken".to_vec()),
        ("package/black/svg/2764.svg", red.to_vec()),
    ]);
    std::fs::write(cache.join("openmoji-17.0.0.tgz"), pkg).unwrap();
    let out = dir.path().join("out");
    let opts = FetchOptions {
        out: out.to_string_lossy().into_owned(),
        cache_dir: cache,
        rows_per_shard: 100,
        max_side_px: 48,
    };
    let s = fetch(PackagedSet::Openmoji, &opts, &StorageConfig::default())
        .await
        .unwrap();
    assert_eq!(s.rows, 1);
    assert_eq!(s.reject_examples[0].0, "1f63a");
    let recs = read_back(&out).await;
    assert_eq!(recs[0].key, "2764");
    assert_eq!(recs[0].text[0].as_deref(), Some("red heart, emotion, love"));
    let img = image::load_from_memory(recs[0].payload.as_ref().unwrap())
        .unwrap()
        .to_rgba8();
    assert_eq!(img.dimensions(), (48, 48));
    // Top half drawn red and opaque, bottom half transparent.
    assert_eq!(img.get_pixel(24, 10).0, [255, 0, 0, 255]);
    assert_eq!(img.get_pixel(24, 40).0[3], 0);
}
