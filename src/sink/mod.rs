//! Sink stage: each worker writes an epoch's outcomes into its own Parquet files and, once
//! the epoch is complete at the worker, publishes them to the output store under their final
//! keys. The epoch is committed afterwards, by the commit stage ([`crate::commit`]).
//!
//! Output layout (keys in the output store):
//!
//! ```text
//! data/e<epoch>-w<worker>-<run>.parquet     embedding rows (the table's columns, crate::table)
//! errors/e<epoch>-w<worker>-<run>.parquet   error records (the same columns, no embedding)
//! _delta_log/<version>.json                 the Delta log: one version commits one epoch
//! ```
//!
//! Each worker writes at most one data and one errors file per epoch, so a file holds about
//! `epoch size / workers` rows (2,048 keys per epoch and 2 workers: ~1,024 rows, ~5 MiB).
//! A file is written under a staging name and appears under its final key in one atomic step;
//! it is part of the table only once the Delta version of its epoch adds it, and that
//! version is committed only after every worker has finished the epoch. Readers go through
//! the table's snapshot ([`reader`]).

pub mod lease;
pub mod reader;
pub mod writer;

use std::sync::Arc;

use timely::dataflow::StreamVec;

use crate::error::StageError;
use crate::operators::{async_map, fold_epochs, StageContext};
use crate::record::{Epoch, Outcome, Published, WorkerFailed, WrittenFile};
use crate::stats::TimedStage;
use crate::storage::{error_chain, ObjectStore};
use writer::{discard, EpochWriter, Naming, SinkError, StagedFile};

/// Files published concurrently per worker.
const PUBLISH_CONCURRENCY: usize = 4;

/// The sink stage: writes each epoch's outcomes into this worker's files, closes them when
/// the epoch is complete at this worker and publishes them to `store`. Emits each published
/// file at its epoch, or, when this worker failed on the epoch, a [`WorkerFailed`] that keeps
/// the epoch from being committed (the typed error is in the run's fatal slot).
pub fn stage<'s>(
    outcomes: StreamVec<'s, Epoch, Outcome>,
    ctx: &StageContext,
    naming: Arc<Naming>,
    store: Arc<dyn ObjectStore>,
) -> StreamVec<'s, Epoch, Result<Published, WorkerFailed>> {
    let staged = write(outcomes, ctx, naming.clone());
    let (ctx_in, worker) = (ctx.clone(), naming.worker);
    async_map(
        staged,
        "Publish",
        ctx,
        PUBLISH_CONCURRENCY,
        None,
        move |s| publish(store.clone(), s, ctx_in.clone(), worker),
    )
}

/// The Parquet half: outcomes to staged files, per epoch.
fn write<'s>(
    outcomes: StreamVec<'s, Epoch, Outcome>,
    ctx: &StageContext,
    naming: Arc<Naming>,
) -> StreamVec<'s, Epoch, Result<StagedFile, WorkerFailed>> {
    let (clock, finish_clock) = (ctx.clock.clone(), ctx.clock.clone());
    let (metrics, fatal) = (ctx.metrics.clone(), ctx.fatal.clone());
    let worker = naming.worker;
    let failed = move |epoch, source: SinkError| {
        let error = StageError::Write { epoch, source };
        let reason = error_chain(&error);
        fatal.set(error);
        WorkerFailed { worker, reason }
    };
    fold_epochs(
        outcomes,
        "WriteParquet",
        move |epoch| {
            let writer = EpochWriter::new(epoch, naming.clone(), metrics.clone());
            (writer, None::<SinkError>)
        },
        move |(writer, error), outcome, _| {
            if error.is_none() {
                let _busy = clock.start(TimedStage::Write);
                *error = writer.push(outcome).err();
            }
        },
        move |epoch, (writer, error), out| {
            let _busy = finish_clock.start(TimedStage::Write);
            match error.map_or_else(|| writer.finish(), Err) {
                Ok(files) => out.extend(files.into_iter().map(Ok)),
                Err(e) => out.push(Err(failed(epoch, e))),
            }
        },
    )
}

/// Puts one staged file into the output store under its final key.
async fn publish(
    store: Arc<dyn ObjectStore>,
    staged: Result<StagedFile, WorkerFailed>,
    ctx: StageContext,
    worker: usize,
) -> Result<Published, WorkerFailed> {
    let staged = staged?;
    let bytes = std::fs::metadata(&staged.path)
        .map(|m| m.len())
        .unwrap_or(0);
    match ctx
        .metrics
        .request(store.put_file(&staged.key, &staged.path))
        .await
    {
        Ok(()) => {
            ctx.metrics.bytes_written.inc_by(bytes);
            Ok(Published {
                file: WrittenFile {
                    key: staged.key,
                    kind: staged.kind,
                    rows: staged.rows,
                    bytes,
                    stats: staged.stats,
                },
                rows: staged.ids,
                failed_reads: staged.failed_reads,
            })
        }
        Err(source) => {
            discard(&staged.path);
            let error = StageError::Publish {
                epoch: staged.epoch,
                source,
            };
            let reason = error_chain(&error);
            ctx.fatal.set(error);
            Err(WorkerFailed { worker, reason })
        }
    }
}
