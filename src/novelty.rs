//! Incremental state, in differential dataflow: which listed objects are new, and how many
//! committed rows each label has.
//!
//! Three input collections, on a logical clock of their own (`Tick`, one per listing page or
//! batch of commits):
//!
//! - `listing`: the (key, ETag) versions of one listing page, present for one tick only;
//! - `handled`: every version committed by earlier runs or released by this one, as
//!   key -> (epoch, version);
//! - `rows`: every committed row as key -> (epoch, label).
//!
//! `handled` is reduced to the *current* version of each key, the one of its latest epoch:
//! the version its current row embeds (or will, once in flight). `listing antijoin current`
//! is the set of new versions: a key never seen, or a key whose listed ETag is not the one
//! its current row embeds. That includes a version seen before: a picture put back (a
//! revert, a restore from backup, `cp -p` of the original) after another one was committed
//! at its key is processed again, and its row supersedes the other's. Versions released are
//! added to `handled` at once, with the epoch they go into, so a key listed again by the next
//! poll, committed or still in flight, is not released twice; a key deleted from the store
//! simply stops being listed. The per-label
//! count reduces `rows` to the latest epoch of each key and counts per label, so a superseding
//! row replaces its predecessor instead of adding to the count. Both outputs are exchanged to
//! worker 0, which drives the source; every other worker closes its inputs at once.
//!
//! Memory is the `handled` and `rows` arrangements, one entry per object version ever
//! committed (listing pages come and go), so the arrangements hold fixed-size fingerprints,
//! not strings: a key and a version are each the first 128 bits of SHA-256 (over the key,
//! and over key and ETag; a chance collision, which would skip an object, is about
//! n^2 / 2^129: 10^-22 for 10^8 objects), a row is a 64-bit fingerprint of its key with its
//! epoch and a 64-bit fingerprint of its label, whose name worker 0 keeps in a small table
//! (labels are few). The arrangements are the input and output of the two latest-per-key
//! reductions (current version, latest row).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::operators::{Exchange, Inspect, Probe};
use timely::dataflow::ProbeHandle;
use timely::worker::Worker;

use crate::metrics::Metrics;
use crate::record::{Epoch, RowId};
use crate::storage::ObjectMeta;

/// Logical time of the incremental state.
type Tick = u64;
/// An object version: key and ETag.
type Version = (String, String);
/// A listed object as the listing collection holds it: version, size, and why it cannot be
/// read, if so.
type Listed = (Version, (u64, Option<String>));
/// Fingerprint of a version (or of a key).
type Fingerprint = u128;
/// Fingerprint of a label.
type LabelId = u64;
/// A handled version: key fingerprint -> (epoch it went into, version fingerprint).
type Handled = (Fingerprint, (Epoch, Fingerprint));
/// A committed row: 64-bit key fingerprint -> (epoch, label fingerprint). (A collision
/// here could only merge two keys in the per-label counts, a metric, never skip an object.)
type Row = (u64, (Epoch, LabelId));

/// The version a deleted key takes in `handled`: no listed version's fingerprint (those are
/// SHA-256 prefixes; 0 is as likely as any other, at 2^-128).
const GONE: Fingerprint = 0;
/// The label a deleted key takes in `rows`: no label's id, so it is counted under none.
const GONE_LABEL: LabelId = 0;

/// The first 128 bits of SHA-256 over `parts`, each length-prefixed (so ("ab", "c") and
/// ("a", "bc") differ): the same on every worker, process and build.
fn fingerprint(parts: &[&str]) -> Fingerprint {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(first)
}

/// A label's fingerprint ("" for keys at the root).
fn label_id(label: &str) -> LabelId {
    fingerprint(&[label]) as u64
}

/// Handles on the incremental dataflow (see the module documentation).
pub struct Novelty {
    listing: InputSession<Tick, ((Fingerprint, Fingerprint), Listed), isize>,
    handled: InputSession<Tick, Handled, isize>,
    rows: InputSession<Tick, Row, isize>,
    probe: ProbeHandle<Tick>,
    fresh: Rc<RefCell<Vec<Listed>>>,
    labels: Rc<RefCell<BTreeMap<String, i64>>>,
    /// Label names by fingerprint, for the counts that come back as fingerprints.
    label_names: Rc<RefCell<HashMap<LabelId, String>>>,
    tick: Tick,
    pending: bool,
}

