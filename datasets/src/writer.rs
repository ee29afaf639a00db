//! Writing img2dataset-layout parquet shards to any store URL: one row per image with `key`,
//! the encoded image (`png`), `caption`, `license`, `source`, `width` and `height`, in shards
//! of a fixed number of rows named `part-00000.parquet`, … The readers of this crate read
//! them back as a `parquet` source (`image_column = "png"`, text column `caption`).
//!
//! A shard is one `put` of a whole file, so a reader never sees half of one. The writer
//! records what it wrote in `_manifest.json`, put last: a set whose manifest exists is
//! complete, and a rerun that finds it does nothing.

use crate::{DatasetError, Result, SourceLocation};
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The manifest a complete set of shards ends with.
pub const MANIFEST: &str = "_manifest.json";

/// One captioned image, ready to be written.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptionedImage {
    /// Unique within the set; its stem decides the held-out split ([`crate::split`]).
    pub key: String,
    /// PNG bytes.
    pub png: Vec<u8>,
    /// The text describing the image.
    pub caption: String,
    /// The image's license (SPDX id where there is one).
    pub license: String,
    /// Where it came from (package and version).
    pub source: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// `_manifest.json`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ShardManifest {
    /// What the shards hold (a package and version).
    pub source: String,
    /// Shard file names, in order.
    pub shards: Vec<String>,
    /// Rows in all.
    pub rows: u64,
}

/// The schema of the shards.
pub fn captioned_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("png", DataType::Binary, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("license", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
    ]))
}

/// Reads `_manifest.json` under `loc`, or `None` when the set is not complete there.
pub async fn read_manifest(loc: &SourceLocation) -> Result<Option<ShardManifest>> {
    let path = loc.prefix.clone().join(MANIFEST);
    match loc.store.get(&path).await {
        Ok(got) => {
            let bytes = got
                .bytes()
                .await
                .map_err(|e| DatasetError::from_store(loc.url_of(&path), e))?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| DatasetError::CorruptShard {
                    shard: loc.url_of(&path),
                    reason: format!("unreadable manifest: {e}"),
                })
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(DatasetError::from_store(loc.url_of(&path), e)),
    }
}

/// Writes `records` as shards of `rows_per_shard` rows under `loc`, then the manifest.
pub async fn write_shards(
    loc: &SourceLocation,
    records: &[CaptionedImage],
    rows_per_shard: usize,
    source: &str,
) -> Result<ShardManifest> {
    let mut manifest = ShardManifest {
        source: source.to_string(),
        ..Default::default()
    };
    for (i, chunk) in records.chunks(rows_per_shard.max(1)).enumerate() {
        let name = format!("part-{i:05}.parquet");
        let path = loc.prefix.clone().join(name.as_str());
        let bytes = encode_shard(chunk).map_err(|e| DatasetError::CorruptShard {
            shard: loc.url_of(&path),
            reason: format!("cannot encode: {e}"),
        })?;
        loc.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| DatasetError::from_store(loc.url_of(&path), e))?;
        manifest.shards.push(name);
        manifest.rows += chunk.len() as u64;
    }
    let path = loc.prefix.clone().join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    loc.store
        .put(&path, PutPayload::from(json))
        .await
        .map_err(|e| DatasetError::from_store(loc.url_of(&path), e))?;
    Ok(manifest)
}

/// One shard's parquet bytes.
fn encode_shard(rows: &[CaptionedImage]) -> std::result::Result<Vec<u8>, String> {
    let strings = |f: fn(&CaptionedImage) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(|r| &r.key),
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.png.as_slice()),
        )),
        strings(|r| &r.caption),
        strings(|r| &r.license),
        strings(|r| &r.source),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.width))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.height))),
    ];
    let batch = RecordBatch::try_new(captioned_schema(), columns).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // Small row groups: a reader's range requests fetch a few hundred images at a time.
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(256))
        .build();
    let mut writer = ArrowWriter::try_new(&mut out, captioned_schema(), Some(props))
        .map_err(|e| e.to_string())?;
    writer.write(&batch).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(out)
}
