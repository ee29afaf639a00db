//! The sets an evaluation reads from the tables: the held-out rows of the training table
//! with their captions and images (what samples are compared against), and each style's
//! images (whose judge centroid the table swap is read against).

use crate::sample::table_images;
use crate::{Result, TrainerError};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::{Array, RecordBatch};
use futures::TryStreamExt;
use knn_datasets::split::key_stem;
use knn_datasets::{SplitConfig, StorageConfig};
use std::collections::HashMap;
use tch::Tensor;

/// `(id, key)` of every row of an embeddings table, in table order.
pub async fn table_keys(uri: &str, storage: &StorageConfig) -> Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    for b in scan_columns(uri, storage, &["id", "key"]).await? {
        let ids = b.column(0).as_primitive_opt::<UInt64Type>();
        let keys = strings(uri, &b, 1)?;
        let Some(ids) = ids else {
            return Err(TrainerError::BadTable {
                table: uri.to_string(),
                detail: format!("`id` is {}, not u64", b.column(0).data_type()),
            });
        };
        out.extend((0..b.num_rows()).map(|i| (ids.value(i), keys.value(i).to_string())));
    }
    Ok(out)
}

/// A table's rows on either side of the held-out split, from one scan of its keys.
#[derive(Debug, Default)]
pub struct SplitRows {
    /// Held-out rows `(id, key)`, in id order.
    pub held: Vec<(u64, String)>,
    /// The other rows' ids, in table order.
    pub kept: Vec<u64>,
}

impl SplitRows {
    /// The held-out ids.
    pub fn held_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.held.iter().map(|(id, _)| *id)
    }
}

/// The rows of `uri` split by `split`.
pub async fn split_rows(
    uri: &str,
    split: &SplitConfig,
    storage: &StorageConfig,
) -> Result<SplitRows> {
    let mut rows = SplitRows::default();
    for (id, key) in table_keys(uri, storage).await? {
        if split.is_holdout(&key) {
            rows.held.push((id, key));
        } else {
            rows.kept.push(id);
        }
    }
    rows.held.sort_unstable();
    Ok(rows)
}

/// Column `at` of `b` as strings, or an error naming the table.
fn strings<'a>(uri: &str, b: &'a RecordBatch, at: usize) -> Result<&'a arrow_array::StringArray> {
    b.column(at)
        .as_string_opt::<i32>()
        .ok_or_else(|| TrainerError::BadTable {
            table: uri.to_string(),
            detail: format!(
                "`{}` is {}, not a string",
                b.schema().field(at).name(),
                b.column(at).data_type()
            ),
        })
}

/// Every row of `columns` of a table, which must have them.
async fn scan_columns(
    uri: &str,
    storage: &StorageConfig,
    columns: &[&str],
) -> Result<Vec<RecordBatch>> {
    let ds = knn_indexer::table::load_dataset(uri, &storage.to_lance_options(), None)
        .await
        .map_err(|e| match e {
            lance::Error::DatasetNotFound { .. } => TrainerError::MissingTable {
                table: uri.to_string(),
                hint: "run the stage that writes it first, or fix the URL in [eval]".into(),
            },
            e => TrainerError::lance(uri, e),
        })?;
    if let Some(c) = columns.iter().find(|c| ds.schema().field(c).is_none()) {
        return Err(TrainerError::BadTable {
            table: uri.to_string(),
            detail: format!(
                "no `{c}` column; eval reads {columns:?} (its held-out split is by key)"
            ),
        });
    }
    let mut scan = ds.scan();
    scan.project(columns)
        .map_err(|e| TrainerError::lance(uri, e))?;
    scan.try_into_stream()
        .await
        .map_err(|e| TrainerError::lance(uri, e))?
        .try_collect()
        .await
        .map_err(|e| TrainerError::lance(uri, e))
}

/// The held-out rows an evaluation samples for: the training table's rows whose key the
/// split holds out and that have a caption.
#[derive(Debug)]
pub struct HeldOut {
    /// Every held-out id of the training table (kept out of every retrieval).
    pub all_ids: Vec<u64>,
    /// The evaluated rows' ids, keys and captions.
    pub ids: Vec<u64>,
    /// Their keys.
    pub keys: Vec<String>,
    /// Their captions.
    pub captions: Vec<String>,
    /// Their images, `[n, 3, side, side]` in [−1, 1].
    pub images: Tensor,
    /// Held-out rows without a caption (left out of the evaluation): how many, and the
    /// first few keys.
    pub uncaptioned: (usize, Vec<String>),
}

/// Reads the held-out rows `held` of `table` (see [`split_rows`]), their captions from
/// `captions` (`key` + `caption_column`; the first caption of each key stem), and their
/// images at `side` px; at most `limit` rows (0: all), in id order.
pub async fn held_out(
    table: &str,
    held: &[(u64, String)],
    captions: (&str, &str),
    limit: usize,
    side: usize,
    storage: &StorageConfig,
) -> Result<HeldOut> {
    let all_ids: Vec<u64> = held.iter().map(|r| r.0).collect();
    let mut by_stem: HashMap<String, String> = HashMap::new();
    for b in scan_columns(captions.0, storage, &["key", captions.1]).await? {
        let (keys, texts) = (strings(captions.0, &b, 0)?, strings(captions.0, &b, 1)?);
        for i in 0..b.num_rows() {
            if texts.is_valid(i) && !texts.value(i).trim().is_empty() {
                by_stem
                    .entry(key_stem(keys.value(i)))
                    .or_insert_with(|| texts.value(i).to_string());
            }
        }
    }
    let (mut ids, mut keys, mut texts, mut missing) = (vec![], vec![], vec![], vec![]);
    for (id, key) in held {
        match by_stem.get(&key_stem(key)) {
            Some(c) if limit == 0 || ids.len() < limit => {
                ids.push(*id);
                keys.push(key.clone());
                texts.push(c.clone());
            }
            Some(_) => {}
            None => missing.push(key.clone()),
        }
    }
    if ids.is_empty() {
        return Err(TrainerError::BadTable {
            table: table.to_string(),
            detail: format!(
                "none of its {} held-out rows has a caption in `{}` (column `{}`, matched by \
                 key stem): check split.holdout_fraction and eval.captions",
                all_ids.len(),
                captions.0,
                captions.1
            ),
        });
    }
    let images = table_images(table, storage, std::slice::from_ref(&ids), ids.len(), side).await?;
    let n_missing = missing.len();
    missing.truncate(5);
    Ok(HeldOut {
        all_ids,
        ids,
        keys,
        captions: texts,
        images,
        uncaptioned: (n_missing, missing),
    })
}

/// Up to `n` images of `rows` of `table` (the ones the split keeps, see [`split_rows`]),
/// evenly spread over them, `[≤n, 3, side, side]`.
pub async fn style_images(
    table: &str,
    rows: &[u64],
    n: usize,
    side: usize,
    storage: &StorageConfig,
) -> Result<Tensor> {
    let step = rows.len().div_ceil(n.max(1)).max(1);
    let ids: Vec<u64> = rows.iter().step_by(step).copied().collect();
    table_images(table, storage, std::slice::from_ref(&ids), ids.len(), side).await
}
