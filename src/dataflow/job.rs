//! What a run is given ([`RunConfig`]) and returns ([`Summary`]), and what happens around the
//! dataflow: opening the stores, the output's lease, resuming from the committed state,
//! timely's configuration, and the per-worker results summed up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::{CommunicationConfig, WorkerConfig};

use crate::cluster::{self, Cluster, ConnectWatchdog};
use crate::commit::delta::OLD_MANIFEST_PREFIX;
use crate::commit::{CommitError, Committed, DeltaOutput, Identity, LOG_PREFIX};
use crate::embed::Embedder;
use crate::error::{Fatal, StageError};
use crate::head::{HeadError, SavedHead};
use crate::metrics::Metrics;
use crate::operators::StageContext;
use crate::record::Epoch;
use crate::sink::lease::{Lease, LeaseError, LeaseSettings, LEASE_KEY};
use crate::source::{CommittedCounts, EpochPolicy, KeyFilter, Mode, SourceStats};
use crate::stats::{self, StageClock, StageSeconds};
use crate::storage::{self, ObjectStore, StoreOptions};

/// Everything a run needs, resolved (weights already loaded).
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Input location (a directory).
    pub input: String,
    /// Only keys under this prefix of the input.
    pub prefix: String,
    /// Output location (a directory, created if missing).
    pub output: String,
    /// Timely worker threads in this process.
    pub workers: usize,
    /// Epoch sizing and backpressure.
    pub epochs: EpochPolicy,
    /// Pictures per call of the network, and decoded pictures in flight per worker.
    pub batch_size: usize,
    /// Concurrent reads per worker.
    pub fetch_concurrency: usize,
    /// Which listed keys to process.
    pub filter: KeyFilter,
    /// How remote stores are reached.
    pub store: StoreOptions,
    /// Other processes of the same run, if any (`workers` is then per process).
    pub cluster: Option<Cluster>,
    /// List once, or keep polling.
    pub mode: Mode,
    /// Set (by a signal handler, say) to stop listing, finish the epochs in flight and
    /// return. Only process 0 looks at it: it alone lists.
    pub stop: Arc<AtomicBool>,
    /// Where the run counts what it does (served by [`crate::metrics::serve`] if wanted).
    pub metrics: Arc<Metrics>,
    /// Size limits of one input object.
    pub limits: InputLimits,
    /// How long the output's lease lasts without renewal (S3).
    pub lease: LeaseSettings,
    /// How long process 0 and its peers wait for each other to connect.
    pub connect_timeout: Duration,
    /// A classifier head applied to every row in the embed stage (`--head`).
    pub head: Option<Arc<SavedHead>>,
    /// Whether pictures are turned upright as their EXIF orientation says.
    pub orientation: crate::decode::Orientation,
    /// Which part of a key is its label (and which extra columns it gives).
    pub labels: crate::label::LabelRule,
    /// Keep the rows of keys that a complete listing no longer holds (deleted from the
    /// input) instead of removing them from the table's snapshot.
    pub keep_deleted: bool,
    /// Delta versions between checkpoints of a table this run creates.
    pub checkpoint_interval: u64,
    /// How long a table this run creates keeps removed files as tombstones in its
    /// checkpoints (`delta.deletedFileRetentionDuration`); Delta's default if `None`.
    pub deleted_file_retention: Option<Duration>,
    /// When the table's small files are merged.
    pub compaction: crate::commit::CompactionPolicy,
}

/// How large one input object may be: what keeps a worker's memory bounded whatever the
/// input holds. An object over either limit becomes an error record.
#[derive(Clone, Copy, Debug)]
pub struct InputLimits {
    /// Objects larger than this are not read (stage `size`).
    pub max_object_bytes: u64,
    /// Pictures with more pixels than this are not decoded (stage `decode`).
    pub max_pixels: u64,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_object_bytes: crate::fetch::MAX_OBJECT_BYTES,
            max_pixels: crate::decode::MAX_PIXELS,
        }
    }
}

impl RunConfig {
    /// What the decode stage makes of fetched bytes, for a network of input `side`.
    pub fn decoding(&self, side: u32) -> crate::decode::DecodeSettings {
        crate::decode::DecodeSettings {
            side,
            max_pixels: self.limits.max_pixels,
            orientation: self.orientation,
            labels: self.labels.clone(),
        }
    }

