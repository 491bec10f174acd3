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
    /// One per failed attempt.
    pub errors: Vec<Failure>,
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
    /// The error records not superseded: those of a version that has no row (a read that
    /// failed and then, retried at a later poll, succeeded leaves an error record and a row).
    pub fn current_errors(&self) -> Vec<&Failure> {
        let embedded: std::collections::HashSet<(&str, &str)> = self
            .rows
            .iter()
            .map(|r| (r.key.as_str(), r.etag.as_str()))
            .collect();
        self.errors
            .iter()
            .filter(|e| !embedded.contains(&(e.key.as_str(), e.etag.as_str())))
            .collect()
    }
}

/// Everything committed in `store`.
pub async fn read_table(store: &dyn ObjectStore) -> Result<Table, CommitError> {
    let committed = Committed::load(store).await?;
    let mut table = Table::default();
    for file in committed.manifests.iter().flat_map(|m| &m.files) {
        for batch in read_batches(store, &file.key, None).await? {
            match file.kind {
                FileKind::Data => table.rows.extend(decode_rows(&batch, &file.key)?),
                FileKind::Errors => table.errors.extend(decode_errors(&batch, &file.key)?),
            }
        }
    }
    table.manifests = committed.manifests;
    Ok(table)
}
