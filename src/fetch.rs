//! Fetch stage: one object's bytes from the input store.
//!
//! Runs as futures on the process's tokio runtime (see [`crate::operators::async_map`]), a
//! bounded number in flight per worker. The read asks for the version that was listed: an
//! object deleted or replaced since is not an error but [`Miss::Vanished`] (a replaced
//! object's new version comes with the next listing); any other failure becomes the object's
//! error record, and so does what the listing found but could not give as an object.

use std::sync::Arc;

use timely::dataflow::StreamVec;

use crate::metrics::Metrics;
use crate::operators::{async_map, Gate, StageContext};
use crate::record::{Epoch, Failure, Fetched, Miss, Stage};
use crate::storage::{ObjectMeta, ObjectStore, StorageError};

/// Default of `--max-object-bytes`: larger objects are error records, never read.
pub const MAX_OBJECT_BYTES: u64 = 64 << 20;

/// Reads `object`, as listed, from `store`, unless it is larger than `max_bytes`: then it is
/// an error record (stage `size`) without a single byte read, so that one huge object cannot
/// take the worker's memory.
pub async fn fetch(
    store: Arc<dyn ObjectStore>,
    object: ObjectMeta,
    max_bytes: u64,
    metrics: Arc<Metrics>,
) -> Result<Fetched, Miss> {
    if let Some(reason) = object.unlistable {
        return Err(Miss::Failed(Failure {
            key: object.key,
            etag: object.etag,
            stage: Stage::List,
            reason,
        }));
    }
    if object.size > max_bytes {
        return Err(Miss::Failed(Failure {
            reason: format!(
                "{} bytes, over the limit of {max_bytes} (--max-object-bytes): not read",
                object.size
            ),
            key: object.key,
            etag: object.etag,
            stage: Stage::Size,
        }));
    }
    let result = metrics
        .request(store.get_version(&object.key, &object.etag))
        .await;
    match result {
        Ok(bytes) => {
            metrics.fetched.inc();
            metrics.bytes_read.inc_by(bytes.len() as u64);
            Ok(Fetched {
                key: object.key,
                etag: object.etag,
                bytes,
            })
        }
        Err(e @ (StorageError::NotFound { .. } | StorageError::Changed { .. })) => {
            tracing::info!("{e}: skipped");
            metrics.vanished.inc();
            Err(Miss::Vanished {
                key: object.key,
                reason: e.to_string(),
            })
        }
        Err(e) => Err(Miss::Failed(Failure {
            reason: e.to_string(),
            key: object.key,
            etag: object.etag,
            stage: Stage::Fetch,
        })),
    }
}

/// The fetch stage: reads every object routed to this worker from `store`, at most
/// `concurrency` reads in flight, and no more fetched-but-undecoded objects than `gate`
/// allows (the decode stage gives its permits back).
pub fn stage<'s>(
    objects: StreamVec<'s, Epoch, ObjectMeta>,
    ctx: &StageContext,
    store: Arc<dyn ObjectStore>,
    max_bytes: u64,
    concurrency: usize,
    gate: Gate,
) -> StreamVec<'s, Epoch, Result<Fetched, Miss>> {
    let metrics = ctx.metrics.clone();
    async_map(objects, "Fetch", ctx, concurrency, Some(gate), move |o| {
        fetch(store.clone(), o, max_bytes, metrics.clone())
    })
}
