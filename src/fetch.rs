//! Fetch stage: one object's bytes from the input store.
//!
//! Runs as futures on the process's tokio runtime (see [`crate::operators::async_map`]), a
//! bounded number in flight per worker. The read asks for the version that was listed: an
//! object deleted or replaced since is not an error but [`Miss::Vanished`] (a replaced
//! object's new version comes with the next listing); any other failure becomes the object's
//! error record.

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::record::{Failure, Fetched, Miss, Stage};
use crate::storage::{ObjectMeta, ObjectStore, StorageError};

/// Reads `object`, as listed, from `store`.
pub async fn fetch(
    store: Arc<dyn ObjectStore>,
    object: ObjectMeta,
    metrics: Arc<Metrics>,
) -> Result<Fetched, Miss> {
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