impl Novelty {
    /// Builds the dataflow on this worker (every worker must, in the same order as the
    /// other dataflows). Per-label counts are written to `metrics` on worker 0.
    pub fn build(worker: &mut Worker, metrics: Arc<Metrics>) -> Self {
        let fresh: Rc<RefCell<Vec<Listed>>> = Rc::default();
        let labels: Rc<RefCell<BTreeMap<String, i64>>> = Rc::default();
        let label_names: Rc<RefCell<HashMap<LabelId, String>>> = Rc::default();
        let probe = ProbeHandle::new();
        let (fresh_out, labels_out, probe_in) = (fresh.clone(), labels.clone(), probe.clone());
        let names = label_names.clone();
        let (listing, handled, rows) = worker.dataflow::<Tick, _, _>(move |scope| {
            let (listing_in, listing) =
                scope.new_collection::<((Fingerprint, Fingerprint), Listed), isize>();
            let (handled_in, handled) = scope.new_collection::<Handled, isize>();
            let (rows_in, rows) = scope.new_collection::<Row, isize>();

            // The current version of each key: the one of its latest epoch (values come
            // sorted; a retracted release has no positive count left).
            let current = handled.reduce(|_key, versions, current| {
                if let Some(((_, version), _)) = versions.iter().rev().find(|(_, diff)| *diff > 0) {
                    current.push((*version, 1isize));
                }
            });

            // A listed version is news unless it is its key's current version. (Were a
            // version added twice, the antijoin would give it a negative count, which is not
            // news either.)
            listing
                .antijoin(current)
                // antijoin emits +1 and -1 for a handled version: only the sum means anything
                .consolidate()
                .inner
                .exchange(|_| 0)
                .inspect(move |((_, version), _tick, diff)| {
                    // Retractions (released, or the page's tick is over) are not news.
                    if *diff > 0 {
                        fresh_out.borrow_mut().push(version.clone());
                    }
                })
                .probe_with(&probe_in);

            rows.reduce(|_key, versions, latest| {
                // Values come sorted: the last is the highest epoch.
                let ((_, label), _) = versions[versions.len() - 1];
                latest.push((*label, 1isize));
            })
            .map(|(_key, label)| label)
            .count()
            .consolidate()
            .inner
            .exchange(|_| 0)
            .inspect(move |((id, count), _tick, diff)| {
                let Some(label) = names.borrow().get(id).cloned() else {
                    return;
                };
                let mut labels = labels_out.borrow_mut();
                let entry = labels.entry(label.clone()).or_default();
                // A count changes as (old, -1) and (new, +1), in either order.
                if *diff > 0 {
                    *entry = *count as i64;
                } else if *entry == *count as i64 {
                    *entry = 0;
                }
                metrics.set_label_rows(&label, *entry);
            })
            .probe_with(&probe_in);

            (listing_in, handled_in, rows_in)
        });
        Self {
            listing,
            handled,
            rows,
            probe,
            fresh,
            labels,
            label_names,
            tick: 0,
            pending: false,
        }
    }

    /// Marks versions as handled in `epoch` (committed by an earlier run, or released into
    /// that epoch by this one): of a key's handled versions, the one of the latest epoch is
    /// current.
    pub fn add_handled(&mut self, versions: impl IntoIterator<Item = (Epoch, String, String)>) {
        self.update_handled(versions, 1);
    }

    /// Takes back versions released into `epoch` whose read failed: their key's current
    /// version is again the one before, so the next listing that sees them releases them
    /// once more.
    pub fn forget_handled(&mut self, versions: impl IntoIterator<Item = (Epoch, String, String)>) {
        self.update_handled(versions, -1);
    }

    /// Adds `diff` to the handled count of each distinct (epoch, version).
    fn update_handled(
        &mut self,
        versions: impl IntoIterator<Item = (Epoch, String, String)>,
        diff: isize,
    ) {
        let mut handled: Vec<Handled> = versions
            .into_iter()
            .map(|(epoch, key, etag)| (fingerprint(&[&key]), (epoch, fingerprint(&[&key, &etag]))))
            .collect();
        handled.sort_unstable();
        handled.dedup();
        for h in handled {
            self.handled.update(h, diff);
        }
        // Settled by the driver's next housekeeping, before the next listing page: a release
        // and its forgetting in the same tick would cancel out, and a version listed in two
        // consecutive ticks is not news the second time.
        self.pending = true;
    }

    /// Adds committed rows of `epoch` to the per-label counts (applied at the next
    /// [`settle`](Self::settle) or page).
    pub fn add_rows(&mut self, epoch: Epoch, rows: impl IntoIterator<Item = RowId>) {
        let mut names = self.label_names.borrow_mut();
        for r in rows {
            let label = r.label.unwrap_or_default();
            let id = label_id(&label);
            names.entry(id).or_insert(label);
            self.rows
                .update((fingerprint(&[&r.key]) as u64, (epoch, id)), 1);
            self.pending = true;
        }
    }

