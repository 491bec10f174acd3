//! `verger demo`: a synthetic labelled set, featurized and inspected, without any download
//! but the weights.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use verger::evaluate::Splits;
use verger::source::KeyFilter;

use super::args::DemoArgs;
use super::inspect::inspect;
use super::run::{run_job, Ending, Service};

/// `verger demo`: writes a small labelled set (once), featurizes it, inspects the result.
pub fn demo(out: &mut dyn Write, args: &DemoArgs) -> Result<Ending> {
    let input = args.dir.join("input");
    let output = args.dir.join("output");
    if !input.exists() {
        let n = verger::demo::write_demo_set(&input, args.per_class, 7)
            .with_context(|| format!("writing demo images to {}", input.display()))?;
        writeln!(out, "wrote {n} demo images under {}", input.display())?;
    }
    let ending = run_job(
        out,
        (&path_str(&input)?, &path_str(&output)?, ""),
        KeyFilter::default(),
        &args.engine,
        None,
        Service::default(),
    )?;
    if ending == Ending::Done {
        inspect(
            out,
            (&path_str(&output)?, None),
            &args.engine.store,
            &Splits::default(),
        )?;
    }
    Ok(ending)
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).context("path is not UTF-8")
}
