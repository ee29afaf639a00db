//! `embed --retry-rejects`: embed again only the records an earlier run rejected, for example
//! after `embed.decode.max_pixels` was raised or a decoder fixed.
//!
//! Rejects are never deleted or rewritten. A retry of shard `S` runs as its own shard,
//! `retry:S:<h>`, committed exactly once through the tables' shard ledger like any other:
//! first its rows in the rejects table, then its images. Its reject rows are the records
//! that failed again (with their new reason) and one `retried` row for each record that is
//! now a row of the images table. A record is open, and retried by the next
//! `--retry-rejects`, while it has rejects and no `retried` row.
//!
//! `<h>` hashes the open records and how many reject rows they have, so a retry that
//! crashed part way is found again and finished under the same id, and a completed retry
//! (whose failures added rows) gets a new one. Reject rows of a retry whose images are not
//! committed are not counted: they are what a crash left between the two commits.

use crate::table::{Reject, ShardedTable};
use crate::{IndexerError, Result};
use arrow_array::cast::AsArray;
use futures::TryStreamExt;
use knn_datasets::{Shard, ShardId};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The code of the reject row that says a record is now a row.
pub const RETRIED: &str = "retried";

/// Reject codes that are about the container or the keys, not the record's bytes: a retry
/// would meet them again.
const NOT_RETRIED: [&str; 3] = ["corrupt_shard", "duplicate_key", "id_collision"];

/// The records of one source shard to embed again.
#[derive(Clone, Debug)]
pub struct RetryPlan {
    /// The retry's shard id, `retry:<shard>:<h>`.
    pub id: String,
    /// Key → (id, the code it was last rejected with).
    pub keys: HashMap<String, (u64, String)>,
}

impl RetryPlan {
    /// The reject rows a retry of `shard` commits, from the rejects its records met this
    /// time (`failed`) and the keys the shard still holds (`seen`): each failure again,
    /// under the retry's shard id; a `retried` row for each record that is now a row; and a
    /// `not_found` reject for each the shard no longer holds (it stays open).
    pub fn reject_rows(
        &self,
        shard: &ShardId,
        failed: Vec<Reject>,
        seen: &HashSet<String>,
    ) -> Vec<Reject> {
        let failed_keys: HashSet<String> = failed.iter().map(|r| r.key.clone()).collect();
        let mut rows: Vec<Reject> = failed
            .into_iter()
            .map(|r| Reject {
                shard: self.id.clone(),
                ..r
            })
            .collect();
        for (key, (id, code)) in &self.keys {
            let (code, detail) = if !seen.contains(key) {
                (
                    "not_found".to_string(),
                    format!("not in shard `{shard}` any more"),
                )
            } else if !failed_keys.contains(key) {
                (
                    RETRIED.to_string(),
                    format!("now a row of the images table (was rejected as `{code}`)"),
                )
            } else {
                continue;
            };
            rows.push(Reject {
                id: *id,
                key: key.clone(),
                shard: self.id.clone(),
                code,
                detail,
            });
        }
        rows
    }
}

/// The source shard a reject row's shard stands for (`retry:S:<h>` → `S`).
fn source_shard(shard: &str) -> &str {
    shard
        .strip_prefix("retry:")
        .and_then(|rest| rest.rsplit_once(':'))
        .map_or(shard, |(s, _)| s)
}

/// One row of the rejects table.
struct RejectRow {
    id: u64,
    key: String,
    shard: String,
    code: String,
}

async fn reject_rows(rejects: &ShardedTable) -> Result<Vec<RejectRow>> {
    let ds = rejects.open().await?;
    let lance_err = |e| IndexerError::lance(rejects.uri(), e);
    let mut scan = ds.scan();
    scan.project(&["id", "key", "shard", "reason"])
        .map_err(lance_err)?;
    let batches: Vec<arrow_array::RecordBatch> = scan
        .try_into_stream()
        .await
        .map_err(lance_err)?
        .try_collect()
        .await
        .map_err(lance_err)?;
    let mut rows = Vec::new();
    for b in batches {
        let bad = |c: &str| IndexerError::MissingColumn {
            table: rejects.uri().to_string(),
            column: c.into(),
            detail: "missing or of the wrong type".into(),
        };
        let ids = b
            .column_by_name("id")
            .and_then(|c| c.as_primitive_opt::<arrow_array::types::UInt64Type>())
            .ok_or_else(|| bad("id"))?;
        let text = |c: &str| {
            b.column_by_name(c)
                .and_then(|a| a.as_string_opt::<i32>())
                .ok_or_else(|| bad(c))
        };
        let (keys, shards, codes) = (text("key")?, text("shard")?, text("reason")?);
        for i in 0..b.num_rows() {
            rows.push(RejectRow {
                id: ids.value(i),
                key: keys.value(i).to_string(),
                shard: shards.value(i).to_string(),
                code: codes.value(i).to_string(),
            });
        }
    }
    Ok(rows)
}

/// What `--retry-rejects` found to do among `shards` (this worker's), and how many rejects
/// it leaves alone because a retry cannot help them.
pub async fn plan(
    images: &ShardedTable,
    rejects: &ShardedTable,
    shards: Vec<Shard>,
) -> Result<(Vec<(Shard, RetryPlan)>, u64)> {
    use sha2::{Digest, Sha256};
    let counted = |shard: &str| !shard.starts_with("retry:") || images.is_committed(shard);
    // Per source shard, per key: (id, reject rows, last code, retried?).
    type Open = BTreeMap<String, (u64, u64, String, bool)>;
    let mut by_shard: HashMap<String, Open> = HashMap::new();
    let mut not_retried = 0;
    for r in reject_rows(rejects).await? {
        if !counted(&r.shard) {
            continue;
        }
        if NOT_RETRIED.contains(&r.code.as_str()) {
            not_retried += 1;
            continue;
        }
        let e = by_shard
            .entry(source_shard(&r.shard).to_string())
            .or_default()
            .entry(r.key)
            .or_insert((r.id, 0, String::new(), false));
        if r.code == RETRIED {
            e.3 = true;
        } else {
            e.1 += 1;
            e.2 = r.code;
        }
    }
    let mut work = Vec::new();
    for shard in shards {
        let Some(keys) = by_shard.remove(shard.id.as_str()) else {
            continue;
        };
        let open: BTreeMap<String, (u64, u64, String, bool)> =
            keys.into_iter().filter(|(_, v)| !v.3 && v.1 > 0).collect();
        if open.is_empty() {
            continue;
        }
        let mut h = Sha256::new();
        for (key, (_, rows, _, _)) in &open {
            h.update(key.as_bytes());
            h.update([0]);
            h.update(rows.to_le_bytes());
        }
        let digest = h.finalize();
        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        let plan = RetryPlan {
            id: format!("retry:{}:{hex}", shard.id),
            keys: open
                .into_iter()
                .map(|(k, (id, _, code, _))| (k, (id, code)))
                .collect(),
        };
        work.push((shard, plan));
    }
    Ok((work, not_retried))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_shard_stands_for_its_source_shard() {
        assert_eq!(source_shard("retry:@00004:0a1b2c3d4e5f"), "@00004");
        assert_eq!(
            source_shard("retry:part-0:a.parquet:00ff"),
            "part-0:a.parquet"
        );
        assert_eq!(source_shard("@00004"), "@00004");
    }
}