    /// `input` to `output` with the command line's defaults: one worker, default epochs,
    /// batches of 4, 16 reads in flight, every key, default store options.
    pub fn new(input: impl Into<String>, output: impl Into<String>) -> Self {
        Self {
            input: input.into(),
            prefix: String::new(),
            output: output.into(),
            workers: 1,
            epochs: EpochPolicy::default(),
            batch_size: 4,
            fetch_concurrency: 16,
            filter: KeyFilter::default(),
            store: StoreOptions::default(),
            cluster: None,
            mode: Mode::Once,
            stop: Arc::default(),
            metrics: Arc::default(),
            limits: InputLimits::default(),
            lease: LeaseSettings::default(),
            connect_timeout: cluster::CONNECT_TIMEOUT,
            head: None,
            orientation: crate::decode::Orientation::default(),
            labels: crate::label::LabelRule::default(),
            keep_deleted: false,
            checkpoint_interval: crate::commit::delta::CHECKPOINT_INTERVAL,
            deleted_file_retention: None,
            compaction: crate::commit::CompactionPolicy::default(),
        }
    }
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The I/O runtime could not be started.
    #[error("cannot start the I/O runtime")]
    Runtime(#[source] std::io::Error),
    /// Input or output could not be opened.
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    /// The output's committed state could not be read, or its leftovers removed.
    #[error("reading the output's commits")]
    Resume(#[source] CommitError),
    /// The network could not be loaded.
    #[error("loading the model")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Another run holds the output.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The output holds another model's features.
    #[error(
        "the output {output} holds features of {committed}; this run computes {model}: give it \
         its own output (features of two models are not comparable)"
    )]
    OtherModel {
        /// The output.
        output: String,
        /// The model (and weights) of its table.
        committed: String,
        /// This run's model (and weights).
        model: String,
    },
    /// The output's rows were derived with another orientation or label rule.
    #[error(
        "the output {output} holds rows made with {committed}; this run asks for {asked}: its \
         committed rows would keep the old labels and pixels, so give it its own output (or the \
         same --orientation / --label / --label-pattern)"
    )]
    OtherDerivation {
        /// The output.
        output: String,
        /// The derivation of its table.
        committed: String,
        /// This run's.
        asked: String,
    },
    /// The head reads another model's features.
    #[error(transparent)]
    Head(#[from] HeadError),
    /// The output is the input itself.
    #[error("the output {0} is the input directory itself: give the output its own folder")]
    OutputIsInput(String),
    /// The output holds files verger did not write (a folder of images given as output).
    #[error(
        "the output {output} holds {key}, which verger did not write: give the output an \
         empty folder (or one verger wrote)"
    )]
    ForeignOutput {
        /// The output.
        output: String,
        /// The first key found that is not verger's.
        key: String,
    },
    /// The output could not be listed.
    #[error("listing the output")]
    ListOutput(#[source] crate::storage::StorageError),
    /// A stage failed (the first failure of the run, with its cause).
    #[error(transparent)]
    Stage(#[from] StageError),
    /// Timely could not start the workers (or connect the processes).
    #[error("cannot start the dataflow: {0}")]
    Timely(String),
    /// A worker thread panicked outside any stage.
    #[error("worker failed: {0}")]
    Worker(String),
}

/// What a run did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Rows committed by this run.
    pub embedded: u64,
    /// Error records committed by this run.
    pub errors: u64,
    /// Objects deleted or replaced between listing and reading (no record; not errors).
    pub vanished: u64,
    /// Epochs committed by this run.
    pub epochs: u64,
    /// What the source saw.
    pub source: SourceStats,
    /// Partial writes of killed runs removed at start (open multipart uploads, temporary
    /// and staging files). Whole files of uncommitted epochs are left: the table's log never
    /// adds them, so no reader sees them.
    pub removed_leftovers: usize,
    /// Wall time.
    pub seconds: f64,
    /// Timely workers in this process.
    pub workers: usize,
    /// Busy time per compute stage, summed over this process's workers.
    pub stages: StageSeconds,
    /// Peak resident memory of the process, when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Committed rows per label in the whole output after the run (latest version of each
    /// key; "" for keys at the root). Process 0 only.
    pub labels: BTreeMap<String, u64>,
}

impl Summary {
    /// Objects (embedded or failed) per second of wall time.
    pub fn images_per_second(&self) -> f64 {
        (self.embedded + self.errors) as f64 / self.seconds.max(1e-9)
    }
}

fn unique_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}{:x}", std::process::id())
}

