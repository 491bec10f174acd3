//! `verger inspect`: what an output holds, read through its Delta table's snapshot.

use std::io::Write;

use anyhow::Result;
use verger::evaluate::Splits;

use super::args::StoreArgs;

/// `verger inspect`: counts, labels, the first errors, and a nearest-centroid check when the
/// output has keys of both `splits`.
pub fn inspect(
    out: &mut dyn Write,
    (output, version): (&str, Option<u64>),
    store: &StoreArgs,
    splits: &Splits,
) -> Result<()> {
    let table = super::read_committed(output, store, "output", version)?;
    let latest: Vec<_> = table.latest_rows().into_iter().cloned().collect();
    let errors = table.current_errors();
    // A table written before verger superseded records may hold several per key: counted
    // as the current ones (the latest of each key).
    let superseded: u64 = table.commits.iter().map(|c| c.superseded).sum();
    let deleted: u64 = table.commits.iter().map(|c| c.deleted).sum();
    writeln!(
        out,
        "{output}: Delta version {}, {} committed epochs, {} rows, {} error records; earlier versions also hold {} records superseded by newer ones and {} of objects deleted from the input (--version N reads them)",
        table.version.unwrap_or_default(),
        table.commits.len(),
        latest.len(),
        errors.len(),
        superseded,
        deleted,
    )?;
    let merged: usize = table.commits.iter().map(|c| c.compacted_from.len()).sum();
    writeln!(
        out,
        "{} files in the snapshot; {merged} small files merged so far (--compact-files)",
        table.files.len()
    )?;
    // How the rows were made: model and derivation in the table's metadata (an output refuses
    // a run with others), and the extra columns of a label pattern.
    if let Some(last) = &table.identity {
        let derivation = match last.derivation.as_str() {
            "" => String::new(),
            d => format!(", {d}"),
        };
        writeln!(out, "rows made by {}{derivation}", last.model)?;
    }
    let columns: Vec<&str> = latest
        .first()
        .map(|r| r.columns.iter().map(|(name, _)| name.as_str()).collect())
        .unwrap_or_default();
    if !columns.is_empty() {
        writeln!(out, "columns from the key: {}", columns.join(", "))?;
    }
    for (label, n) in verger::evaluate::label_counts(&latest) {
        writeln!(out, "  {n:>7}  {label}")?;
    }
    for e in errors.iter().take(20) {
        writeln!(
            out,
            "  error  {} [{}] {}",
            e.key,
            e.stage.as_str(),
            e.reason
        )?;
    }
    let rows: Vec<_> = latest.iter().collect();
    let (train, test) = splits.partition(&rows);
    if !train.is_empty() && !test.is_empty() {
        let (acc, n) = verger::evaluate::nearest_centroid_accuracy(&train, &test);
        writeln!(
            out,
            "nearest-centroid accuracy on {} ({n} images, centroids from {}): {:.1}%",
            splits.test_name(),
            splits.train_name(),
            acc * 100.0
        )?;
    }
    Ok(())
}
