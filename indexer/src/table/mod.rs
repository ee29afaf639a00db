//! The embed stage's two Lance tables and how they are opened, created and appended to.
//!
//! The embeddings table's rows: `id` (u64, stable), `key`, `shard`, `image` (the training
//! image, center-cropped and re-encoded as PNG), `width` / `height` (original pixels), `emb`
//! (FixedSizeList<f32, d>, L2-normalised CLIP image embedding), then any source columns
//! `embed.source.columns` carries and score columns the `score` stage adds. The rejects table: `id`,
//! `key`, `shard`, `reason` (a short code) and `detail`. The schema metadata records which
//! CLIP made the embeddings, so embeddings of two different models never mix in one table.

pub mod maintain;

use crate::ledger::{LedgerStore, ShardLedger, SHARD_PROPERTY};
use crate::{IndexerError, Result};
use arrow_array::{RecordBatch, RecordBatchIterator};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use knn_datasets::{RetrySettings, StorageConfig, TableMaintenance};
use lance::dataset::transaction::{Operation, Transaction};
use lance::dataset::{CommitBuilder, InsertBuilder, WriteMode, WriteParams};
use lance::deps::datafusion::error::DataFusionError;
use lance::deps::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use lance::io::{ObjectStoreParams, StorageOptionsAccessor};
use lance::Dataset;
use lance_io::object_store::{ObjectStore, ObjectStoreRegistry};
use object_store::path::Path;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Schema metadata key: identity of the CLIP that made `emb`.
pub const CLIP_METADATA: &str = "knn.clip";

/// Schema of the embeddings table for embedding dimension `dim`.
pub fn embeddings_schema(dim: i32, clip_identity: &str) -> SchemaRef {
    embeddings_schema_with(dim, clip_identity, &[])
}

/// [`embeddings_schema`] with `carried` source columns after `emb` (`embed.source.columns`).
pub fn embeddings_schema_with(dim: i32, clip_identity: &str, carried: &[Field]) -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let mut fields = vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("shard", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("emb", DataType::FixedSizeList(item, dim), false),
    ];
    fields.extend(carried.iter().cloned());
    Arc::new(Schema::new(fields).with_metadata(HashMap::from([(
        CLIP_METADATA.to_string(),
        clip_identity.to_string(),
    )])))
}

/// Schema of the rejects table.
pub fn rejects_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("shard", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
    ]))
}

/// A record left out of a table, and why: one row of a rejects table.
#[derive(Clone, Debug, PartialEq)]
pub struct Reject {
    /// The record's id.
    pub id: u64,
    /// Its key in its shard.
    pub key: String,
    /// Its shard.
    pub shard: String,
    /// A short reason code (`corrupt`, `empty_caption`, ...).
    pub code: String,
    /// What exactly was wrong.
    pub detail: String,
}

/// Rejects as a batch of [`rejects_schema`].
pub fn rejects_batch(rejects: &[Reject]) -> Result<RecordBatch> {
    let strings = |f: fn(&Reject) -> &str| -> arrow_array::ArrayRef {
        Arc::new(arrow_array::StringArray::from_iter_values(
            rejects.iter().map(f),
        ))
    };
    let columns: Vec<arrow_array::ArrayRef> = vec![
        Arc::new(arrow_array::UInt64Array::from_iter_values(
            rejects.iter().map(|r| r.id),
        )),
        strings(|r| &r.key),
        strings(|r| &r.shard),
        strings(|r| &r.code),
        strings(|r| &r.detail),
    ];
    RecordBatch::try_new(rejects_schema(), columns)
        .map_err(|e| IndexerError::Internal(format!("rejects batch: {e}")))
}

/// A Lance table that shards are committed to exactly once.
#[derive(Clone, Debug)]
pub struct ShardedTable {
    uri: String,
    /// Lance's options for the store (`[storage]`).
    storage: HashMap<String, String>,
    /// How the operations object_store does not retry itself are retried.
    retry: RetrySettings,
    schema: SchemaRef,
    ledger: ShardLedger,
    /// The table's root in its object store (where `create`'s marker and the ledger's
    /// checkpoints go).
    store: Arc<ObjectStore>,
    base: Path,
    upkeep: TableMaintenance,
    /// Columns the table has after this run's (added later, e.g. by `score`).
    added_columns: Vec<String>,
}