/// Where `output` lies inside `input`, as a key prefix of the input (`""`: they are the same
/// place); `None` when it does not. Local directories are compared after resolving symbolic
/// links, S3 locations by bucket and prefix.
pub fn nested_prefix(input: &dyn ObjectStore, output: &dyn ObjectStore) -> Option<String> {
    let rest = match (input.local_root(), output.local_root()) {
        (Some(i), Some(o)) => {
            let (i, o) = (i.canonicalize().ok()?, o.canonicalize().ok()?);
            let rest = o.strip_prefix(&i).ok()?;
            rest.to_str()?.replace(std::path::MAIN_SEPARATOR, "/")
        }
        (None, None) => {
            let (i, o) = (input.location(), output.location());
            let i = format!("{}/", i.trim_end_matches('/'));
            let o = format!("{}/", o.trim_end_matches('/'));
            o.strip_prefix(&i)?.trim_end_matches('/').to_string()
        }
        _ => return None,
    };
    Some(if rest.is_empty() {
        rest
    } else {
        format!("{rest}/")
    })
}

/// What verger writes at the root of an output: the Delta log, data and error files, the
/// lease; and the manifests of its earlier layout (refused with their own error).
const OUTPUT_LAYOUT: [&str; 5] = [
    LOG_PREFIX,
    "data/",
    "errors/",
    LEASE_KEY,
    OLD_MANIFEST_PREFIX,
];

/// Whether `key`, relative to an output, is something verger writes there ([`OUTPUT_LAYOUT`]).
pub fn is_output_key(key: &str) -> bool {
    OUTPUT_LAYOUT.iter().any(|p| key.starts_with(p))
}

/// The first key of the output's first listing page (up to 1,000 keys) that verger did not
/// write, if any: an output folder full of images (`--output photos/Training`) is a slip,
/// and writing among them would mix the table into the pictures.
async fn foreign_key(
    output: &dyn ObjectStore,
) -> Result<Option<String>, crate::storage::StorageError> {
    let page = output.list_page("", None, 1000).await?;
    Ok(page
        .objects
        .into_iter()
        .map(|o| o.key)
        .find(|key| !is_output_key(key)))
}

/// Opens input and output, loads the network with `load` (only once both are open: a wrong
/// location, missing credentials or an unreachable store fail before seconds of model
/// loading or a weights download), takes the output's lease on process 0, and runs `execute`
/// on the prepared [`Job`].
pub(super) fn prepare_and_run(
    config: &RunConfig,
    load: impl FnOnce() -> Result<Embedder, Box<dyn std::error::Error + Send + Sync>>,
    execute: impl FnOnce(Arc<Job>) -> Result<Vec<Option<WorkerReport>>, RunError>,
) -> Result<Summary, RunError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("verger-io")
        .build()
        .map_err(RunError::Runtime)?;
    let input = runtime
        .block_on(storage::open(&config.input, false, &config.store))
        .map_err(|e| e.on_side("input"))?;
    let output = runtime
        .block_on(storage::open(&config.output, true, &config.store))
        .map_err(|e| e.on_side("output"))?;
    let mut config = config.clone();
    match nested_prefix(input.as_ref(), output.as_ref()) {
        Some(p) if p.is_empty() => return Err(RunError::OutputIsInput(output.location())),
        Some(p) => {
            tracing::warn!(
                "the output lies inside the input: keys under {p} are not taken as input"
            );
            config.filter = config.filter.excluding_prefix(p);
        }
        None => {}
    }
    // What the output holds, before anything is written there: verger's table, or nothing yet.
    let delta = DeltaOutput::of(output.as_ref(), &config.store).map_err(RunError::Resume)?;
    // The table's files go through delta-rs's object store from here on; the lease, the
    // listing and the clean-up stay on verger's store of the same location.
    let output = runtime
        .block_on(async { delta.files(output, &config.store) })
        .map_err(RunError::Resume)?;
    runtime
        .block_on(delta.check(output.as_ref()))
        .map_err(RunError::Resume)?;
    if let Some(key) = runtime
        .block_on(foreign_key(output.as_ref()))
        .map_err(RunError::ListOutput)?
    {
        return Err(RunError::ForeignOutput {
            output: output.location(),
            key,
        });
    }
    let embedder = load().map_err(RunError::Model)?;
    let run_id = unique_run_id();
    let leader = config.cluster.as_ref().is_none_or(|c| c.process == 0);
    let lease = match leader {
        true => Some(runtime.block_on(Lease::acquire(output.clone(), &run_id, config.lease))?),
        false => None,
    };
    let result = resume_and_run(
        config,
        embedder,
        &runtime,
        (input, output.clone()),
        run_id,
        lease.as_ref(),
        execute,
    );
    if let Some(lease) = lease {
        if let Err(e) = runtime.block_on(lease.release()) {
            tracing::warn!("could not release the output's lease (it expires by itself): {e}");
        }
    }
    result
}

