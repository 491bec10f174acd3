//! README's "Reading the output" snippets (the `deltalake` package with pandas, Polars), run
//! exactly as written on a real output, local and in S3 (SeaweedFS): a data scientist's first
//! contact with verger must work, with the readers their team already has. The Python
//! packages are installed with pip when missing (`.ci/run` installs the same pinned versions).

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
    verger_run_to(input.to_str().unwrap(), output.to_str().unwrap(), &[]);
}

/// `verger run` from `input` to `output` (directories or s3://) with `extra` flags.
fn verger_run_to(input: &str, output: &str, extra: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_verger"))
        .env("VERGER_WEIGHTS", weights())
        .args(["run", "-w", "1", "--no-progress", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
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

/// Six sample photos in their class folders, and one file that is not a picture, under
/// `input`: their keys and labels.
fn photos(input: &Path) -> (Vec<String>, std::collections::BTreeSet<String>) {
    let rows = reference_rows();
    let mut keys = Vec::new();
    for (i, (path, _)) in rows.iter().step_by(7).take(6).enumerate() {
        let class = path.rsplit('/').nth(1).unwrap();
        std::fs::create_dir_all(input.join(class)).unwrap();
        let key = format!("{class}/{i}.jpg");
        std::fs::copy(sample_dir().join(path), input.join(&key)).unwrap();
        keys.push(key);
    }
    let labels: std::collections::BTreeSet<String> = keys
        .iter()
        .map(|k| k.split('/').next().unwrap().to_string())
        .collect();
    assert!(labels.len() >= 2, "{keys:?}");
    std::fs::write(
        input.join(labels.first().unwrap()).join("notes.jpg"),
        b"not a picture",
    )
    .unwrap();
    (keys, labels)
}

#[test]
fn readme_snippets_read_one_row_per_current_object_and_the_errors() {
    require_python_packages();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("photos");
    let rows = reference_rows();
    let (mut keys, folders) = photos(&input);
    let output = dir.path().join("features");
    verger_run(&input, &output);
    // A photo replaced by another, another deleted: the snapshot has one row per photo left.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::copy(sample_dir().join(&rows[1].0), input.join(&keys[0])).unwrap();
    let gone = keys.pop().unwrap();
    std::fs::remove_file(input.join(&gone)).unwrap();
    let labels: std::collections::BTreeSet<String> = keys
        .iter()
        .map(|k| k.split('/').next().unwrap().to_string())
        .collect();
    verger_run(&input, &output);
    let table = read_output(&output);
    assert_eq!(table.rows.len(), keys.len(), "one row per photo");

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
    std::fs::remove_file(input.join(folders.first().unwrap()).join("notes.jpg")).unwrap();
    verger_run(&input, &clean.path().join("features"));
    let stdout = run_snippet(&blocks[1], clean.path());
    assert!(
        stdout.contains(&format!("{n} images, 0 error records")),
        "{stdout}"
    );
    let stdout = run_snippet(&blocks[0], clean.path());
    assert!(stdout.contains(&format!("({n}, 1280) float32")), "{stdout}");
}

/// The same snippets on an output in S3, with the location changed and the endpoint in the
/// environment, as README says.
#[test]
fn readme_snippets_read_an_s3_output() {
    use common::s3util::*;
    require_python_packages();
    let (server, rt, client) = server_with_bucket("readers");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("photos");
    let (keys, labels) = photos(&input);
    rt.block_on(upload_dir(&client, "readers", "photos/", &input, |_| true));
    let endpoint = server.endpoint();
    verger_run_to(
        "s3://readers/photos",
        "s3://readers/features",
        &["--endpoint-url", &endpoint, "--path-style"],
    );

    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let blocks = readme_python_blocks(
        "## Reading the output (Delta Lake: deltalake, Polars, DuckDB, Spark)",
    );
    let printed: Vec<String> = blocks
        .iter()
        .map(|b| {
            let code = b.replace("\"features\"", "\"s3://readers/features\"");
            assert_ne!(&code, b, "the snippet names its table");
            run_python_with(&code, dir.path(), &env)
        })
        .collect();
    let n = keys.len();
    assert!(
        printed[0].contains(&format!("({n}, 1280) float32 {} labels", labels.len())),
        "deltalake on S3: {}",
        printed[0]
    );
    assert!(
        printed[1].contains(&format!("{n} images, 1 error records")),
        "polars on S3: {}",
        printed[1]
    );
}
