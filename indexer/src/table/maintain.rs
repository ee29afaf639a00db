//! Upkeep of a sharded table, so that what one more shard commit writes and what one more
//! worker reads at start-up stop growing with the shards committed.
//!
//! Without upkeep three things grow with the table: every commit writes a manifest listing
//! every fragment (one or more per shard), a new worker reads one transaction per version to
//! learn which shards are in, and `_versions/` keeps every manifest ever written. Upkeep, in
//! this order:
//! 1. **Checkpoint the ledger** ([`crate::ledger`]): the shards committed through the latest
//!    version, one object. A worker whose commit crosses a mark (every `every_commits`
//!    versions) starts an upkeep round, claimed with a put-if-absent, unless one is running
//!    on the table: one round at a time (overlapping rounds' compactions preempt each other
//!    and leave the fragments unmerged), whichever workers cross marks meanwhile; the others
//!    go on committing.
//! 2. **Compact** fragments smaller than `target_rows_per_fragment` (Lance's
//!    planner and rewrite; its commit conflicts with no append, but against a stream of them
//!    it lost every one of Lance's attempts, so it commits behind the ledger's gate, which
//!    holds shard commits back for that moment).
//! 3. **Remove old versions**: those older than the checkpoint *and* than
//!    `keep_versions_hours` (Lance's `cleanup_old_versions`; data files of appends still in
//!    flight are younger than its seven-day threshold for unreferenced files and stay).
//!
//! The checkpoint is written before any version is removed, and a worker that finds a
//! version's transaction gone reloads the newest checkpoint (which then covers it), so
//! exactly-once holds through the clean-up. That is also the safe manual procedure,
//! `knn-diffusion gc` ([`gc`]): run it any time, with workers committing or not; never
//! remove versions of a sharded table with another tool.

use super::{load_dataset, table_store, ShardedTable};
use crate::ledger::{LedgerStore, ShardLedger};
use crate::{IndexerError, Result};
use knn_datasets::TableMaintenance;
use lance::dataset::cleanup::CleanupPolicy;
use lance::dataset::index::DatasetIndexRemapperOptions;
use lance::dataset::optimize::{commit_compaction, plan_compaction, CompactionOptions};
use lance::Dataset;
use lance_io::object_store::ObjectStore;
use lance_table::io::commit::ManifestNamingScheme;
use object_store::path::Path;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

/// What one round of upkeep did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UpkeepSummary {
    /// The table.
    pub table: String,
    /// Shards in the ledger.
    pub shards: usize,
    /// The version the ledger checkpoint covers.
    pub checkpoint_version: u64,
    /// Fragments before and after compaction.
    pub fragments_before: usize,
    pub fragments_after: usize,
    /// Versions and bytes removed.
    pub versions_removed: u64,
    pub bytes_removed: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Checks `[storage.tables]`.
pub fn check(cfg: &TableMaintenance) -> Result<()> {
    let bad = |key: &str, reason: String| {
        Err(IndexerError::Config {
            key: format!("storage.tables.{key}"),
            reason,
        })
    };
    if !(cfg.keep_versions_hours >= 0.0 && cfg.keep_versions_hours.is_finite()) {
        return bad(
            "keep_versions_hours",
            format!("must be 0 or more hours, got {}", cfg.keep_versions_hours),
        );
    }
    if cfg.target_rows_per_fragment == 0 {
        return bad("target_rows_per_fragment", "must be at least 1".into());
    }
    Ok(())
}

/// The upkeep a commit that created `committed` (crossing upkeep mark `mark`) owes the
/// table: nothing when another worker's round is running or won the mark.
pub(super) async fn maintain(
    table: &ShardedTable,
    committed: Dataset,
    mark: u64,
) -> Result<Option<UpkeepSummary>> {
    let lance_err = |e| IndexerError::lance(&table.uri, e);
    let Some(round) = table.ledger.begin_round(mark).await.map_err(lance_err)? else {
        return Ok(None);
    };
    let done = upkeep(
        (&table.uri, &table.storage),
        (&table.store, &table.base),
        &table.ledger,
        committed,
        &table.upkeep,
    )
    .await;
    table.ledger.end_round(round).await.map_err(lance_err)?;
    let s = done?;
    tracing::info!(
        table = %s.table,
        shards = s.shards,
        mark,
        round,
        checkpoint_version = s.checkpoint_version,
        fragments = %format!("{} -> {}", s.fragments_before, s.fragments_after),
        versions_removed = s.versions_removed,
        mb_removed = s.bytes_removed / 1_000_000,
        seconds = %format!("{:.1}", s.seconds),
        "table upkeep done"
    );
    Ok(Some(s))
}

