//! Reading committed output back: the files of the Delta table's snapshot, so a reader never
//! sees a file of an epoch that did not commit.

use crate::commit::delta::{epoch_commits, identity_of, refuse_old_layout, table_files};
use crate::commit::{CommitError, DeltaOutput, EpochCommit, Identity};
use crate::record::{Embedded, Failure};
use crate::storage::ObjectStore;
use crate::table::{decode_records, read_batches};

/// The committed content of an output: embedding rows and error records.
#[derive(Debug, Default)]
pub struct Table {
    /// One per embedded object version, in commit order: a key whose object was replaced
    /// has a row per version, and the last one is current ([`Table::latest_rows`]).
    pub rows: Vec<Embedded>,
    /// The epoch of each row (`rows[i]` was committed in `row_epochs[i]`).
    pub row_epochs: Vec<crate::record::Epoch>,
    /// One per failed attempt, in commit order.
    pub errors: Vec<Failure>,
    /// The epoch of each error record (`errors[i]` was committed in `error_epochs[i]`).
    pub error_epochs: Vec<crate::record::Epoch>,
    /// The commit records, by epoch: one per committed epoch.
    pub commits: Vec<EpochCommit>,
    /// What computed the rows (`None`: the output has no table).
    pub identity: Option<Identity>,
    /// The Delta version read.
    pub version: Option<u64>,
    /// The snapshot's files (data and errors), by path.
    pub files: Vec<String>,
}

impl Table {
    /// The current row of every key: the last committed version.
    pub fn latest_rows(&self) -> Vec<&Embedded> {
        let mut latest: std::collections::HashMap<&str, usize> = Default::default();
        for (i, row) in self.rows.iter().enumerate() {
            latest.insert(row.key.as_str(), i);
        }
        let mut index: Vec<usize> = latest.into_values().collect();
        index.sort_unstable();
        index.into_iter().map(|i| &self.rows[i]).collect()
    }
}

impl Table {
    /// The error records not superseded: those of a key with no row of the same version nor
    /// of a later epoch. A read that failed and then, retried at a later poll, succeeded
    /// leaves an error record and a row of the same version; a file read half-written in
    /// watch mode, then complete, leaves an error record and a newer version's row. Either
    /// way the row is what the key holds now.
    pub fn current_errors(&self) -> Vec<&Failure> {
        let mut latest_row: std::collections::HashMap<&str, crate::record::Epoch> =
            Default::default();
        let embedded: std::collections::HashSet<(&str, &str)> = self
            .rows
            .iter()
            .map(|r| (r.key.as_str(), r.etag.as_str()))
            .collect();
        // Rows are in commit order: the epoch of a key's last row is its latest.
        for (row, epoch) in self.rows.iter().zip(&self.row_epochs) {
            latest_row.insert(row.key.as_str(), *epoch);
        }
        self.errors
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                let epoch = self.error_epochs.get(*i).copied().unwrap_or_default();
                !embedded.contains(&(e.key.as_str(), e.etag.as_str()))
                    && latest_row
                        .get(e.key.as_str())
                        .is_none_or(|&row_epoch| row_epoch < epoch)
            })
            .map(|(_, e)| e)
            .collect()
    }
}

/// Everything committed in the output `store` whose table is `delta`: its latest snapshot,
/// or the snapshot of Delta version `version` (time travel).
pub async fn read_table(
    store: &dyn ObjectStore,
    delta: &DeltaOutput,
    version: Option<u64>,
) -> Result<Table, CommitError> {
    refuse_old_layout(delta, store).await?;
    let Some(table) = delta.open(version).await? else {
        return Ok(Table::default());
    };
    let mut out = Table {
        identity: Some(identity_of(delta, &table)?),
        version: table.version(),
        commits: epoch_commits(&table).await?,
        ..Table::default()
    };
    // The history is the whole log's: keep the epochs of the version read.
    let last = delta.txn_version(&table).await?;
    out.commits
        .retain(|c| last.is_some_and(|last| c.epoch as i64 <= last));
    let mut files: Vec<String> = table_files(delta, &table)?
        .into_iter()
        .map(|f| f.path)
        .collect();
    files.sort();
    let mut records = Vec::new();
    for file in &files {
        for batch in read_batches(store, file, None).await? {
            records.push(decode_records(&batch, file)?);
        }
    }
    out.files = files;
    // Commit order: by epoch, then the file's order.
    let mut rows: Vec<_> = records.iter_mut().flat_map(|r| r.rows.drain(..)).collect();
    let mut errors: Vec<_> = records
        .iter_mut()
        .flat_map(|r| r.errors.drain(..))
        .collect();
    rows.sort_by_key(|(epoch, _)| *epoch);
    errors.sort_by_key(|(epoch, _)| *epoch);
    (out.row_epochs, out.rows) = rows.into_iter().unzip();
    (out.error_epochs, out.errors) = errors.into_iter().unzip();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Stage;

    fn row(key: &str, etag: &str) -> Embedded {
        Embedded {
            columns: Vec::new(),
            key: key.into(),
            etag: etag.into(),
            label: None,
            width: 1,
            height: 1,
            embedding: vec![0.0],
            prediction: None,
        }
    }

    fn error(key: &str, etag: &str) -> Failure {
        Failure {
            key: key.into(),
            etag: etag.into(),
            stage: Stage::Decode,
            reason: "bad".into(),
        }
    }

    /// An error record is superseded by a row of its version (a retried read) or of a later
    /// epoch (a newer version); it stays current when the key's newest record is the error.
    #[test]
    fn an_error_is_superseded_by_a_row_of_its_version_or_of_a_later_epoch() {
        let table = Table {
            rows: vec![
                row("retried", "A"),
                row("rewritten", "Y"),
                row("broken", "A"),
            ],
            row_epochs: vec![2, 3, 1],
            errors: vec![
                error("retried", "A"),
                error("rewritten", "X"),
                error("broken", "B"),
                error("never", "Z"),
            ],
            error_epochs: vec![1, 2, 2, 1],
            ..Table::default()
        };
        let current: Vec<(&str, &str)> = table
            .current_errors()
            .iter()
            .map(|e| (e.key.as_str(), e.etag.as_str()))
            .collect();
        assert_eq!(current, [("broken", "B"), ("never", "Z")]);
    }
}
