//! Exactly once across crashes, on a local table and against a real S3 server (SeaweedFS on
//! loopback): verger is killed with SIGKILL at ten random moments of one run over the sample
//! and restarted each time; the committed table ends with every image exactly once, for
//! verger's reader and for the `deltalake` package. And SIGINT in a batch run finishes the
//! epochs in flight.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::Verger;
use common::s3util::*;
use common::*;
use rand::{Rng, SeedableRng};

const SAMPLE_IMAGES: usize = 2_624;

#[test]
fn ten_kill_9_at_random_moments_then_every_image_exactly_once() {
    let (server, rt, client) = server_with_bucket("crash");
    let keys = rt.block_on(upload_dir(&client, "crash", "in/", &sample_dir(), |_| true));
    assert_eq!(keys.len(), SAMPLE_IMAGES);

    let endpoint = server.endpoint();
    // Epochs of 200 images (~2 s here), every file a multipart upload and small files merged
    // once three have piled up: the kills land in listing, processing, uploads, merges and
    // commits alike.
    let args = [
        "run",
        "--input",
        "s3://crash/in",
        "--output",
        "s3://crash/out",
        "--endpoint-url",
        &endpoint,
        "--path-style",
        "-w",
        "2",
        "--epoch-size",
        "200",
        "--multipart-threshold-mib",
        "0",
        "--compact-files",
        "3",
    ];
    kill_ten_times_then_finish(&args, || {
        rt.block_on(committed_epochs(&client, "crash", "out/"))
    });
    let table = read_location("s3://crash/out", &options(&endpoint));
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    let epochs: Vec<u64> = table.commits.iter().map(|c| c.epoch).collect();
    assert_eq!(
        epochs,
        (0..epochs.len() as u64).collect::<Vec<_>>(),
        "one Delta version per epoch, consecutive"
    );
    assert!(
        table.commits.iter().any(|c| !c.compacted.is_empty()),
        "no epoch merged small files"
    );
    let rows = by_key(table.rows); // panics on a duplicate key
    assert_eq!(rows.len(), SAMPLE_IMAGES);
    let want: HashSet<&String> = keys.iter().collect();
    assert!(
        rows.keys().all(|k| want.contains(k)),
        "a key nobody uploaded"
    );
    rt.block_on(assert_clean_output(&client, "crash", "out/"));
    // The `deltalake` package reads the S3 table the same: every image once.
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let (rows, distinct, errors, version) =
        common::python::deltalake_counts("s3://crash/out", &env);
    assert_eq!((rows, distinct, errors), (SAMPLE_IMAGES, SAMPLE_IMAGES, 0));
    assert_eq!(version, table.commits.len() as u64);
    // The killed runs' local staging files are gone too (the restart removes the output's
    // staging folder before it writes anything).
    let staging = verger::storage::s3::staging_for(&format!("{endpoint} s3://crash/out/"));
    assert!(
        !staging.exists() || files_under(&staging).is_empty(),
        "staging files of killed runs left in {}: {:?}",
        staging.display(),
        files_under(&staging)
    );
}

/// Kills `verger <args>` with SIGKILL at ten random moments (1-4 s into each start; seed
/// printed, `VERGER_CRASH_SEED` to replay), printing `committed()` epochs after each, then runs
/// it to the end.
fn kill_ten_times_then_finish<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    committed: impl Fn() -> usize,
) {
    let seed = std::env::var("VERGER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("kill moments from seed {seed} (VERGER_CRASH_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut while_running = 0;
    for kill in 1..=10 {
        let verger = Verger::start(args);
        let moment = Duration::from_millis(rng.random_range(1_000..4_000));
        std::thread::sleep(moment);
        let mut child = verger.child;
        let finished = child.try_wait().unwrap().is_some();
        while_running += usize::from(!finished);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        eprintln!(
            "kill {kill} after {:.1} s{}: {} epochs committed so far",
            moment.as_secs_f64(),
            if finished {
                " (had already finished)"
            } else {
                ""
            },
            committed()
        );
    }
    assert!(
        while_running >= 5,
        "only {while_running} kills hit a running verger: the test proves little"
    );
    let (status, stdout) = Verger::start(args).wait(Duration::from_secs(600));
    assert!(status.success(), "{stdout}");
    eprintln!(
        "ten kills and the final run took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The same ten kills on a local table, read back by the `deltalake` package: exactly the
/// sample's keys, each once; one Delta version per epoch, each with its txn, consecutive; every
/// file the log adds on disk.
#[test]
fn ten_kill_9_on_a_local_table_then_the_deltalake_reader_sees_every_image_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = whole_sample_args(&out);
    let versions = || {
        std::fs::read_dir(out.join("_delta_log"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "json")
                })
                .count()
            })
            .unwrap_or(0)
    };
    kill_ten_times_then_finish(&args, || versions().saturating_sub(1));
    let (rows, keys, errors, version) =
        common::python::deltalake_counts(out.to_str().unwrap(), &[]);
    assert_eq!((rows, keys, errors), (SAMPLE_IMAGES, SAMPLE_IMAGES, 0));
    // Version 0 creates the table; version v commits epoch v - 1 with txn(verger, v - 1).
    let mut txns = Vec::new();
    for v in 0..=version {
        let json = std::fs::read_to_string(out.join(format!("_delta_log/{v:020}.json"))).unwrap();
        for line in json.lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(txn) = action["txn"].as_object() {
                assert_eq!(txn["appId"], "verger");
                txns.push(txn["version"].as_u64().unwrap());
            }
            if let Some(path) = action["add"]["path"].as_str() {
                assert!(out.join(path).is_file(), "the log adds a missing {path}");
            }
        }
    }
    assert_eq!(
        txns,
        (0..version).collect::<Vec<_>>(),
        "one epoch per version, consecutive"
    );
    let table = read_output(&out);
    assert!(
        table.commits.iter().any(|c| !c.compacted.is_empty()),
        "no epoch merged small files"
    );
    assert_eq!(by_key(table.rows).len(), SAMPLE_IMAGES);
}

