//! Shared test harness: where the shared sample data lives, one cached copy of the weights,
//! reading Parquet output back, and small vector helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use verger::embed::{weights_file, Backend, Embedder, ModelSpec};

/// `../shared` beside the project (CI clones it there), or `$VERGER_SHARED`.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("VERGER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        dir.join("reference").is_dir(),
        "shared data not found at {} (set VERGER_SHARED)",
        dir.display()
    );
    dir
}

/// The Fruits-360 sample: `Training/<Class>/*.jpg` and `Test/<Class>/*.jpg`.
pub fn sample_dir() -> PathBuf {
    shared_dir().join("data/fruits-360-sample")
}

/// The verified weights, fetched once per machine into the default cache by verger's own code.
pub fn weights() -> PathBuf {
    static WEIGHTS: OnceLock<PathBuf> = OnceLock::new();
    WEIGHTS
        .get_or_init(|| {
            weights_file::ensure_weights(&ModelSpec::efficientnet_lite0(), None, None)
                .expect("weights available (verger model fetch)")
        })
        .clone()
}

/// An embedder on the default backend.
pub fn weights_of(model: &str) -> PathBuf {
    let spec = ModelSpec::named(model).unwrap();
    weights_file::ensure_weights(&spec, None, None).unwrap_or_else(|e| {
        panic!("{model} weights (run `verger model fetch --model {model}`): {e}")
    })
}

pub fn embedder() -> Embedder {
    Embedder::load(
        &ModelSpec::efficientnet_lite0(),
        &weights(),
        Backend::default(),
    )
    .expect("weights load")
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The exact `side`x`side` pixels PyTorch was fed (`reference/resized_<side>/NN_*.png`).
pub fn reference_pixels_of(side: u32) -> Vec<Vec<u8>> {
    let dir = shared_dir().join(format!("reference/resized_{side}"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| image::open(p).unwrap().into_rgb8().into_raw())
        .collect()
}

/// Reference rows: (relative path, 1280 floats), from `reference/paths.txt` and `features_224.f32`.
pub fn reference_rows() -> Vec<(String, Vec<f32>)> {
    reference_rows_of("features_224.f32")
}

/// Reference rows of another model's features file (`efficientnet_lite2_260.f32`, ...).
pub fn reference_rows_of(features: &str) -> Vec<(String, Vec<f32>)> {
    let r = shared_dir().join("reference");
    let paths = std::fs::read_to_string(r.join("paths.txt")).unwrap();
    let raw = std::fs::read(r.join(features)).unwrap();
    let floats: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let rows: Vec<_> = paths
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(floats.len(), rows.len() * 1280);
    rows.into_iter()
        .zip(floats.chunks_exact(1280).map(<[f32]>::to_vec))
        .collect()
}

use verger::dataflow::{RunConfig, Summary};
use verger::sink::reader::Table;
use verger::source::EpochPolicy;

/// One embedder shared by the tests of a binary (the weights are loaded once).
pub fn shared_embedder() -> &'static Embedder {
    static EMBEDDER: OnceLock<Embedder> = OnceLock::new();
    EMBEDDER.get_or_init(embedder)
}

/// Nearest-centroid accuracy of the sample's `Test/` rows against the centroids of its
/// `Training/` rows, after asserting that every Test row was scored; with the Test rows' count.
pub fn sample_nearest_centroid(rows: &[verger::record::Embedded]) -> (f64, usize) {
    let train: Vec<_> = rows
        .iter()
        .filter(|r| r.key.starts_with("Training/"))
        .collect();
    let test: Vec<_> = rows.iter().filter(|r| r.key.starts_with("Test/")).collect();
    let (accuracy, scored) = verger::evaluate::nearest_centroid_accuracy(&train, &test);
    assert_eq!(scored, test.len(), "every Test row scored");
    (accuracy, scored)
}

/// A run configuration for tests: `workers` threads, `epoch_keys` keys per epoch.
pub fn config(input: &Path, output: &Path, workers: usize, epoch_keys: usize) -> RunConfig {
    let mut config = RunConfig::new(input.to_str().unwrap(), output.to_str().unwrap());
    config.workers = workers;
    config.epochs = EpochPolicy {
        epoch_keys,
        ..EpochPolicy::default()
    };
    config.fetch_concurrency = 8;
    config
}

/// Runs the pipeline in-process.
pub fn run(config: &RunConfig) -> Summary {
    verger::dataflow::run(config, shared_embedder()).expect("run succeeds")
}

/// The committed content of an output directory.
pub fn read_output(output: &Path) -> Table {
    read_location(output.to_str().unwrap(), &Default::default())
}

/// The committed content of any output location (directory or s3://).
pub fn read_location(location: &str, options: &verger::storage::StoreOptions) -> Table {
    read_location_at(location, options, None)
}

/// The snapshot of Delta version `version` of an output (time travel), or its latest.
pub fn read_location_at(
    location: &str,
    options: &verger::storage::StoreOptions,
    version: Option<u64>,
) -> Table {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = verger::storage::open(location, false, options)
            .await
            .unwrap();
        let delta = verger::commit::DeltaOutput::of(store.as_ref(), options).unwrap();
        let store = delta.files(store, options).unwrap();
        verger::sink::reader::read_table(store.as_ref(), &delta, version)
            .await
            .unwrap()
    })
}

/// Rows by key, checking that no key appears twice.
pub fn by_key(
    rows: Vec<verger::record::Embedded>,
) -> std::collections::BTreeMap<String, verger::record::Embedded> {
    let n = rows.len();
    let map: std::collections::BTreeMap<_, _> =
        rows.into_iter().map(|r| (r.key.clone(), r)).collect();
    assert_eq!(map.len(), n, "a key appears twice");
    map
}

/// Every file under `dir`, as `/`-separated keys relative to it.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.push(rel.to_str().unwrap().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) {
    for key in files_under(from) {
        let target = to.join(&key);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(from.join(&key), target).unwrap();
    }
}

#[allow(dead_code)]
pub mod fault_proxy;
#[allow(dead_code)]
pub mod process;
#[allow(dead_code)]
pub mod python;
#[allow(dead_code)]
pub mod s3util;
#[allow(dead_code)]
pub mod seaweed;

/// The `verger` binary, with the cached Lite0 weights.
pub fn verger() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_verger"));
    cmd.env("VERGER_WEIGHTS", weights());
    cmd
}

/// Runs `cmd`, asserts it exits 0 (showing its output otherwise) and returns its stdout.
pub fn succeeds(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
