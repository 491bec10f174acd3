//! The table's snapshot as the committing worker keeps it: which file holds the current
//! record of each key. With it, the commit that adds a key's new record also removes its
//! old one (a replaced object, a read retried with success), and a deletion's commit
//! removes the records of keys gone from the input, so that the latest snapshot holds one
//! record per object, its latest version, and time travel the earlier states.
//!
//! Delta without DataFusion has no DELETE and delta-rs writes no deletion vectors: a record
//! leaves the snapshot by a `remove` of its file and an `add` of the file rewritten without
//! it, in the same version as the epoch's own files.
//!
//! Memory is one entry per key of the snapshot: a 64-bit hash of the key, the file's index
//! and whether the key is in this run's scope (its prefix and filters): about 20 bytes per
//! object. A hash collision can only make a rewrite find nothing to remove in a file: a
//! replaced key's records are matched by the key itself; a deleted key's by its hash and
//! scope, where a collision (about n^2 / 2^65: 10^-8 for 10^6 keys) would drop a record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use arrow::array::{BooleanArray, RecordBatch};
use bytes::Bytes;

use crate::error::CommitError;
use crate::record::{Epoch, RowId, Stage, WrittenFile};
use crate::storage::ObjectStore;
use crate::table::{self, FileStats};

/// A key's hash in the snapshot index: the same for every run of one build (SipHash with
/// fixed keys), never written anywhere.
pub type KeyHash = u64;