/// Checkpoints the ledger, compacts and removes old versions of the table at `uri` now (the
/// `gc` command). Safe while workers commit, and beside their own upkeep.
pub async fn gc(
    uri: &str,
    storage: &HashMap<String, String>,
    upkeep_cfg: &TableMaintenance,
) -> Result<UpkeepSummary> {
    check(upkeep_cfg)?;
    let (store, base) = table_store(uri, storage).await?;
    let ledger = ShardLedger::new(LedgerStore::new(store.clone(), &base, uri));
    let latest = load_dataset(uri, storage, None)
        .await
        .map_err(|e| IndexerError::lance(uri, e))?;
    upkeep((uri, storage), (&store, &base), &ledger, latest, upkeep_cfg).await
}

/// Brings `ledger` up to `latest`, checkpoints it, then compacts and removes the versions
/// the checkpoint covers.
async fn upkeep(
    (uri, storage): (&str, &HashMap<String, String>),
    (store, base): (&Arc<ObjectStore>, &Path),
    ledger: &ShardLedger,
    latest: Dataset,
    cfg: &TableMaintenance,
) -> Result<UpkeepSummary> {
    let start = Instant::now();
    let lance_err = |e: lance::Error| IndexerError::lance(uri, e);
    ledger
        .refresh(&latest, latest.version().version)
        .await
        .map_err(lance_err)?;
    let checkpoint_version = ledger.checkpoint().await.map_err(lance_err)?;
    let mut ds = load_dataset(uri, storage, None).await.map_err(lance_err)?;
    let fragments_before = ds.count_fragments();
    if cfg.compact {
        compact(uri, storage, ledger, &mut ds, cfg.target_rows_per_fragment).await?;
    }
    let fragments_after = ds.count_fragments();
    let keep = chrono::Duration::milliseconds((cfg.keep_versions_hours * 3.6e6) as i64);
    let cutoff = chrono::Utc::now() - keep;
    let behind = match cfg.keep_versions {
        0 => 0,
        n => ds.version().version.saturating_sub(n),
    };
    let (mut versions_removed, mut bytes_removed) = (0, 0);
    let tagged: HashSet<u64> = ds
        .tags()
        .list()
        .await
        .map_err(lance_err)?
        .into_values()
        .map(|t| t.version)
        .collect();
    // Lance's clean-up reads every manifest to find what is still referenced, even when
    // none is to go: that would make each round cost O(versions). One listing picks the
    // versions to remove, and the clean-up is told exactly those.
    let doomed = removable_versions(
        store,
        base,
        &Retention {
            checkpoint_version,
            cutoff,
            behind,
            tagged: &tagged,
        },
    )
    .await
    .map_err(lance_err)?;
    if !doomed.is_empty() {
        let policy = CleanupPolicy {
            versions: Some(doomed),
            delete_unverified: false,
            error_if_tagged_old_versions: false,
            ..Default::default()
        };
        let removed = match ds.cleanup_with_policy(policy.clone()).await {
            // Another clean-up (a `gc` beside a worker's upkeep) removed a version this one
            // was reading: once more, from the new latest.
            Err(e) if crate::ledger::is_not_found(&e) => {
                ds = load_dataset(uri, storage, None).await.map_err(lance_err)?;
                ds.cleanup_with_policy(policy).await.map_err(lance_err)?
            }
            other => other.map_err(lance_err)?,
        };
        versions_removed = removed.old_versions;
        bytes_removed = removed.bytes_removed;
    }
    Ok(UpkeepSummary {
        table: uri.to_string(),
        shards: ledger.len(),
        checkpoint_version,
        fragments_before,
        fragments_after,
        versions_removed,
        bytes_removed,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Compacts `ds` in place: the small fragments are planned and rewritten while shard commits
/// go on, then the rewrite commits with the ledger's gate up, so that appends wait for it
/// (they would otherwise win every one of Lance's attempts). A rewrite that loses to another
/// rewrite, or whose versions another clean-up removed (a `gc` run and a worker's upkeep, or
/// two `gc` runs), is planned again on the new version, three times in all; after that the
/// other rewrite has done the work and this round leaves compaction to it. A rewrite's
/// result is never committed twice (a second commit of the same files lost them).
async fn compact(
    uri: &str,
    storage: &HashMap<String, String>,
    ledger: &ShardLedger,
    ds: &mut Dataset,
    target_rows_per_fragment: usize,
) -> Result<()> {
    const TRIES: usize = 3;
    let options = CompactionOptions {
        target_rows_per_fragment,
        ..Default::default()
    };
    for attempt in 1..=TRIES {
        match rewrite_and_commit(ledger, ds, &options).await {
            Ok(()) => return Ok(()),
            Err(e)
                if matches!(
                    e,
                    lance::Error::RetryableCommitConflict { .. }
                        | lance::Error::CommitConflict { .. }
                        | lance::Error::IncompatibleTransaction { .. }
                        | lance::Error::TooMuchWriteContention { .. }
                ) || crate::ledger::is_not_found(&e) =>
            {
                tracing::info!(
                    table = uri,
                    attempt,
                    error = %e,
                    "compaction lost to a concurrent commit; reloading the table"
                );
                *ds = load_dataset(uri, storage, None)
                    .await
                    .map_err(|e| IndexerError::lance(uri, e))?;
            }
            Err(e) => return Err(IndexerError::lance(uri, e)),
        }
    }
    tracing::warn!(
        table = uri,
        "compaction skipped this round: {TRIES} tries each lost to a concurrent commit"
    );
    Ok(())
}

/// One compaction: plan, rewrite, and commit behind the ledger's gate (always lowered).
async fn rewrite_and_commit(
    ledger: &ShardLedger,
    ds: &mut Dataset,
    options: &CompactionOptions,
) -> lance::Result<()> {
    let plan = plan_compaction(ds, options).await?;
    if plan.num_tasks() == 0 {
        return Ok(());
    }
    // As `compact_files` runs them: a task per fragment group, a few at a time.
    let threads = options
        .num_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rewritten: Vec<_> = {
        use futures::{StreamExt, TryStreamExt};
        let ds = &*ds;
        futures::stream::iter(plan.compaction_tasks())
            .map(|task| async move { task.execute(ds).await })
            .buffer_unordered(threads)
            .try_collect()
            .await?
    };
    ledger.raise_gate().await?;
    let committed = commit_compaction(
        ds,
        rewritten,
        Arc::new(DatasetIndexRemapperOptions::default()),
        options,
    )
    .await;
    let lowered = ledger.lower_gate().await;
    committed?;
    lowered
}

/// Which versions a round of upkeep may remove.
struct Retention<'a> {
    /// Versions the ledger checkpoint covers are below this.
    checkpoint_version: u64,
    /// Versions written before this are old enough (`keep_versions_hours`).
    cutoff: chrono::DateTime<chrono::Utc>,
    /// Versions below this are too far behind the newest (`keep_versions`; 0: none).
    behind: u64,
    /// Versions a reader tagged: never removed.
    tagged: &'a HashSet<u64>,
}

impl Retention<'_> {
    fn removes(&self, version: u64, written: chrono::DateTime<chrono::Utc>) -> bool {
        version < self.checkpoint_version
            && !self.tagged.contains(&version)
            && (written < self.cutoff || version < self.behind)
    }
}

/// The versions in `_versions/` of the table at `base` that `keep` removes (one listing).
async fn removable_versions(
    store: &ObjectStore,
    base: &Path,
    keep: &Retention<'_>,
) -> lance::Result<HashSet<u64>> {
    Ok(listed_versions(store, base)
        .await?
        .into_iter()
        .filter(|&(v, written)| keep.removes(v, written))
        .map(|(v, _)| v)
        .collect())
}

/// Every version in the table's `_versions/`, with when its manifest was written: one
/// listing, no manifest read.
async fn listed_versions(
    store: &ObjectStore,
    base: &Path,
) -> lance::Result<Vec<(u64, chrono::DateTime<chrono::Utc>)>> {
    use futures::TryStreamExt;
    let mut out = Vec::new();
    let mut listed = store.list(Some(base.clone().join("_versions")));
    while let Some(meta) = listed.try_next().await? {
        let Some(name) = meta.location.filename() else {
            continue;
        };
        if meta.location.extension() != Some("manifest") {
            continue;
        }
        let version = ManifestNamingScheme::detect_scheme(name).and_then(|s| s.parse_version(name));
        if let Some(v) = version {
            out.push((v, meta.last_modified));
        }
    }
    Ok(out)
}

/// What a sweep for orphaned data files found ([`sweep_orphans`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct OrphanSweep {
    /// The table.
    pub table: String,
    /// Versions whose manifests were read for the files they reference.
    pub versions_read: usize,
    /// Files under `data/`.
    pub data_files: usize,
    /// Files under `data/` that no version references and that are older than the grace
    /// period: left by writers that died before their commit.
    pub orphans: usize,
    pub orphan_bytes: u64,
    /// Unreferenced files younger than the grace period, kept: a live writer's, not yet
    /// committed.
    pub young_unreferenced: usize,
    /// Orphans deleted (0 with `--dry-run`).
    pub removed: usize,
    /// The orphans' URLs (the first 100), for `--dry-run`.
    pub orphan_paths: Vec<String>,
}

