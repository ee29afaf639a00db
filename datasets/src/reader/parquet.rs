//! img2dataset-style parquet shards: one row per record, a binary image column and a key
//! column. Only those two columns are read, `parquet_batch_rows` rows at a time, through
//! range requests against the object store.

use super::{ReaderOptions, StoreFault};
use crate::{DatasetError, RawRecord, RejectReason, Result, Shard, ShardId, SourceLocation};
use arrow_array::{cast::AsArray, Array, RecordBatch};
use arrow_schema::DataType;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::{path::Path, ObjectStore};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::arrow::ProjectionMask;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use std::ops::Range;
use std::sync::Arc;

/// An [`AsyncFileReader`] over our object store (parquet's own targets another
/// object_store release).
struct StoreFile {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    /// The object's URL, for a store error.
    url: String,
    fault: StoreFault,
}

impl AsyncFileReader for StoreFile {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        Box::pin(async move {
            let opts = object_store::GetOptions {
                range: Some(range.into()),
                ..Default::default()
            };
            let fault = |e| ParquetError::General(self.fault.keep(&self.url, e));
            let got = self.store.get_opts(&self.path, opts).await.map_err(fault)?;
            got.bytes().await.map_err(fault)
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let meta = ParquetMetaDataReader::new()
                .load_and_finish(self, size)
                .await?;
            check_chunks(&meta, size)?;
            Ok(Arc::new(meta))
        })
    }
}

/// Refuses a footer whose column chunks lie outside the file: parquet's reader asserts
/// (panics) on a negative offset or length, and a footer is only as sound as its bytes.
fn check_chunks(meta: &ParquetMetaData, file_bytes: u64) -> parquet::errors::Result<()> {
    for (g, group) in meta.row_groups().iter().enumerate() {
        for (c, col) in group.columns().iter().enumerate() {
            let start = col
                .dictionary_page_offset()
                .unwrap_or(col.data_page_offset());
            let len = col.compressed_size();
            let inside = start >= 0
                && len >= 0
                && (start as u64)
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= file_bytes);
            if !inside {
                return Err(ParquetError::General(format!(
                    "column chunk {c} of row group {g} lies outside the file (offset {start}, \
                     length {len}, file {file_bytes} bytes)"
                )));
            }
        }
    }
    Ok(())
}

/// Opens `shard`'s parquet file: its footer read, no rows yet. A store error on the way is
/// kept in `fault`.
async fn open(
    loc: &SourceLocation,
    shard: &Shard,
    fault: &StoreFault,
) -> Result<ParquetRecordBatchStreamBuilder<StoreFile>> {
    let meta = shard
        .objects
        .first()
        .cloned()
        .ok_or_else(|| DatasetError::CorruptShard {
            shard: shard.id.to_string(),
            reason: "no object".into(),
        })?;
    let file = StoreFile {
        store: loc.store.clone(),
        url: loc.url_of(&meta.location),
        path: meta.location.clone(),
        size: meta.size,
        fault: fault.clone(),
    };
    use futures::FutureExt;
    // The footer's embedded Arrow schema is decoded with asserts too (the fuzz tests found
    // panics in arrow-ipc on a malformed one).
    let built = std::panic::AssertUnwindSafe(ParquetRecordBatchStreamBuilder::new(file))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(decoder_panic(panic)));
    built.map_err(|e| {
        fault.explain(DatasetError::CorruptShard {
            shard: shard.id.to_string(),
            reason: format!("cannot read parquet footer: {e}"),
        })
    })
}

/// A panic of the parquet or Arrow decoder on malformed data, as an error.
fn decoder_panic(panic: Box<dyn std::any::Any + Send>) -> ParquetError {
    let why = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    ParquetError::General(format!("the decoder failed on malformed data: {why}"))
}

/// The Arrow schema of `shard` (from its footer alone).
pub(super) async fn schema(loc: &SourceLocation, shard: &Shard) -> Result<arrow_schema::SchemaRef> {
    Ok(open(loc, shard, &StoreFault::default())
        .await?
        .schema()
        .clone())
}

pub(super) fn read(
    loc: SourceLocation,
    shard: Shard,
    opts: ReaderOptions,
) -> BoxStream<'static, Result<RawRecord>> {
    let fault = StoreFault::default();
    let opened = async move {
        let corrupt = |reason: String| DatasetError::CorruptShard {
            shard: shard.id.to_string(),
            reason,
        };
        let builder = open(&loc, &shard, &fault).await?;
        let schema = builder.schema().clone();
        let index_of = |column: &str, key: String| {
            schema
                .index_of(column)
                .map_err(|_| DatasetError::missing_column(&shard.id, column, &schema, key))
        };
        let mut roots = vec![index_of(
            &opts.image_column,
            format!("{}.image_column", opts.config_prefix),
        )?];
        if let Some(k) = &opts.key_column {
            roots.push(index_of(k, format!("{}.key_column", opts.config_prefix))?);
        }
        for t in &opts.text_columns {
            roots.push(index_of(&t.name, t.config_key.clone())?);
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let build = || {
            builder
                .with_projection(mask)
                .with_batch_size(opts.parquet_batch_rows.max(1))
                .build()
        };
        let batches = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
            .unwrap_or_else(|panic| Err(decoder_panic(panic)))
            .map_err(|e| fault.explain(corrupt(e.to_string())))?;
        Ok::<_, DatasetError>((batches, shard.id, opts, fault))
    };
    stream::once(opened)
        .flat_map(|opened| match opened {
            Err(e) => stream::once(async move { Err(e) }).boxed(),
            Ok((batches, shard_id, opts, fault)) => {
                let mut row_base = 0usize;
                unpanicked(batches)
                    .flat_map(move |batch| {
                        let out: Vec<Result<RawRecord>> = match batch {
                            Err(e) => vec![Err(fault.explain(DatasetError::CorruptShard {
                                shard: shard_id.to_string(),
                                reason: format!("after {row_base} rows: {e}"),
                            }))],
                            Ok(b) => {
                                let recs = rows(&b, &shard_id, &opts, row_base);
                                row_base += b.num_rows();
                                recs
                            }
                        };
                        stream::iter(out)
                    })
                    .boxed()
            }
        })
        .boxed()
}

