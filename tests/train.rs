//! Transfer learning's second half through the binary: `verger train` on the sample's
//! embeddings, `verger run --head` predicting in the stream, and `verger report` rendered by
//! a real headless browser (Debian's chromium).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// The whole sample (Training and Test) embedded once for every test of this file, in two
/// epochs or more (so the report has several to show).
fn sample_output() -> &'static Path {
    static OUTPUT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, out) = OUTPUT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("features");
        succeeds(
            verger()
                .args(["run", "--no-progress", "--epoch-size", "1000", "--input"])
                .arg(sample_dir())
                .arg("--output")
                .arg(&out),
        );
        (dir, out)
    });
    out
}

fn train(head: &Path, extra: &[&str]) -> String {
    succeeds(
        verger()
            .args(["train", "--input"])
            .arg(sample_output())
            .arg("--output")
            .arg(head)
            .args(extra),
    )
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn test_images() -> usize {
    files_under(&sample_dir().join("Test")).len()
}

/// Softmax regression on the Training rows classifies every Test image of the sample; the
/// head directory holds the record, labels, provenance and metrics, and the same seed gives
/// the same head byte for byte.
#[test]
fn a_head_trained_on_the_sample_classifies_every_test_image() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let stdout = train(&head, &[]);
    assert!(stdout.contains("accuracy 100.00%"), "{stdout}");
    let metrics = json(&head.join("metrics.json"));
    assert_eq!(metrics["rows"], test_images());
    assert_eq!(metrics["accuracy"], 1.0, "{metrics}");
    assert_eq!(metrics["top5_accuracy"], 1.0);
    assert_eq!(metrics["macro_f1"], 1.0);
    let labels: Vec<String> = serde_json::from_value(json(&head.join("labels.json"))).unwrap();
    let mut classes: Vec<String> = std::fs::read_dir(sample_dir().join("Test"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    classes.sort();
    assert_eq!(labels, classes);
    let confusion: Vec<Vec<u64>> = serde_json::from_value(metrics["confusion"].clone()).unwrap();
    for (t, row) in confusion.iter().enumerate() {
        for (p, &n) in row.iter().enumerate() {
            assert!(t == p || n == 0, "{labels:?}: {confusion:?}");
        }
    }
    let info = json(&head.join("head.json"));
    assert_eq!(info["model"], "efficientnet-lite0");
    let sha = info["weights_sha256"].as_str().unwrap();
    assert!(sha.starts_with("57934424"), "{sha}");
    assert_eq!(info["shape"]["features"], 1280);
    assert_eq!(info["shape"]["classes"], 4);

    let again = dir.path().join("again");
    train(&again, &[]);
    let other = dir.path().join("other-seed");
    train(&other, &["--seed", "7"]);
    // Records carry random parameter ids: compare what the heads compute.
    let table = read_output(sample_output());
    let rows: Vec<&[f32]> = table
        .rows
        .iter()
        .take(50)
        .map(|r| r.embedding.as_slice())
        .collect();
    let probabilities = |d: &Path| {
        verger::head::SavedHead::load(d)
            .unwrap()
            .head
            .probabilities(&rows)
    };
    let first = probabilities(&head);
    assert!(first == probabilities(&again), "same seed, same head");
    assert!(first != probabilities(&other), "the seed is used");
}

/// A head with a hidden layer learns the sample too.
#[test]
fn a_head_with_a_hidden_layer_also_classifies_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    train(&head, &["--hidden", "64"]);
    let metrics = json(&head.join("metrics.json"));
    assert_eq!(metrics["accuracy"], 1.0, "{metrics}");
    assert_eq!(json(&head.join("head.json"))["shape"]["hidden"], 64);
}

/// `verger run --head` writes each row's predicted label and its probability; a head trained
/// on another model's features is refused before anything is written.
#[test]
fn run_with_a_head_predicts_every_row_and_refuses_another_models_head() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    train(&head, &[]);
    let input = dir.path().join("in");
    for class in std::fs::read_dir(sample_dir().join("Test")).unwrap() {
        let class = class.unwrap().path();
        let to = input.join(class.file_name().unwrap());
        std::fs::create_dir_all(&to).unwrap();
        for image in std::fs::read_dir(&class).unwrap().take(10) {
            let image = image.unwrap().path();
            std::fs::copy(&image, to.join(image.file_name().unwrap())).unwrap();
        }
    }
    let out = dir.path().join("predicted");
    succeeds(
        verger()
            .args(["run", "--no-progress", "--head"])
            .arg(&head)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out),
    );
    let table = read_output(&out);
    assert_eq!(table.rows.len(), 40);
    for row in &table.rows {
        let p = row.prediction.as_ref().expect("every row has a prediction");
        assert_eq!(Some(&p.label), row.label.as_ref(), "{}", row.key);
        assert!(
            p.confidence > 0.5 && p.confidence <= 1.0,
            "{}: {}",
            row.key,
            p.confidence
        );
    }

    let refused = verger()
        .env_remove("VERGER_WEIGHTS")
        .args(["run", "--model", "efficientnet-lite1", "--head"])
        .arg(&head)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("lite1"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("was trained on features of efficientnet-lite0")
            && stderr.contains("this run computes efficientnet-lite1"),
        "{stderr}"
    );
    assert!(!dir.path().join("lite1/_delta_log").exists());
}

