//! Compaction: the snapshot's small files merged into larger ones, in the same Delta version
//! as an epoch's own files.
//!
//! Every epoch adds at least one file per worker that had records, and watch mode commits
//! small epochs for ever, so without it the snapshot's file count (and with it start-up,
//! which reads every file's keys, and every reader's listing) grows with the number of
//! epochs. Compaction is size-tiered, as in a log-structured merge tree: files are grouped
//! by kind (`data/`, `errors/`) and by tier, `floor(log_K(size))` for `K` =
//! [`CompactionPolicy::files`]; once a tier holds `K` files they are merged, oldest first,
//! into files of at most [`CompactionPolicy::target_bytes`]. A record is so rewritten about
//! `log_K(target / size of an epoch's file)` times in all, and the snapshot holds at most
//! about `K` small files per tier and kind, whatever the number of epochs; files of the
//! target size or more are never touched.
//!
//! A merged file keeps every record as it was (its epoch column included); the merge's
//! `add` and `remove` actions say `dataChange: false`, as Delta's OPTIMIZE does, so a
//! streaming reader of the table does not see the rows twice. Files the epoch's commit
//! rewrites for superseded or deleted records are left for a later merge.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use bytes::Bytes;
use parquet::arrow::ArrowWriter;

use crate::commit::snapshot::{SnapshotFile, SnapshotIndex, Supersession};
use crate::error::CommitError;
use crate::record::{Epoch, FileKind, WrittenFile};
use crate::storage::ObjectStore;
use crate::table::{self, FileStats};

/// When the snapshot's small files are merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Files of one tier that trigger a merge (and the tiers' size ratio); 0 never merges.
    pub files: usize,
    /// Largest merged file, in bytes; files of this size or more are never merged.
    pub target_bytes: u64,
}

/// Files of one tier that trigger a merge, by default.
pub const COMPACT_FILES: usize = 10;
/// Largest merged file by default, in MiB.
pub const COMPACT_TARGET_MIB: u64 = 64;

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            files: COMPACT_FILES,
            target_bytes: COMPACT_TARGET_MIB << 20,
        }
    }
}

impl CompactionPolicy {
    /// A policy that never merges.
    pub fn never() -> Self {
        Self {
            files: 0,
            ..Self::default()
        }
    }

    /// The tier of a file of `bytes`: `floor(log_K(bytes))`.
    fn tier(&self, bytes: u64) -> u32 {
        let k = self.files.max(2) as u64;
        let (mut tier, mut size) = (0, bytes.max(1));
        while size >= k {
            size /= k;
            tier += 1;
        }
        tier
    }

    /// The merges to make among `files` (slot, path, size), each a list of slots, oldest
    /// path first: per kind and tier with at least `K` files, those files in path order cut
    /// into runs of at most the target size; a run of one file is no merge.
    pub fn plan(&self, files: &[(u32, &str, u64)]) -> Vec<Vec<u32>> {
        if self.files < 2 {
            return Vec::new();
        }
        // By (is an error file, tier): (path, slot, size) of each file.
        type Tier<'p> = Vec<(&'p str, u32, u64)>;
        let mut tiers: BTreeMap<(bool, u32), Tier> = BTreeMap::new();
        for &(slot, path, bytes) in files {
            if bytes >= self.target_bytes {
                continue;
            }
            tiers
                .entry((kind_of(path) == FileKind::Errors, self.tier(bytes)))
                .or_default()
                .push((path, slot, bytes));
        }
        let mut merges = Vec::new();
        for (_, mut tier) in tiers {
            if tier.len() < self.files {
                continue;
            }
            tier.sort_unstable();
            let (mut run, mut run_bytes) = (Vec::new(), 0u64);
            for (_, slot, bytes) in tier {
                if !run.is_empty() && run_bytes + bytes > self.target_bytes {
                    if run.len() > 1 {
                        merges.push(std::mem::take(&mut run));
                    }
                    run.clear();
                    run_bytes = 0;
                }
                run.push(slot);
                run_bytes += bytes;
            }
            if run.len() > 1 {
                merges.push(run);
            }
        }
        merges
    }
}

/// The kind of a table file, from its folder.
fn kind_of(path: &str) -> FileKind {
    match path.starts_with("errors/") {
        true => FileKind::Errors,
        false => FileKind::Data,
    }
}

/// Key of the `n`-th file merged by `epoch`'s commit in `run`, in the folder of `kind`. The
/// same for every attempt of one commit.
pub fn merged_key(kind: FileKind, epoch: Epoch, n: usize, run: &str) -> String {
    let dir = match kind {
        FileKind::Data => "data",
        FileKind::Errors => "errors",
    };
    format!("{dir}/c{epoch:010}-{n:04}-{run}.parquet")
}

