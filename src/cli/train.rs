//! `verger train`: a classifier head on an output's committed rows, scored on the test split.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use verger::evaluate::Splits;
use verger::head::{self, Example, HeadInfo, Metrics, SavedHead, TrainConfig};

use super::args::StoreArgs;

/// Trains on the current labelled rows of `splits.train`, scores on `splits.test`, prints the
/// scores and saves the head (with `metrics.json`) into `head_dir`.
pub fn train(
    out: &mut dyn Write,
    (output, version, head_dir): (&str, Option<u64>, &Path),
    store: &StoreArgs,
    splits: &Splits,
    config: &TrainConfig,
) -> Result<()> {
    let table = super::read_committed(output, store, "input", version)?;
    let Some(last) = table
        .identity
        .as_ref()
        .filter(|_| !table.commits.is_empty())
    else {
        bail!("{output} has no committed epoch: run `verger run --output {output}` first");
    };
    let (model, weights_sha256) = (last.model.clone(), last.weights_sha256.clone());
    let latest = table.latest_rows();
    let (train_rows, test_rows) = splits.partition(&latest);
    let examples: Vec<Example> = train_rows
        .iter()
        .filter_map(|r| {
            Some(Example {
                key: &r.key,
                label: r.label.as_deref()?,
                features: &r.embedding,
            })
        })
        .collect();
    if examples.is_empty() {
        bail!(
            "{output} has no labelled rows in the training split ({}): set --train, or --split \
             hash:F for a collection without split folders",
            splits.train_name()
        );
    }
    let started = Instant::now();
    let trained = head::train(&examples, config)?;
    let seconds = started.elapsed().as_secs_f64();
    writeln!(
        out,
        "trained on {} rows of {} labels ({} more held out for validation): epoch {} kept of {}, {seconds:.1} s",
        trained.rows.0,
        trained.labels.len(),
        trained.rows.1,
        trained.best_epoch,
        trained.history.len(),
    )?;
    let info = HeadInfo {
        shape: trained.shape,
        model,
        weights_sha256,
        config: config.clone(),
        rows: trained.rows,
        best_epoch: trained.best_epoch,
    };
    let metrics = if test_rows.is_empty() {
        writeln!(
            out,
            "no rows in the test split ({}): no test scores (set --test, or --split hash:F)",
            splits.test_name()
        )?;
        None
    } else {
        let features: Vec<&[f32]> = test_rows.iter().map(|r| r.embedding.as_slice()).collect();
        let truth: Vec<Option<usize>> = test_rows
            .iter()
            .map(|r| {
                let label = r.label.as_deref()?;
                trained.labels.iter().position(|l| l == label)
            })
            .collect();
        let metrics = Metrics::score(
            &trained.labels,
            &truth,
            &trained.head.probabilities(&features),
        );
        print_metrics(out, &splits.test_name(), &metrics)?;
        Some(metrics)
    };
    SavedHead::save(
        head_dir,
        &trained.head,
        &trained.labels,
        &info,
        metrics.as_ref(),
    )
    .with_context(|| format!("saving the head into {}", head_dir.display()))?;
    writeln!(out, "head saved in {}", head_dir.display())?;
    Ok(())
}

fn print_metrics(out: &mut dyn Write, split: &str, m: &Metrics) -> Result<()> {
    writeln!(
        out,
        "{split} ({} rows): accuracy {:.2}%, top-5 {:.2}%, macro-F1 {:.4}{}",
        m.rows,
        m.accuracy * 100.0,
        m.top5_accuracy * 100.0,
        m.macro_f1,
        match m.unseen_label_rows {
            0 => String::new(),
            n => format!(" ({n} rows of labels absent from training, counted as errors)"),
        }
    )?;
    let width = m
        .classes
        .iter()
        .map(|c| c.label.len())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(
        out,
        "  {:<width$}  support  precision  recall      F1",
        "label"
    )?;
    for c in &m.classes {
        writeln!(
            out,
            "  {:<width$}  {:>7}  {:>9.4}  {:>6.4}  {:>6.4}",
            c.label, c.support, c.precision, c.recall, c.f1
        )?;
    }
    if m.classes.len() <= 20 {
        writeln!(out, "  confusion (rows: true label, columns: predicted):")?;
        for (c, row) in m.classes.iter().zip(&m.confusion) {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:>5}")).collect();
            writeln!(out, "  {:<width$}  {}", c.label, cells.join(""))?;
        }
    }
    Ok(())
}