/// Chromium, as Debian installs it.
fn chromium() -> Command {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a headless browser (Debian: apt-get install chromium)");
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
    ]);
    cmd
}

/// `verger report` writes one page that a real browser renders with no network: a bar per
/// label, a point per sampled row on the PCA map, the confusion matrix of the head's metrics,
/// a bar per committed epoch; the screenshot shows the labels' colours.
#[test]
fn the_report_renders_in_a_headless_browser() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    train(&head, &[]);
    let html = dir.path().join("report.html");
    let stdout = succeeds(
        verger()
            .arg("report")
            .arg(sample_output())
            .arg("--html")
            .arg(&html)
            // The head's folder, as `verger train` wrote it (its metrics.json is read).
            .arg("--metrics")
            .arg(&head)
            .args(["--max-points", "500"]),
    );
    assert!(stdout.contains("500 points"), "{stdout}");
    // The split options of inspect and train: a hash split names itself on the page.
    let hashed = dir.path().join("hashed.html");
    succeeds(
        verger()
            .arg("report")
            .arg(sample_output())
            .arg("--html")
            .arg(&hashed)
            .args(["--split", "hash:0.25"]),
    );
    let hashed = std::fs::read_to_string(&hashed).unwrap();
    assert!(hashed.contains(r#""split_names":["hash 0.75","hash 0.25"]"#));
    let page = std::fs::read_to_string(&html).unwrap();
    for external in ["http://", "https://", "src=", "<link"] {
        let outside = page.replace("http://www.w3.org/2000/svg", "");
        assert!(!outside.contains(external), "the page loads {external}");
    }
    let epochs = read_output(sample_output()).commits.len();
    assert!(epochs >= 2);

    let profile = dir.path().join("profile");
    let dom = chromium()
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    let count = |class: &str| dom.matches(&format!("class=\"{class}\"")).count();
    assert_eq!(count("point"), 500, "one circle per sampled row");
    assert_eq!(count("bar"), 4, "one bar per label");
    assert_eq!(count("cell"), 16, "a 4x4 confusion matrix");
    assert_eq!(count("epoch"), epochs, "one point per committed epoch");
    let runs = read_output(sample_output())
        .commits
        .iter()
        .map(|m| m.run.clone())
        .collect::<std::collections::HashSet<_>>()
        .len();
    assert_eq!(count("run"), runs, "one curve of committed objects per run");
    assert_eq!(
        count("column"),
        4,
        "the confusion matrix's columns are labelled"
    );
    let tested = format!("Test rows {}: accuracy 100.0%", test_images());
    assert!(dom.contains(&tested), "the head's metrics are shown");
    for class in ["apple", "lemon", "mango", "raspberry"] {
        let count = |split: &str| files_under(&sample_dir().join(split).join(class)).len();
        let (train, test) = (count("Training"), count("Test"));
        let bar = format!("{} (Training {train}, Test {test})", train + test);
        assert!(dom.contains(&bar), "{class}: {bar} on its bar");
    }

    let shot = dir.path().join("shot.png");
    let status = chromium()
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1200,1600")
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let image = image::open(&shot).unwrap().to_rgb8();
    // The first two labels' colours (#1f77b4, #ff7f0e) fill bars and map points.
    for colour in [[0x1f, 0x77, 0xb4], [0xff, 0x7f, 0x0e]] {
        let pixels = image.pixels().filter(|p| p.0 == colour).count();
        assert!(pixels > 200, "{colour:?}: {pixels} pixels");
    }
}
