//! The whole pipeline as one timely dataflow, and the run that drives it.
//!
//! ```text
//! worker 0: list ──epochs──▶ exchange(hash key) ──▶ fetch (async) ──▶ decode+label (paced)
//!   ──▶ embed (batched) ──▶ write Parquet (per worker, per epoch) ──▶ publish (async)
//!   ──▶ exchange(worker 0) ──▶ gather epoch ──▶ write manifest (async) ──▶ probe ─┐
//!   ▲                                                                             │
//!   └───────────── the source releases a new epoch only while few are unfinished ─┘
//! ```
//!
//! Before anything else, process 0 takes the output's lease ([`Lease`]), then removes what
//! uncommitted epochs left; the first panic or failure of any stage goes to one [`Fatal`] slot,
//! after which the stages drop their work and the run fails with that message.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::dataflow::operators::{Exchange, Input, Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::{CommunicationConfig, WorkerConfig};

use crate::cluster::{self, Cluster};
use crate::decode::decode_and_resize_within;
use crate::embed::Embedder;
use crate::label::label_of;
use crate::metrics::Metrics;
use crate::novelty::Novelty;
use crate::operators::{async_map, batch_ok, paced_map, panic_message, Fatal, Gate};
use crate::record::{
    Embedded, Epoch, Failure, Fetched, Labelled, Miss, Outcome, Published, Stage, WrittenFile,
};
use crate::sink::lease::{Lease, LeaseError, LeaseSettings};
use crate::sink::manifest::{gather_epochs, Committed, CommittedEpoch};
use crate::sink::{self, Naming, StagedFile};
use crate::source::{self, CommitQueue, Driver, EpochPolicy, KeyFilter, Mode, SourceStats};
use crate::stats::{self, StageClock, StageSeconds, TimedStage};
use crate::storage::{self, ObjectMeta, ObjectStore, StoreOptions};

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
    /// Images per forward pass, and decoded images in flight per worker.
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
        }
    }
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Input or output could not be opened or listed.
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    /// Output could not be written or committed.
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    /// Another run holds the output.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The output is the input itself.
    #[error("the output {0} is the input directory itself: give the output its own folder")]
    OutputIsInput(String),
    /// Something failed that stops the run (message names it).
    #[error("{0}")]
    Fatal(String),
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
    /// Leftover files of uncommitted epochs removed at start.
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

