//! Hostile and malformed input, generated (proptest): whatever the bytes, the decoder and
//! the three readers give a record, a reject or an error, never a panic, and a decoded
//! image never exceeds the pixel limit. Cases per property: `FUZZ_CASES` (default 256;
//! the closing notes record longer runs).

use crate::fixtures::{parquet, png, tar};
use futures::StreamExt;
use knn_datasets::{
    decode_image, list_shards, read_shard, DecodeLimits, ListOptions, ReaderOptions, ShardFormat,
    SourceLocation, StorageConfig,
};
use object_store::{path::Path, ObjectStoreExt};
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").map_or(256, |v| v.parse().expect("FUZZ_CASES: a number"))
}

fn limits() -> DecodeLimits {
    DecodeLimits {
        max_pixels: 4096,
        max_bytes: 1 << 20,
        ..DecodeLimits::default()
    }
}

/// `base` with `edits` applied: (position, byte) overwrites, then a cut at `cut` (a
/// fraction of the length; 1.0 keeps it whole).
fn mutate(base: &[u8], edits: &[(usize, u8)], cut: f64) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(at, byte) in edits {
        if !b.is_empty() {
            let i = at % b.len();
            b[i] = byte;
        }
    }
    b.truncate((b.len() as f64 * cut.clamp(0.0, 1.0)).ceil() as usize);
    b
}

/// Decodes `bytes` and checks the limit held.
fn decode_checked(bytes: &[u8]) {
    if let Ok(img) = decode_image(bytes, &limits()) {
        assert!(u64::from(img.width) * u64::from(img.height) <= limits().max_pixels);
    }
}

/// Reads every shard of `format` that `name` (holding `bytes`) makes, decoding what it
/// yields: every item is a record or an error.
fn read_shard_bytes(format: ShardFormat, name: &str, bytes: Vec<u8>) -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("memory://fuzz-{}/src/", N.fetch_add(1, Ordering::Relaxed));
        let loc = SourceLocation::open(&url, &StorageConfig::default()).unwrap();
        let path = Path::from(format!("{}/{name}", loc.prefix));
        loc.store.put(&path, bytes.into()).await.unwrap();
        let Ok(shards) = list_shards(&loc, format, &ListOptions::default()).await else {
            return 0;
        };
        let mut items = 0;
        for shard in shards {
            let mut s = read_shard(&loc, &shard, &ReaderOptions::default());
            while let Some(item) = s.next().await {
                items += 1;
                if let Ok(rec) = item {
                    if let Ok(b) = &rec.payload {
                        decode_checked(b);
                    }
                }
            }
        }
        items
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_or_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_checked(&bytes);
    }

    #[test]
    fn mutated_images_decode_or_are_rejected(
        seed in any::<u8>(),
        side in 1u32..80,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..12),
        cut in 0.0f64..1.2,
    ) {
        let base = png(side, side.div_ceil(2), seed);
        decode_checked(&mutate(&base, &edits, cut));
        let mut jpeg = Vec::new();
        let img = image::load_from_memory(&base).unwrap().to_rgb8();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode_image(&img).unwrap();
        decode_checked(&mutate(&jpeg, &edits, cut));
    }

    #[test]
    fn mutated_tars_give_records_or_errors(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16),
        cut in 0.0f64..1.2,
        names in proptest::collection::vec("[a-z]{1,6}(/[a-z]{1,4})?\\.(png|jpg|txt|json)", 1..4),
    ) {
        let members: Vec<(&str, Vec<u8>)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), png(4 + i as u32, 4, i as u8)))
            .collect();
        let bytes = mutate(&tar(&members), &edits, cut);
        let items = read_shard_bytes(ShardFormat::WebDataset, "shard-0000.tar", bytes);
        if edits.is_empty() && cut >= 1.0 {
            prop_assert!(items >= 1, "an intact tar gave nothing");
        }
    }

    #[test]
    fn mutated_parquet_gives_records_or_errors(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16),
        cut in 0.0f64..1.2,
        rows in 1usize..6,
    ) {
        let keys: Vec<String> = (0..rows).map(|i| format!("k{i}")).collect();
        let data: Vec<(&str, Option<Vec<u8>>)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), (i % 3 != 2).then(|| png(6, 5, i as u8))))
            .collect();
        let bytes = mutate(&parquet(&data), &edits, cut);
        let items = read_shard_bytes(ShardFormat::Parquet, "part-0.parquet", bytes);
        if edits.is_empty() && cut >= 1.0 {
            prop_assert_eq!(items, rows, "an intact file gives every row");
        }
    }
}
