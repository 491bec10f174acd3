//! `verger report`: the output as one self-contained HTML page.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use verger::head::Metrics;
use verger::report::{ReportData, ReportOptions};

use super::args::StoreArgs;
use verger::evaluate::Splits;

/// Writes the report of `output` to `html`, with a head's `metrics` (a `metrics.json`, or the
/// head's folder that `verger train` wrote it into).
pub fn report(
    out: &mut dyn Write,
    (output, version, html): (&str, Option<u64>, &Path),
    store: &StoreArgs,
    metrics: Option<&Path>,
    (max_points, splits): (usize, &Splits),
) -> Result<()> {
    let metrics: Option<Metrics> = match metrics {
        None => None,
        Some(path) => {
            let file = path.join("metrics.json");
            let path = if path.is_dir() { file.as_path() } else { path };
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is no metrics.json", path.display()))?,
            )
        }
    };
    let table = super::read_committed(output, store, "input", version)?;
    let options = ReportOptions {
        title: output.to_string(),
        max_points,
        splits: splits.clone(),
    };
    let data = ReportData::gather(&table, metrics, &options);
    std::fs::write(html, data.html()).with_context(|| format!("writing {}", html.display()))?;
    writeln!(
        out,
        "{}: {} labels, {} points on the map, {} error groups, {} epochs",
        html.display(),
        data.labels.len(),
        data.map.as_ref().map_or(0, |m| m.points.len()),
        data.errors.len(),
        data.throughput
            .iter()
            .map(|r| r.commits.len())
            .sum::<usize>()
    )?;
    Ok(())
}
