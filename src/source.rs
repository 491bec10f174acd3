//! Source stage: lists the input store and releases its keys into the dataflow in epochs.
//!
//! Listing runs on the tokio runtime and hands pages over as they arrive, so the first images
//! are processed while the listing goes on. Versions already committed in the output, or
//! released earlier in this run, are skipped ([`Novelty`]); in watch mode the listing is
//! repeated every poll interval.
//! An epoch closes at `epoch_keys` keys, `epoch_bytes` bytes, the end of the listing, or
//! `max_epoch_age` after its first key; a new epoch is released only while fewer than
//! `max_epochs_in_flight` are unfinished downstream (probe), which bounds memory whatever the
//! size of the input.
//!
//! A complete listing also tells which keys are gone: those of the table's snapshot, in the
//! run's scope, that it did not hold. The source sends their hashes into the dataflow's
//! second input, in the epoch it closes next, and that epoch's commit removes their records.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use timely::dataflow::operators::{Exchange, Input};
use timely::dataflow::{InputHandle, ProbeHandle, Scope, StreamVec};
use timely::worker::Worker;

use crate::commit::{key_hash, CommitFeed, CommitReport, KeyHash, SnapshotIndex};
use crate::metrics::Metrics;
use crate::novelty::Novelty;
use crate::record::{Epoch, RowId};
use crate::storage::listing::{start_listing, ListingError, Pages};
use crate::storage::{ObjectMeta, ObjectStore};

/// The input of the dataflow: listed objects, stamped with their epoch.
pub type KeyInput =
    InputHandle<Epoch, timely::container::CapacityContainerBuilder<Vec<ObjectMeta>>>;

/// The dataflow's second input: keys deleted from the input (their hashes), stamped with the
/// epoch whose commit removes their records.
pub type DeletionInput =
    InputHandle<Epoch, timely::container::CapacityContainerBuilder<Vec<KeyHash>>>;

/// The stream of deleted keys, on the worker that feeds it (worker 0); the commit stage
/// gathers it with the epoch's files.
pub fn deletions<'s>(
    scope: Scope<'s, Epoch>,
    input: &mut DeletionInput,
) -> StreamVec<'s, Epoch, KeyHash> {
    scope.input_from(input).container::<Vec<KeyHash>>()
}

/// The source stage's stream: what worker 0 releases into `input`, each object sent on to
/// the worker that fetches, decodes and embeds it ([`route`]).
pub fn stream<'s>(
    scope: Scope<'s, Epoch>,
    input: &mut KeyInput,
) -> StreamVec<'s, Epoch, ObjectMeta> {
    scope
        .input_from(input)
        .container::<Vec<ObjectMeta>>()
        .exchange(|o: &ObjectMeta| route(&o.key))
}

/// Which worker handles `key`: XXH3-64 (seed 0) of the key's UTF-8 bytes, a fixed and
/// published algorithm, so that processes built by different compilers or versions agree
/// (std's `DefaultHasher` promises no such thing).
pub fn route(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

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
    /// Keys under this prefix are never input (the output, when it lies inside the input).
    excluded_prefix: Option<String>,
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
            excluded_prefix: None,
        })
    }

    /// The same filter, also leaving out every key under `prefix` (which ends in `/`).
    pub fn excluding_prefix(mut self, prefix: String) -> Self {
        self.excluded_prefix = Some(prefix);
        self
    }

    /// Whether `key` is to be processed.
    pub fn accepts(&self, key: &str) -> bool {
        !self
            .excluded_prefix
            .as_ref()
            .is_some_and(|p| key.starts_with(p.as_str()))
            && self.include.as_ref().is_none_or(|g| g.is_match(key))
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
    /// Keys found deleted from the input (whose records leave the table's snapshot).
    #[serde(default)]
    pub deleted: u64,
    /// The listing was stopped (by a signal) before it reached its end.
    #[serde(default)]
    pub interrupted: bool,
    /// The process whose stop (a signal it received) stopped the listing, when it was not
    /// this one: in a cluster a stop asked of any process reaches the source on process 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by_process: Option<usize>,
}

/// When a run lists: once, or every `poll_interval` until stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// List once, process what is new, finish.
    #[default]
    Once,
    /// Poll: start a listing every interval (or at once, if one took longer) until stopped.
    Watch {
        /// Time from the start of one listing to the start of the next.
        poll_interval: Duration,
    },
}

