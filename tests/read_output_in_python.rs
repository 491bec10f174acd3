//! README's "Reading the output" snippets (the `deltalake` package with pandas, Polars), run
//! exactly as written on a real output: a data scientist's first contact with verger must work,
//! with the readers their team already has. The Python packages are
//! installed with pip when missing (`.ci/run` installs the same pinned versions).

mod common;

use std::path::Path;
use std::process::Command;

use common::python::*;
use common::*;

/// The ```python blocks of README's section `heading`.
fn readme_python_blocks(heading: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let section = &readme[start + heading.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .split("```python\n")
        .skip(1)
        .map(|block| block[..block.find("```").expect("closed block")].to_string())
        .collect()
}

fn verger_run(input: &Path, output: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_verger"))
        .env("VERGER_WEIGHTS", weights())
        .args(["run", "-w", "1", "--no-progress", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a README snippet in `dir` (where its `features/` is), asserts it succeeds, returns
/// what it printed.
fn run_snippet(block: &str, dir: &Path) -> String {
    run_python(block, dir)
}

#[test]
fn readme_snippets_read_the_latest_row_of_each_key_and_the_errors() {
    require_python_packages();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("photos");
    let rows = reference_rows();
    // Six sample photos in their class folders, and one file that is not a picture.
    let mut keys = Vec::new();
    for (i, (path, _)) in rows.iter().step_by(7).take(6).enumerate() {
        let class = path.rsplit('/').nth(1).unwrap();
        std::fs::create_dir_all(input.join(class)).unwrap();
        let key = format!("{class}/{i}.jpg");
        std::fs::copy(sample_dir().join(path), input.join(&key)).unwrap();
        keys.push(key);
    }
    let labels: std::collections::BTreeSet<&str> =
        keys.iter().map(|k| k.split('/').next().unwrap()).collect();
    assert!(labels.len() >= 2, "{keys:?}");
    std::fs::write(
        input.join(labels.first().unwrap()).join("notes.jpg"),
        b"not a picture",
    )
    .unwrap();
    let output = dir.path().join("features");
    verger_run(&input, &output);
    // A photo replaced by another: its key gets a second row, in a later epoch.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::copy(sample_dir().join(&rows[1].0), input.join(&keys[0])).unwrap();
    verger_run(&input, &output);
    let table = read_output(&output);
    assert_eq!(table.rows.len(), keys.len() + 1, "one key has two rows");

    let blocks = readme_python_blocks(
        "## Reading the output (Delta Lake: deltalake, Polars, DuckDB, Spark)",
    );
    assert_eq!(blocks.len(), 2, "a deltalake and a Polars snippet");
    let printed: Vec<String> = blocks.iter().map(|b| run_snippet(b, dir.path())).collect();
    let n = keys.len();
    assert!(
        printed[0].contains(&format!("({n}, 1280) float32 {} labels", labels.len())),
        "deltalake: one row per key, the latest: {}",
        printed[0]
    );
    let polars = &printed[1];
    assert!(
        polars.contains(&format!("{n} images, 1 error records")),
        "polars: {polars}"
    );
    for label in &labels {
        let count = keys
            .iter()
            .filter(|k| k.starts_with(&format!("{label}/")))
            .count();
        assert!(
            polars.contains(&format!("('{label}', {count})")),
            "{label}: {polars}"
        );
    }
    // Files of an epoch that never committed (what a killed run leaves) are invisible to
    // both readers: a copy of a committed data file under a new name, not in the log.
    let data = output.join("data");
    let first = std::fs::read_dir(&data)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&first, data.join("e0000000099-w0000-killed.parquet")).unwrap();
    assert_eq!(run_snippet(&blocks[0], dir.path()), printed[0]);
    assert_eq!(&run_snippet(&blocks[1], dir.path()), polars);
    // The same snippets on an output with no error at all.
    let clean = tempfile::tempdir().unwrap();
    std::fs::remove_file(input.join(labels.first().unwrap()).join("notes.jpg")).unwrap();
    verger_run(&input, &clean.path().join("features"));
    let stdout = run_snippet(&blocks[1], clean.path());
    assert!(
        stdout.contains(&format!("{n} images, 0 error records")),
        "{stdout}"
    );
    let stdout = run_snippet(&blocks[0], clean.path());
    assert!(stdout.contains(&format!("({n}, 1280) float32")), "{stdout}");
}
