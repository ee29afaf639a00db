//! Generated test inputs: images, broken images, and shards in each format.

use arrow_array::{BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use std::io::Cursor;
use std::sync::Arc;

/// A PNG of `w` x `h` with a pattern that depends on `seed`.
pub fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(3) ^ seed,
            (y as u8).wrapping_add(seed),
            seed,
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A PNG whose header claims `w` x `h` pixels but which holds almost no data: a
/// decompression bomb as far as any decoder trusting the header is concerned.
pub fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = png(1, 1, 0);
    // IHDR data starts at 16: width (4 bytes BE), height (4 bytes BE); CRC follows the 13
    // data bytes and covers the chunk type and data.
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// A WebDataset tar of `(member name, bytes)` in order.
pub fn tar(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

/// An img2dataset-style parquet file with `key` and `jpg` columns (None = null image).
pub fn parquet(rows: &[(&str, Option<Vec<u8>>)]) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("jpg", DataType::Binary, true),
        Field::new("caption", DataType::Utf8, true),
    ]));
    let keys = StringArray::from_iter_values(rows.iter().map(|r| r.0));
    let imgs = BinaryArray::from_iter(rows.iter().map(|r| r.1.as_deref()));
    let captions = StringArray::from_iter(rows.iter().map(|_| Some("ignored")));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(keys), Arc::new(imgs), Arc::new(captions)],
    )
    .unwrap();
    let mut out = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(3))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}
