//! Generated test inputs: images, broken images, and shards in each format.

use arrow_array::{BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use std::sync::Arc;

pub use crate::images::{bomb_png, png, tar};

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