/// The hash of `key` in the snapshot index.
pub fn key_hash(key: &str) -> KeyHash {
    #[allow(deprecated)] // SipHasher: std's fixed-key SipHash, stable within a build
    let mut h = std::hash::SipHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Where a key's current record is.
#[derive(Clone, Copy, Debug)]
struct Place {
    file: u32,
    in_scope: bool,
}

/// A file of the snapshot: its path and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    /// Its key in the output store.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// Which file of the snapshot holds each key's record (see the module documentation).
#[derive(Debug, Default)]
pub struct SnapshotIndex {
    /// The snapshot's files by slot; `None` once removed with nothing left to add.
    files: Vec<Option<SnapshotFile>>,
    /// Slots emptied by a merge, which no key points to any more: reused by the next file.
    free: Vec<u32>,
    keys: HashMap<KeyHash, Place>,
    /// Keys with records in more than one file (a table written before verger superseded
    /// records): the other files. The first rewrite that touches the key removes them all.
    more: HashMap<KeyHash, Vec<u32>>,
}

/// What one epoch's commit removes from the snapshot, and what it adds in their place.
#[derive(Debug, Default)]
pub struct Supersession {
    /// Files rewritten without the removed records (added by the commit).
    pub rewritten: Vec<WrittenFile>,
    /// Files removed by the commit: every rewritten file's original, and files with no
    /// record left.
    pub removed: Vec<String>,
    /// Records removed because their key was deleted from the input: (epoch, row).
    pub deleted: Vec<(Epoch, RowId)>,
    /// Records removed because a newer record of their key came (replaced objects, retried
    /// reads).
    pub superseded: u64,
    /// Files that compaction wrote, each the records of several small files (added by the
    /// commit as a rearrangement: `dataChange` false).
    pub compacted: Vec<WrittenFile>,
    /// The small files they replace (removed with `dataChange` false).
    pub compacted_from: Vec<String>,
    /// Index updates to apply once the commit is made: (file slot, its new file).
    updates: Vec<(u32, Option<SnapshotFile>)>,
    /// Merges to apply once the commit is made: the slots merged, and their merged file.
    pub(super) merges: Vec<(Vec<u32>, SnapshotFile)>,
}

impl SnapshotIndex {
    /// Records that `file`, a file of the snapshot, holds the records of `keys` (each with
    /// whether it is in this run's scope). A key already placed in another file keeps both.
    pub fn add_file<'a>(
        &mut self,
        file: SnapshotFile,
        keys: impl IntoIterator<Item = (&'a str, bool)>,
    ) {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.files[slot as usize] = Some(file);
                slot
            }
            None => {
                self.files.push(Some(file));
                self.files.len() as u32 - 1
            }
        };
        for (key, in_scope) in keys {
            let place = Place {
                file: slot,
                in_scope,
            };
            if let Some(old) = self.keys.insert(key_hash(key), place) {
                if old.file != slot {
                    self.more.entry(key_hash(key)).or_default().push(old.file);
                }
            }
        }
    }

    /// Keys in the snapshot.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the snapshot has no record.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The snapshot's files with their slots, in slot order.
    pub fn files(&self) -> impl Iterator<Item = (u32, &SnapshotFile)> + '_ {
        self.files
            .iter()
            .enumerate()
            .filter_map(|(slot, file)| Some((slot as u32, file.as_ref()?)))
    }

    /// The keys in this run's scope that `listed` (every key of one complete listing) does
    /// not hold: objects deleted from the input.
    pub fn gone(&self, listed: &HashSet<KeyHash>) -> Vec<KeyHash> {
        let mut gone: Vec<KeyHash> = self
            .keys
            .iter()
            .filter(|(hash, place)| place.in_scope && !listed.contains(*hash))
            .map(|(hash, _)| *hash)
            .collect();
        gone.sort_unstable();
        gone
    }

    /// The files of `hash`'s records.
    fn files_of(&self, hash: KeyHash) -> impl Iterator<Item = u32> + '_ {
        let first = self.keys.get(&hash).map(|p| p.file);
        let more = self.more.get(&hash).into_iter().flatten().copied();
        first.into_iter().chain(more)
    }

    /// Applies a commit: the rewritten and removed files, the merged ones, then the
    /// epoch's own `files` with the keys of their records (all in scope: this run listed
    /// them).
    pub fn apply<'a>(
        &mut self,
        supersession: &Supersession,
        deleted: &[KeyHash],
        files: impl IntoIterator<Item = (SnapshotFile, Vec<&'a str>)>,
    ) {
        for (file, path) in &supersession.updates {
            self.files[*file as usize] = path.clone();
        }
        for (slots, merged) in &supersession.merges {
            self.merge(slots, merged.clone());
        }
        for hash in deleted {
            self.keys.remove(hash);
            self.more.remove(hash);
        }
        // A key's older records were all rewritten away: its new record is its only one.
        let files: Vec<(SnapshotFile, Vec<&str>)> = files.into_iter().collect();
        for key in files.iter().flat_map(|(_, keys)| keys) {
            self.keys.remove(&key_hash(key));
            self.more.remove(&key_hash(key));
        }
        for (file, keys) in files {
            self.add_file(file, keys.into_iter().map(|k| (k, true)));
        }
        if supersession.updates.iter().any(|(_, path)| path.is_none()) {
            let live: HashSet<u32> = self.files().map(|(slot, _)| slot).collect();
            self.more.retain(|_, files| {
                files.retain(|f| live.contains(f));
                !files.is_empty()
            });
        }
    }

    /// Replaces the files of `slots` by `merged`, which holds all their records: the first
    /// slot takes it, the keys of the others move there (one pass over the keys), and the
    /// others are free for later files.
    fn merge(&mut self, slots: &[u32], merged: SnapshotFile) {
        let Some((&into, others)) = slots.split_first() else {
            return;
        };
        self.files[into as usize] = Some(merged);
        let others: HashSet<u32> = others.iter().copied().collect();
        for place in self.keys.values_mut() {
            if others.contains(&place.file) {
                place.file = into;
            }
        }
        for files in self.more.values_mut() {
            for f in files.iter_mut() {
                if others.contains(f) {
                    *f = into;
                }
            }
            files.sort_unstable();
            files.dedup();
        }
        for slot in others {
            self.files[slot as usize] = None;
            self.free.push(slot);
        }
    }
}

/// What a rewrite of one file drops: records of these keys (superseded) or, among those in
/// scope, of these hashes (deleted).
#[derive(Debug, Default)]
struct Drops {
    keys: HashSet<String>,
    hashes: HashSet<KeyHash>,
}

