//! Source stage: lists the input store and releases its keys into the dataflow in epochs.
//!
//! Listing runs on the tokio runtime and hands pages over as they arrive, so the first images
//! are processed while the listing goes on. Keys already committed in the output are skipped.
//! An epoch closes at `epoch_keys` keys, `epoch_bytes` bytes, the end of the listing, or
//! `max_epoch_age` after its first key; a new epoch is released only while fewer than
//! `max_epochs_in_flight` are unfinished downstream (probe), which bounds memory whatever the
//! size of the input.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;

use crate::record::Epoch;

/// The input of the dataflow: listed objects, stamped with their epoch.
pub type KeyInput =
    InputHandle<Epoch, timely::container::CapacityContainerBuilder<Vec<ObjectMeta>>>;
use crate::storage::{ObjectMeta, ObjectStore, StorageError};

/// How keys are grouped into epochs and how many epochs may be unfinished at once.
#[derive(Clone, Debug)]
pub struct EpochPolicy {
    /// Most keys in one epoch.
    pub epoch_keys: usize,
    /// Most input bytes in one epoch.
    pub epoch_bytes: u64,
    /// Most epochs released but not yet committed.
    pub max_epochs_in_flight: u64,
    /// An epoch with at least one key closes after this long, so a slow listing still
    /// produces output.
    pub max_epoch_age: Duration,
    /// Keys asked per listing request.
    pub page_size: usize,
}

impl Default for EpochPolicy {
    fn default() -> Self {
        Self {
            epoch_keys: 2048,
            epoch_bytes: 256 << 20,
            max_epochs_in_flight: 2,
            max_epoch_age: Duration::from_secs(2),
            page_size: 1000,
        }
    }
}

/// Which listed keys are processed: those matching an include glob (all when none is given)
/// and no exclude glob. Globs are matched case-insensitively against the whole key, and `*`
/// crosses folders: `*.jpg` takes every JPEG at any depth.
#[derive(Clone, Debug, Default)]
pub struct KeyFilter {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
}

impl KeyFilter {
    /// Builds a filter; an invalid glob is an error naming it.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, globset::Error> {
        let set = |patterns: &[String]| -> Result<Option<GlobSet>, globset::Error> {
            if patterns.is_empty() {
                return Ok(None);
            }
            let mut builder = GlobSetBuilder::new();
            for p in patterns {
                builder.add(GlobBuilder::new(p).case_insensitive(true).build()?);
            }
            builder.build().map(Some)
        };
        Ok(Self {
            include: set(include)?,
            exclude: set(exclude)?,
        })
    }

    /// Whether `key` is to be processed.
    pub fn accepts(&self, key: &str) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(key))
            && !self.exclude.as_ref().is_some_and(|g| g.is_match(key))
    }
}

/// What the source saw.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SourceStats {
    /// Objects listed.
    pub listed: u64,
    /// Objects skipped because already committed.
    pub skipped: u64,
    /// Objects left out by the include/exclude globs.
    pub filtered: u64,
    /// Objects released into the dataflow.
    pub released: u64,
    /// Epochs released.
    pub epochs: u64,
}

/// Starts listing `prefix` of `store` on `runtime`; pages arrive on the returned channel.
pub fn start_listing(
    runtime: &tokio::runtime::Handle,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    page_size: usize,
) -> tokio::sync::mpsc::Receiver<Result<Vec<ObjectMeta>, StorageError>> {
    // A few pages of look-ahead: listing stays ahead of processing without running away.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    runtime.spawn(async move {
        let mut token = None;
        loop {
            match store.list_page(&prefix, token, page_size).await {
                Ok(page) => {
                    if tx.send(Ok(page.objects)).await.is_err() {
                        return; // the source stopped listening
                    }
                    match page.next {
                        Some(next) => token = Some(next),
                        None => return,
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    rx
}

/// Drives the input of worker 0: releases listed keys epoch by epoch under `policy`, with
/// backpressure from `probe`, until the listing ends or `stop` says so. Returns what it saw.
#[allow(clippy::too_many_arguments)]
pub fn drive(
    worker: &mut Worker,
    input: &mut KeyInput,
    probe: &ProbeHandle<Epoch>,
    mut pages: tokio::sync::mpsc::Receiver<Result<Vec<ObjectMeta>, StorageError>>,
    committed: &HashSet<String>,
    filter: &KeyFilter,
    policy: &EpochPolicy,
    stop: &dyn Fn() -> bool,
) -> Result<SourceStats, StorageError> {
    let mut stats = SourceStats::default();
    let mut keys = 0usize;
    let mut bytes = 0u64;
    let mut opened: Option<Instant> = None;
    let close_epoch = |input: &mut KeyInput, worker: &mut Worker, stats: &mut SourceStats| {
        let next = *input.time() + 1;
        input.advance_to(next);
        stats.epochs += 1;
        // Backpressure: wait while `max_epochs_in_flight` epochs are unfinished.
        let max = policy.max_epochs_in_flight.max(1);
        while next >= max && probe.less_equal(&(next - max)) {
            worker.step_or_park(None);
        }
    };
    loop {
        if stop() {
            break;
        }
        let page = match pages.try_recv() {
            Ok(page) => page?,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                if opened.is_some_and(|t| t.elapsed() >= policy.max_epoch_age) {
                    close_epoch(input, worker, &mut stats);
                    (keys, bytes, opened) = (0, 0, None);
                }
                worker.step_or_park(Some(Duration::from_millis(5)));
                continue;
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
        };
        for object in page {
            stats.listed += 1;
            if !filter.accepts(&object.key) {
                stats.filtered += 1;
                continue;
            }
            if committed.contains(&object.key) {
                stats.skipped += 1;
                continue;
            }
            bytes += object.size;
            keys += 1;
            stats.released += 1;
            opened.get_or_insert_with(Instant::now);
            input.send(object);
            if keys >= policy.epoch_keys || bytes >= policy.epoch_bytes {
                close_epoch(input, worker, &mut stats);
                (keys, bytes, opened) = (0, 0, None);
            }
        }
        worker.step();
    }
    if keys > 0 {
        stats.epochs += 1;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::KeyFilter;

    fn f(include: &[&str], exclude: &[&str]) -> KeyFilter {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        KeyFilter::new(&v(include), &v(exclude)).unwrap()
    }

    #[test]
    fn no_globs_accept_everything() {
        assert!(f(&[], &[]).accepts("a/b/c.txt"));
    }

    #[test]
    fn include_by_extension_at_any_depth_ignoring_case() {
        let filter = f(&["*.jpg", "*.png"], &[]);
        assert!(filter.accepts("Training/Apple Red 1/r_3_100.jpg"));
        assert!(filter.accepts("x.PNG"));
        assert!(!filter.accepts("Training/notes.txt"));
    }

    #[test]
    fn exclude_wins_over_include() {
        let filter = f(&["*.jpg"], &["Test/**"]);
        assert!(filter.accepts("Training/a/1.jpg"));
        assert!(!filter.accepts("Test/a/1.jpg"));
    }

    #[test]
    fn bad_glob_is_an_error() {
        assert!(KeyFilter::new(&["a[".to_string()], &[]).is_err());
    }
}
