//! Small real tables for training tests: an embed-stage table of generated 16 px images with
//! distinct unit embeddings, and its precompute-knn output made by the real stage.

use arrow_array::builder::{
    BinaryBuilder, FixedSizeListBuilder, Float32Builder, StringBuilder, UInt32Builder,
    UInt64Builder,
};
use arrow_array::RecordBatch;
use knn_datasets::StorageConfig;
use knn_indexer::knn::{precompute_knn, KnnConfig, KnnProgress};
use knn_indexer::table::embeddings_schema;
use std::sync::Arc;

/// Side of the generated images.
pub const SIDE: u32 = 16;
/// Embedding dimension.
pub const DIM: usize = 16;

/// Image `i`: a two-colour pattern (halves, a centred square or a diagonal) in colours that
/// differ per image.
pub fn image(i: usize) -> image::RgbImage {
    let palette = [
        [230u8, 40, 40],
        [40, 200, 60],
        [40, 80, 230],
        [240, 220, 40],
        [200, 60, 220],
        [30, 220, 220],
        [250, 250, 250],
        [20, 20, 20],
    ];
    let a = palette[i % 8];
    let b = palette[(i * 3 + 5) % 8];
    image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let on = match i % 4 {
            0 => x < SIDE / 2,
            1 => y < SIDE / 2,
            2 => (4..12).contains(&x) && (4..12).contains(&y),
            _ => x + y < SIDE,
        };
        image::Rgb(if on { a } else { b })
    })
}

/// Embedding of image `i`: a fixed random unit vector.
pub fn embedding(i: usize) -> Vec<f32> {
    let mut s = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut v: Vec<f32> = (0..DIM)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// Writes `n` rows (ids 100 + i) to `<dir>/emb.lance` and runs precompute-knn with `k`.
/// Returns (embeddings URI, kNN URI).
pub async fn tables(dir: &std::path::Path, n: usize, k: usize) -> (String, String) {
    tables_with(dir, n, k, "").await
}

/// [`tables`] with more `[knn]` settings (TOML lines), e.g. a held-out split.
pub async fn tables_with(
    dir: &std::path::Path,
    n: usize,
    k: usize,
    knn_settings: &str,
) -> (String, String) {
    let uri = dir.join("emb.lance").to_string_lossy().to_string();
    let schema = embeddings_schema(DIM as i32, "test");
    let (mut id, mut key, mut shard, mut img, mut w, mut h) = (
        UInt64Builder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        BinaryBuilder::new(),
        UInt32Builder::new(),
        UInt32Builder::new(),
    );
    let mut emb =
        FixedSizeListBuilder::new(Float32Builder::new(), DIM as i32).with_field(Arc::new(
            arrow_schema::Field::new("item", arrow_schema::DataType::Float32, true),
        ));
    for i in 0..n {
        id.append_value(100 + i as u64);
        key.append_value(format!("img-{i}.png"));
        shard.append_value("s0");
        let mut png = Vec::new();
        image(i)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        img.append_value(&png);
        w.append_value(SIDE);
        h.append_value(SIDE);
        emb.values().append_slice(&embedding(i));
        emb.append(true);
    }
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(id.finish()),
            Arc::new(key.finish()),
            Arc::new(shard.finish()),
            Arc::new(img.finish()),
            Arc::new(w.finish()),
            Arc::new(h.finish()),
            Arc::new(emb.finish()),
        ],
    )
    .unwrap();
    let reader = arrow_array::RecordBatchIterator::new(vec![Ok(batch)], schema);
    lance::Dataset::write(reader, &uri, None).await.unwrap();
    let cfg: KnnConfig =
        toml::from_str(&format!("table = {uri:?}\nk = {k}\n{knn_settings}")).unwrap();
    precompute_knn(
        &cfg,
        &StorageConfig::default(),
        (0, 1),
        Arc::new(KnnProgress::default()),
    )
    .await
    .unwrap();
    let knn = cfg.output_uri().unwrap();
    (uri, knn)
}