/// What this run committed, as the commit stage reported it to the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommittedCounts {
    /// Embedding rows.
    pub rows: u64,
    /// Error records.
    pub errors: u64,
    /// Epochs.
    pub epochs: u64,
}

/// How many times watch mode reads one object version again after a failed read, at the
/// following polls (a restart tries again in any case).
pub const FETCH_RETRIES: u32 = 3;

/// The source on worker 0: lists, keeps only new versions ([`Novelty`]), releases them epoch
/// by epoch with backpressure, and keeps the run-wide gauges up to date.
pub struct Driver {
    input: Option<KeyInput>,
    probe: ProbeHandle<Epoch>,
    novelty: Novelty,
    commits: CommitFeed,
    policy: EpochPolicy,
    filter: KeyFilter,
    metrics: Arc<Metrics>,
    /// What the source saw.
    pub stats: SourceStats,
    /// What the commit stage reported committed.
    pub committed: CommittedCounts,
    keys: usize,
    bytes: u64,
    opened: Option<Instant>,
    /// Released, not yet committed epochs with the time of their first object.
    unfinished: VecDeque<(Epoch, Instant)>,
    /// (time, committed objects) over the last seconds, for images/s.
    rate: VecDeque<(Instant, u64)>,
    /// Whether failed reads are listed again at the next poll (watch mode).
    retry_failed_reads: bool,
    /// Reads retried so far, of the failing version of each key.
    retries: ReadRetries,
    /// Where keys found deleted go, and the snapshot they are looked for in (unless the run
    /// keeps deleted keys' rows).
    deletions: Option<(DeletionInput, Arc<Mutex<SnapshotIndex>>)>,
    /// The hashes of the keys listed in this round (only while deletions are tracked).
    listed: HashSet<KeyHash>,
}

/// How many times the read of each key's failing version was retried (watch mode). Small
/// whatever the input: a key is here only while its current version fails to be read; a row
/// of the key committing, or another version failing, replaces or drops its entry.
#[derive(Debug, Default)]
struct ReadRetries(std::collections::HashMap<String, (String, u32)>);

impl ReadRetries {
    /// A read of `etag` at `key` failed: whether it gets another try (at most
    /// [`FETCH_RETRIES`] per version), and the try's number.
    fn failed(&mut self, key: &str, etag: &str) -> Option<u32> {
        let entry = self
            .0
            .entry(key.to_string())
            .or_insert_with(|| (etag.to_string(), 0));
        if entry.0 != etag {
            *entry = (etag.to_string(), 0);
        }
        (entry.1 < FETCH_RETRIES).then(|| {
            entry.1 += 1;
            entry.1
        })
    }

    /// A row of `key` committed: its reads succeed again.
    fn committed(&mut self, key: &str) {
        self.0.remove(key);
    }