/// Hash of a key that every process computes alike: which worker embeds it.
fn route(key: &str) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Decode, resize and label one fetched object. A decoder that panics on hostile bytes
/// gives the object an error record, like any other decode failure.
fn decode_and_label(fetched: Fetched, side: u32, max_pixels: u64) -> Result<Labelled, Miss> {
    let decoded = std::panic::catch_unwind(|| {
        decode_and_resize_within(&fetched.bytes, side, max_pixels).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|payload| {
        Err(format!(
            "decoder panicked: {}",
            panic_message(payload.as_ref())
        ))
    });
    match decoded {
        Ok(pixels) => Ok(Labelled {
            label: label_of(&fetched.key).map(str::to_string),
            key: fetched.key,
            etag: fetched.etag,
            pixels,
        }),
        Err(reason) => Err(Miss::Failed(Failure {
            key: fetched.key,
            etag: fetched.etag,
            stage: Stage::Decode,
            reason,
        })),
    }
}

/// Embed a batch; if the backend fails, every image of the batch gets an error record.
fn embed_batch(embedder: &Embedder, batch: Vec<Labelled>, metrics: &Metrics) -> Vec<Outcome> {
    let pixels: Vec<&[u8]> = batch.iter().map(|l| l.pixels.rgb.as_slice()).collect();
    match embedder.embed(&pixels) {
        Ok(rows) => batch
            .into_iter()
            .zip(rows)
            .map(|(l, embedding)| {
                metrics.embedded.inc();
                Outcome::Row(Embedded {
                    key: l.key,
                    etag: l.etag,
                    label: l.label,
                    width: l.pixels.width,
                    height: l.pixels.height,
                    embedding,
                })
            })
            .collect(),
        Err(e) => batch
            .into_iter()
            .map(|l| {
                Outcome::Failed(Failure {
                    key: l.key,
                    etag: l.etag,
                    stage: Stage::Embed,
                    reason: e.to_string(),
                })
            })
            .collect(),
    }
}

async fn publish(
    store: Arc<dyn ObjectStore>,
    staged: Result<StagedFile, String>,
    metrics: Arc<Metrics>,
) -> Result<Published, String> {
    let staged = staged?;
    let bytes = std::fs::metadata(&staged.path)
        .map(|m| m.len())
        .unwrap_or(0);
    match metrics
        .request(store.put_file(&staged.key, &staged.path))
        .await
    {
        Ok(()) => {
            metrics.bytes_written.inc_by(bytes);
            Ok(Published {
                file: WrittenFile {
                    key: staged.key,
                    kind: staged.kind,
                    rows: staged.rows,
                    bytes,
                },
                rows: staged.ids,
            })
        }
        Err(e) => {
            sink::discard(&staged.path);
            Err(e.to_string())
        }
    }
}

async fn commit(
    store: Arc<dyn ObjectStore>,
    epoch: Result<CommittedEpoch, String>,
    metrics: Arc<Metrics>,
    fatal: Fatal,
    lease_lost: Arc<AtomicBool>,
) -> Result<CommittedEpoch, String> {
    let epoch = epoch?;
    let e = epoch.manifest.epoch;
    if lease_lost.load(Ordering::Acquire) {
        return Err(format!(
            "epoch {e} not committed: this run lost the lease of {}",
            store.location()
        ));
    }
    if let Some(reason) = fatal.reason() {
        return Err(format!(
            "epoch {e} not committed: the run is failing ({reason})"
        ));
    }
    metrics
        .request(epoch.manifest.write(store.as_ref()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(epoch)
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

/// Featurizes every image of `config.input` not yet committed in `config.output`.
///
/// Process 0 first takes the output's lease ([`Lease`]): a second run on the same output
/// fails at once naming the holder, before it deletes or writes anything.
pub fn run(config: &RunConfig, embedder: &Embedder) -> Result<Summary, RunError> {
    run_loading(config, || Ok(embedder.clone()))
}

/// [`run`], loading the network with `load` only once input and output are open: a wrong
/// location, missing credentials or an unreachable store fail before seconds of model loading
/// (or a weights download).
pub fn run_loading(
    config: &RunConfig,
    load: impl FnOnce() -> Result<Embedder, String>,
) -> Result<Summary, RunError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("verger-io")
        .build()
        .map_err(|e| RunError::Fatal(format!("cannot start the I/O runtime: {e}")))?;
    let input = runtime
        .block_on(storage::open(&config.input, false, &config.store))
        .map_err(|e| e.on_side("input"))?;
    let output = runtime
        .block_on(storage::open(&config.output, true, &config.store))
        .map_err(|e| e.on_side("output"))?;
    let embedder = load().map_err(RunError::Fatal)?;
    let embedder = &embedder;
    let mut filter = config.filter.clone();
    match nested_prefix(input.as_ref(), output.as_ref()) {
        Some(p) if p.is_empty() => return Err(RunError::OutputIsInput(output.location())),
        Some(p) => {
            tracing::warn!(
                "the output lies inside the input: keys under {p} are not taken as input"
            );
            filter = filter.excluding_prefix(p);
        }
        None => {}
    }
    let run_id = unique_run_id();
    let leader = config.cluster.as_ref().is_none_or(|c| c.process == 0);
    let lease = match leader {
        true => Some(runtime.block_on(Lease::acquire(output.clone(), &run_id, config.lease))?),
        false => None,
    };
    let result = run_holding_lease(
        config,
        embedder,
        &runtime,
        (input, output),
        filter,
        run_id,
        lease.as_ref(),
    );
    if let Some(lease) = lease {
        if let Err(e) = runtime.block_on(lease.release()) {
            tracing::warn!("could not release the output's lease (it expires by itself): {e}");
        }
    }
    result
}

/// The run proper, once the lease (if this process needs one) is held.
fn run_holding_lease(
    config: &RunConfig,
    embedder: &Embedder,
    runtime: &tokio::runtime::Runtime,
    (input, output): (Arc<dyn ObjectStore>, Arc<dyn ObjectStore>),
    filter: KeyFilter,
    run_id: String,
    lease: Option<&Lease>,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let _ = config.metrics.run_started.set(started);
    let workers = config.workers.max(1);
    let lease_lost = lease.map_or_else(Arc::default, Lease::lost_flag);
    let leader = lease.is_some();

    // Resume: what is committed stays; leftovers of uncommitted epochs go. In a cluster only
    // process 0 cleans up, before it connects: no peer writes anything until all are connected.
    let committed = runtime.block_on(Committed::load(output.as_ref()))?;
    let removed_leftovers = match leader {
        true => runtime.block_on(committed.remove_uncommitted(output.as_ref()))?,
        false => 0,
    };
    let first_epoch = committed.next_epoch();
    tracing::info!(
        committed_epochs = committed.manifests.len(),
        committed_rows = committed.rows.len(),
        removed_leftovers,
        "output state loaded"
    );
    // Handed to worker 0, which seeds the incremental state with it.
    let committed = Arc::new(Mutex::new(Some(committed)));

    let staging: PathBuf = output.staging_dir().join(&run_id);
    let staging_dir = staging.clone();
    let model = embedder.spec().name.clone();
    let fatal = Fatal::default();
    let clock: Arc<StageClock> = Arc::default();
    let clock_in = clock.clone();
    let handle = runtime.handle().clone();
    let mut config = config.clone();
    config.filter = filter;
    let limits = config.limits;
    let embedder = embedder.clone();
    let fatal_in = fatal.clone();
    let metrics = config.metrics.clone();
    let (input_shared, output_shared) = (input.clone(), output.clone());
    let mut watchdog = None;
    let communication = match &config.cluster {
        None => CommunicationConfig::Process(workers),
        Some(c) => {
            cluster::watch_peers(&c.addresses);
            watchdog = Some(Arc::new(cluster::ConnectWatchdog::arm(
                c,
                config.connect_timeout,
            )));
            CommunicationConfig::Cluster {
                threads: workers,
                process: c.process,
                addresses: c.addresses.clone(),
                report: false,
                zerocopy: false,
            }
        }
    };
    let watchdog_in = watchdog.clone();
    let timely_config = timely::Config {
        communication,
        worker: WorkerConfig::default(),
    };

    let guards = timely::execute(timely_config, move |worker| {
        if let Some(watchdog) = &watchdog_in {
            watchdog.disarm(); // every process is connected: timely runs the workers
        }
        let index = worker.index();
        let (rt, fatal) = (handle.clone(), fatal_in.clone());
        let (input_store, output_store) = (input_shared.clone(), output_shared.clone());
        let embedder = embedder.clone();
        let side = embedder.spec().input_size;
        let clock = clock_in.clone();
        let (decode_clock, embed_clock) = (clock.clone(), clock.clone());
        let metrics = metrics.clone();
        let commits: CommitQueue = Arc::default();
        let commits_in = commits.clone();
        let naming = Arc::new(Naming {
            staging: staging.clone(),
            worker: index,
            run: run_id.clone(),
            model: model.clone(),
        });
        let mut keys: source::KeyInput = InputHandle::new();
        let probe: ProbeHandle<Epoch> = ProbeHandle::new();
        let done = Arc::new(Mutex::new(Summary::default()));
        let done_in = done.clone();
        let fatal_seen = fatal.clone();

        worker.dataflow::<Epoch, _, _>(|scope| {
            let objects = scope
                .input_from(&mut keys)
                .container::<Vec<ObjectMeta>>()
                .exchange(|o: &ObjectMeta| route(&o.key));
            let store = input_store.clone();
            // Fetched-but-undecoded objects per worker: the reads in flight plus as many again.
            let gate = Gate::new(2 * config.fetch_concurrency);
            let m = metrics.clone();
            let fetched = async_map(
                objects,
                "Fetch",
                rt.clone(),
                config.fetch_concurrency,
                Some(gate.clone()),
                fatal.clone(),
                move |o| crate::fetch::fetch(store.clone(), o, limits.max_object_bytes, m.clone()),
            );
            let labelled = paced_map(
                fetched,
                "DecodeLabel",
                config.batch_size,
                Some(gate),
                fatal.clone(),
                move |f| {
                    decode_clock.time(TimedStage::Decode, || {
                        f.and_then(|f| decode_and_label(f, side, limits.max_pixels))
                    })
                },
            );
            let m = metrics.clone();
            let outcomes = batch_ok(
                labelled,
                "Embed",
                config.batch_size,
                fatal.clone(),
                move |batch| {
                    embed_clock.time(TimedStage::Embed, || embed_batch(&embedder, batch, &m))
                },
                Outcome::from,
            );
            let staged = sink::write_epochs(outcomes, naming, clock.clone(), metrics.clone());
            let (store, m) = (output_store.clone(), metrics.clone());
            let written = async_map(
                staged,
                "Publish",
                rt.clone(),
                4,
                None,
                fatal.clone(),
                move |s| publish(store.clone(), s, m.clone()),
            );
            let epochs = gather_epochs(written.exchange(|_| 0), run_id.clone(), model.clone());
            let (store, m) = (output_store.clone(), metrics.clone());
            let committed_metrics = metrics.clone();
            let (commit_fatal, lost) = (fatal.clone(), lease_lost.clone());
            async_map(
                epochs,
                "Commit",
                rt.clone(),
                1,
                None,
                fatal.clone(),
                move |e| {
                    commit(
                        store.clone(),
                        e,
                        m.clone(),
                        commit_fatal.clone(),
                        lost.clone(),
                    )
                },
            )
            .inspect(
                move |result: &Result<CommittedEpoch, String>| match result {
                    Ok(c) => {
                        let m = &c.manifest;
                        let mut s = done_in.lock().expect("summary lock");
                        s.embedded += m.rows;
                        s.errors += m.errors;
                        s.epochs += 1;
                        committed_metrics.committed.inc_by(m.rows + m.errors);
                        committed_metrics.epochs_committed.inc();
                        commits_in.lock().unwrap_or_else(|e| e.into_inner()).push(
                            source::CommitReport {
                                epoch: m.epoch,
                                rows: c.rows.clone(),
                                failed_reads: c.failed_reads.clone(),
                            },
                        );
                        tracing::info!(
                            epoch = m.epoch,
                            rows = m.rows,
                            errors = m.errors,
                            "epoch committed"
                        );
                    }
                    Err(e) => {
                        if fatal_seen.set(e.clone()) {
                            tracing::error!("{e}");
                        }
                    }
                },
            )
            .probe_with(&probe);
        });

        keys.advance_to(first_epoch);
        let mut novelty = Novelty::build(worker, metrics.clone());
        let mut stats = SourceStats::default();
        let mut labels = BTreeMap::new();
        if index == 0 {
            let seed = committed.lock().expect("committed lock").take();
            if let Some(seed) = seed {
                novelty.add_handled(seed.handled);
                for (epoch, row) in seed.rows {
                    novelty.add_rows(epoch, [row]);
                }
            }
            let mut driver = Driver::new(
                keys,
                probe.clone(),
                novelty,
                commits,
                config.epochs.clone(),
                config.filter.clone(),
                metrics.clone(),
            );
            let stop_flag = config.stop.clone();
            let stop = || fatal.is_set() || stop_flag.load(Ordering::Relaxed);
            if let Err(e) = driver.drive(
                worker,
                &rt,
                &input_store,
                &config.prefix,
                config.mode,
                &stop,
            ) {
                fatal.set(e.to_string());
            }
            if stop_flag.load(Ordering::Relaxed) {
                tracing::warn!("stop requested: finishing the epochs in flight");
            }
            stats = driver.stats.clone();
            labels = driver.finish(worker);
        } else {
            drop(keys);
            drop(novelty);
            while !probe.done() {
                worker.step_or_park(Some(Duration::from_millis(50)));
            }
        }
        let mut summary = done.lock().expect("summary lock").clone();
        summary.source = stats;
        summary.labels = labels;
        summary
    });
    if let Some(watchdog) = &watchdog {
        watchdog.disarm();
    }
    let guards = guards.map_err(RunError::Fatal)?;

    let mut summary = Summary {
        removed_leftovers,
        ..Summary::default()
    };
    for result in guards.join() {
        let part = result.map_err(|e| RunError::Fatal(format!("worker failed: {e}")))?;
        summary.embedded += part.embedded;
        summary.errors += part.errors;
        summary.epochs += part.epochs;
        if part.source.listed > 0 || part.source.epochs > 0 || part.source.interrupted {
            summary.source = part.source;
        }
        if !part.labels.is_empty() {
            summary.labels = part.labels;
        }
    }
    let _ = std::fs::remove_dir_all(&staging_dir);
    let _ = std::fs::remove_dir(output.staging_dir()); // only if empty: a peer may be staging
    if let Some(reason) = fatal.reason() {
        return Err(RunError::Fatal(reason));
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.workers = workers;
    summary.stages = clock.seconds();
    summary.peak_rss_bytes = stats::peak_rss_bytes();
    summary.vanished = config.metrics.vanished.get();
    Ok(summary)
}