/// Key of the rewrite of `original` at `epoch` by `run`: the original's name up to its
/// first dot (so its epoch and worker stay first), then the rewriting epoch and run. The
/// same for every attempt of one commit, so a retried rewrite puts the same file again.
pub fn rewritten_key(original: &str, epoch: Epoch, run: &str) -> String {
    let (dir, name) = original.rsplit_once('/').unwrap_or(("", original));
    let stem = name.split('.').next().unwrap_or(name);
    let dir = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    format!("{dir}{stem}.r{epoch:010}-{run}.parquet")
}

/// Writes the rewrites that `epoch`'s commit needs: every snapshot file holding an older
/// record of a key in `new_keys` (the keys of the epoch's records) or a record of a key in
/// `deleted`, rewritten without those records into the output `store`. The index is only
/// read; [`SnapshotIndex::apply`] updates it once the commit is made.
pub async fn supersede(
    store: &dyn ObjectStore,
    index: &std::sync::Mutex<SnapshotIndex>,
    (epoch, run): (Epoch, &str),
    new_keys: &[&str],
    deleted: &[KeyHash],
) -> Result<Supersession, CommitError> {
    let plan: BTreeMap<u32, (String, Drops)> = {
        let index = index.lock().unwrap_or_else(|e| e.into_inner());
        let mut plan: BTreeMap<u32, Drops> = BTreeMap::new();
        for key in new_keys {
            for file in index.files_of(key_hash(key)) {
                plan.entry(file).or_default().keys.insert(key.to_string());
            }
        }
        for hash in deleted {
            for file in index.files_of(*hash) {
                plan.entry(file).or_default().hashes.insert(*hash);
            }
        }
        plan.into_iter()
            .filter_map(|(file, drops)| {
                let path = index.files[file as usize].as_ref()?.path.clone();
                Some((file, (path, drops)))
            })
            .collect()
    };
    let mut out = Supersession::default();
    for (file, (path, drops)) in plan {
        let batches = table::read_batches(store, &path, None).await?;
        let mut kept = Vec::with_capacity(batches.len());
        let (mut stats, mut dropped) = (FileStats::default(), 0u64);
        for batch in batches {
            let (keep, records) = keep_mask(&batch, &path, &drops)?;
            for (epoch, row, removed, stage) in records {
                match removed {
                    Removal::Kept => stats.observe(epoch, &row.key, row.label.as_deref(), stage),
                    Removal::Superseded => {
                        dropped += 1;
                        out.superseded += 1;
                    }
                    Removal::Deleted => {
                        dropped += 1;
                        out.deleted.push((epoch, row));
                    }
                }
            }
            let filtered = arrow::compute::filter_record_batch(&batch, &keep).map_err(|e| {
                CommitError::Invalid {
                    key: path.clone(),
                    reason: e.to_string(),
                }
            })?;
            if filtered.num_rows() > 0 {
                kept.push(filtered);
            }
        }
        if dropped == 0 {
            continue; // a hash that only collided
        }
        out.removed.push(path.clone());
        if kept.is_empty() {
            out.updates.push((file, None));
            continue;
        }
        let key = rewritten_key(&path, epoch, run);
        let bytes = table::parquet_bytes(&kept, &key)?;
        let size = bytes.len() as u64;
        store.put(&key, Bytes::from(bytes)).await?;
        out.rewritten.push(WrittenFile {
            key: key.clone(),
            kind: match path.starts_with("errors/") {
                true => crate::record::FileKind::Errors,
                false => crate::record::FileKind::Data,
            },
            rows: kept.iter().map(|b| b.num_rows() as u64).sum(),
            bytes: size,
            stats: stats.to_json(),
        });
        out.updates.push((
            file,
            Some(SnapshotFile {
                path: key,
                bytes: size,
            }),
        ));
    }
    Ok(out)
}

/// What a rewrite does with one record.
enum Removal {
    Kept,
    Superseded,
    Deleted,
}

/// One record as a rewrite sees it: its epoch, key, version and label, what becomes of it,
/// and its stage (`None` for a row).
type Seen = (Epoch, RowId, Removal, Option<Stage>);

