//! Exactly-once commits per shard.
//!
//! Lance appends never conflict with each other, so a shard committed twice (a rerun after a
//! crash between commit and bookkeeping, or the same worker launched twice) would silently
//! double its rows. The ledger makes that impossible by riding on Lance's own linearisable
//! commit: every shard commit carries the transaction property `knn.shard = <id>`, and a
//! [`ShardLedgerHandler`] wraps the table's commit handler. Lance calls it once per attempt
//! with the version it is about to create (conditional put: only one writer can create version
//! N). Before delegating, the handler reads the transactions of every version below N that it
//! has not seen yet; if one already carries this shard, the commit is refused. Two racing
//! commits of one shard: the first creates N; the second loses N, is rebased to N+1, sees N's
//! transaction, and is refused. The table's transaction history *is* the ledger, so it cannot
//! disagree with the data.
//!
//! **Checkpoints.** Reading one transaction per version makes a new worker's start-up grow
//! with the table's history, and Lance's `cleanup_old_versions` deletes old transactions. So
//! the ledger is also written, every `storage.tables.every_commits` versions, as one object
//! `_knn_ledger/ledger-<V>.json` in the table's directory (which Lance's clean-up never
//! lists): the shards committed through version V, as runs of shard numbers
//! ([`shard_set`]), so that its size follows the gaps between committed shards rather than
//! their count. A worker starts from the checkpoint of
//! the highest V and reads only the transactions after it. A version whose transaction is gone
//! must be covered by a checkpoint; if none covers it, the refresh fails rather than guess
//! (see [`crate::table::maintain`] for the clean-up that keeps this true).
//!
//! **The compaction gate.** A compaction's commit conflicts with no append, but appends are
//! cheaper to rebase, and against a stream of them it lost every one of Lance's attempts
//! (rounds of minutes, fragments piling up: BENCHMARKS.md, "scale"). So upkeep raises a gate
//! (`_knn_ledger/compacting`) for the moment its rewrite commits, and every shard commit
//! attempt waits while it is up (one HEAD request when it is not). A gate left up by a worker
//! that died is ignored once it is [`GATE_LEASE`] old. An attempt that waited gives its
//! manifest back as a conflict, so that Lance makes it again on the newest version: while it
//! waited, upkeep may have removed the versions up to the one it aimed at, and a put-if-absent
//! of a removed version succeeds where no reader looks (measured: rows lost and shards
//! committed twice, in `upkeep_while_two_workers_commit_keeps_every_shard_exactly_once`). For
//! the same reason every attempt checks that the version below its own still exists.

use lance::dataset::transaction::Transaction as DatasetTransaction;
use lance::Dataset;
use lance_io::object_store::ObjectStore;
use lance_table::format::{IndexMetadata, Manifest, Transaction};
use lance_table::io::commit::{
    CommitError, CommitHandler, ManifestLocation, ManifestNamingScheme, ManifestWriter,
};
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub mod shard_set;
pub use shard_set::ShardSet;
use shard_set::WrittenShards;

/// The transaction property naming the shard a commit belongs to.
pub const SHARD_PROPERTY: &str = "knn.shard";

/// The directory, inside the table's, that holds ledger checkpoints.
pub const LEDGER_DIR: &str = "_knn_ledger";

/// Format tag of the checkpoint objects this build writes: the shards as runs of numbers.
const CHECKPOINT_FORMAT: &str = "knn-ledger/2";

/// Format tag of the checkpoints written before, which list every shard with its version;
/// still read.
const CHECKPOINT_FORMAT_LISTED: &str = "knn-ledger/1";

/// Checkpoints (and upkeep round objects) kept after a new one is written (older ones are
/// deleted).
const CHECKPOINTS_KEPT: usize = 3;

/// How long an unfinished upkeep round keeps the next one from starting: after this its
/// worker is taken to have died.
pub const UPKEEP_LEASE: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// How long a raised compaction gate holds shard commits back: a worker that died while
/// committing a compaction leaves its gate up, and commits go on once it is this old.
pub const GATE_LEASE: std::time::Duration = std::time::Duration::from_secs(120);

