//! Reading committed output back: only what manifests list, so a reader never sees a file
//! of an epoch that did not commit.

use crate::commit::{CommitError, Committed};
use crate::record::{Embedded, Failure, FileKind};
use crate::storage::ObjectStore;
use crate::table::{decode_errors, decode_rows, read_batches};

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
    /// The manifests, by epoch: one per committed epoch.
    pub manifests: Vec<crate::commit::Manifest>,
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

/// Everything committed in `store`.
pub async fn read_table(store: &dyn ObjectStore) -> Result<Table, CommitError> {
    let committed = Committed::load(store).await?;
    let mut table = Table::default();
    for manifest in &committed.manifests {
        let epoch = manifest.epoch;
        for file in &manifest.files {
            for batch in read_batches(store, &file.key, None).await? {
                match file.kind {
                    FileKind::Data => {
                        let rows = decode_rows(&batch, &file.key)?;
                        table
                            .row_epochs
                            .extend(std::iter::repeat_n(epoch, rows.len()));
                        table.rows.extend(rows);
                    }
                    FileKind::Errors => {
                        let errors = decode_errors(&batch, &file.key)?;
                        table
                            .error_epochs
                            .extend(std::iter::repeat_n(epoch, errors.len()));
                        table.errors.extend(errors);
                    }
                }
            }
        }
    }
    table.manifests = committed.manifests;
    Ok(table)
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
            manifests: Vec::new(),
        };
        let current: Vec<(&str, &str)> = table
            .current_errors()
            .iter()
            .map(|e| (e.key.as_str(), e.etag.as_str()))
            .collect();
        assert_eq!(current, [("broken", "B"), ("never", "Z")]);
    }
}
