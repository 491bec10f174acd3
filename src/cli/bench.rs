//! `verger bench`: end-to-end images/s at several worker counts, each in its own process.

use std::io::Write;

use anyhow::{Context, Result};
use verger::dataflow::Summary;

use super::args::{default_workers, BenchArgs};
use super::model::weights;

/// `verger bench`: runs `verger run` once per worker count, each in its own process (own
/// peak RSS), on the same replicated input, and prints the summary table.
pub fn bench(out: &mut dyn Write, args: &BenchArgs) -> Result<()> {
    use clap::ValueEnum;
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let input = dir.join("input");
    let n = match args.photo_size {
        None => verger::bench::replicate(&args.input, &input, args.images),
        Some(size) => {
            eprintln!(
                "verger bench: writing {} photos of {}x{} ...",
                args.images, size.0, size.1
            );
            verger::bench::replicate_as_photos(&args.input, &input, args.images, size)
        }
    }
    .with_context(|| format!("replicating {}", args.input.display()))?;
    let workers = if args.workers.is_empty() {
        let cores = default_workers();
        std::iter::successors(Some(1), |w| Some(w * 2))
            .take_while(|&w| w <= cores)
            .collect()
    } else {
        args.workers.clone()
    };
    // Resolve the weights once, so every run finds them without downloading.
    let weights = weights(&args.model)?;
    let backend = args
        .backend
        .backend
        .to_possible_value()
        .context("backend name")?;
    let precision = args
        .backend
        .precision
        .to_possible_value()
        .context("precision name")?;
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for &w in &workers {
        let output = dir.join(format!("output-w{w}"));
        let report = dir.join(format!("report-w{w}.json"));
        let _ = std::fs::remove_dir_all(&output);
        eprintln!("verger bench: {n} images, {w} workers ...");
        let status = std::process::Command::new(&exe)
            .arg("run")
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .arg("--workers")
            .arg(w.to_string())
            .arg("--batch-size")
            .arg(args.batch_size.to_string())
            .arg("--backend")
            .arg(backend.get_name())
            .arg("--precision")
            .arg(precision.get_name())
            .arg("--model")
            .arg(&args.model.model)
            .arg("--weights")
            .arg(&weights)
            .arg("--report-json")
            .arg(&report)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(
            status.success(),
            "verger run with {w} workers failed: {status}"
        );
        let summary: Summary = serde_json::from_slice(&std::fs::read(&report)?)?;
        let _ = std::fs::remove_dir_all(&output);
        rows.push(verger::bench::BenchRow {
            workers: w,
            summary,
        });
    }
    writeln!(
        out,
        "{n} images, backend {}, precision {}, batch {}\n",
        backend.get_name(),
        precision.get_name(),
        args.batch_size
    )?;
    write!(out, "{}", verger::bench::table(&rows))?;
    Ok(())
}
