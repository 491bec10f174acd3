//! The output as a Delta Lake table: one Delta version commits one epoch.
//!
//! Workers publish their Parquet files under `data/` and `errors/` (crate::sink); once an
//! epoch is finished everywhere, worker 0 commits one Delta version that adds them, with the
//! application transaction `txn { appId: "verger", version: <epoch> }` that Spark's Delta
//! sink uses for the same purpose. A file is part of the table only once a version adds it,
//! so every Delta reader sees committed epochs only, each once; a file of an epoch that did
//! not commit (a crash, a kill) is invisible, and its keys are processed again by the next
//! run, which reads the table's txn version to know where to go on.
//!
//! What makes the table verger's is in its metadata ([`Identity`]): the model, the SHA-256
//! of its weights and how rows were derived. An output holds one model's features, or its
//! rows would not be comparable, so a run with another model is refused.
//!
//! The Delta log is read and written by delta-rs (`deltalake-core`, S3 through
//! `deltalake-aws`: a conditional put makes each version, no lock service); the data files
//! go through the same object store ([`DeltaOutput::files`]), so the log and the files it
//! names share one client, credentials and retry policy, local or S3.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Once};
use std::time::Duration;

use deltalake_core::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake_core::kernel::{Action, Add, Remove, StructType, Transaction};
use deltalake_core::logstore::LogStore;
use deltalake_core::operations::create::CreateBuilder;
use deltalake_core::protocol::{DeltaOperation, OutputMode, SaveMode};
use deltalake_core::{DeltaTable, DeltaTableBuilder, TableProperty};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::commit::SnapshotFile;
pub use crate::error::CommitError;
use crate::record::{Epoch, FileKind, RowId, Stage, WrittenFile, FEATURE_DIM};
use crate::storage::s3::OUTAGE_PAUSES;
use crate::storage::table_files::TableFiles;
use crate::storage::{check_key, ObjectStore, StoreOptions};
use crate::table;

/// The Delta log's folder in the output store.
pub const LOG_PREFIX: &str = "_delta_log/";

/// The manifests of verger's earlier output layout: an output holding them is refused.
pub const OLD_MANIFEST_PREFIX: &str = "_manifest/";

/// The application id of verger's `txn` actions: the version of its txn is the last
/// committed epoch.
pub const APP_ID: &str = "verger";

/// Table metadata (configuration) keys.
const MODEL_KEY: &str = "verger.model";
const WEIGHTS_KEY: &str = "verger.weightsSha256";
const DERIVATION_KEY: &str = "verger.derivation";
const DIM_KEY: &str = "verger.embeddingDim";

/// The key under which a version's commitInfo holds its [`EpochCommit`].
const COMMIT_INFO_KEY: &str = "verger";

/// Delta versions between checkpoints (`delta.checkpointInterval`): opening the table reads
/// the last checkpoint and the versions after it, not the whole log.
pub const CHECKPOINT_INTERVAL: u64 = 100;

/// Key of the file that `worker` of `run` writes for `epoch` into table `kind`:
/// `data/e<epoch>-w<worker>-<run>.parquet` or `errors/…`. The run id keeps it apart from any
/// leftover of an earlier run; the epoch and worker, from every other file of this run.
pub fn file_key(kind: FileKind, epoch: Epoch, worker: usize, run: &str) -> String {
    let dir = match kind {
        FileKind::Data => "data",
        FileKind::Errors => "errors",
    };
    format!("{dir}/e{epoch:010}-w{worker:04}-{run}.parquet")
}

/// What computed an output's rows: stored in the table's metadata when verger creates it,
/// compared with every later run's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The model's name.
    pub model: String,
    /// The SHA-256 of its weights.
    pub weights_sha256: String,
    /// How rows are derived from objects besides the model (EXIF orientation, label rule).
    pub derivation: String,
    /// The extra string columns of a label pattern.
    pub columns: Vec<String>,
}

