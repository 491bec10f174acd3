//! The whole pipeline as one timely dataflow: each stage's operator is built in the module
//! named after the stage, and `worker` below wires them, in order.
//!
//! ```text
//! worker 0: source::stream ──exchange(route(key))──▶ fetch::stage (async reads, gated)
//!   ──▶ decode::stage (decode + resize + label, paced) ──▶ embed::stage (batches)
//!   ──▶ sink::stage (Parquet per worker per epoch, then publish) ──exchange(worker 0)──▶
//!   commit::stage (gather the epoch, commit its Delta version) ──▶ probe ─┐
//!   ▲                                                                │
//!   └── the source releases a new epoch only while few are unfinished┘  (CommitFeed: what committed)
//! ```
//!
//! Around it (`job.rs`): process 0 takes the output's lease ([`crate::sink::lease::Lease`])
//! and creates the output's Delta table if it has none; the first failure of any stage goes to one
//! [`crate::error::Fatal`] slot, after which the stages drop their work and the run fails with
//! that error.

mod job;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::{Exchange, Input, Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;

pub use job::{is_output_key, nested_prefix, InputLimits, RunConfig, RunError, Summary};
use job::{Job, WorkerReport};

use crate::commit::{self, CommitSettings};
use crate::embed::{self, Embedder};
use crate::novelty::Novelty;
use crate::operators::Gate;
use crate::record::Epoch;
use crate::sink::{self, writer::Naming};
use crate::source::{self, DeletionInput, Driver, KeyInput};
use crate::{decode, fetch};

/// Featurizes every image of `config.input` not yet committed in `config.output`.
///
/// Process 0 first takes the output's lease: a second run on the same output fails at once
/// naming the holder, before it deletes or writes anything.
pub fn run(config: &RunConfig, embedder: &Embedder) -> Result<Summary, RunError> {
    run_loading(config, || Ok(embedder.clone()))
}

/// [`run`], loading the network with `load` only once input and output are open: a wrong
/// location, missing credentials or an unreachable store fail before seconds of model loading
/// (or a weights download).
pub fn run_loading(
    config: &RunConfig,
    load: impl FnOnce() -> Result<Embedder, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Summary, RunError> {
    job::prepare_and_run(config, load, |job| {
        let timely = job::timely_config(&job.config);
        let (builders, others) = timely
            .communication
            .try_build_with(crate::cluster::network_hooks())
            .map_err(RunError::Timely)?;
        let guards = timely::execute::execute_from(builders, others, timely.worker, move |w| {
            worker(w, &job)
        })
        .map_err(RunError::Timely)?;
        guards
            .join()
            .into_iter()
            .map(|r| r.map_err(RunError::Worker))
            .collect()
    })
}

/// One worker's share of the run: builds the dataflow, then, on worker 0, drives the source
/// until the input is done; other workers step until every epoch is committed.
fn worker(worker: &mut Worker, job: &Job) -> Option<WorkerReport> {
    if let Some(watchdog) = &job.watchdog {
        watchdog.disarm(); // every process is connected: timely runs the workers
    }
    let (config, ctx) = (&job.config, &job.context);
    let naming = Arc::new(Naming {
        staging: job.staging.clone(),
        worker: worker.index(),
        run: job.run_id.clone(),
        model: job.embedder.model_name(),
        columns: config.labels.columns().to_vec(),
    });
    let decoding = job.decoding();
    let (reports, feed) = commit::channel();
    let mut keys: KeyInput = InputHandle::new();
    let mut deletions: DeletionInput = InputHandle::new();
    let index = Arc::new(std::sync::Mutex::new(commit::SnapshotIndex::default()));
    let probe: ProbeHandle<Epoch> = ProbeHandle::new();

    worker.dataflow::<Epoch, _, _>(|scope| {
        let limits = config.limits;
        // Fetched-but-undecoded objects per worker: the reads in flight plus as many again.
        let gate = Gate::new(2 * config.fetch_concurrency);

        let objects = source::stream(scope, &mut keys);
        let fetched = fetch::stage(
            objects,
            ctx,
            job.input.clone(),
            limits.max_object_bytes,
            config.fetch_concurrency,
            gate.clone(),
        );
        let labelled = decode::stage(fetched, ctx, decoding.clone(), config.batch_size, gate);
        let outcomes = embed::stage(
            labelled,
            ctx,
            (job.embedder.clone(), config.head.clone()),
            config.batch_size,
        );
        let published = sink::stage(outcomes, ctx, naming.clone(), job.output.clone());
        let settings = CommitSettings {
            output: job.delta.clone(),
            run: job.run_id.clone(),
            model: naming.model.clone(),
            weights_sha256: job.embedder.weights_sha256().to_string(),
            derivation: decoding.derivation(),
            lease_lost: job.lease_lost.clone(),
            reports,
            run_started_ms: job.started_ms,
            store: job.output.clone(),
            index: index.clone(),
            compaction: config.compaction,
        };
        let deleted = source::deletions(scope, &mut deletions);
        commit::stage(published, deleted, ctx, settings).probe_with(&probe);
    });

    keys.advance_to(job.first_epoch);
    deletions.advance_to(job.first_epoch);
    let mut novelty = Novelty::build(worker, ctx.metrics.clone());
    let (mut stops, stopped_by) = stop_requests(worker);
    if worker.index() != 0 {
        drop((keys, deletions, novelty, feed));
        let process = config.cluster.as_ref().map_or(0, |c| c.process);
        let mut asked = false;
        while !probe.done() {
            if !asked && config.stop.load(Ordering::Relaxed) {
                stops.send(process);
                // Advancing the time is what pushes the message out now: the exchange's
                // buffers are flushed when an input's epoch closes, not by `flush`.
                stops.advance_to(1);
                asked = true;
            }
            worker.step_or_park(Some(Duration::from_millis(50)));
        }
        return None;
    }
    let seed = job.committed.lock().expect("committed lock").take();
    if let Some(seed) = seed {
        novelty.add_handled(seed.handled);
        for (epoch, row) in seed.rows {
            novelty.add_rows(epoch, [row]);
        }
        *index.lock().unwrap_or_else(|e| e.into_inner()) = seed.index;
    }
    let mut driver = Driver::new(
        keys,
        probe,
        novelty,
        feed,
        config.epochs.clone(),
        config.filter.clone(),
        ctx.metrics.clone(),
    );
    match config.keep_deleted {
        // Closed at once: only the keys' input then holds epochs open.
        true => drop(deletions),
        false => driver.track_deletions(deletions, index),
    }
    let stop = || {
        ctx.fatal.is_set()
            || config.stop.load(Ordering::Relaxed)
            || stopped_by.load(Ordering::Relaxed) != NO_PROCESS
    };
    let listed = driver.drive(
        worker,
        &ctx.runtime,
        &job.input,
        &config.prefix,
        config.mode,
        &stop,
    );
    if let Err(e) = listed {
        ctx.fatal.set(e.into());
    }
    let peer = stopped_by.load(Ordering::Relaxed);
    if config.stop.load(Ordering::Relaxed) {
        tracing::warn!("stop requested: finishing the epochs in flight");
    } else if peer != NO_PROCESS {
        tracing::warn!(
            process = peer,
            "process {peer} was asked to stop: finishing the epochs in flight"
        );
        driver.stats.stopped_by_process = Some(peer);
    }
    let labels = driver.finish(worker);
    drop(stops);
    Some(WorkerReport {
        source: driver.stats.clone(),
        committed: driver.committed,
        labels,
    })
}

/// What [`stop_requests`]' flag holds while no stop was asked.
const NO_PROCESS: usize = usize::MAX;

/// The input of the stop dataflow: the index of a process that was asked to stop.
type StopInput = InputHandle<u64, CapacityContainerBuilder<Vec<usize>>>;

/// A small dataflow beside the pipeline that carries a stop (SIGINT or SIGTERM) asked of any
/// process to worker 0, whose source alone releases objects: `docker stop` of one cluster
/// member then stops the whole run the way a stop of process 0 does (no new object released,
/// the epochs in flight committed) instead of being ignored until that member is killed. Each
/// worker sends its process's index into the input; worker 0's flag holds the first that came.
fn stop_requests(worker: &mut Worker) -> (StopInput, Arc<AtomicUsize>) {
    let mut input = StopInput::new();
    let stopped_by = Arc::new(AtomicUsize::new(NO_PROCESS));
    let flag = stopped_by.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        scope
            .input_from(&mut input)
            .container::<Vec<usize>>()
            .exchange(|_| 0)
            .inspect(move |process| {
                let _ = flag.compare_exchange(
                    NO_PROCESS,
                    *process,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            });
    });
    (input, stopped_by)
}