/// Finds the files under the table's `data/` that no version references and that were last
/// written more than `grace` ago, and deletes them unless `dry_run`. Lance's own clean-up
/// leaves such files for seven days (it cannot tell them from a live writer's), and a
/// killed worker leaves one set per shard it was writing.
///
/// Safe beside live writers as long as `grace` is longer than any writer takes from
/// writing a file to committing it (one shard's write and commit, or one compaction):
/// the data directory is listed before the manifests are read, so a file committed
/// meanwhile is either referenced or younger than the listing. Versions, transactions and
/// the shard ledger are never touched.
pub async fn sweep_orphans(
    uri: &str,
    storage: &HashMap<String, String>,
    grace: std::time::Duration,
    dry_run: bool,
) -> Result<OrphanSweep> {
    use futures::TryStreamExt;
    let lance_err = |e: lance::Error| IndexerError::lance(uri, e);
    let (store, base) = table_store(uri, storage).await?;
    let data = base.clone().join("data");
    let cutoff =
        chrono::Utc::now() - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let listed: Vec<object_store::ObjectMeta> = store
        .list(Some(data.clone()))
        .try_collect()
        .await
        .map_err(lance_err)?;
    let latest = load_dataset(uri, storage, None).await.map_err(lance_err)?;
    let mut referenced = HashSet::new();
    let mut versions_read = 0;
    for (v, _) in listed_versions(&store, &base).await.map_err(lance_err)? {
        let ds = match latest.checkout_version(v).await {
            Ok(ds) => ds,
            // Removed by upkeep since the listing: the files it held are referenced by a
            // newer version or were removed with it.
            Err(e) if crate::ledger::is_not_found(&e) => continue,
            Err(e) => return Err(lance_err(e)),
        };
        versions_read += 1;
        for f in ds.manifest().fragments.iter() {
            let files = f
                .files
                .iter()
                .chain(f.overlays.iter().map(|o| &o.data_file));
            referenced.extend(files.map(|d| data.clone().join(d.path.as_str()).to_string()));
        }
    }
    let mut sweep = OrphanSweep {
        table: uri.to_string(),
        versions_read,
        data_files: listed.len(),
        ..Default::default()
    };
    for meta in listed {
        if referenced.contains(meta.location.as_ref()) {
            continue;
        }
        if meta.last_modified >= cutoff {
            sweep.young_unreferenced += 1;
            continue;
        }
        sweep.orphans += 1;
        sweep.orphan_bytes += meta.size;
        if sweep.orphan_paths.len() < 100 {
            let name = meta.location.filename().unwrap_or_default();
            let url = format!("{}/data/{name}", uri.trim_end_matches('/'));
            sweep.orphan_paths.push(url);
        }
        if !dry_run {
            store.delete(&meta.location).await.map_err(lance_err)?;
            tracing::debug!(table = uri, file = %meta.location, "removed an orphaned data file");
            sweep.removed += 1;
        }
    }
    Ok(sweep)
}