/// The record of one committed epoch, in its Delta version's commitInfo (`verger` key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochCommit {
    /// The epoch.
    pub epoch: Epoch,
    /// Id of the run that committed it.
    pub run: String,
    /// Model that computed the embeddings.
    pub model: String,
    /// SHA-256 of the weights that computed them.
    pub weights_sha256: String,
    /// How rows were derived from objects besides the model.
    #[serde(default)]
    pub derivation: String,
    /// Embedding rows in the epoch.
    pub rows: u64,
    /// Error records in the epoch.
    pub errors: u64,
    /// The files, data and errors.
    pub files: Vec<WrittenFile>,
    /// When the run that wrote it started, in ms since the Unix epoch (throughput per epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_started_ms: Option<u64>,
    /// When its files were all published and the commit made, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_ms: Option<u64>,
    /// Files of earlier epochs rewritten without the records this epoch removed (added).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewritten: Vec<WrittenFile>,
    /// Files this epoch removed from the snapshot (each rewritten, or left with no record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// Files merged from small files of earlier epochs (added with `dataChange` false).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compacted: Vec<WrittenFile>,
    /// The small files those merges replace (removed with `dataChange` false).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compacted_from: Vec<String>,
    /// Older records of this epoch's keys that it removed (replaced objects, retried reads).
    #[serde(default)]
    pub superseded: u64,
    /// Records it removed because their object was deleted from the input.
    #[serde(default)]
    pub deleted: u64,
}

/// An epoch being committed, with the rows that the source counts once it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedEpoch {
    /// Its commit record.
    pub commit: EpochCommit,
    /// Its embedding rows.
    pub rows: Vec<RowId>,
    /// Its error records of failed reads (stage `fetch`): what watch mode lists again.
    pub failed_reads: Vec<RowId>,
    /// Each of its files with the keys of its records.
    pub file_keys: Vec<(String, Vec<String>)>,
    /// Keys deleted from the input (hashes) whose records it removes.
    pub deleted: Vec<crate::commit::KeyHash>,
    /// The records that removal took out, with their epochs (once committed).
    pub deleted_rows: Vec<(Epoch, RowId)>,
}

/// Where an output's Delta table is and how delta-rs reaches it.
#[derive(Clone, Debug)]
pub struct DeltaOutput {
    url: Url,
    options: HashMap<String, String>,
    location: String,
    /// Pauses before each retry of a log operation that failed on the store (an outage, a
    /// reset connection): the first `--s3-outage-retries` of the S3 store's schedule.
    pauses: &'static [Duration],
}

static S3_HANDLERS: Once = Once::new();

impl DeltaOutput {
    /// The table of the output `store` (a local directory or `s3://bucket/prefix`), reached
    /// with the same endpoint and addressing as verger's S3 client; credentials come from the
    /// default chain (environment, profile, EC2 role).
    pub fn of(store: &dyn ObjectStore, options: &StoreOptions) -> Result<Self, CommitError> {
        let location = store.location();
        let bad = |reason: String| CommitError::Location {
            location: location.clone(),
            reason,
        };
        let mut storage = HashMap::new();
        let url = if location.starts_with("s3://") {
            S3_HANDLERS.call_once(|| deltalake_aws::register_handlers(None));
            let endpoint = options
                .endpoint_url
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
            if let Some(endpoint) = endpoint {
                if endpoint.starts_with("http://") {
                    storage.insert("aws_allow_http".into(), "true".into());
                }
                storage.insert("aws_endpoint".into(), endpoint);
            }
            storage.insert(
                "aws_virtual_hosted_style_request".into(),
                (!options.path_style).to_string(),
            );
            // The SDK's default chain (profiles, EC2 roles) even with a custom endpoint.
            storage.insert("AWS_FORCE_CREDENTIAL_LOAD".into(), "true".into());
            // As patient with the table's files as verger's client is with the images: the
            // SDK's attempts and then the outage's, within object_store's 3 minutes.
            let retries = options.max_attempts.saturating_sub(1) as usize + options.outage_retries;
            storage.insert("max_retries".into(), retries.to_string());
            Url::parse(location.trim_end_matches('/')).map_err(|e| bad(e.to_string()))?
        } else {
            let root = store
                .local_root()
                .ok_or_else(|| bad("neither a local folder nor s3://".into()))?;
            let root = std::path::absolute(root).map_err(|e| bad(e.to_string()))?;
            Url::from_directory_path(&root).map_err(|()| bad("not an absolute path".into()))?
        };
        let pauses = &OUTAGE_PAUSES[..options.outage_retries.min(OUTAGE_PAUSES.len())];
        Ok(Self {
            url,
            options: storage,
            location,
            pauses,
        })
    }