/// SIGINT in the middle of a batch run: listing stops, the epochs in flight are committed, the
/// exit code is 130 (partial: `verger run && train.py` must not go on), nothing is left
/// behind; the next run does exactly the rest and exits 0.
#[test]
fn sigint_mid_run_finishes_the_epochs_in_flight_and_a_rerun_does_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = whole_sample_args(&out);
    let verger = Verger::start(&args);
    verger.wait_for_line("epoch committed", Duration::from_secs(120));
    let interrupted = Command::new("kill")
        .args(["-INT", &verger.child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let stderr = verger.stderr.clone();
    let (status, stdout) = verger.wait(Duration::from_secs(120));
    assert_eq!(
        status.code(),
        Some(130),
        "SIGINT before the end is a partial run: {status:?}\n{stdout}"
    );
    assert!(
        stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("interrupted before the end of the input")),
        "the exit is explained"
    );
    let first = read_output(&out);
    assert!(
        !first.rows.is_empty() && first.rows.len() < SAMPLE_IMAGES,
        "{} rows after the interrupt",
        first.rows.len()
    );
    assert!(
        stdout.contains(&format!("embedded {}, errors 0", first.rows.len())),
        "the summary counts what was committed: {stdout}"
    );
    assert!(
        !files_under(&out).iter().any(|f| f.contains("_staging")),
        "staging files left behind"
    );

    let (status, stdout) = Verger::start(&args).wait(Duration::from_secs(600));
    assert!(status.success(), "{stdout}");
    let rows = by_key(read_output(&out).rows);
    assert_eq!(rows.len(), SAMPLE_IMAGES);
}

/// `verger run` of the sample's keys under `prefix` into `out`, one worker, epochs of 20 images,
/// at most `in_flight` of them in flight.
/// `verger run` over the whole local sample into `out`, 2 workers, epochs of 200 images.
fn whole_sample_args(out: &Path) -> Vec<String> {
    let sample = sample_dir();
    let (input, output) = (sample.to_str().unwrap(), out.to_str().unwrap());
    [
        "run",
        "--input",
        input,
        "--output",
        output,
        "-w",
        "2",
        "--epoch-size",
        "200",
        "--compact-files",
        "3",
    ]
    .map(String::from)
    .to_vec()
}

fn sample_run_args(out: &Path, prefix: &str, in_flight: &str) -> Vec<String> {
    let sample = sample_dir();
    [
        "run",
        "--input",
        sample.to_str().unwrap(),
        "--prefix",
        prefix,
        "--output",
        out.to_str().unwrap(),
        "-w",
        "1",
        "--epoch-size",
        "20",
        "--max-epochs-in-flight",
        in_flight,
    ]
    .map(String::from)
    .to_vec()
}

/// SIGTERM after the whole input was released (164 keys in epochs of 20, enough epochs in flight
/// that none waits): nothing was left to release, so the run commits what it has in flight and
/// ends normally, exit 0 with every row; a run that lost nothing is not reported as interrupted
/// (it used to exit 143).
#[test]
fn sigterm_after_everything_was_released_ends_the_run_normally() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = sample_run_args(&out, "Test/apple/", "50");
    let verger = Verger::start(&args);
    let done = verger.wait_for_line("listing done", Duration::from_secs(120));
    assert!(done.contains("164"), "everything released: {done}");
    verger.terminate();
    let (status, stdout) = verger.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("embedded 164, errors 0"), "{stdout}");
    assert_eq!(by_key(read_output(&out).rows).len(), 164);
}

/// SIGTERM while the source is in the middle of a listing page (here the whole input is one
/// page of 662 keys in epochs of 20): nothing more is released, so the run ends after the
/// epochs already in flight instead of going through the rest of the page (it used to commit
/// all 33 epochs and then exit 143). The rerun does exactly the rest.
#[test]
fn sigterm_stops_releasing_in_the_middle_of_a_listing_page() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = sample_run_args(&out, "Test/", "2");
    let verger = Verger::start(&args);
    verger.wait_for_line("epoch committed", Duration::from_secs(120));
    verger.terminate();
    let (status, stdout) = verger.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(143), "{stdout}");
    let first = read_output(&out);
    // Committed when the signal came (at least 1), at most 2 released behind it, the open
    // one, and the few committed between the line and the signal.
    assert!(
        first.commits.len() <= 8,
        "{} epochs committed after SIGTERM: the rest of the page was released",
        first.commits.len()
    );
    assert!(first.rows.len() < 662);

    let (status, stdout) = Verger::start(&args).wait(Duration::from_secs(600));
    assert!(status.success(), "{stdout}");
    let rows = by_key(read_output(&out).rows);
    assert_eq!(rows.len(), 662);
}
