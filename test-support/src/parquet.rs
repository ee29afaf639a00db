//! Writing test shards as parquet bytes.

/// `batch` as the bytes of one parquet file (default writer settings).
pub fn parquet_bytes(batch: &arrow_array::RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None)
        .expect("parquet writer");
    w.write(batch).expect("write batch");
    w.close().expect("close parquet");
    out
}