/// Merges the snapshot's small files as `policy` says, into the output `store`, and adds
/// the merges to `out` (what `epoch`'s commit does). Files that `out` already rewrites are
/// left out. The index is only read; [`SnapshotIndex::apply`] updates it once the commit
/// is made. Memory: the merged file being written (at most the target size) and one input
/// file at a time.
pub async fn compact(
    store: &dyn ObjectStore,
    index: &Mutex<SnapshotIndex>,
    (epoch, run): (Epoch, &str),
    policy: CompactionPolicy,
    out: &mut Supersession,
) -> Result<(), CommitError> {
    let (merges, paths) = {
        let index = index.lock().unwrap_or_else(|e| e.into_inner());
        let touched: HashSet<&str> = out.removed.iter().map(String::as_str).collect();
        let files: Vec<(u32, &str, u64)> = index
            .files()
            .filter(|(_, f)| !touched.contains(f.path.as_str()))
            .map(|(slot, f)| (slot, f.path.as_str(), f.bytes))
            .collect();
        let merges = policy.plan(&files);
        let paths: BTreeMap<u32, String> = files
            .iter()
            .map(|&(slot, path, _)| (slot, path.to_string()))
            .collect();
        (merges, paths)
    };
    for (n, slots) in merges.into_iter().enumerate() {
        let inputs: Vec<&str> = slots.iter().map(|s| paths[s].as_str()).collect();
        let kind = kind_of(inputs[0]);
        let key = merged_key(kind, epoch, n, run);
        let (bytes, rows, stats) = merge(store, &inputs, &key).await?;
        let size = bytes.len() as u64;
        store.put(&key, Bytes::from(bytes)).await?;
        out.compacted.push(WrittenFile {
            key: key.clone(),
            kind,
            rows,
            bytes: size,
            stats: stats.to_json(),
        });
        out.compacted_from
            .extend(inputs.iter().map(|p| p.to_string()));
        out.merges.push((
            slots,
            SnapshotFile {
                path: key,
                bytes: size,
            },
        ));
    }
    Ok(())
}

/// The records of `inputs`, in order, as one Parquet file named `key`, with its row count
/// and statistics.
async fn merge(
    store: &dyn ObjectStore,
    inputs: &[&str],
    key: &str,
) -> Result<(Vec<u8>, u64, FileStats), CommitError> {
    let bad = |source| {
        CommitError::from(table::TableError::Encode {
            key: key.to_string(),
            source,
        })
    };
    let (mut writer, mut rows, mut stats) = (None, 0u64, FileStats::default());
    for input in inputs {
        for batch in table::read_batches(store, input, None).await? {
            for entry in table::index_of(&batch, input)? {
                stats.observe(
                    entry.epoch,
                    &entry.row.key,
                    entry.row.label.as_deref(),
                    entry.stage,
                );
            }
            rows += batch.num_rows() as u64;
            let writer = match &mut writer {
                Some(w) => w,
                None => writer.insert(
                    ArrowWriter::try_new(
                        Vec::new(),
                        batch.schema(),
                        Some(table::writer_properties()),
                    )
                    .map_err(bad)?,
                ),
            };
            writer.write(&batch).map_err(bad)?;
        }
    }
    let bytes = match writer {
        Some(w) => w.into_inner().map_err(bad)?,
        None => Vec::new(),
    };
    Ok((bytes, rows, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(files: usize, target_bytes: u64) -> CompactionPolicy {
        CompactionPolicy {
            files,
            target_bytes,
        }
    }

    #[test]
    fn tiers_are_powers_of_k() {
        let p = policy(10, 1 << 30);
        assert_eq!(p.tier(0), 0);
        assert_eq!(p.tier(9), 0);
        assert_eq!(p.tier(10), 1);
        assert_eq!(p.tier(99_999), 4);
        assert_eq!(p.tier(100_000), 5);
    }

    /// A tier merges once it holds K files, whatever their order in the index; other tiers
    /// and kinds wait; files of the target size are never merged.
    #[test]
    fn a_full_tier_merges_oldest_first() {
        let p = policy(3, 1_000_000);
        let files = [
            (0, "data/e0000000002-w0000-r.parquet", 500),
            (1, "data/e0000000000-w0000-r.parquet", 400),
            (2, "errors/e0000000000-w0000-r.parquet", 300),
            (3, "data/e0000000001-w0000-r.parquet", 600),
            (4, "data/e0000000003-w0000-r.parquet", 5_000),
            (5, "data/big.parquet", 2_000_000),
            (6, "errors/e0000000001-w0000-r.parquet", 310),
        ];
        assert_eq!(p.plan(&files), vec![vec![1, 3, 0]]);
        assert!(policy(4, 1_000_000).plan(&files).is_empty());
        assert!(CompactionPolicy::never().plan(&files).is_empty());
    }

    /// A full tier whose files together exceed the target is cut into runs under it; a run
    /// of one file is left alone.
    #[test]
    fn merged_files_stay_under_the_target() {
        let p = policy(2, 1_000);
        let files = [
            (0, "data/a", 400),
            (1, "data/b", 400),
            (2, "data/c", 400),
            (3, "data/d", 700),
        ];
        // Tiers of K=2: 400 -> 8, 700 -> 9.
        assert_eq!(p.plan(&files), vec![vec![0, 1]]);
        let p = policy(2, 10_000);
        assert_eq!(p.plan(&files), vec![vec![0, 1, 2]]);
    }
}