    /// Whether no key has a failing read.
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Driver {
    /// A driver releasing into `input` from `input.time()` on, watching `probe`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input: KeyInput,
        probe: ProbeHandle<Epoch>,
        novelty: Novelty,
        commits: CommitFeed,
        policy: EpochPolicy,
        filter: KeyFilter,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            input: Some(input),
            probe,
            novelty,
            commits,
            policy,
            filter,
            metrics,
            stats: SourceStats::default(),
            committed: CommittedCounts::default(),
            keys: 0,
            bytes: 0,
            opened: None,
            unfinished: VecDeque::new(),
            rate: VecDeque::new(),
            retry_failed_reads: false,
            retries: Default::default(),
            deletions: None,
            listed: HashSet::new(),
        }
    }

    /// After each complete listing, sends the keys of `index` in the run's scope that the
    /// listing did not hold into `input`, for the next commit to remove their records.
    pub fn track_deletions(&mut self, input: DeletionInput, index: Arc<Mutex<SnapshotIndex>>) {
        self.deletions = Some((input, index));
    }

    /// Lists `prefix` of `store` once or repeatedly (`mode`), releasing new objects, until
    /// the listing ends (once) or `stop` says so. A failed listing ends a single run; in
    /// watch mode it is logged and retried at the next poll.
    #[allow(clippy::too_many_arguments)]
    pub fn drive(
        &mut self,
        worker: &mut Worker,
        runtime: &tokio::runtime::Handle,
        store: &Arc<dyn ObjectStore>,
        prefix: &str,
        mode: Mode,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), ListingError> {
        self.retry_failed_reads = matches!(mode, Mode::Watch { .. });
        loop {
            let round = Instant::now();
            let pages = start_listing(
                runtime,
                store.clone(),
                prefix.to_string(),
                self.policy.page_size,
            );
            let released = self.stats.released;
            self.listed.clear();
            match (self.list_round(worker, pages, stop), mode) {
                (Ok(()), _) if !stop() => self.release_deletions(),
                (Ok(()), _) => {}
                (Err(e), Mode::Once) => return Err(e),
                (Err(e), Mode::Watch { .. }) => {
                    tracing::warn!("{e}; trying again at the next poll");
                }
            }
            self.close_epoch(worker, stop);
            let Mode::Watch { poll_interval } = mode else {
                tracing::info!(
                    released = self.stats.released,
                    seconds = round.elapsed().as_secs_f64(),
                    "listing done"
                );
                return Ok(());
            };
            tracing::info!(
                new = self.stats.released - released,
                seconds = round.elapsed().as_secs_f64(),
                "poll done"
            );
            while round.elapsed() < poll_interval {
                if stop() {
                    return Ok(());
                }
                self.housekeeping(worker);
                worker.step_or_park(Some(Duration::from_millis(50)));
            }
            if stop() {
                return Ok(());
            }
        }
    }

    fn list_round(
        &mut self,
        worker: &mut Worker,
        mut pages: Pages,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), ListingError> {
        loop {
            if stop() {
                let (filter, novelty) = (&self.filter, &mut self.novelty);
                let left = nothing_left(&mut pages, |page| {
                    let accepted = page.into_iter().filter(|o| filter.accepts(&o.key));
                    !novelty.new_objects(worker, accepted.collect()).is_empty()
                });
                self.stats.interrupted = !left;
                return Ok(()); // dropping `pages` ends the listing task
            }
            self.housekeeping(worker);
            let page = match pages.try_recv() {
                Ok(page) => page?,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    if self
                        .opened
                        .is_some_and(|t| t.elapsed() >= self.policy.max_epoch_age)
                    {
                        self.close_epoch(worker, stop);
                    }
                    worker.step_or_park(Some(Duration::from_millis(5)));
                    continue;
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return Ok(()),
            };
            self.stats.listed += page.len() as u64;
            self.metrics.listed.inc_by(page.len() as u64);
            let before = page.len();
            let accepted: Vec<ObjectMeta> = page
                .into_iter()
                .filter(|o| self.filter.accepts(&o.key))
                .collect();
            self.stats.filtered += (before - accepted.len()) as u64;
            let offered = accepted.len();
            if self.deletions.is_some() {
                self.listed
                    .extend(accepted.iter().map(|o| key_hash(&o.key)));
            }
            let fresh = self.novelty.new_objects(worker, accepted);
            self.stats.skipped += (offered - fresh.len()) as u64;
            for object in fresh {
                // A stop releases nothing more, even in the middle of a page.
                if stop() {
                    self.stats.interrupted = true;
                    return Ok(());
                }
                self.release(worker, object, stop);
            }
            worker.step();
        }
    }

    /// After a complete listing: sends the keys of the snapshot in scope that it did not
    /// hold into the open epoch (opening one if none is), whose commit removes their records.
    fn release_deletions(&mut self) {
        let Some((input, index)) = &mut self.deletions else {
            return;
        };
        let gone = index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gone(&self.listed);
        self.listed = HashSet::new();
        if gone.is_empty() {
            return;
        }
        tracing::info!(
            keys = gone.len(),
            "objects deleted from the input: their records leave the table at the next commit"
        );
        self.stats.deleted += gone.len() as u64;
        self.opened.get_or_insert_with(Instant::now);
        for hash in gone {
            input.send(hash);
        }
    }

    fn release(&mut self, worker: &mut Worker, object: ObjectMeta, stop: &dyn Fn() -> bool) {
        self.bytes += object.size;
        self.keys += 1;
        self.stats.released += 1;
        self.metrics.released.inc();
        self.opened.get_or_insert_with(Instant::now);
        let input = self.input.as_mut().expect("input open");
        self.novelty.released(*input.time(), &object);
        input.send(object);
        if self.keys >= self.policy.epoch_keys || self.bytes >= self.policy.epoch_bytes {
            self.close_epoch(worker, stop);
        }
    }

    /// Closes the open epoch, if it has objects, then waits while `max_epochs_in_flight`
    /// epochs are unfinished (backpressure), or until `stop` says so.
    fn close_epoch(&mut self, worker: &mut Worker, stop: &dyn Fn() -> bool) {
        let Some(opened) = self.opened.take() else {
            return;
        };
        let input = self.input.as_mut().expect("input open");
        let epoch = *input.time();
        input.advance_to(epoch + 1);
        if let Some((deleted, _)) = &mut self.deletions {
            deleted.advance_to(epoch + 1);
        }
        self.unfinished.push_back((epoch, opened));
        self.stats.epochs += 1;
        (self.keys, self.bytes) = (0, 0);
        let max = self.policy.max_epochs_in_flight.max(1);
        let next = epoch + 1;
        while next >= max && self.probe.less_equal(&(next - max)) && !stop() {
            self.housekeeping(worker);
            worker.step_or_park(Some(Duration::from_millis(100)));
        }
    }

    /// Feeds committed rows to the per-label counts and refreshes the run-wide gauges.
    pub fn housekeeping(&mut self, worker: &mut Worker) {
        let committed: Vec<CommitReport> = self.commits.drain().collect();
        for report in committed {
            let m = &report.commit;
            self.committed.rows += m.rows;
            self.committed.errors += m.errors;
            self.committed.epochs += 1;
            if !self.retries.is_empty() {
                for row in &report.rows {
                    self.retries.committed(&row.key);
                }
            }
            self.novelty.add_rows(m.epoch, report.rows);
            if !report.deleted.is_empty() {
                self.novelty
                    .deleted(m.epoch, report.deleted.into_iter().map(|(_, row)| row.key));
            }
            if self.retry_failed_reads {
                self.forget_failed_reads(m.epoch, report.failed_reads);
            }
        }
        if self.novelty.has_pending() {
            self.novelty.settle(worker);
        }
        while let Some(&(epoch, _)) = self.unfinished.front() {
            if self.probe.less_equal(&epoch) {
                break;
            }
            self.unfinished.pop_front();
        }
        let now = Instant::now();
        self.metrics
            .epochs_in_flight
            .set(self.unfinished.len() as i64 + i64::from(self.opened.is_some()));
        let oldest = self.unfinished.front().map(|u| u.1).or(self.opened);
        self.metrics
            .frontier_lag_seconds
            .set(oldest.map_or(0.0, |t| (now - t).as_secs_f64()));
        let done = self.metrics.committed.get();
        if self
            .rate
            .back()
            .is_none_or(|(t, _)| now - *t >= Duration::from_millis(500))
        {
            self.rate.push_back((now, done));
            while self.rate.len() > 2 && now - self.rate[0].0 > RATE_WINDOW {
                self.rate.pop_front();
            }
            if let (Some(first), Some(last)) = (self.rate.front(), self.rate.back()) {
                let dt = (last.0 - first.0).as_secs_f64();
                if dt > 0.0 {
                    self.metrics
                        .images_per_second
                        .set((last.1 - first.1) as f64 / dt);
                }
            }
        }
    }

    /// Makes versions whose read failed in `epoch` new again, so that the next poll releases
    /// them, at most [`FETCH_RETRIES`] times each.
    fn forget_failed_reads(&mut self, epoch: Epoch, failed: Vec<RowId>) {
        let mut again = Vec::new();
        for row in failed {
            match self.retries.failed(&row.key, &row.etag) {
                Some(attempt) => {
                    tracing::info!(
                        key = row.key,
                        attempt,
                        "read failed: listed again at the next poll"
                    );
                    again.push((row.key, row.etag));
                }
                None => tracing::warn!(
                    key = row.key,
                    "read failed {} more times: not retried before a restart",
                    FETCH_RETRIES
                ),
            }
        }
        self.novelty
            .forget_handled(again.into_iter().map(|(key, etag)| (epoch, key, etag)));
    }

    /// Closes the input and steps until every released epoch is committed; returns the
    /// committed rows per label of the whole output.
    pub fn finish(&mut self, worker: &mut Worker) -> BTreeMap<String, u64> {
        // No need to wait for room here: everything released is waited for below.
        self.close_epoch(worker, &|| true);
        self.input.take();
        self.deletions.take();
        while !self.probe.done() {
            self.housekeeping(worker);
            worker.step_or_park(Some(Duration::from_millis(50)));
        }
        self.housekeeping(worker);
        self.novelty.settle(worker);
        self.metrics.epochs_in_flight.set(0);
        self.metrics.frontier_lag_seconds.set(0.0);
        self.novelty.label_counts()
    }
}

