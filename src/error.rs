//! What fails a run from inside the dataflow, typed, and the one slot the first such failure
//! goes to.
//!
//! A bad object never fails a run: it becomes an error record (see [`crate::record::Failure`]).
//! A [`StageError`] is what stops the run instead: the output cannot be written or committed,
//! the listing broke, a stage panicked. The first one goes to the run's [`Fatal`] slot, every
//! stage then drops its work, and the run ends with that error and its causes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::record::Epoch;
use crate::storage::listing::ListingError;
use crate::storage::StorageError;
use crate::table::TableError;

/// A failure of a stage that stops the run, with its cause as `source`.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The input's listing broke off: the run cannot know it saw every key.
    #[error(transparent)]
    Listing(#[from] ListingError),
    /// A worker could not write its Parquet files of an epoch.
    #[error("epoch {epoch}: could not write this worker's files")]
    Write {
        /// The epoch.
        epoch: Epoch,
        /// What failed.
        #[source]
        source: SinkError,
    },
    /// A finished file could not be put into the output store.
    #[error("epoch {epoch}: could not publish a file")]
    Publish {
        /// The epoch.
        epoch: Epoch,
        /// The store's error (it names the file).
        #[source]
        source: StorageError,
    },
    /// The Delta version of an epoch could not be committed.
    #[error("epoch {epoch} not committed")]
    Commit {
        /// The epoch.
        epoch: Epoch,
        /// Why.
        #[source]
        source: CommitError,
    },
    /// The output's lease was lost (expired or taken over): this run must not commit.
    #[error("epoch {epoch} not committed: this run lost the lease of {location}")]
    LeaseLost {
        /// The epoch that was not committed.
        epoch: Epoch,
        /// The output.
        location: String,
    },
    /// A worker of another process failed on an epoch (its own process reports the cause).
    #[error("epoch {epoch} not committed: worker {worker} failed: {reason}")]
    Peer {
        /// The epoch.
        epoch: Epoch,
        /// The worker's global index.
        worker: usize,
        /// Its error, as text (it crossed the network).
        reason: String,
    },
    /// A stage's code panicked (a bug): its record was dropped.
    #[error("{stage} stage panicked: {message}")]
    Panicked {
        /// The stage (operator name).
        stage: String,
        /// The panic's message.
        message: String,
    },
}

/// Why a worker's files could not be written: fatal for the run.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The local staging file could not be created, written or synced.
    #[error("staging file {path}")]
    Staging {
        /// The staging file.
        path: String,
        /// The file system's error.
        #[source]
        source: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("staging file {path}: Parquet encoding failed")]
    Parquet {
        /// The staging file.
        path: String,
        /// The writer's error.
        #[source]
        source: parquet::errors::ParquetError,
    },
}

impl SinkError {
    pub(crate) fn staging(path: &Path) -> impl Fn(std::io::Error) -> Self + '_ {
        move |source| Self::Staging {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn parquet(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> Self + '_ {
        move |source| Self::Parquet {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Why the output's committed state could not be read or a commit could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The output store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A committed file could not be read back.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The Delta table could not be opened, read or committed to.
    #[error("the Delta table at {location}: {source}")]
    Delta {
        /// The output.
        location: String,
        /// delta-rs's error.
        #[source]
        source: Box<deltalake_core::DeltaTableError>,
    },
    /// The output's location cannot be a Delta table's.
    #[error("{location}: not a place for a Delta table: {reason}")]
    Location {
        /// The output.
        location: String,
        /// Why.
        reason: String,
    },
    /// The output holds a Delta table that verger did not make.
    #[error("{location} holds a Delta table that verger did not make (no verger.model in its metadata); write to another output")]
    NotVerger {
        /// The output.
        location: String,
    },
    /// The output holds verger's earlier layout (manifests), not a Delta table.
    #[error("{location} holds an output of an earlier verger (_manifest/ files, not a Delta table); write to a new output, or remove it to start over")]
    OldLayout {
        /// The output.
        location: String,
    },
    /// A commit record is not valid JSON of one (or could not be encoded).
    #[error("{key}: {source}")]
    Json {
        /// Its key.
        key: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The Delta log lists a file outside the output.
    #[error("{key}: {reason}")]
    Invalid {
        /// Its key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The epoch was committed by another run: a second writer on this output.
    #[error("epoch {epoch} was already committed by run {run}: another writer on this output")]
    AlreadyCommitted {
        /// The epoch.
        epoch: Epoch,
        /// The run that committed it.
        run: String,
    },
}

impl CommitError {
    /// Whether it came from the store rather than from the table: an HTTP failure, a reset
    /// or refused connection, a timeout. Such an operation may succeed when tried again; a
    /// conflict, a missing object or a refused table may not.
    pub fn is_transient(&self) -> bool {
        let CommitError::Delta { source, .. } = self else {
            return false;
        };
        let transient = |store: &deltalake_core::ObjectStoreError| {
            matches!(store, deltalake_core::ObjectStoreError::Generic { .. })
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(error) = cause {
            if let Some(store) = error.downcast_ref::<deltalake_core::ObjectStoreError>() {
                return transient(store);
            }
            // The kernel wraps the store's error without naming it as its source.
            if let Some(delta_kernel::Error::ObjectStore(store)) =
                error.downcast_ref::<delta_kernel::Error>()
            {
                return transient(store);
            }
            cause = error.source();
        }
        false
    }
}

/// The first [`StageError`] of a run, shared by every stage of every worker of the process.
/// Once it is set, stages stop starting work and drop what they hold.
#[derive(Clone, Debug, Default)]
pub struct Fatal {
    set: Arc<AtomicBool>,
    error: Arc<Mutex<Option<StageError>>>,
}

impl Fatal {
    /// Records `error` unless an earlier one is recorded; returns whether this one was.
    pub fn set(&self, error: StageError) -> bool {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(error);
        self.set.store(true, Ordering::Release);
        true
    }

    /// Whether the run is failing.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// The recorded error with its causes on one line, if any.
    pub fn describe(&self) -> Option<String> {
        let slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map(|e| crate::storage::error_chain(e))
    }

    /// Takes the recorded error out (once the dataflow has ended).
    pub fn take(&self) -> Option<StageError> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn the_first_error_wins_and_keeps_its_cause() {
        let fatal = Fatal::default();
        assert!(!fatal.is_set());
        let cause = StorageError::NotFound {
            key: "data/e1.parquet".into(),
        };
        assert!(fatal.set(StageError::Publish {
            epoch: 1,
            source: cause
        }));
        assert!(!fatal.set(StageError::Panicked {
            stage: "Embed".into(),
            message: "later".into()
        }));
        assert!(fatal.is_set());
        assert_eq!(
            fatal.describe().unwrap(),
            "epoch 1: could not publish a file: data/e1.parquet: object not found"
        );
        let error = fatal.take().unwrap();
        let source = error.source().expect("the store's error is the source");
        assert!(source.downcast_ref::<StorageError>().is_some());
    }
}
