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
//! The history must therefore outlive the jobs writing the table: shard commits skip Lance's
//! auto-cleanup, and `cleanup_old_versions` must not run on a table that embed jobs still
//! write to (it deletes old transaction files, and with them the record of those shards).

use lance::dataset::transaction::Transaction as DatasetTransaction;
use lance::Dataset;
use lance_io::object_store::ObjectStore;
use lance_table::format::{IndexMetadata, Manifest, Transaction};
use lance_table::io::commit::{
    CommitError, CommitHandler, ManifestLocation, ManifestNamingScheme, ManifestWriter,
};
use object_store::path::Path;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The transaction property naming the shard a commit belongs to.
pub const SHARD_PROPERTY: &str = "knn.shard";

/// What the ledger knows about one table: which shards were committed, at which version.
#[derive(Debug, Default)]
struct LedgerState {
    scanned_through: u64,
    committed: HashMap<String, u64>,
}

/// The shard ledger of one table, read from its transaction history.
#[derive(Clone, Debug, Default)]
pub struct ShardLedger {
    state: Arc<Mutex<LedgerState>>,
}

impl ShardLedger {
    /// An empty ledger; call [`ShardLedger::refresh`] to read a table's history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the transactions of versions not read yet, up to `through`.
    pub async fn refresh(&self, table: &Dataset, through: u64) -> lance::Result<()> {
        let from = self.lock().scanned_through + 1;
        if from > through {
            return Ok(());
        }
        use futures::StreamExt;
        let found: Vec<(u64, Option<DatasetTransaction>)> = futures::stream::iter(from..=through)
            .map(|v| async move {
                match table.read_transaction_by_version(v).await {
                    Ok(t) => Ok((v, t)),
                    // Versions removed by cleanup hold no shard commits we can see.
                    Err(lance::Error::NotFound { .. })
                    | Err(lance::Error::DatasetNotFound { .. }) => Ok((v, None)),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<lance::Result<_>>()?;
        let mut state = self.lock();
        for (version, txn) in found {
            let shard = txn
                .as_ref()
                .and_then(|t| t.transaction_properties.as_ref())
                .and_then(|p| p.get(SHARD_PROPERTY).cloned());
            if let Some(shard) = shard {
                let at = state.committed.entry(shard).or_insert(version);
                *at = (*at).min(version);
            }
        }
        state.scanned_through = state.scanned_through.max(through);
        Ok(())
    }

    /// The version at which `shard` was committed, if it was.
    pub fn committed_at(&self, shard: &str) -> Option<u64> {
        self.lock().committed.get(shard).copied()
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
        self.ledger
            .refresh(&self.table, target.saturating_sub(1))
            .await
            .map_err(CommitError::OtherError)?;
        if let Some(at) = self.ledger.committed_at(&self.shard) {
            return Err(CommitError::OtherError(lance::Error::invalid_input(
                format!(
                    "shard `{}` was already committed in version {at}; refusing a second commit",
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