/// Span over which images/s is averaged.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// After a stop: whether the listing held nothing beyond what was released. The pages still
/// to come are read (nothing is released) and each is asked `anything_new`; a listing that has
/// not ended yet, or that failed, may hold more, so it counts as something left. This is what
/// tells a stop that came after the last release (exit 0) from one that cut the run short.
fn nothing_left(pages: &mut Pages, mut anything_new: impl FnMut(Vec<ObjectMeta>) -> bool) -> bool {
    use tokio::sync::mpsc::error::TryRecvError;
    loop {
        match pages.try_recv() {
            Ok(Ok(page)) => {
                if anything_new(page) {
                    return false;
                }
            }
            Ok(Err(_)) | Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Disconnected) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stop that lands after the last release but before the listing's end: the pages
    /// that arrive after it hold only released keys, so the run ends normally (exit 0); a new
    /// key, a listing still under way or a failed listing make it an interrupted run (143).
    #[test]
    fn a_stop_after_the_last_release_leaves_nothing_when_the_rest_was_released() {
        let released = ["a.jpg", "b.jpg"];
        let is_new =
            |page: Vec<ObjectMeta>| page.iter().any(|o| !released.contains(&o.key.as_str()));
        let listing = |pages: Vec<Result<Vec<ObjectMeta>, ListingError>>, ended: bool| {
            let (send, receive) = tokio::sync::mpsc::channel(8);
            for page in pages {
                send.try_send(page).unwrap();
            }
            if !ended {
                std::mem::forget(send); // the listing task still holds its sender
            }
            receive
        };
        let page = |keys: &[&str]| {
            Ok(keys
                .iter()
                .map(|k| ObjectMeta::new(k.to_string(), 1, "v1".to_string()))
                .collect())
        };
        let mut ended_with_released = listing(vec![page(&["a.jpg"]), page(&["b.jpg"])], true);
        assert!(nothing_left(&mut ended_with_released, is_new));
        let mut ended_empty = listing(vec![], true);
        assert!(nothing_left(&mut ended_empty, is_new));
        let mut a_new_key = listing(vec![page(&["a.jpg"]), page(&["c.jpg"])], true);
        assert!(!nothing_left(&mut a_new_key, is_new));
        let mut still_listing = listing(vec![page(&["a.jpg", "b.jpg"])], false);
        assert!(!nothing_left(&mut still_listing, is_new));
        let failed = Err(ListingError::Panicked {
            location: "in/".to_string(),
            page: 2,
            after: Some("a.jpg".to_string()),
            message: "a test".to_string(),
        });
        let mut a_failed_page = listing(vec![page(&["a.jpg"]), failed], true);
        assert!(!nothing_left(&mut a_failed_page, is_new));
    }

    fn f(include: &[&str], exclude: &[&str]) -> KeyFilter {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        KeyFilter::new(&v(include), &v(exclude)).unwrap()
    }

    /// The route is XXH3-64 as published (values computed with the reference implementation
    /// through Python's `xxhash` package), so any two builds send a key to the same worker.
    #[test]
    fn read_retries_are_counted_per_version_and_forgotten_once_the_key_commits() {
        let mut retries = super::ReadRetries::default();
        for attempt in 1..=super::FETCH_RETRIES {
            assert_eq!(retries.failed("a.jpg", "v1"), Some(attempt));
        }
        assert_eq!(retries.failed("a.jpg", "v1"), None, "no more tries for v1");
        assert_eq!(
            retries.failed("a.jpg", "v2"),
            Some(1),
            "a new version starts over"
        );
        assert_eq!(retries.failed("b.jpg", "v1"), Some(1));
        assert_eq!(
            retries.0.len(),
            2,
            "one entry per failing key, not per version"
        );
        retries.committed("a.jpg");
        retries.committed("never-failed.jpg");
        assert_eq!(retries.0.len(), 1);
        assert_eq!(
            retries.failed("a.jpg", "v2"),
            Some(1),
            "a committed key starts over"
        );
    }

    #[test]
    fn route_is_the_published_xxh3_of_the_key() {
        assert_eq!(route(""), 0x2d06_8005_38d3_94c2);
        assert_eq!(route("Training/apple/r_1_100.jpg"), 0x2773_1901_f195_98da);
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
