//! Reading Lance tables back in tests. Shared through `#[path]`.

use futures::TryStreamExt;

/// Every value of a u64 column of the table at `uri`, after checking the table with
/// Lance's `validate()`.
pub async fn u64_column(uri: &str, column: &str) -> Vec<u64> {
    let ds = lance::Dataset::open(uri).await.expect("open table");
    ds.validate().await.expect("table validates");
    let batches: Vec<arrow_array::RecordBatch> = ds
        .scan()
        .project(&[column])
        .expect("project")
        .try_into_stream()
        .await
        .expect("scan")
        .try_collect()
        .await
        .expect("read");
    batches
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<arrow_array::UInt64Array>()
                .expect("u64 column")
                .values()
                .to_vec()
        })
        .collect()
}
