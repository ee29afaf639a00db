//! Table upkeep (ledger checkpoints, compaction, removal of old versions) on a real Lance
//! table while workers commit: exactly once must survive it.

use knn_datasets::{StorageConfig, TableMaintenance};
use knn_indexer::table::{maintain, rejects_schema, ShardedTable};
use lance::deps::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use std::sync::Arc;

const SHARDS: u64 = 24;

fn upkeep(every: u64) -> TableMaintenance {
    TableMaintenance {
        every_commits: every,
        compact: true,
        target_rows_per_fragment: 1000,
        keep_versions_hours: 0.0,
        keep_versions: 0,
    }
}

/// Commits shard `s` (two rejects rows, ids 10s and 10s+1) through `table`.
async fn commit(table: &ShardedTable, s: u64) -> bool {
    let schema = rejects_schema();
    let ids = vec![10 * s, 10 * s + 1];
    let col = |v: &str| Arc::new(arrow_array::StringArray::from(vec![v, v])) as _;
    let batch = arrow_array::RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow_array::UInt64Array::from(ids)),
            col("k"),
            col(&format!("s{s}")),
            col("r"),
            col("d"),
        ],
    )
    .unwrap();
    let ds = Arc::new(table.open().await.unwrap());
    let stream = Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::iter([Ok(batch)]),
    ));
    let txn = table.write_uncommitted(&ds, stream).await.unwrap();
    table.commit_shard(ds, &format!("s{s}"), txn).await.unwrap()
}

async fn worker(uri: String, order: Vec<u64>, every: u64) -> usize {
    worker_with(uri, order, &upkeep(every)).await
}

async fn worker_with(uri: String, order: Vec<u64>, cfg: &TableMaintenance) -> usize {
    let storage = StorageConfig {
        tables: cfg.clone(),
        ..StorageConfig::default()
    };
    let table = ShardedTable::open_or_create(&uri, rejects_schema(), &storage)
        .await
        .unwrap();
    let mut won = 0;
    for s in order {
        table.refresh_ledger().await.unwrap();
        if !table.is_committed(&format!("s{s}")) && commit(&table, s).await {
            won += 1;
        }
    }
    won
}