    /// The output, as the user named it.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn delta_error(&self) -> impl Fn(deltalake_core::DeltaTableError) -> CommitError + '_ {
        |source| CommitError::Delta {
            location: self.location.clone(),
            source: Box::new(source),
        }
    }

    fn builder(&self) -> Result<DeltaTableBuilder, CommitError> {
        Ok(DeltaTableBuilder::from_url(self.url.clone())
            .map_err(self.delta_error())?
            .with_storage_options(self.options.clone()))
    }

    /// `own` (the store of this output's location) with its table files read and written
    /// through the object store delta-rs opens for the table: one client, credentials and
    /// retry policy for the log and the files it names ([`TableFiles`]).
    pub fn files(
        &self,
        own: Arc<dyn ObjectStore>,
        options: &StoreOptions,
    ) -> Result<Arc<dyn ObjectStore>, CommitError> {
        let objects = self
            .builder()?
            .build_storage()
            .map_err(self.delta_error())?
            .object_store(None);
        Ok(Arc::new(TableFiles::new(objects, own, options)))
    }

    /// The table at its latest version (or at `version`), or `None` if there is none yet.
    /// Retried through a store outage, as verger's own store operations are.
    pub async fn open(&self, version: Option<u64>) -> Result<Option<DeltaTable>, CommitError> {
        self.retrying("opening the table", || self.open_once(version))
            .await
    }

    async fn open_once(&self, version: Option<u64>) -> Result<Option<DeltaTable>, CommitError> {
        let mut table = self.builder()?.build().map_err(self.delta_error())?;
        if !table
            .verify_deltatable_existence()
            .await
            .map_err(self.delta_error())?
        {
            return Ok(None);
        }
        match version {
            Some(v) => table.load_version(v).await,
            None => table.load().await,
        }
        .map_err(self.delta_error())?;
        Ok(Some(table))
    }

    /// Refuses an output that is not (or not yet) verger's table: the earlier layout
    /// (`_manifest/`), or a Delta table another tool made. Cheap: no data file is read.
    pub async fn check(&self, store: &dyn ObjectStore) -> Result<(), CommitError> {
        refuse_old_layout(self, store).await?;
        if let Some(table) = self.open(None).await? {
            identity_of(self, &table)?;
        }
        Ok(())
    }

    /// Creates the table with verger's schema and `identity` in its metadata. Retried through
    /// a store outage; a creation that landed although its request failed is found by the
    /// next attempt, which then only checks that the table is verger's.
    /// A checkpoint is written every `checkpoint_interval` versions; removed files are kept as
    /// tombstones in checkpoints for `deleted_file_retention` (Delta's default, a week, if
    /// `None`).
    pub async fn create(
        &self,
        identity: &Identity,
        checkpoint_interval: u64,
        deleted_file_retention: Option<Duration>,
    ) -> Result<(), CommitError> {
        self.retrying("creating the table", || async {
            match self.open_once(None).await? {
                Some(table) => identity_of(self, &table).map(|_| ()),
                None => {
                    self.create_once(identity, checkpoint_interval, deleted_file_retention)
                        .await
                }
            }
        })
        .await
    }

    async fn create_once(
        &self,
        identity: &Identity,
        checkpoint_interval: u64,
        deleted_file_retention: Option<Duration>,
    ) -> Result<(), CommitError> {
        let schema = table::table_schema(&identity.columns);
        let kernel: StructType = schema
            .as_ref()
            .try_into_kernel()
            .map_err(|e| self.delta_error()(e.into()))?;
        let log_store = self
            .builder()?
            .build_storage()
            .map_err(self.delta_error())?;
        CreateBuilder::new()
            .with_log_store(log_store)
            .with_table_name("verger")
            .with_comment("CNN embeddings of images, one row per object version (verger)")
            .with_columns(kernel.fields().cloned())
            .with_save_mode(SaveMode::ErrorIfExists)
            // verger's own keys (`verger.*`) beside Delta's.
            .with_raise_if_key_not_exists(false)
            .with_configuration_property(
                TableProperty::CheckpointInterval,
                Some(checkpoint_interval.max(1).to_string()),
            )
            .with_configuration_property(
                TableProperty::DeletedFileRetentionDuration,
                deleted_file_retention.map(|d| format!("interval {} seconds", d.as_secs())),
            )
            .with_configuration([
                (MODEL_KEY.to_string(), Some(identity.model.clone())),
                (
                    WEIGHTS_KEY.to_string(),
                    Some(identity.weights_sha256.clone()),
                ),
                (
                    DERIVATION_KEY.to_string(),
                    Some(identity.derivation.clone()),
                ),
                (DIM_KEY.to_string(), Some(FEATURE_DIM.to_string())),
            ])
            .await
            .map(|_| ())
            .map_err(self.delta_error())
    }

    /// Commits `epoch`: one Delta version adding its files, with `txn(verger, epoch)`, into
    /// `table` (opened here if `None`). A version that landed although the request failed (a
    /// timeout or reset after the write) is recognised by the table's txn version and counts
    /// as committed; an epoch that another run committed is refused, never appended twice. A
    /// failure of the store is retried with the outage pauses, each retry reading the log
    /// first to know whether the previous attempt landed.
    pub async fn commit(
        &self,
        table: &mut Option<DeltaTable>,
        epoch: &EpochCommit,
    ) -> Result<(), CommitError> {
        let mut first = true;
        let table = &tokio::sync::Mutex::new(table);
        self.retrying("committing", || {
            let refresh = !std::mem::replace(&mut first, false);
            async move {
                let mut guard = table.lock().await;
                let slot: &mut Option<DeltaTable> = &mut guard;
                if slot.is_none() {
                    *slot = self.open_once(None).await?;
                } else if refresh {
                    let t = slot.as_mut().expect("checked");
                    t.update_incremental(None)
                        .await
                        .map_err(self.delta_error())?;
                }
                match slot.as_mut() {
                    Some(t) => self.commit_once(t, epoch).await,
                    None => Err(CommitError::Location {
                        location: self.location.clone(),
                        reason: "its Delta table is gone".into(),
                    }),
                }
            }
        })
        .await
    }

    /// One attempt of [`commit`](Self::commit) on a table read up to date.
    async fn commit_once(
        &self,
        table: &mut DeltaTable,
        epoch: &EpochCommit,
    ) -> Result<(), CommitError> {
        let txn = self.txn_version(table).await?;
        if txn.is_some_and(|v| v >= epoch.epoch as i64) {
            return match self.already_committed(table, epoch).await {
                CommitError::AlreadyCommitted { run, .. } if run == epoch.run => Ok(()),
                other => Err(other),
            };
        }
        let now = crate::commit::unix_ms(std::time::SystemTime::now()) as i64;
        let add = |f: &WrittenFile, data_change: bool| {
            Action::Add(Add {
                path: f.key.clone(),
                size: f.bytes as i64,
                modification_time: now,
                data_change,
                stats: Some(f.stats.clone()),
                ..Default::default()
            })
        };
        let remove = |path: &String, data_change: bool| {
            Action::Remove(Remove {
                path: path.clone(),
                data_change,
                deletion_timestamp: Some(now),
                ..Default::default()
            })
        };
        // A merge of small files rearranges records without changing them: `dataChange`
        // false, so that a streaming reader does not read them again.
        let adds = (epoch
            .files
            .iter()
            .chain(&epoch.rewritten)
            .map(|f| add(f, true)))
        .chain(epoch.compacted.iter().map(|f| add(f, false)));
        let removes = (epoch.removed.iter().map(|p| remove(p, true)))
            .chain(epoch.compacted_from.iter().map(|p| remove(p, false)));
        let actions = adds.chain(removes).collect();
        // An epoch that only adds is an append; one that also removes updates the table.
        let output_mode = match epoch.removed.is_empty() {
            true => OutputMode::Append,
            false => OutputMode::Update,
        };
        let record = serde_json::to_value(epoch).map_err(|source| CommitError::Json {
            key: format!("commit of epoch {}", epoch.epoch),
            source,
        })?;
        let properties = CommitProperties::default()
            .with_application_transaction(Transaction::new_with_last_update(
                APP_ID,
                epoch.epoch as i64,
                Some(now),
            ))
            .with_metadata([(COMMIT_INFO_KEY.to_string(), record)])
            // One writer per output (the lease): a version taken by another commit is
            // either this very commit, landed before its request failed, or a second
            // writer. Never re-append at the next version; find out which instead (the
            // next attempt reads the txn version first).
            .with_max_retries(0);
        let snapshot = table.snapshot().map_err(self.delta_error())?;
        let committed = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(
                Some(snapshot),
                table.log_store(),
                DeltaOperation::StreamingUpdate {
                    output_mode,
                    query_id: APP_ID.to_string(),
                    epoch_id: epoch.epoch as i64,
                },
            )
            .await
            .map_err(self.delta_error());
        table
            .update_incremental(None)
            .await
            .map_err(self.delta_error())?;
        match committed {
            Ok(_) => Ok(()),
            // Whatever the failure (an answer lost after the write, the version taken), the
            // log now says whether this epoch is in: then it is committed, by this run or,
            // refused, by another.
            Err(error) => match self.txn_version(table).await? {
                Some(v) if v >= epoch.epoch as i64 => {
                    match self.already_committed(table, epoch).await {
                        CommitError::AlreadyCommitted { run, .. } if run == epoch.run => Ok(()),
                        other => Err(other),
                    }
                }
                _ => Err(error),
            },
        }
    }

    /// Runs `op` until it succeeds, fails for good, or the outage pauses are spent. A failure
    /// is retried when it came from the store (an HTTP error, a reset connection, an
    /// unreachable endpoint): that is what a restart of the store, or a network gone for
    /// seconds, looks like.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, CommitError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CommitError>>,
    {
        let mut pauses = self.pauses.iter();
        loop {
            match op().await {
                Err(error) if error.is_transient() => match pauses.next() {
                    Some(pause) => {
                        tracing::warn!(
                            location = self.location,
                            "{what} failed on the store, retrying in {pause:?}: {}",
                            crate::storage::error_chain(&error)
                        );
                        tokio::time::sleep(*pause).await;
                    }
                    None => return Err(error),
                },
                other => return other,
            }
        }
    }

    /// The table's txn version of verger's application id: its last committed epoch.
    pub async fn txn_version(&self, table: &DeltaTable) -> Result<Option<i64>, CommitError> {
        let snapshot = table.snapshot().map_err(self.delta_error())?;
        snapshot
            .transaction_version(table.log_store().as_ref(), APP_ID)
            .await
            .map_err(self.delta_error())
    }

    /// The error for an epoch the table already has, naming the run that committed it.
    async fn already_committed(&self, table: &DeltaTable, epoch: &EpochCommit) -> CommitError {
        let run = match epoch_commits(table).await {
            Ok(commits) => commits
                .into_iter()
                .find(|c| c.epoch == epoch.epoch)
                .map_or_else(|| "?".to_string(), |c| c.run),
            Err(_) => "?".to_string(),
        };
        CommitError::AlreadyCommitted {
            epoch: epoch.epoch,
            run,
        }
    }
}