/// One checkpoint object: the shards committed through `table_version`. Two checkpoints of
/// one version hold the same shards (the table's history decides them), so whoever writes
/// last writes the same bytes.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    format: String,
    table_version: u64,
    /// How many shards `committed` holds, checked when read.
    #[serde(default)]
    shard_count: usize,
    /// The shards (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    committed: Option<WrittenShards>,
    /// Every shard with the version that committed it (format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shards: Option<BTreeMap<String, u64>>,
}

/// A checkpoint as read: the shards committed through `table_version`.
#[derive(Debug)]
struct CheckpointRead {
    table_version: u64,
    committed: ShardSet,
}

/// What the ledger knows about one table: which shards were committed through which version.
#[derive(Debug, Default)]
struct LedgerState {
    scanned_through: u64,
    committed: ShardSet,
    /// The newest upkeep mark this worker tried to start a round at.
    mark: u64,
}

/// Where a table's checkpoints and upkeep rounds live.
#[derive(Clone, Debug)]
pub struct LedgerStore {
    store: Arc<ObjectStore>,
    dir: Path,
    table: String,
}

impl LedgerStore {
    /// The checkpoints of the table at `base` (its root path in `store`), named `table` in
    /// errors.
    pub fn new(store: Arc<ObjectStore>, base: &Path, table: &str) -> Self {
        Self {
            store,
            dir: base.clone().join(LEDGER_DIR),
            table: table.to_string(),
        }
    }

    /// `<dir>/<prefix>-<u64::MAX - n>`: inverted, so that a lexically ordered listing gives
    /// the newest first.
    fn path(&self, prefix: &str, n: u64, suffix: &str) -> Path {
        self.dir
            .clone()
            .join(format!("{prefix}-{:020}{suffix}", u64::MAX - n))
    }

    fn checkpoint_path(&self, version: u64) -> Path {
        self.path("ledger", version, ".json")
    }

    fn round_path(&self, round: u64) -> Path {
        self.path("upkeep", round, "")
    }