async fn ids(uri: &str) -> Vec<u64> {
    let ds = lance::Dataset::open(uri).await.unwrap();
    let batch = ds
        .scan()
        .project(&["id"])
        .unwrap()
        .try_into_batch()
        .await
        .unwrap();
    let col = batch
        .column(0)
        .as_any()
        .downcast_ref::<arrow_array::UInt64Array>()
        .unwrap();
    let mut v = col.values().to_vec();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upkeep_while_two_workers_commit_keeps_every_shard_exactly_once() {
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("t.lance").to_string_lossy().to_string();
    // Create it first so both workers and gc find it.
    ShardedTable::open_or_create(&uri, rejects_schema(), &Default::default())
        .await
        .unwrap();
    // Both workers try every shard, in opposite orders; each does upkeep every 4 versions,
    // and gc runs on a loop beside them, removing every version older than its checkpoint.
    let a = tokio::spawn(worker(uri.clone(), (0..SHARDS).collect(), 4));
    let b = tokio::spawn(worker(uri.clone(), (0..SHARDS).rev().collect(), 4));
    let gc_uri = uri.clone();
    let gc = tokio::spawn(async move {
        let mut removed = 0;
        let mut rounds = 0;
        while rounds < 200 {
            let s = maintain::gc(&gc_uri, &Default::default(), &upkeep(4))
                .await
                .unwrap();
            removed += s.versions_removed;
            rounds += 1;
            if s.shards as u64 == SHARDS {
                break;
            }
        }
        (removed, rounds)
    });
    let (wa, wb) = (a.await.unwrap(), b.await.unwrap());
    let (removed, rounds) = gc.await.unwrap();
    assert_eq!(
        wa + wb,
        SHARDS as usize,
        "each shard committed by exactly one worker"
    );
    let want: Vec<u64> = (0..SHARDS).flat_map(|s| [10 * s, 10 * s + 1]).collect();
    assert_eq!(ids(&uri).await, want, "every row exactly once");
    assert!(
        rounds > 1 && removed > 0,
        "gc ran {rounds} rounds and removed {removed} versions"
    );

    // The early history is gone: a new worker knows the shards from the checkpoint.
    let ds = lance::Dataset::open(&uri).await.unwrap();
    assert!(
        ds.read_transaction_by_version(2).await.is_err(),
        "version 2 was removed"
    );
    assert!(
        ds.count_fragments() < SHARDS as usize,
        "fragments were compacted"
    );
    let fresh = ShardedTable::open_or_create(&uri, rejects_schema(), &Default::default())
        .await
        .unwrap();
    assert_eq!(fresh.refresh_ledger().await.unwrap(), SHARDS as usize);
    assert!(
        !commit(&fresh, 3).await,
        "a shard in the checkpoint is refused"
    );
    assert_eq!(ids(&uri).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_removed_without_a_checkpoint_is_an_error_not_a_guess() {
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("t.lance").to_string_lossy().to_string();
    assert_eq!(worker(uri.clone(), vec![0, 1, 2], 0).await, 3);
    // Another tool removes the old versions: no checkpoint records their shards.
    let ds = lance::Dataset::open(&uri).await.unwrap();
    remove_versions_before(&ds, ds.version().version).await;
    let fresh = ShardedTable::open_or_create(&uri, rejects_schema(), &Default::default())
        .await
        .unwrap();
    let err = fresh.refresh_ledger().await.unwrap_err().to_string();
    assert!(
        err.contains("no ledger checkpoint") && err.contains("t.lance"),
        "{err}"
    );
    // gc cannot repair it either, and says the same.
    let err = maintain::gc(&uri, &Default::default(), &upkeep(4))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no ledger checkpoint"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn young_versions_past_keep_versions_go_and_tagged_ones_stay() {
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("t.lance").to_string_lossy().to_string();
    assert_eq!(worker(uri.clone(), vec![0, 1], 0).await, 2);
    // A long reader tags the version it reads (as precompute-knn and train do).
    let ds = lance::Dataset::open(&uri).await.unwrap();
    let pinned = ds.version().version;
    let tag = knn_indexer::table::reader_tag("train", "runs/a");
    knn_indexer::table::pin_version(&ds, &uri, &tag, "test").await;
    // Every version is young (168 h), but at most 3 may stay behind the newest.
    let cfg = TableMaintenance {
        keep_versions_hours: 168.0,
        keep_versions: 3,
        ..upkeep(4)
    };
    assert_eq!(
        worker_with(uri.clone(), (2..SHARDS).collect(), &cfg).await,
        22
    );
    let manifests = std::fs::read_dir(out.path().join("t.lance/_versions"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".manifest")
        })
        .count();
    // The newest, up to 3 behind it, up to 4 since the last upkeep, the tagged one.
    assert!(manifests <= 9, "{manifests} manifests kept");
    let want: Vec<u64> = (0..SHARDS).flat_map(|s| [10 * s, 10 * s + 1]).collect();
    assert_eq!(ids(&uri).await, want, "every row exactly once");
    let old = lance::Dataset::open(&uri)
        .await
        .unwrap()
        .checkout_version(pinned)
        .await
        .expect("the tagged version is kept");
    assert_eq!(old.count_rows(None).await.unwrap(), 4);
    // With no count limit nothing young is removed.
    let kept = maintain::gc(
        &uri,
        &Default::default(),
        &TableMaintenance {
            keep_versions: 0,
            ..cfg
        },
    )
    .await
    .unwrap();
    assert_eq!(kept.versions_removed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upkeep_round_runs_at_a_time_and_a_dead_one_is_outwaited() {
    use knn_indexer::ledger::{LedgerStore, ShardLedger, UPKEEP_LEASE};
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("t.lance").to_string_lossy().to_string();
    let (store, base) = lance_io::object_store::ObjectStore::from_uri(&uri)
        .await
        .unwrap();
    let worker = || ShardLedger::new(LedgerStore::new(store.clone(), &base, &uri));
    let (a, b) = (worker(), worker());
    assert_eq!(a.begin_round(1).await.unwrap(), Some(1));
    // While a's round runs, b crossing marks starts none.
    assert_eq!(b.begin_round(1).await.unwrap(), None);
    assert_eq!(b.begin_round(2).await.unwrap(), None);
    a.end_round(1).await.unwrap();
    // A mark is tried once; the next one starts the next round.
    assert_eq!(b.begin_round(2).await.unwrap(), None);
    assert_eq!(b.begin_round(3).await.unwrap(), Some(2));
    b.end_round(2).await.unwrap();
    // Two workers crossing a mark together: exactly one round starts.
    let (x, y) = tokio::join!(a.begin_round(10), b.begin_round(10));
    let started: Vec<u64> = [x.unwrap(), y.unwrap()].into_iter().flatten().collect();
    assert_eq!(started, vec![3]);
    // Round 3's worker dies: the next round waits out the lease, then starts.
    let c = worker();
    assert_eq!(c.begin_round(11).await.unwrap(), None);
    let round3 = out
        .path()
        .join(format!("t.lance/_knn_ledger/upkeep-{:020}", u64::MAX - 3));
    std::fs::File::options()
        .write(true)
        .open(&round3)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - UPKEEP_LEASE - UPKEEP_LEASE / 10)
        .unwrap();
    assert_eq!(c.begin_round(12).await.unwrap(), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_commits_wait_at_a_compactions_gate_and_a_dead_ones_lapses() {
    use knn_indexer::ledger::{LedgerStore, ShardLedger, GATE_LEASE};
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("t.lance").to_string_lossy().to_string();
    let storage = StorageConfig::default();
    let open = || ShardedTable::open_or_create(&uri, rejects_schema(), &storage);
    let table = open().await.unwrap();
    assert!(commit(&table, 0).await);
    let (store, base) = lance_io::object_store::ObjectStore::from_uri(&uri)
        .await
        .unwrap();
    let compactor = ShardLedger::new(LedgerStore::new(store, &base, &uri));
    compactor.raise_gate().await.unwrap();
    // A commit started while the gate is up waits until it is lowered.
    let other = open().await.unwrap();
    let pending = tokio::spawn(async move { commit(&other, 1).await });
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert!(
        !pending.is_finished(),
        "a shard commit went past a raised gate"
    );
    compactor.lower_gate().await.unwrap();
    assert!(pending.await.unwrap());
    // A gate left up by a worker that died while committing a compaction lapses.
    compactor.raise_gate().await.unwrap();
    std::fs::File::options()
        .write(true)
        .open(out.path().join("t.lance/_knn_ledger/compacting"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - GATE_LEASE - GATE_LEASE / 10)
        .unwrap();
    let lapsed = tokio::time::timeout(std::time::Duration::from_secs(60), commit(&table, 2));
    assert!(lapsed.await.expect("a stale gate held a commit"));
    assert_eq!(ids(&uri).await.len(), 6);
}

/// Removes every version of `ds` below `version`, as a tool other than `gc` would: Lance's
/// own clean-up, with no ledger checkpoint written first.
async fn remove_versions_before(ds: &lance::Dataset, version: u64) {
    let policy = lance::dataset::cleanup::CleanupPolicy {
        before_version: Some(version),
        before_timestamp: Some(chrono::Utc::now()),
        error_if_tagged_old_versions: false,
        ..Default::default()
    };
    assert!(ds.cleanup_with_policy(policy).await.unwrap().old_versions > 0);
}

/// The newest ledger checkpoint object in `t.lance/_knn_ledger/`: its path and contents.
fn newest_checkpoint(out: &std::path::Path) -> (std::path::PathBuf, serde_json::Value) {
    // Names hold u64::MAX - version: the lowest name is the newest.
    let path = std::fs::read_dir(out.join("t.lance/_knn_ledger"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("ledger-")
        })
        .min()
        .expect("a ledger checkpoint");
    let cp = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    (path, cp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_checkpoint_from_an_earlier_build_still_reads_and_the_next_is_runs() {
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("t.lance").to_string_lossy().to_string();
    assert_eq!(worker(uri.clone(), vec![0, 1, 2], 0).await, 3);
    // What an earlier build wrote at the newest version (shards s0..s2 in versions 2..4),
    // then every older version removed: the checkpoint alone says which shards are in.
    let ds = lance::Dataset::open(&uri).await.unwrap();
    let newest = ds.version().version;
    let listed = serde_json::json!({
        "format": "knn-ledger/1",
        "table_version": newest,
        "shards": {"s0": 2, "s1": 3, "s2": 4},
    });
    std::fs::create_dir_all(out.path().join("t.lance/_knn_ledger")).unwrap();
    std::fs::write(
        out.path().join(format!(
            "t.lance/_knn_ledger/ledger-{:020}.json",
            u64::MAX - newest
        )),
        serde_json::to_vec(&listed).unwrap(),
    )
    .unwrap();
    remove_versions_before(&ds, newest).await;
    let fresh = ShardedTable::open_or_create(&uri, rejects_schema(), &Default::default())
        .await
        .unwrap();
    assert_eq!(fresh.refresh_ledger().await.unwrap(), 3);
    assert!(
        !commit(&fresh, 1).await,
        "a shard of the old checkpoint is refused"
    );

    // Forty more shards with upkeep every 8 versions, taken by two workers from both ends:
    // the newest checkpoint holds them as at most two runs per width of number (s0..s9 and
    // s10..s42 are two families).
    let a = tokio::spawn(worker(uri.clone(), (3..43).collect(), 8));
    let b = tokio::spawn(worker(uri.clone(), (3..43).rev().collect(), 8));
    assert_eq!(a.await.unwrap() + b.await.unwrap(), 40);
    let (path, cp) = newest_checkpoint(out.path());
    assert_eq!(cp["format"], "knn-ledger/2", "{cp}");
    let runs: usize = cp["committed"]["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["runs"].as_array().unwrap().len())
        .sum();
    assert!(
        cp["shard_count"].as_u64().unwrap() >= 30 && runs <= 4,
        "{cp}"
    );
    let want: Vec<u64> = (0..43).flat_map(|s| [10 * s, 10 * s + 1]).collect();
    assert_eq!(ids(&uri).await, want, "every row exactly once");

    // A checkpoint whose count disagrees with its runs is named as unreadable.
    let mut bad = cp.clone();
    bad["shard_count"] = serde_json::json!(7);
    std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let fresh = ShardedTable::open_or_create(&uri, rejects_schema(), &Default::default())
        .await
        .unwrap();
    let err = fresh.refresh_ledger().await.unwrap_err().to_string();
    assert!(
        err.contains("unreadable") && err.contains("shard_count says 7"),
        "{err}"
    );
}