/// The [`EpochCommit`] of every version that has one, oldest first. Reads the table's
/// history (every version's commitInfo): for reports, not for start-up.
pub async fn epoch_commits(table: &DeltaTable) -> Result<Vec<EpochCommit>, CommitError> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let mut history = table.history(None);
    while let Some(info) = history.next().await {
        let info = info.map_err(|source| CommitError::Delta {
            location: table.table_url().to_string(),
            source: Box::new(source),
        })?;
        if let Some(value) = info.info.get(COMMIT_INFO_KEY) {
            let commit =
                serde_json::from_value(value.clone()).map_err(|source| CommitError::Json {
                    key: format!("{LOG_PREFIX} commitInfo"),
                    source,
                })?;
            out.push(commit);
        }
    }
    out.sort_by_key(|c: &EpochCommit| c.epoch);
    Ok(out)
}

/// Files whose key index start-up reads at once.
const INDEX_READS: usize = 16;

/// What earlier runs committed to an output.
#[derive(Debug, Default)]
pub struct Committed {
    /// What computed its rows (`None` for an output with no table yet).
    pub identity: Option<Identity>,
    /// The last committed epoch (the table's txn version), if any.
    pub last_epoch: Option<Epoch>,
    /// The table's Delta version, if it has one.
    pub version: Option<u64>,
    /// Versions (epoch, key, ETag) handled: every committed row, and every error record but
    /// those of failed reads, which a new run retries. A key's version of the latest epoch
    /// is its current one, not processed again while it is the one listed.
    pub handled: Vec<(Epoch, String, String)>,
    /// Every committed row with its epoch, oldest first.
    pub rows: Vec<(Epoch, RowId)>,
    /// The files of the table's snapshot.
    pub files: Vec<SnapshotFile>,
    /// Which file holds each key's record, and whether the key is in the run's scope.
    pub index: crate::commit::SnapshotIndex,
}