    /// Records that `keys` were deleted from the input and their records removed by the
    /// commit of `epoch`: each key's current version becomes one that no listing has, so the
    /// key is new again if it comes back (even with the same version), and no label counts
    /// it any more.
    pub fn deleted(&mut self, epoch: Epoch, keys: impl IntoIterator<Item = String>) {
        let mut keys: Vec<Fingerprint> = keys.into_iter().map(|k| fingerprint(&[&k])).collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            self.handled.update((key, (epoch, GONE)), 1);
            self.rows.update((key as u64, (epoch, GONE_LABEL)), 1);
            self.pending = true;
        }
    }

    /// Whether rows were added since the last settle.
    pub fn has_pending(&self) -> bool {
        self.pending
    }

    /// The objects of `page` whose listed version is not their key's current one, sorted
    /// by key. Each must be marked [`released`](Self::released) with its epoch before the
    /// next page is compared.
    pub fn new_objects(&mut self, worker: &mut Worker, page: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
        let now = self.tick;
        for o in page {
            let item = (
                (fingerprint(&[&o.key]), fingerprint(&[&o.key, &o.etag])),
                ((o.key, o.etag), (o.size, o.unlistable)),
            );
            self.listing.update_at(item.clone(), now + 1, -1);
            self.listing.update_at(item, now, 1);
        }
        self.settle(worker);
        let mut fresh = std::mem::take(&mut *self.fresh.borrow_mut());
        fresh.sort();
        fresh.dedup();
        fresh
            .into_iter()
            .map(|((key, etag), (size, unlistable))| ObjectMeta {
                key,
                size,
                etag,
                unlistable,
            })
            .collect()
    }

    /// Records that `object` went into `epoch`: from now on it is its key's current version.
    pub fn released(&mut self, epoch: Epoch, object: &ObjectMeta) {
        self.handled.update(
            (
                fingerprint(&[&object.key]),
                (epoch, fingerprint(&[&object.key, &object.etag])),
            ),
            1,
        );
    }

    /// Moves to the next tick and steps the worker until every output of the current one
    /// has arrived at worker 0.
    pub fn settle(&mut self, worker: &mut Worker) {
        self.tick += 1;
        self.listing.advance_to(self.tick);
        self.handled.advance_to(self.tick);
        self.rows.advance_to(self.tick);
        self.listing.flush();
        self.handled.flush();
        self.rows.flush();
        self.pending = false;
        while self.probe.less_than(&self.tick) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
    }

    /// Committed rows per label (the latest version of each key; "" for keys at the root),
    /// as of the last settle.
    pub fn label_counts(&self) -> BTreeMap<String, u64> {
        self.labels
            .borrow()
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(l, &n)| (l.clone(), n as u64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, etag: &str) -> ObjectMeta {
        ObjectMeta::new(key.into(), 10, etag.into())
    }

    fn row(key: &str, etag: &str, label: &str) -> RowId {
        RowId {
            key: key.into(),
            etag: etag.into(),
            label: Some(label.into()),
        }
    }

    fn keys(objects: &[ObjectMeta]) -> Vec<(&str, &str)> {
        objects
            .iter()
            .map(|o| (o.key.as_str(), o.etag.as_str()))
            .collect()
    }

    /// Lists `page` and releases what is new into `epoch`, as the source does.
    fn list_and_release(
        n: &mut Novelty,
        worker: &mut Worker,
        epoch: Epoch,
        page: Vec<ObjectMeta>,
    ) -> Vec<(String, String)> {
        let fresh = n.new_objects(worker, page);
        for o in &fresh {
            n.released(epoch, o);
        }
        fresh.into_iter().map(|o| (o.key, o.etag)).collect()
    }

    fn versions(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, e)| (k.to_string(), e.to_string()))
            .collect()
    }

    /// One worker, one thread: new versions only, changed ETags count as new, deletions and
    /// repeats do not; label counts follow the latest row of each key.
    #[test]
    fn listed_minus_handled_and_latest_rows_per_label() {
        timely::execute(timely::Config::thread(), |worker| {
            let mut n = Novelty::build(worker, Arc::new(Metrics::new()));
            n.add_handled([(0, "a/1".to_string(), "e1".to_string())]);
            n.add_rows(0, [row("a/1", "e1", "a")]);

            let first = n.new_objects(worker, vec![meta("a/1", "e1"), meta("a/2", "e1")]);
            assert_eq!(keys(&first), [("a/2", "e1")], "a/1 was committed before");
            n.released(1, &first[0]);
            // Polled again while a/2 is in flight: nothing new.
            let again = n.new_objects(worker, vec![meta("a/1", "e1"), meta("a/2", "e1")]);
            assert!(again.is_empty(), "{again:?}");
            // a/1 replaced, a/2 deleted, b/3 added.
            let third = list_and_release(
                &mut n,
                worker,
                2,
                vec![meta("a/1", "e2"), meta("b/3", "e1")],
            );
            assert_eq!(third, versions(&[("a/1", "e2"), ("b/3", "e1")]));

            n.add_rows(1, [row("a/2", "e1", "a")]);
            n.add_rows(2, [row("a/1", "e2", "a"), row("b/3", "e1", "b")]);
            n.settle(worker);
            let counts = n.label_counts();
            assert_eq!(
                counts.get("a"),
                Some(&2),
                "a/1 superseded, not added: {counts:?}"
            );
            assert_eq!(counts.get("b"), Some(&1));
        })
        .unwrap();
    }

    /// A version put back after another one was released at its key (a revert, a restore
    /// from backup) is new again: the current row must embed it, not the other one.
    #[test]
    fn a_version_that_comes_back_is_new_again_in_a_running_watch() {
        timely::execute(timely::Config::thread(), |worker| {
            let mut n = Novelty::build(worker, Arc::new(Metrics::new()));
            let a = || vec![meta("k", "A"), meta("other", "x")];
            let b = || vec![meta("k", "B"), meta("other", "x")];
            assert_eq!(list_and_release(&mut n, worker, 0, a()).len(), 2);
            assert_eq!(
                list_and_release(&mut n, worker, 1, b()),
                versions(&[("k", "B")])
            );
            assert_eq!(
                list_and_release(&mut n, worker, 2, a()),
                versions(&[("k", "A")]),
                "A came back: its row must supersede B's"
            );
            assert!(list_and_release(&mut n, worker, 3, a()).is_empty());
            assert_eq!(
                list_and_release(&mut n, worker, 4, b()),
                versions(&[("k", "B")])
            );
        })
        .unwrap();
    }

    /// A key whose records a commit removed as deleted from the input is new again when it
    /// comes back with the very version it had, and no label counts it meanwhile.
    #[test]
    fn a_deleted_key_that_comes_back_is_new_again_and_counted_under_no_label() {
        timely::execute(timely::Config::thread(), |worker| {
            let mut n = Novelty::build(worker, Arc::new(Metrics::new()));
            let page = || vec![meta("a/k", "A"), meta("a/j", "J")];
            assert_eq!(list_and_release(&mut n, worker, 0, page()).len(), 2);
            n.add_rows(0, [row("a/k", "A", "a"), row("a/j", "J", "a")]);
            n.settle(worker);
            assert_eq!(n.label_counts().get("a"), Some(&2));

            n.deleted(1, ["a/k".to_string()]);
            n.settle(worker);
            assert_eq!(n.label_counts().get("a"), Some(&1), "a/k counted no more");
            assert_eq!(
                list_and_release(&mut n, worker, 2, page()),
                versions(&[("a/k", "A")]),
                "back with its old version: new again"
            );
            n.add_rows(2, [row("a/k", "A", "a")]);
            n.settle(worker);
            assert_eq!(n.label_counts().get("a"), Some(&2));
            assert!(list_and_release(&mut n, worker, 3, page()).is_empty());
        })
        .unwrap();
    }

    /// After a restart, the seeds decide by epoch: the version of a key's latest committed
    /// epoch is current, older ones are new when listed again.
    #[test]
    fn seeds_make_the_latest_epochs_version_current() {
        timely::execute(timely::Config::thread(), |worker| {
            let mut n = Novelty::build(worker, Arc::new(Metrics::new()));
            // Given out of order, as a table's files may.
            n.add_handled([
                (3, "k".to_string(), "B".to_string()),
                (1, "k".to_string(), "A".to_string()),
                (2, "j".to_string(), "J".to_string()),
            ]);
            assert!(n
                .new_objects(worker, vec![meta("k", "B"), meta("j", "J")])
                .is_empty());
            assert_eq!(
                keys(&n.new_objects(worker, vec![meta("k", "A"), meta("j", "J")])),
                [("k", "A")]
            );
        })
        .unwrap();
    }

    /// A release whose read failed is taken back: the listed version is new again, and the
    /// version before it is current again.
    #[test]
    fn a_forgotten_release_gives_the_key_back_its_previous_version() {
        timely::execute(timely::Config::thread(), |worker| {
            let mut n = Novelty::build(worker, Arc::new(Metrics::new()));
            n.add_handled([(0, "k".to_string(), "A".to_string())]);
            assert_eq!(
                list_and_release(&mut n, worker, 1, vec![meta("k", "B")]),
                versions(&[("k", "B")])
            );
            n.forget_handled([(1, "k".to_string(), "B".to_string())]);
            assert!(n.has_pending(), "the driver settles before the next page");
            n.settle(worker);
            assert_eq!(
                list_and_release(&mut n, worker, 2, vec![meta("k", "B")]),
                versions(&[("k", "B")]),
                "the failed read is retried"
            );
            n.forget_handled([(2, "k".to_string(), "B".to_string())]);
            n.settle(worker);
            assert!(n.new_objects(worker, vec![meta("k", "A")]).is_empty());
        })
        .unwrap();
    }
}
