//! Fetch stage: one object's bytes from the input store.
//!
//! Runs as futures on the process's tokio runtime (see [`crate::operators::async_map`]), a
//! bounded number in flight per worker; a failure becomes the object's error record.

use std::sync::Arc;

use crate::record::{Failure, Fetched, Stage};
use crate::storage::{ObjectMeta, ObjectStore};

/// Reads `object` from `store`.
pub async fn fetch(store: Arc<dyn ObjectStore>, object: ObjectMeta) -> Result<Fetched, Failure> {
    match store.get(&object.key).await {
        Ok(bytes) => Ok(Fetched {
            key: object.key,
            bytes,
        }),
        Err(e) => Err(Failure {
            reason: e.to_string(),
            key: object.key,
            stage: Stage::Fetch,
        }),
    }
}