impl Committed {
    /// Reads the table's snapshot: its identity, txn version and the key, version and label
    /// (or stage) of every committed row and error record, each key marked with whether
    /// `in_scope` holds it (the run's prefix and filters: only such keys can be found
    /// deleted from the input). An output in verger's earlier layout, or a Delta table that
    /// another tool made, is refused.
    pub async fn load(
        output: &DeltaOutput,
        store: &dyn ObjectStore,
        in_scope: &dyn Fn(&str) -> bool,
    ) -> Result<Self, CommitError> {
        refuse_old_layout(output, store).await?;
        let Some(table) = output.open(None).await? else {
            return Ok(Self::default());
        };
        let head = Self::head_of(output, &table).await?;
        let mut files = table_files(output, &table)?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let (mut handled, mut rows) = (Vec::new(), Vec::new());
        let mut index = crate::commit::SnapshotIndex::default();
        // Several reads at once: on S3 each file is a round trip.
        use futures::{StreamExt, TryStreamExt};
        let mut indexes = futures::stream::iter(files.clone())
            .map(|file| async move {
                let entries = table::read_index(store, &file.path).await?;
                Ok::<_, CommitError>((file, entries))
            })
            .buffered(INDEX_READS);
        while let Some((file, entries)) = indexes.try_next().await? {
            index.add_file(
                file,
                entries
                    .iter()
                    .map(|e| (e.row.key.as_str(), in_scope(&e.row.key))),
            );
            for entry in entries {
                if entry.stage != Some(Stage::Fetch) {
                    handled.push((entry.epoch, entry.row.key.clone(), entry.row.etag.clone()));
                }
                if entry.stage.is_none() {
                    rows.push((entry.epoch, entry.row));
                }
            }
        }
        rows.sort_by_key(|(epoch, _)| *epoch);
        Ok(Self {
            handled,
            rows,
            files,
            index,
            ..head
        })
    }