/// Which records of `batch` a rewrite keeps, and each record's fate.
fn keep_mask(
    batch: &RecordBatch,
    path: &str,
    drops: &Drops,
) -> Result<(BooleanArray, Vec<Seen>), CommitError> {
    let index = table::index_of(batch, path)?;
    let mut keep = Vec::with_capacity(index.len());
    let mut seen = Vec::with_capacity(index.len());
    for entry in index {
        let removal = if drops.keys.contains(&entry.row.key) {
            Removal::Superseded
        } else if !drops.hashes.is_empty() && drops.hashes.contains(&key_hash(&entry.row.key)) {
            Removal::Deleted
        } else {
            Removal::Kept
        };
        keep.push(matches!(removal, Removal::Kept));
        seen.push((entry.epoch, entry.row, removal, entry.stage));
    }
    Ok((BooleanArray::from(keep), seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_keeps_the_original_epoch_first_and_names_the_rewriting_one() {
        let once = rewritten_key("data/e0000000003-w0001-runa.parquet", 7, "runb");
        assert_eq!(once, "data/e0000000003-w0001-runa.r0000000007-runb.parquet");
        let twice = rewritten_key(&once, 9, "runc");
        assert_eq!(
            twice,
            "data/e0000000003-w0001-runa.r0000000009-runc.parquet"
        );
    }

    fn file(path: &str) -> SnapshotFile {
        SnapshotFile {
            path: path.into(),
            bytes: 1,
        }
    }

    /// Keys gone from a complete listing are those in scope that it did not hold; a key
    /// placed twice (an older table) keeps both files until a commit touches it.
    #[test]
    fn gone_keys_are_those_in_scope_not_listed() {
        let mut index = SnapshotIndex::default();
        index.add_file(file("data/a"), [("x", true), ("y", true), ("z", false)]);
        index.add_file(file("data/b"), [("x", true)]);
        let listed: HashSet<KeyHash> = [key_hash("x")].into();
        assert_eq!(index.gone(&listed), [key_hash("y")]);
        assert_eq!(index.files_of(key_hash("x")).collect::<Vec<_>>(), [1, 0]);

        let done = Supersession {
            updates: vec![(0, Some(file("data/a2"))), (1, None)],
            ..Supersession::default()
        };
        index.apply(&done, &[key_hash("y")], [(file("data/c"), vec!["x"])]);
        assert_eq!(index.files_of(key_hash("x")).collect::<Vec<_>>(), [2]);
        assert_eq!(index.files_of(key_hash("y")).count(), 0);
        assert_eq!(
            index.files[0].as_ref().map(|f| f.path.as_str()),
            Some("data/a2")
        );
        assert_eq!(index.len(), 2);
    }

    /// A merge moves the keys of every merged file to the merged one, and the slots it
    /// frees are taken by the next files.
    #[test]
    fn a_merge_moves_keys_and_frees_slots() {
        let mut index = SnapshotIndex::default();
        index.add_file(file("data/a"), [("x", true)]);
        index.add_file(file("data/b"), [("y", true)]);
        index.add_file(file("data/c"), [("z", true)]);
        index.add_file(file("data/d"), [("x", true)]); // x in two files (an older table)
        let done = Supersession {
            merges: vec![(vec![1, 2, 3], file("data/m"))],
            ..Supersession::default()
        };
        index.apply(&done, &[], []);
        for key in ["y", "z"] {
            assert_eq!(index.files_of(key_hash(key)).collect::<Vec<_>>(), [1]);
        }
        assert_eq!(index.files_of(key_hash("x")).collect::<Vec<_>>(), [1, 0]);
        let paths: Vec<&str> = index.files().map(|(_, f)| f.path.as_str()).collect();
        assert_eq!(paths, ["data/a", "data/m"]);
        index.apply(&Supersession::default(), &[], [(file("data/e"), vec!["w"])]);
        let slot = index.files_of(key_hash("w")).next().unwrap();
        assert!(slot == 2 || slot == 3, "a freed slot is reused: {slot}");
        assert_eq!(index.files().count(), 3);
    }
}