/// The URI of a table beside `uri`: its name with `-suffix` before `.lance`
/// (`runs/x/emb.lance` → `runs/x/emb-knn.lance`).
pub fn sibling_uri(uri: &str, suffix: &str) -> String {
    let t = uri.trim_end_matches('/');
    match t.strip_suffix(".lance") {
        Some(stem) => format!("{stem}-{suffix}.lance"),
        None => format!("{t}-{suffix}"),
    }
}

/// Name of the tag a long reader puts on the table version it reads: `<kind>-<last path part
/// of reader>-<hash of reader>`, so one reader (a kNN output, a run directory) has one tag,
/// moved when it reads a newer version. Lance's clean-up keeps tagged versions, which is what
/// lets `[storage.tables]` remove the untagged ones early.
pub fn reader_tag(kind: &str, reader: &str) -> String {
    use sha2::{Digest, Sha256};
    let reader = reader.trim_end_matches('/');
    let name: String = reader
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let sha = Sha256::digest(reader.as_bytes());
    format!(
        "{kind}-{name}-{:x}",
        u32::from_be_bytes([sha[0], sha[1], sha[2], sha[3]])
    )
}

/// Tags the version `ds` is at as `tag` (made by [`reader_tag`]) on the table at `uri`, or
/// moves the tag there when it names another version. A table that cannot be tagged
/// (read-only storage) gets a warning saying what a clean-up could then break (`breaks`),
/// and the run goes on.
pub async fn pin_version(ds: &Dataset, uri: &str, tag: &str, breaks: &str) {
    let version = ds.version().version;
    let tags = ds.tags();
    let pinned = match tags.create(tag, version).await {
        Ok(()) => Ok(()),
        Err(lance::Error::RefConflict { .. }) => match tags.get_version(tag).await {
            Ok(v) if v == version => Ok(()),
            Ok(_) => tags.update(tag, version).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match pinned {
        Ok(()) => tracing::debug!(table = uri, version, tag, "table version tagged"),
        Err(e) => tracing::warn!(
            table = uri,
            version,
            tag,
            error = %e,
            "cannot tag the table version this run reads; a clean-up of that table (upkeep \
             or `knn-diffusion gc`) may remove it: {breaks}"
        ),
    }
}

/// Opens the table at `uri` (at `version`, or the latest) with `storage` options.
pub async fn load_dataset(
    uri: &str,
    storage: &HashMap<String, String>,
    version: Option<u64>,
) -> lance::Result<Dataset> {
    // The latest version is found by listing, then its manifest read: `gc` may remove that
    // version in between (a newer one exists by then), so a missing manifest is looked
    // for again.
    let mut tries = 0;
    loop {
        let mut builder = lance::dataset::builder::DatasetBuilder::from_uri(uri)
            .with_storage_options(storage.clone());
        if let Some(v) = version {
            builder = builder.with_version(v);
        }
        match builder.load().await {
            Err(e)
                if version.is_none()
                    && tries < 3
                    && !matches!(e, lance::Error::DatasetNotFound { .. })
                    && crate::ledger::is_not_found(&e) =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Lance store parameters carrying `storage` options.
pub(crate) fn store_params(storage: &HashMap<String, String>) -> ObjectStoreParams {
    ObjectStoreParams {
        storage_options_accessor: Some(Arc::new(StorageOptionsAccessor::with_static_options(
            storage.clone(),
        ))),
        ..Default::default()
    }
}

/// The object store holding the table at `uri`, and the table's root in it.
pub(crate) async fn table_store(
    uri: &str,
    storage: &HashMap<String, String>,
) -> Result<(Arc<ObjectStore>, Path)> {
    ObjectStore::from_uri_and_params(
        Arc::new(ObjectStoreRegistry::default()),
        uri,
        &store_params(storage),
    )
    .await
    .map_err(|e| IndexerError::lance(uri, e))
}

impl ShardedTable {
    /// Commits `rejects` of shard `shard` to this (rejects) table in one commit, once: nothing
    /// when there are none or the shard is already in.
    pub async fn commit_rejects(&self, shard: &str, rejects: &[Reject]) -> Result<()> {
        if rejects.is_empty() || self.is_committed(shard) {
            return Ok(());
        }
        let batch = rejects_batch(rejects)?;
        let ds = Arc::new(self.open().await?);
        let stream = Box::pin(RecordBatchStreamAdapter::new(
            batch.schema(),
            futures::stream::iter([Ok(batch)]),
        ));
        let txn = self.write_uncommitted(&ds, stream).await?;
        self.commit_shard(ds, shard, txn).await?;
        Ok(())
    }

    /// Opens the table at `uri`, creating it empty with `schema` if it does not exist; an
    /// existing table must have the same columns and the same CLIP identity. `storage`
    /// gives the store's options, its retries and the table's upkeep (`[storage.tables]`).
    pub async fn open_or_create(
        uri: &str,
        schema: SchemaRef,
        storage: &StorageConfig,
    ) -> Result<Self> {
        maintain::check(&storage.tables)?;
        let lance_options = storage.to_lance_options();
        let (store, base) = table_store(uri, &lance_options).await?;
        let mut table = Self {
            uri: uri.to_string(),
            storage: lance_options,
            retry: storage.retry.clone(),
            schema,
            ledger: ShardLedger::new(LedgerStore::new(store.clone(), &base, uri)),
            store,
            base,
            upkeep: storage.tables.clone(),
            added_columns: Vec::new(),
        };
        let ds = match table.open().await {
            Ok(ds) => ds,
            Err(IndexerError::Lance {
                source: lance::Error::DatasetNotFound { .. },
                ..
            }) => match table.create().await {
                Ok(ds) => ds,
                Err(e) if e.is_unwritable() => return Err(e),
                // Another worker created it first.
                Err(_) => table.open().await?,
            },
            Err(e) => return Err(e),
        };
        table.added_columns = table.check_schema(&ds)?;
        Ok(table)
    }

    /// The table URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Opens the latest version.
    pub async fn open(&self) -> Result<Dataset> {
        load_dataset(&self.uri, &self.storage, None)
            .await
            .map_err(|e| IndexerError::lance(&self.uri, e))
    }

    /// Creates the table empty, once however many workers race to: Lance commits a `Create`
    /// as an `Overwrite`, so a second creator that starts before the table exists would
    /// overwrite the first's version (and any shard it committed meanwhile). One creator wins
    /// a put-if-absent marker object in the table's directory and creates; the others wait
    /// for the table to appear. A marker left by a creator that died is waited out
    /// (`CREATE_WAIT`), then the table is created anyway.
    async fn create(&self) -> Result<Dataset> {
        const CREATE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
        let marker = self.base.clone().join("_knn_create.marker");
        let put = self
            .again_after_store_faults("creating the table's marker", || async {
                match self
                    .store
                    .put_if_absent(
                        &marker,
                        object_store::PutPayload::from_static(b"created by knn-diffusion\n"),
                    )
                    .await
                {
                    Err(e @ object_store::Error::Generic { .. }) => {
                        Err(IndexerError::lance(&self.uri, lance::Error::from(e)))
                    }
                    other => Ok(other),
                }
            })
            .await?;
        match put {
            Ok(()) | Err(object_store::Error::NotSupported { .. }) => {
                self.again_after_store_faults("creating the table", || self.create_now())
                    .await
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                let deadline = std::time::Instant::now() + CREATE_WAIT;
                while std::time::Instant::now() < deadline {
                    match self.open().await {
                        Ok(ds) => return Ok(ds),
                        Err(IndexerError::Lance {
                            source: lance::Error::DatasetNotFound { .. },
                            ..
                        }) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                        Err(e) => return Err(e),
                    }
                }
                tracing::warn!(table = %self.uri, "a creator left its marker but no table; creating it");
                self.create_now().await
            }
            Err(e) => Err(IndexerError::lance(&self.uri, lance::Error::from(e))),
        }
    }

    async fn create_now(&self) -> Result<Dataset> {
        let params = WriteParams {
            mode: WriteMode::Create,
            store_params: Some(store_params(&self.storage)),
            ..Default::default()
        };
        let empty = RecordBatch::new_empty(self.schema.clone());
        let reader = RecordBatchIterator::new(vec![Ok(empty)], self.schema.clone());
        Dataset::write(reader, self.uri.as_str(), Some(params))
            .await
            .map_err(|e| IndexerError::lance(&self.uri, e))
    }

    /// Columns added to the table after this run's own (`score`'s): reading and skipping
    /// committed shards is fine, appending rows is not.
    pub fn added_columns(&self) -> &[String] {
        &self.added_columns
    }

    /// Checks the table has this run's columns (first, in order) and CLIP; returns the
    /// names of nullable columns added after them.
    fn check_schema(&self, ds: &Dataset) -> Result<Vec<String>> {
        let have: Schema = ds.schema().into();
        let names = |s: &Schema| {
            s.fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
        };
        let (mine, theirs) = (names(&self.schema), names(&have));
        let added = &have.fields()[mine.len().min(theirs.len())..];
        if !theirs.starts_with(&mine) || added.iter().any(|f| !f.is_nullable()) {
            return Err(IndexerError::SchemaMismatch {
                table: self.uri.clone(),
                detail: format!(
                    "table has [{}], this run writes [{}]",
                    names(&have).join(", "),
                    names(&self.schema).join(", ")
                ),
            });
        }
        if let Some(want) = self.schema.metadata().get(CLIP_METADATA) {
            let got = ds.schema().metadata.get(CLIP_METADATA);
            if got != Some(want) {
                return Err(IndexerError::SchemaMismatch {
                    table: self.uri.clone(),
                    detail: format!(
                        "its embeddings come from CLIP `{}`, this run uses `{want}`",
                        got.map(String::as_str).unwrap_or("unknown")
                    ),
                });
            }
        }
        Ok(added.iter().map(|f| f.name().clone()).collect())
    }

    /// Reads the shard ledger up to the latest version; returns the committed shard count.
    pub async fn refresh_ledger(&self) -> Result<usize> {
        let ds = self.open().await?;
        let latest = ds.version().version;
        self.ledger
            .refresh(&ds, latest)
            .await
            .map_err(|e| IndexerError::lance(&self.uri, e))?;
        Ok(self.ledger.len())
    }

    /// Whether `shard` is committed (as of the last refresh).
    pub fn is_committed(&self, shard: &str) -> bool {
        self.ledger.is_committed(shard)
    }

    /// Write parameters for appending uncommitted fragments.
    pub fn append_params(&self) -> WriteParams {
        WriteParams {
            mode: WriteMode::Append,
            store_params: Some(store_params(&self.storage)),
            ..Default::default()
        }
    }

    /// Writes `batches` as uncommitted fragments (nothing is visible until
    /// [`ShardedTable::commit_shard`]).
    pub async fn write_uncommitted(
        &self,
        ds: &Arc<Dataset>,
        source: lance::deps::datafusion::execution::SendableRecordBatchStream,
    ) -> Result<Transaction> {
        let params = self.append_params();
        InsertBuilder::new(ds.clone())
            .with_params(&params)
            .execute_uncommitted_stream(source)
            .await
            .map_err(|e| IndexerError::lance(&self.uri, e))
    }

    /// Commits `transaction` as shard `shard`. Returns `Ok(false)` when the shard was already
    /// committed (by an earlier run or a concurrent duplicate), in which case nothing changes.
    ///
    /// The append is rebased onto the latest version first (appends never conflict), so the
    /// commit reads only the versions made since, however long the shard took to write. A
    /// commit that crosses a `[storage.tables]` mark then does the table's upkeep
    /// ([`maintain`]); upkeep that fails is logged and leaves the commit standing.
    pub async fn commit_shard(
        &self,
        ds: Arc<Dataset>,
        shard: &str,
        transaction: Transaction,
    ) -> Result<bool> {
        // Set on the transaction itself: lance 14.0.2's `CommitBuilder` keeps
        // `with_transaction_properties` but does not apply it in `execute`.
        let mut transaction = transaction;
        let mut props = transaction
            .transaction_properties
            .as_deref()
            .cloned()
            .unwrap_or_default();
        props.insert(SHARD_PROPERTY.to_string(), shard.to_string());
        transaction.transaction_properties = Some(Arc::new(props));
        let inner = lance_table::io::commit::commit_handler_from_url(
            &self.uri,
            &Some(store_params(&self.storage)),
        )
        .await
        .map_err(|e| IndexerError::lance(&self.uri, e))?;
        // A version the commit reads while rebasing can be removed by `gc` under it (with
        // `keep_versions_hours` near 0): then the commit starts again from the new latest.
        //
        // Lance retries a lost race with a backoff whose time slot is the first attempt's
        // duration: one slow first attempt (a catch-up, a busy machine) gives that writer
        // slots of seconds while the others retry every few milliseconds, and it loses
        // every race until its timeout (BENCHMARKS.md, "scale: commit and ledger cost").
        // So the commit runs in rounds of a few retries, each with a fresh backoff, until
        // `COMMIT_PATIENCE` has passed.
        let started = std::time::Instant::now();
        let (mut tries, mut rounds, mut store_faults) = (0, 0u32, 0usize);
        let committed = loop {
            let latest = Arc::new(self.open().await?);
            let mut transaction = transaction.clone();
            let base = if latest.version().version > ds.version().version {
                transaction.read_version = latest.version().version;
                latest
            } else {
                ds.clone()
            };
            let handler = self.ledger.handler((*base).clone(), inner.clone(), shard);
            let result = CommitBuilder::new(base)
                .with_store_params(store_params(&self.storage))
                .with_commit_handler(handler)
                // Old versions' transactions are the ledger until a checkpoint covers them:
                // only `maintain` removes versions, never Lance's auto-cleanup.
                .with_skip_auto_cleanup(true)
                .with_max_retries(COMMIT_ROUND_RETRIES)
                .with_retry_timeout(COMMIT_ROUND)
                .execute(transaction)
                .await;
            match result {
                Ok(committed) => break committed,
                Err(_) if self.ledger.is_committed(shard) => return Ok(false),
                Err(e) if tries < 3 && crate::ledger::is_not_found(&e) => tries += 1,
                // The store failed the manifest's conditional write in a way it does not
                // retry itself (a reset connection: the write may or may not have landed).
                // Committing again is safe: the ledger finds the shard if it did land.
                Err(e) if store_faults < self.retry.max_retries && is_store_fault(&e) => {
                    store_faults += 1;
                    let wait = self.retry.backoff(store_faults);
                    tracing::info!(table = %self.uri, shard, attempt = store_faults, error = %e, "a shard commit met a store fault; trying again in {:.2} s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
                // Appends only wait for each other; many workers committing at once is not
                // an error, however long the queue.
                Err(
                    lance::Error::TooMuchWriteContention { .. }
                    | lance::Error::CommitConflict { .. },
                ) if started.elapsed() < COMMIT_PATIENCE => {
                    rounds += 1;
                    tracing::debug!(table = %self.uri, shard, rounds, "commit round lost to other writers; starting another");
                    // A short pause, spread by shard and round, so that losers do not
                    // start their rounds in step.
                    let spread = shard.bytes().fold(u64::from(rounds), |h, b| {
                        h.wrapping_mul(31).wrapping_add(u64::from(b))
                    });
                    tokio::time::sleep(std::time::Duration::from_millis(spread % 50)).await;
                }
                Err(e) => {
                    if rounds > 0 {
                        tracing::warn!(
                            table = %self.uri,
                            shard,
                            rounds,
                            waited_s = started.elapsed().as_secs_f64(),
                            "a shard commit gave up against other writers; fewer workers a \
                             table, or larger shards, make fewer commits"
                        );
                    }
                    return Err(IndexerError::lance(&self.uri, e));
                }
            }
        };
        let version = committed.version().version;
        self.ledger.record_own_commit(shard, version);
        let every = self.upkeep.every_commits;
        if every > 0 && version / every > self.ledger.mark() {
            if let Err(e) = maintain::maintain(self, committed, version / every).await {
                tracing::warn!(table = %self.uri, error = %e, "table upkeep failed; the commit stands, the next mark retries");
            }
        }
        Ok(true)
    }
}

impl ShardedTable {
    /// Runs `op` again while it fails on a store fault the object store gave up on or does
    /// not retry (a conditional write whose connection was reset), as `[storage.retry]`
    /// allows. Only for operations that are safe to repeat.
    async fn again_after_store_faults<T, F>(&self, what: &str, op: impl FnMut() -> F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let passes = |e: &IndexerError| matches!(e, IndexerError::Lance { source, .. } if is_store_fault(source));
        let at = format!("{} ({what})", self.uri);
        self.retry.again(&at, passes, op).await
    }
}

/// Whether a commit failed on the object store's transport or a server error (object_store's
/// `Generic`), rather than on a conflict, a missing file, a refusal or a full, read-only or
/// forbidden file system (which trying again cannot help).
fn is_store_fault(e: &lance::Error) -> bool {
    if knn_datasets::Unwritable::find(e).is_some() {
        return false;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(os) = c.downcast_ref::<object_store::Error>() {
            return matches!(os, object_store::Error::Generic { .. });
        }
        cause = c.source();
    }
    false
}

/// Retries of one commit round (see [`ShardedTable::commit_shard`]).
const COMMIT_ROUND_RETRIES: u32 = 10;
/// Longest commit round.
const COMMIT_ROUND: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a shard commit keeps trying against other writers before it fails.
const COMMIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// Streams one shard's batches into uncommitted fragments of a [`ShardedTable`] while the
/// shard is still being computed; [`ShardWriter::finish`] gives the transaction for
/// [`ShardedTable::commit_shard`]. Nothing is visible before that commit.
pub struct ShardWriter {
    table: ShardedTable,
    ds: Arc<Dataset>,
    running: Option<RunningWriter>,
}

type RunningWriter = (
    mpsc::Sender<std::result::Result<RecordBatch, DataFusionError>>,
    tokio::task::JoinHandle<Result<Transaction>>,
);

impl ShardWriter {
    /// A writer appending to `ds` (the version the shard's commit will be based on).
    pub fn new(table: &ShardedTable, ds: Arc<Dataset>) -> Self {
        Self {
            table: table.clone(),
            ds,
            running: None,
        }
    }

    /// Writes `batch` (in the table's schema).
    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let (tx, _) = self.running.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(2);
            let rx = futures::stream::unfold(rx, |mut rx: mpsc::Receiver<_>| async move {
                rx.recv().await.map(|b| (b, rx))
            });
            let source = Box::pin(RecordBatchStreamAdapter::new(self.table.schema.clone(), rx));
            let table = self.table.clone();
            let ds = self.ds.clone();
            let task = tokio::spawn(async move { table.write_uncommitted(&ds, source).await });
            (tx, task)
        });
        if tx.send(Ok(batch)).await.is_err() {
            // The writer stopped early: its own error says why.
            if let Some((_, task)) = self.running.take() {
                join_writer(task).await?;
            }
            return Err(IndexerError::Internal(format!(
                "the writer of `{}` stopped without an error",
                self.table.uri
            )));
        }
        Ok(())
    }

    /// Ends the stream; the transaction appends everything written (nothing if no batch was).
    pub async fn finish(self) -> Result<Transaction> {
        match self.running {
            Some((tx, task)) => {
                drop(tx);
                join_writer(task).await
            }
            None => Ok(Transaction::new(
                self.ds.version().version,
                Operation::Append { fragments: vec![] },
                None,
            )),
        }
    }
}

async fn join_writer(task: tokio::task::JoinHandle<Result<Transaction>>) -> Result<Transaction> {
    task.await
        .map_err(|e| IndexerError::Internal(format!("writer task died: {e}")))?
}