    /// Only the table's identity, txn version and Delta version, reading no data file: what
    /// a process other than the first needs (the first epoch it may use, and the check that
    /// the table is this run's), while the first process's source holds the records.
    pub async fn load_head(output: &DeltaOutput) -> Result<Self, CommitError> {
        match output.open(None).await? {
            Some(table) => Self::head_of(output, &table).await,
            None => Ok(Self::default()),
        }
    }

    async fn head_of(output: &DeltaOutput, table: &DeltaTable) -> Result<Self, CommitError> {
        Ok(Self {
            identity: Some(identity_of(output, table)?),
            last_epoch: output.txn_version(table).await?.map(|v| v as Epoch),
            version: table.version(),
            ..Self::default()
        })
    }

    /// The first epoch number a new run may use.
    pub fn next_epoch(&self) -> Epoch {
        self.last_epoch.map_or(0, |e| e + 1)
    }
}

/// The snapshot's files with their sizes, each checked to lie under the output (the log is
/// data from storage: a hand-edited one must not make verger open `../../etc/passwd`).
pub fn table_files(
    output: &DeltaOutput,
    table: &DeltaTable,
) -> Result<Vec<SnapshotFile>, CommitError> {
    let snapshot = table.snapshot().map_err(output.delta_error())?;
    snapshot
        .log_data()
        .iter()
        .map(|file| {
            let path = file.path().to_string();
            check_key(&path).map_err(|e| CommitError::Invalid {
                key: format!("{}/{LOG_PREFIX}", output.location.trim_end_matches('/')),
                reason: e.to_string(),
            })?;
            Ok(SnapshotFile {
                path,
                bytes: file.size().max(0) as u64,
            })
        })
        .collect()
}