    /// The numbers of the `prefix` objects present, newest first.
    async fn listed(&self, prefix: &str, suffix: &str) -> lance::Result<Vec<u64>> {
        Ok(self
            .listed_objects(prefix, suffix)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// The `prefix` objects present with their numbers, newest first.
    async fn listed_objects(
        &self,
        prefix: &str,
        suffix: &str,
    ) -> lance::Result<Vec<(u64, object_store::ObjectMeta)>> {
        use futures::TryStreamExt;
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(self.dir.clone()))
            .try_collect()
            .await?;
        let mut found: Vec<(u64, object_store::ObjectMeta)> = listed
            .into_iter()
            .filter_map(|m| {
                let inv: u64 = m
                    .location
                    .filename()?
                    .strip_prefix(prefix)?
                    .strip_prefix('-')?
                    .strip_suffix(suffix)?
                    .parse()
                    .ok()?;
                Some((u64::MAX - inv, m))
            })
            .collect();
        found.sort_unstable_by_key(|(n, _)| std::cmp::Reverse(*n));
        Ok(found)
    }

    /// Deletes all but the newest [`CHECKPOINTS_KEPT`] `prefix` objects.
    async fn prune(&self, prefix: &str, suffix: &str) -> lance::Result<()> {
        for old in self
            .listed(prefix, suffix)
            .await?
            .into_iter()
            .skip(CHECKPOINTS_KEPT)
        {
            match self.store.delete(&self.path(prefix, old, suffix)).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The checkpoint of the highest version, if any (one that vanishes while read, pruned
    /// by a newer one's writer, is looked for again).
    async fn newest(&self) -> lance::Result<Option<CheckpointRead>> {
        for _ in 0..3 {
            let Some(&version) = self.listed("ledger", ".json").await?.first() else {
                return Ok(None);
            };
            let path = self.checkpoint_path(version);
            let bytes = match self.store.read_one_all(&path).await {
                Ok(bytes) => bytes,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(e),
            };
            return self.parse(&path, &bytes).map(Some);
        }
        Ok(None)
    }

    /// Reads checkpoint object `path` of either format.
    fn parse(&self, path: &Path, bytes: &[u8]) -> lance::Result<CheckpointRead> {
        let unreadable = |why: String| {
            lance::Error::invalid_input(format!(
                "ledger checkpoint `{path}` of table `{}` is unreadable ({why}); delete it and \
                 rerun (the ledger is then read from the table's transactions)",
                self.table
            ))
        };
        let cp: Checkpoint =
            serde_json::from_slice(bytes).map_err(|e| unreadable(e.to_string()))?;
        let read = |committed| CheckpointRead {
            table_version: cp.table_version,
            committed,
        };
        match (cp.format.as_str(), cp.committed, cp.shards) {
            (CHECKPOINT_FORMAT, Some(written), _) => {
                let committed = ShardSet::from_written(written).map_err(unreadable)?;
                if committed.len() != cp.shard_count {
                    return Err(unreadable(format!(
                        "its runs hold {} shards, its shard_count says {}",
                        committed.len(),
                        cp.shard_count
                    )));
                }
                Ok(read(committed))
            }
            (CHECKPOINT_FORMAT_LISTED, _, Some(listed)) => {
                let mut committed = ShardSet::default();
                listed.keys().for_each(|s| {
                    committed.insert(s);
                });
                Ok(read(committed))
            }
            (CHECKPOINT_FORMAT | CHECKPOINT_FORMAT_LISTED, _, _) => Err(unreadable(format!(
                "format `{}` without its list of shards",
                cp.format
            ))),
            (other, _, _) => Err(lance::Error::invalid_input(format!(
                "ledger checkpoint `{path}` of table `{}` has format `{other}`, this build reads \
                 `{CHECKPOINT_FORMAT}` and `{CHECKPOINT_FORMAT_LISTED}`",
                self.table
            ))),
        }
    }

    /// Writes `cp` and prunes older checkpoints.
    async fn put(&self, cp: &Checkpoint) -> lance::Result<()> {
        let body = serde_json::to_vec(cp)
            .map_err(|e| lance::Error::invalid_input(format!("ledger checkpoint: {e}")))?;
        self.store
            .put(&self.checkpoint_path(cp.table_version), &body)
            .await?;
        self.prune("ledger", ".json").await
    }

    /// Starts the next upkeep round unless one is running: rounds are numbered, round `r` is
    /// claimed by creating `upkeep-<r>` with a put-if-absent once round `r - 1` is finished
    /// (its object rewritten non-empty) or has held the table longer than [`UPKEEP_LEASE`]
    /// (its worker died). So one round runs at a time on a table, whichever workers cross
    /// marks meanwhile. `Ok(None)`: a round is running, or another worker won this one.
    /// Stores without conditional puts grant every claim (upkeep stays correct, only
    /// repeated or overlapping).
    async fn begin_round(&self) -> lance::Result<Option<u64>> {
        let newest = self.listed_objects("upkeep", "").await?.into_iter().next();
        if let Some((_, meta)) = &newest {
            let held = chrono::Utc::now() - meta.last_modified;
            if meta.size == 0 && held.to_std().unwrap_or_default() < UPKEEP_LEASE {
                return Ok(None);
            }
        }
        let round = newest.map_or(1, |(r, _)| r + 1);
        let path = self.round_path(round);
        match self
            .store
            .put_if_absent(&path, object_store::PutPayload::from_static(b""))
            .await
        {
            Ok(()) => {}
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => return Ok(None),
            Err(object_store::Error::NotImplemented { .. })
            | Err(object_store::Error::NotSupported { .. }) => {
                self.store.put(&path, &[]).await?;
            }
            Err(e) => return Err(e.into()),
        }
        self.prune("upkeep", "").await?;
        Ok(Some(round))
    }

    /// Marks upkeep round `round` finished, so the next one may start.
    async fn end_round(&self, round: u64) -> lance::Result<()> {
        self.store.put(&self.round_path(round), b"done").await?;
        Ok(())
    }

    fn gate_path(&self) -> Path {
        self.dir.clone().join("compacting")
    }

    async fn raise_gate(&self) -> lance::Result<()> {
        self.store.put(&self.gate_path(), b"compacting").await?;
        Ok(())
    }

    async fn lower_gate(&self) -> lance::Result<()> {
        match self.store.delete(&self.gate_path()).await {
            Err(e) if !is_not_found(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Waits while the gate is up and younger than [`GATE_LEASE`]; how long it waited, or
    /// `None` when the gate was down (or lapsed) at the first look.
    async fn wait_at_gate(&self) -> lance::Result<Option<std::time::Duration>> {
        use object_store::ObjectStoreExt;
        let mut started = None;
        loop {
            let up = match self.store.inner.head(&self.gate_path()).await {
                Ok(meta) => {
                    let age = chrono::Utc::now().signed_duration_since(meta.last_modified);
                    age.to_std().unwrap_or_default() < GATE_LEASE
                }
                Err(object_store::Error::NotFound { .. }) => false,
                Err(e) => return Err(e.into()),
            };
            if !up {
                return Ok(started.map(|t: std::time::Instant| t.elapsed()));
            }
            started.get_or_insert_with(std::time::Instant::now);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// The shard ledger of one table, read from its checkpoints and transaction history.
#[derive(Clone, Debug)]
pub struct ShardLedger {
    state: Arc<Mutex<LedgerState>>,
    store: LedgerStore,
}

impl ShardLedger {
    /// An empty ledger over the checkpoints in `store`; call [`ShardLedger::refresh`] to read
    /// a table's history.
    pub fn new(store: LedgerStore) -> Self {
        Self {
            state: Arc::default(),
            store,
        }
    }

    /// Brings the ledger up to version `through`: from the newest checkpoint on the first
    /// call (or when transactions it has not read yet were cleaned up), then from the
    /// transactions of the versions after it.
    pub async fn refresh(&self, table: &Dataset, through: u64) -> lance::Result<()> {
        let mut from_checkpoint = self.lock().scanned_through == 0;
        let started = std::time::Instant::now();
        loop {
            if from_checkpoint {
                if let Some(cp) = self.store.newest().await? {
                    tracing::debug!(
                        table = %self.store.table,
                        checkpoint_version = cp.table_version,
                        shards = cp.committed.len(),
                        runs = cp.committed.pieces(),
                        elapsed_s = started.elapsed().as_secs_f64(),
                        "ledger checkpoint read"
                    );
                    self.merge(cp);
                }
            }
            let from = self.lock().scanned_through + 1;
            if from > through {
                return Ok(());
            }
            let found = read_shard_commits(table, from, through).await?;
            tracing::debug!(
                table = %self.store.table,
                versions = found.len(),
                elapsed_s = started.elapsed().as_secs_f64(),
                "ledger transactions read"
            );
            let gone: Vec<u64> = found
                .iter()
                .filter_map(|(v, shard)| shard.is_none().then_some(*v))
                .collect();
            if gone.is_empty() {
                let mut state = self.lock();
                for (_, shard) in found {
                    if let Some(Some(shard)) = shard {
                        state.committed.insert(&shard);
                    }
                }
                state.scanned_through = state.scanned_through.max(through);
                return Ok(());
            }
            if from_checkpoint && self.lock().scanned_through < gone[gone.len() - 1] {
                // A newer checkpoint did not cover what is gone: nobody can say any more
                // which shards those versions committed.
                return Err(lance::Error::invalid_input(format!(
                    "table `{}`: the transactions of {} version(s) between {} and {} are gone \
                     and no ledger checkpoint in `{LEDGER_DIR}/` covers them, so which shards \
                     they committed is unknown; old versions were cleaned up by something \
                     other than `knn-diffusion gc` (which checkpoints the ledger first). \
                     Embed into a new table, or restore the deleted versions",
                    self.store.table,
                    gone.len(),
                    gone[0],
                    gone[gone.len() - 1]
                )));
            }
            from_checkpoint = true;
        }
    }

    fn merge(&self, cp: CheckpointRead) {
        let mut state = self.lock();
        if cp.table_version <= state.scanned_through {
            return;
        }
        state.committed.extend(&cp.committed);
        state.scanned_through = cp.table_version;
    }

    /// Records that `shard` was committed in `version`, which this process just created;
    /// the ledger had read every version before it.
    pub fn record_own_commit(&self, shard: &str, version: u64) {
        let mut state = self.lock();
        state.committed.insert(shard);
        if state.scanned_through + 1 == version {
            state.scanned_through = version;
        }
    }

    /// Writes a checkpoint of everything read so far; returns the version it covers.
    pub async fn checkpoint(&self) -> lance::Result<u64> {
        let cp = {
            let state = self.lock();
            Checkpoint {
                format: CHECKPOINT_FORMAT.to_string(),
                table_version: state.scanned_through,
                shard_count: state.committed.len(),
                committed: Some(state.committed.to_written()),
                shards: None,
            }
        };
        self.store.put(&cp).await?;
        Ok(cp.table_version)
    }

    /// Starts an upkeep round for upkeep mark `mark` (the table's version divided by
    /// `storage.tables.every_commits`), which this worker's commit just crossed: `Ok(None)`
    /// when the mark is not above the newest this ledger tried, when a round is running on
    /// the table (the next mark tries again), or when another worker crossing it won.
    /// Finish the round with [`ShardLedger::end_round`].
    pub async fn begin_round(&self, mark: u64) -> lance::Result<Option<u64>> {
        {
            let mut state = self.lock();
            if mark <= state.mark {
                return Ok(None);
            }
            state.mark = mark;
        }
        self.store.begin_round().await
    }

    /// Marks upkeep round `round` finished (whether it succeeded or not).
    pub async fn end_round(&self, round: u64) -> lance::Result<()> {
        self.store.end_round(round).await
    }

    /// Holds every worker's shard commits back ([`ShardLedger::wait_at_gate`]) while a
    /// compaction commits: against a stream of appends, a rewrite's commit lost all of
    /// Lance's attempts and rounds took minutes (BENCHMARKS.md, "scale"). Lower it with
    /// [`ShardLedger::lower_gate`]; one left up by a dead worker lapses after
    /// [`GATE_LEASE`].
    pub async fn raise_gate(&self) -> lance::Result<()> {
        self.store.raise_gate().await
    }

    /// Lets shard commits go on.
    pub async fn lower_gate(&self) -> lance::Result<()> {
        self.store.lower_gate().await
    }

    /// Waits while a compaction holds the gate (one HEAD request when it does not); returns
    /// how long it waited, `None` when it did not.
    pub async fn wait_at_gate(&self) -> lance::Result<Option<std::time::Duration>> {
        self.store.wait_at_gate().await
    }

    /// The newest upkeep mark this ledger has tried.
    pub fn mark(&self) -> u64 {
        self.lock().mark
    }

    /// The version the ledger has read through.
    pub fn scanned_through(&self) -> u64 {
        self.lock().scanned_through
    }

    /// Whether `shard` was committed.
    pub fn is_committed(&self, shard: &str) -> bool {
        self.lock().committed.contains(shard)
    }

    /// Number of shards committed.
    pub fn len(&self) -> usize {
        self.lock().committed.len()
    }

    /// Whether no shard is committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A commit handler that commits `shard` to `table` only if no version holds it yet.
    pub fn handler(
        &self,
        table: Dataset,
        inner: Arc<dyn CommitHandler>,
        shard: &str,
    ) -> Arc<dyn CommitHandler> {
        Arc::new(ShardLedgerHandler {
            ledger: self.clone(),
            table,
            inner,
            shard: shard.to_string(),
        })
    }
}

/// The shard each version in `from..=through` committed: `None` when the version's
/// transaction is gone (cleaned up), `Some(None)` when it committed no shard.
async fn read_shard_commits(
    table: &Dataset,
    from: u64,
    through: u64,
) -> lance::Result<Vec<(u64, Option<Option<String>>)>> {
    use futures::StreamExt;
    futures::stream::iter(from..=through)
        .map(|v| async move {
            let shard = |t: Option<DatasetTransaction>| {
                t.as_ref()
                    .and_then(|t| t.transaction_properties.as_ref())
                    .and_then(|p| p.get(SHARD_PROPERTY).cloned())
            };
            match table.read_transaction_by_version(v).await {
                Ok(t) => Ok((v, Some(shard(t)))),
                Err(e) if is_not_found(&e) => Ok((v, None)),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Whether `e` says an object is missing (a version's manifest or transaction cleaned up, a
/// checkpoint pruned), however deep Lance wrapped the store's error.
pub(crate) fn is_not_found(e: &lance::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(l) = c.downcast_ref::<lance::Error>() {
            // A shared error's `source()` skips the error it shares: look through it.
            let root = l.find_root();
            if matches!(
                root,
                lance::Error::NotFound { .. } | lance::Error::DatasetNotFound { .. }
            ) {
                return true;
            }
            if !std::ptr::eq(root, l) {
                cause = Some(root);
                continue;
            }
        }
        if let Some(object_store::Error::NotFound { .. }) = c.downcast_ref::<object_store::Error>()
        {
            return true;
        }
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Wraps a table's commit handler with the once-per-shard check (see the module docs).
#[derive(Debug)]
pub struct ShardLedgerHandler {
    ledger: ShardLedger,
    table: Dataset,
    inner: Arc<dyn CommitHandler>,
    shard: String,
}

#[async_trait::async_trait]
impl CommitHandler for ShardLedgerHandler {
    fn is_version_not_found_definitive(&self) -> bool {
        self.inner.is_version_not_found_definitive()
    }

    fn propagate_commit_error_after_success(&self) -> bool {
        self.inner.propagate_commit_error_after_success()
    }

    async fn commit(
        &self,
        manifest: &mut Manifest,
        indices: Option<Vec<IndexMetadata>>,
        base_path: &Path,
        object_store: &ObjectStore,
        manifest_writer: ManifestWriter,
        naming_scheme: ManifestNamingScheme,
        transaction: Option<Transaction>,
    ) -> Result<ManifestLocation, CommitError> {
        let target = manifest.version;
        // Every attempt, not only a round's first: an attempt already past the gate when a
        // compaction raises it can take one version from it, no more.
        let waited = self
            .ledger
            .wait_at_gate()
            .await
            .map_err(CommitError::OtherError)?;
        if let Some(waited) = waited {
            tracing::debug!(
                table = %self.ledger.store.table,
                shard = %self.shard,
                waited_ms = waited.as_millis() as u64,
                "waited for a compaction to commit"
            );
            // This manifest was made for a version the compaction has most likely taken,
            // and while it waited, upkeep may have removed versions up to its target: a
            // put-if-absent of a removed version succeeds, and would commit this shard
            // where no reader looks (rows lost, the shard free to be committed again).
            // Lance rebuilds it on the newest version after a conflict.
            return Err(CommitError::CommitConflict);
        }
        self.ledger
            .refresh(&self.table, target.saturating_sub(1))
            .await
            .map_err(CommitError::OtherError)?;
        // The same hazard without a gate, narrowed to one request: a manifest is made on
        // version `target - 1`, and if upkeep removed that version meanwhile (it removes all
        // but the newest when `keep_versions_hours = 0`), `target` may be gone too.
        if target > 1 {
            use object_store::ObjectStoreExt;
            let below = naming_scheme.manifest_path(base_path, target - 1);
            match object_store.inner.head(&below).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(CommitError::CommitConflict)
                }
                Err(e) => return Err(CommitError::OtherError(e.into())),
            }
        }
        if self.ledger.is_committed(&self.shard) {
            return Err(CommitError::OtherError(lance::Error::invalid_input(
                format!(
                    "shard `{}` was already committed; refusing a second commit",
                    self.shard
                ),
            )));
        }
        self.inner
            .commit(
                manifest,
                indices,
                base_path,
                object_store,
                manifest_writer,
                naming_scheme,
                transaction,
            )
            .await
    }
}