/// `batches`, with a panic of the parquet decoder (it asserts on some malformed pages and
/// headers, as the fuzz tests found) turned into an error that ends the stream: the shard is
/// then corrupt after the rows read, like a file cut short.
fn unpanicked<S>(batches: S) -> impl futures::Stream<Item = parquet::errors::Result<RecordBatch>>
where
    S: futures::Stream<Item = parquet::errors::Result<RecordBatch>> + Send + 'static,
{
    use futures::FutureExt;
    stream::unfold(Some(Box::pin(batches)), |state| async move {
        let mut s = state?;
        match std::panic::AssertUnwindSafe(s.next()).catch_unwind().await {
            Ok(Some(item)) => Some((item, Some(s))),
            Ok(None) => None,
            Err(panic) => Some((Err(decoder_panic(panic)), None)),
        }
    })
}

/// Converts one record batch (projected to image[, key]) into records.
fn rows(
    batch: &RecordBatch,
    shard: &ShardId,
    opts: &ReaderOptions,
    row_base: usize,
) -> Vec<Result<RawRecord>> {
    let schema = batch.schema();
    let col = |name: &str| schema.index_of(name).ok().map(|i| batch.column(i).clone());
    let image = col(&opts.image_column).expect("projected image column");
    let key = opts.key_column.as_deref().and_then(col);
    let texts: Vec<_> = opts.text_columns.iter().map(|t| col(&t.name)).collect();
    (0..batch.num_rows())
        .map(|row| {
            let key = match &key {
                Some(k) => cell_text(k.as_ref(), row).ok_or_else(|| DatasetError::ColumnType {
                    shard: shard.to_string(),
                    column: opts.key_column.clone().unwrap_or_default(),
                    types: format!("{} (want a string or an integer)", k.data_type()),
                    key: format!("{}.key_column", opts.config_prefix),
                })?,
                None => format!("{:09}", row_base + row),
            };
            let payload =
                cell_bytes(image.as_ref(), row).ok_or_else(|| DatasetError::ColumnType {
                    shard: shard.to_string(),
                    column: opts.image_column.clone(),
                    types: format!("{} (want binary)", image.data_type()),
                    key: format!("{}.image_column", opts.config_prefix),
                })?;
            let payload = match payload {
                Some(b) if b.len() as u64 > opts.max_record_bytes => Err(RejectReason::TooLarge {
                    bytes: b.len() as u64,
                    max_bytes: opts.max_record_bytes,
                }),
                Some(b) => Ok(Bytes::copy_from_slice(b)),
                None => Err(RejectReason::NoImage {
                    detail: format!("`{}` is null", opts.image_column),
                }),
            };
            let mut text = Vec::with_capacity(texts.len());
            for (t, column) in texts.iter().zip(&opts.text_columns) {
                let cell = match t {
                    Some(c) => cell_text(c.as_ref(), row)
                        .ok_or_else(|| DatasetError::ColumnType {
                            shard: shard.to_string(),
                            column: column.name.clone(),
                            types: format!("{} (want a string or a number)", c.data_type()),
                            key: column.config_key.clone(),
                        })
                        .map(|v| (!c.is_null(row)).then_some(v))?,
                    None => None,
                };
                text.push(cell);
            }
            Ok(RawRecord::new(shard, key, payload, text))
        })
        .collect()
}

/// The row's cell as text (keys, captions, scores); `None` for an unsupported column type.
/// A null cell becomes `#row` (callers that care check nulls first).
fn cell_text(col: &dyn Array, row: usize) -> Option<String> {
    if col.is_null(row) {
        return Some(format!("#{row}"));
    }
    Some(match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(row).to_string(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(row).to_string(),
        DataType::Utf8View => col.as_string_view().value(row).to_string(),
        DataType::Int64 => col
            .as_primitive::<arrow_array::types::Int64Type>()
            .value(row)
            .to_string(),
        DataType::Int32 => col
            .as_primitive::<arrow_array::types::Int32Type>()
            .value(row)
            .to_string(),
        DataType::UInt64 => col
            .as_primitive::<arrow_array::types::UInt64Type>()
            .value(row)
            .to_string(),
        DataType::Float64 => col
            .as_primitive::<arrow_array::types::Float64Type>()
            .value(row)
            .to_string(),
        DataType::Float32 => col
            .as_primitive::<arrow_array::types::Float32Type>()
            .value(row)
            .to_string(),
        _ => return None,
    })
}

/// The row's bytes; outer `None` for an unsupported type, inner `None` for null.
fn cell_bytes(col: &dyn Array, row: usize) -> Option<Option<&[u8]>> {
    let null = col.is_null(row);
    let value = match col.data_type() {
        DataType::Binary => col.as_binary::<i32>().value(row),
        DataType::LargeBinary => col.as_binary::<i64>().value(row),
        DataType::BinaryView => col.as_binary_view().value(row),
        _ => return None,
    };
    Some((!null).then_some(value))
}