/// The identity in the table's metadata, or an error if the table is not verger's.
pub fn identity_of(output: &DeltaOutput, table: &DeltaTable) -> Result<Identity, CommitError> {
    let snapshot = table.snapshot().map_err(output.delta_error())?;
    let config = snapshot.metadata().configuration();
    let get = |key: &str| config.get(key).cloned();
    let Some(model) = get(MODEL_KEY) else {
        return Err(CommitError::NotVerger {
            location: output.location.clone(),
        });
    };
    let base: Vec<String> = crate::label::TABLE_COLUMNS
        .iter()
        .map(|c| c.to_string())
        .collect();
    let columns = snapshot
        .schema()
        .fields()
        .map(|f| f.name().to_string())
        .filter(|name| !base.contains(name))
        .collect();
    Ok(Identity {
        model,
        weights_sha256: get(WEIGHTS_KEY).unwrap_or_default(),
        derivation: get(DERIVATION_KEY).unwrap_or_default(),
        columns,
    })
}

/// Refuses an output written by verger before its table was a Delta table.
pub async fn refuse_old_layout(
    output: &DeltaOutput,
    store: &dyn ObjectStore,
) -> Result<(), CommitError> {
    let page = store.list_page(OLD_MANIFEST_PREFIX, None, 1).await?;
    if page.objects.is_empty() {
        return Ok(());
    }
    Err(CommitError::OldLayout {
        location: output.location.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(source: deltalake_core::DeltaTableError) -> CommitError {
        CommitError::Delta {
            location: "s3://b/out".into(),
            source: Box::new(source),
        }
    }

    fn store_error(reason: &str) -> deltalake_core::ObjectStoreError {
        deltalake_core::ObjectStoreError::Generic {
            store: "S3",
            source: reason.into(),
        }
    }

    /// A failure of the store, however delta-rs wraps it (its own error, or the kernel's,
    /// which does not name it as its source), is retried; a conflict or an existing object
    /// is not, nor anything that is not the store's.
    #[test]
    fn only_store_failures_are_retried() {
        use deltalake_core::DeltaTableError as E;
        let reset = delta(E::ObjectStore {
            source: store_error("connection reset"),
        });
        assert!(reset.is_transient());
        let in_kernel = delta(E::KernelError(delta_kernel::Error::ObjectStore(
            store_error("connection refused"),
        )));
        assert!(in_kernel.is_transient());
        let exists = delta(E::ObjectStore {
            source: deltalake_core::ObjectStoreError::AlreadyExists {
                path: "_delta_log/00000000000000000001.json".into(),
                source: "exists".into(),
            },
        });
        assert!(!exists.is_transient());
        assert!(!delta(E::VersionAlreadyExists(1)).is_transient());
        let refused = CommitError::NotVerger {
            location: "out".into(),
        };
        assert!(!refused.is_transient());
    }
}