/// Removes what killed runs left half-written: multipart uploads still open, hidden
/// temporary files, the output's local staging folder. Only the holder of the output's lease
/// may call it. Returns how many uploads and temporary files were removed.
async fn remove_partial_writes(
    output: &dyn ObjectStore,
) -> Result<usize, crate::storage::StorageError> {
    let partial = output.remove_partial_writes().await?;
    let staging = output.staging_dir();
    if staging.exists() {
        tracing::info!(dir = %staging.display(), "removing staging files of killed runs");
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(partial)
}

/// Refuses a run whose rows would not be comparable with the table's: another model or
/// weights, another orientation or label rule.
fn check_identity(table: &Identity, run: &Identity, output: String) -> Result<(), RunError> {
    if table.model != run.model || table.weights_sha256 != run.weights_sha256 {
        let described = |model: &str, sha: &str| match sha.get(..12) {
            Some(short) => format!("{model} (weights {short})"),
            None => model.to_string(),
        };
        return Err(RunError::OtherModel {
            output,
            committed: described(&table.model, &table.weights_sha256),
            model: described(&run.model, &run.weights_sha256),
        });
    }
    if table.derivation != run.derivation || table.columns != run.columns {
        return Err(RunError::OtherDerivation {
            output,
            committed: table.derivation.clone(),
            asked: run.derivation.clone(),
        });
    }
    Ok(())
}

/// Everything the workers of one process share.
pub(super) struct Job {
    /// The run's settings (the key filter adjusted for an output inside the input).
    pub config: RunConfig,
    /// The network.
    pub embedder: Embedder,
    /// Where images are read.
    pub input: Arc<dyn ObjectStore>,
    /// Where Parquet files go.
    pub output: Arc<dyn ObjectStore>,
    /// The output's Delta table, which commits them.
    pub delta: DeltaOutput,
    /// Runtime, metrics, clock and fatal slot, for every stage.
    pub context: StageContext,
    /// This run's id (file names, commit records).
    pub run_id: String,
    /// Where this process stages its files.
    pub staging: PathBuf,
    /// Set when the output's lease is lost.
    pub lease_lost: Arc<AtomicBool>,
    /// What earlier runs committed, for worker 0 to seed the source's state with.
    pub committed: Mutex<Option<Committed>>,
    /// The first epoch this run may use.
    pub first_epoch: Epoch,
    /// Fails the process if its peers do not connect in time.
    pub watchdog: Option<Arc<ConnectWatchdog>>,
    /// When the run started (ms since the Unix epoch).
    pub started_ms: u64,
}

impl Job {
    /// What the decode stage makes of fetched bytes in this run.
    pub fn decoding(&self) -> crate::decode::DecodeSettings {
        self.config.decoding(self.embedder.spec().input_size)
    }
}

/// What worker 0 (the source) reports at the end of the run.
#[derive(Debug, Default)]
pub(super) struct WorkerReport {
    /// What the source saw.
    pub source: SourceStats,
    /// What the commit stage reported committed.
    pub committed: CommittedCounts,
    /// Committed rows per label, whole output.
    pub labels: BTreeMap<String, u64>,
}

/// The run once the lease (if this process needs one) is held: loads the committed state,
/// creates the output's table if it has none (process 0, before any peer can commit), runs
/// the dataflow and sums up.
fn resume_and_run(
    config: RunConfig,
    embedder: Embedder,
    runtime: &tokio::runtime::Runtime,
    (input, output): (Arc<dyn ObjectStore>, Arc<dyn ObjectStore>),
    run_id: String,
    lease: Option<&Lease>,
    execute: impl FnOnce(Arc<Job>) -> Result<Vec<Option<WorkerReport>>, RunError>,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let _ = config.metrics.run_started.set(started);
    let delta = DeltaOutput::of(output.as_ref(), &config.store).map_err(RunError::Resume)?;
    let in_scope = |key: &str| key.starts_with(&config.prefix) && config.filter.accepts(key);
    // The records only where the source runs (worker 0, on process 0): a peer needs the
    // epoch to go on from, not every file's keys.
    let committed = match lease.is_some() {
        true => runtime.block_on(Committed::load(&delta, output.as_ref(), &in_scope)),
        false => runtime.block_on(Committed::load_head(&delta)),
    }
    .map_err(RunError::Resume)?;
    let (model, weights) = (&embedder.model_name(), embedder.weights_sha256());
    if let Some(head) = &config.head {
        head.check_model(model, weights)?;
    }
    let decoding = config.decoding(embedder.spec().input_size);
    let identity = Identity {
        model: model.clone(),
        weights_sha256: weights.to_string(),
        derivation: decoding.derivation(),
        columns: config.labels.columns().to_vec(),
    };
    match &committed.identity {
        Some(table) => check_identity(table, &identity, output.location())?,
        // Process 0 makes the table, before any peer can commit.
        None if lease.is_some() => {
            runtime
                .block_on(delta.create(
                    &identity,
                    config.checkpoint_interval,
                    config.deleted_file_retention,
                ))
                .map_err(RunError::Resume)?;
        }
        None => {}
    }
    let removed_leftovers = match lease.is_some() {
        true => runtime
            .block_on(remove_partial_writes(output.as_ref()))
            .map_err(|e| RunError::Resume(e.into()))?,
        false => 0,
    };
    tracing::info!(
        committed_epochs = committed.last_epoch.map_or(0, |e| e + 1),
        removed_leftovers,
        committed_rows = committed.rows.len(),
        version = committed.version,
        "output state loaded"
    );
    let context = StageContext {
        runtime: runtime.handle().clone(),
        metrics: config.metrics.clone(),
        clock: Arc::<StageClock>::default(),
        fatal: Fatal::default(),
    };
    let watchdog = config.cluster.as_ref().map(|c| {
        cluster::watch_peers(&c.addresses);
        Arc::new(ConnectWatchdog::arm(c, config.connect_timeout))
    });
    let staging = output.staging_dir().join(&run_id);
    // A lost peer or a cluster that never connects ends the process from another thread:
    // give the lease up and remove the staging files on the way out, as the end below does.
    let _early_exit = {
        let (releaser, handle, staging) = (
            lease.map(Lease::releaser),
            runtime.handle().clone(),
            staging.clone(),
        );
        crate::shutdown::on_early_exit(move || {
            let _ = std::fs::remove_dir_all(&staging);
            if let Some(releaser) = releaser {
                let released = handle.block_on(async {
                    tokio::time::timeout(Duration::from_secs(5), releaser.release()).await
                });
                if !matches!(released, Ok(Ok(()))) {
                    tracing::warn!("could not release the output's lease (it expires by itself)");
                }
            }
        })
    };
    let job = Arc::new(Job {
        staging,
        first_epoch: committed.next_epoch(),
        committed: Mutex::new(Some(committed)),
        lease_lost: lease.map_or_else(Arc::default, Lease::lost_flag),
        embedder,
        input,
        output: output.clone(),
        delta,
        context: context.clone(),
        run_id,
        watchdog: watchdog.clone(),
        started_ms: crate::commit::unix_ms(std::time::SystemTime::now()),
        config,
    });
    let reports = execute(job.clone());
    if let Some(watchdog) = &watchdog {
        watchdog.disarm();
    }
    let _ = std::fs::remove_dir_all(&job.staging);
    let _ = std::fs::remove_dir(output.staging_dir()); // only if empty: a peer may be staging
    if let Some(error) = context.fatal.take() {
        return Err(error.into());
    }
    let report = reports?.into_iter().flatten().next().unwrap_or_default();
    Ok(Summary {
        embedded: report.committed.rows,
        errors: report.committed.errors,
        epochs: report.committed.epochs,
        vanished: job.config.metrics.vanished.get(),
        source: report.source,
        removed_leftovers,
        seconds: started.elapsed().as_secs_f64(),
        workers: job.config.workers.max(1),
        stages: context.clock.seconds(),
        peak_rss_bytes: stats::peak_rss_bytes(),
        labels: report.labels,
    })
}

/// Timely's configuration: this process's workers, and its peers if it is one of several.
pub(super) fn timely_config(config: &RunConfig) -> timely::Config {
    let workers = config.workers.max(1);
    let communication = match &config.cluster {
        None => CommunicationConfig::Process(workers),
        Some(c) => CommunicationConfig::Cluster {
            threads: workers,
            process: c.process,
            addresses: c.addresses.clone(),
            report: false,
            zerocopy: false,
        },
    };
    timely::Config {
        communication,
        worker: WorkerConfig::default(),
    }
}
