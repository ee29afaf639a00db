//! Reading Lance tables back in tests.

use futures::TryStreamExt;

/// Every value of a u64 column of the table at `uri`, after checking the table with
/// Lance's `validate()`.
pub async fn u64_column(uri: &str, column: &str) -> Vec<u64> {
    scan(uri, Some(&[column]))
        .await
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

/// Every value of a string column of the table at `uri` (after `validate()`).
pub async fn string_column(uri: &str, column: &str) -> Vec<String> {
    scan(uri, Some(&[column]))
        .await
        .iter()
        .flat_map(|b| {
            let a = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow_array::StringArray>()
                .expect("string column");
            a.iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every row of the table at `uri` (after `validate()`) as text, keyed by its `id`, without
/// the columns named in `skip` (row addresses, say, which follow the order of commits).
pub async fn rows_by_id(uri: &str, skip: &[&str]) -> std::collections::BTreeMap<u64, String> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let batches = scan(uri, None).await;
    let mut rows = std::collections::BTreeMap::new();
    let options = FormatOptions::default();
    for b in &batches {
        let schema = b.schema();
        let ids = b
            .column_by_name("id")
            .expect("an id column")
            .as_any()
            .downcast_ref::<arrow_array::UInt64Array>()
            .expect("u64 ids");
        let shown: Vec<(String, ArrayFormatter)> = schema
            .fields()
            .iter()
            .zip(b.columns())
            .filter(|(f, _)| !skip.contains(&f.name().as_str()))
            .map(|(f, c)| {
                let fmt = ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter");
                (f.name().clone(), fmt)
            })
            .collect();
        for row in 0..b.num_rows() {
            let text: Vec<String> = shown
                .iter()
                .map(|(name, fmt)| format!("{name}={}", fmt.value(row)))
                .collect();
            let previous = rows.insert(ids.value(row), text.join(" "));
            assert!(previous.is_none(), "id {} twice in {uri}", ids.value(row));
        }
    }
    rows
}

/// The table at `uri`, after Lance's `validate()`: every batch, of `columns` or of all.
async fn scan(uri: &str, columns: Option<&[&str]>) -> Vec<arrow_array::RecordBatch> {
    let ds = lance::Dataset::open(uri).await.expect("open table");
    ds.validate().await.expect("table validates");
    let mut scan = ds.scan();
    if let Some(columns) = columns {
        scan.project(columns).expect("project");
    }
    scan.try_into_stream()
        .await
        .expect("scan")
        .try_collect()
        .await
        .expect("read")
}
