//! Several `verger run` processes as one timely computation (`-n`, `-p`, `-H`), on loopback
//! against a real S3 server (SeaweedFS): the same output as one process, and a lost process
//! stops the others with its name, after which a restart completes exactly once.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::s3util::*;
use common::seaweed::*;
use common::*;

const SAMPLE_IMAGES: usize = 2_624;

/// `n` loopback addresses on ports free right now, as a timely hostfile in `dir`.
fn hostfile(dir: &Path, n: usize) -> std::path::PathBuf {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let lines: Vec<String> = listeners
        .iter()
        .map(|l| format!("127.0.0.1:{}", l.local_addr().unwrap().port()))
        .collect();
    let path = dir.join(format!("hosts-{n}.txt"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Starts process `p` of `n` (`w` workers each) from `s3://fruits/in` to `output`.
fn start(endpoint: &str, output: &str, w: usize, n: usize, p: usize, hosts: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_verger"))
        .env("VERGER_WEIGHTS", weights())
        .args(["run", "--input", "s3://fruits/in", "--output", output])
        .args([
            "--endpoint-url",
            endpoint,
            "--path-style",
            "--epoch-size",
            "256",
        ])
        .args([
            "-w",
            &w.to_string(),
            "-n",
            &n.to_string(),
            "-p",
            &p.to_string(),
        ])
        .arg("-H")
        .arg(hosts)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `n` processes of `w` workers to completion; every one must exit 0.
fn run_cluster(endpoint: &str, output: &str, w: usize, n: usize, dir: &Path) {
    let hosts = hostfile(dir, n);
    let children: Vec<Child> = (0..n)
        .map(|p| start(endpoint, output, w, n, p, &hosts))
        .collect();
    for (p, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{w}x{n} process {p}: {}", show(&out));
    }
}

/// Waits until the output under `prefix` of bucket `fruits` has a committed epoch, while the
/// `leader` still runs.
fn wait_for_a_commit(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_s3::Client,
    prefix: &str,
    leader: &mut Child,
) {
    let started = Instant::now();
    while rt.block_on(committed_epochs(client, "fruits", prefix)) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no epoch committed"
        );
        assert!(leader.try_wait().unwrap().is_none(), "leader ended early");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn show(out: &Output) -> String {
    format!(
        "{}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn server_with_sample() -> (SeaweedFs, tokio::runtime::Runtime, aws_sdk_s3::Client) {
    let (server, rt, client) = server_with_bucket("fruits");
    let uploaded = rt.block_on(upload_dir(&client, "fruits", "in/", &sample_dir(), |_| {
        true
    }));
    assert_eq!(uploaded.len(), SAMPLE_IMAGES);
    (server, rt, client)
}

/// 1 process x 1 worker, 2 x 2 and 3 x 1 give the same keys, labels and embeddings.
#[test]
fn processes_times_workers_do_not_change_the_output() {
    let (server, rt, client) = server_with_sample();
    let endpoint = server.endpoint();
    let store = options(&endpoint);
    let dir = tempfile::tempdir().unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_verger"))
        .env("VERGER_WEIGHTS", weights())
        .args([
            "run",
            "--input",
            "s3://fruits/in",
            "--output",
            "s3://fruits/out-1x1",
        ])
        .args(["--endpoint-url", &endpoint, "--path-style", "-w", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let single = by_key(read_location("s3://fruits/out-1x1", &store).rows);
    assert_eq!(single.len(), SAMPLE_IMAGES);

    for (w, n) in [(2, 2), (1, 3)] {
        let output = format!("s3://fruits/out-{n}x{w}");
        run_cluster(&endpoint, &output, w, n, dir.path());
        let table = read_location(&output, &store);
        assert!(table.errors.is_empty(), "{n}x{w}: {:?}", table.errors);
        let rows = by_key(table.rows);
        assert_eq!(
            rows.keys().collect::<Vec<_>>(),
            single.keys().collect::<Vec<_>>(),
            "{n}x{w}: same keys"
        );
        for (key, row) in &rows {
            assert_eq!(row.label, single[key].label, "{key}");
            let diff = max_abs_diff(&row.embedding, &single[key].embedding);
            assert!(diff <= 1e-5, "{n}x{w} {key}: {diff}");
        }
        // Every process wrote its own files: more than one worker's name in the output (in
        // the epochs' own files, `e<epoch>-w<worker>-<run>`, not in merged ones).
        let writers: std::collections::BTreeSet<String> = rt
            .block_on(list_keys(&client, "fruits", &format!("out-{n}x{w}/data/")))
            .iter()
            .filter_map(|k| k.rsplit('/').next()?.strip_prefix('e'))
            .filter_map(|name| name.split('-').nth(1).map(str::to_string))
            .collect();
        assert_eq!(
            writers.len(),
            n * w,
            "{n}x{w}: files per worker {writers:?}"
        );
        rt.block_on(assert_clean_output(
            &client,
            "fruits",
            &format!("out-{n}x{w}/"),
        ));
    }
}

/// kill -9 one of two processes mid-run: the other exits non-zero naming it within 30 s,
/// releasing the output's lease on the way out;
/// restarting both completes with every image exactly once and nothing left over.
#[test]
fn a_killed_process_stops_its_peer_and_a_restart_completes_exactly_once() {
    let (server, rt, client) = server_with_sample();
    let endpoint = server.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hostfile(dir.path(), 2);
    let output = "s3://fruits/out";
    let mut leader = start(&endpoint, output, 1, 2, 0, &hosts);
    let mut victim = start(&endpoint, output, 1, 2, 1, &hosts);

    // Mid-run: after the first epoch is committed, well before the last.
    wait_for_a_commit(&rt, &client, "out/", &mut leader);
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = leader.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "the surviving process did not stop within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = leader.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lost = std::fs::read_to_string(&hosts).unwrap();
    let victim_address = lost.lines().nth(1).unwrap();
    assert!(
        stderr.contains(&format!("lost contact with process 1 ({victim_address})")),
        "{stderr}"
    );
    let partial = read_location(output, &options(&endpoint));
    assert!(partial.rows.len() < SAMPLE_IMAGES, "killed after the end");
    // It went through the same clean-up as any other end: the lease is given up (a restart
    // from another host need not wait for it to expire).
    assert!(
        rt.block_on(list_keys(&client, "fruits", "out/_lease.json"))
            .is_empty(),
        "the lease is left behind:\n{stderr}"
    );

    // Restart both on fresh ports: the run completes, exactly once.
    run_cluster(&endpoint, output, 1, 2, dir.path());
    let table = read_location(output, &options(&endpoint));
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    assert_eq!(by_key(table.rows).len(), SAMPLE_IMAGES);
    rt.block_on(assert_clean_output(&client, "fruits", "out/"));
}

/// SIGTERM to process 1 only (what `docker stop` of one member does): the stop reaches the
/// source on process 0, so the cluster releases nothing more, commits the epochs in flight and
/// both processes exit 143 with nothing left over (no file outside the table's log, the lease given
/// up); a restart of both completes with every image exactly once.
#[test]
fn sigterm_to_one_member_stops_the_cluster_after_its_epochs_in_flight() {
    let (server, rt, client) = server_with_sample();
    let endpoint = server.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hostfile(dir.path(), 2);
    let output = "s3://fruits/stopped";
    let mut leader = start(&endpoint, output, 1, 2, 0, &hosts);
    let member = start(&endpoint, output, 1, 2, 1, &hosts);
    wait_for_a_commit(&rt, &client, "stopped/", &mut leader);
    let term = Command::new("kill")
        .args(["-TERM", &member.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // Both end by themselves: neither is killed (wait_with_output has no deadline; a member
    // that ignored the stop would hang here and the test harness would time it out).
    let member = member.wait_with_output().unwrap();
    let leader = leader.wait_with_output().unwrap();
    assert_eq!(member.status.code(), Some(143), "{}", show(&member));
    assert_eq!(leader.status.code(), Some(143), "{}", show(&leader));
    let stderr = String::from_utf8_lossy(&leader.stderr);
    assert!(
        stderr.contains("interrupted before the end of the input (process 1 was asked to stop)"),
        "{stderr}"
    );
    let partial = read_location(output, &options(&endpoint));
    assert!(partial.rows.len() < SAMPLE_IMAGES, "stopped after the end");
    // The epochs in flight were committed, not abandoned: every Parquet file is in the log.
    rt.block_on(assert_clean_output(&client, "fruits", "stopped/"));
    let logged = rt.block_on(log_files(&client, "fruits", "stopped/"));
    let parquet: std::collections::HashSet<String> = rt
        .block_on(list_keys(&client, "fruits", "stopped/"))
        .into_iter()
        .filter(|k| k.ends_with(".parquet"))
        .map(|k| k["stopped/".len()..].to_string())
        .collect();
    assert_eq!(
        parquet, logged,
        "a published file outside the log: an abandoned epoch"
    );

    run_cluster(&endpoint, output, 1, 2, dir.path());
    let table = read_location(output, &options(&endpoint));
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    assert_eq!(by_key(table.rows).len(), SAMPLE_IMAGES);
    rt.block_on(assert_clean_output(&client, "fruits", "stopped/"));
}

/// A peer that never starts: each process gives up after --connect-timeout, exit code 3,
/// naming the process it waits for and its address, instead of waiting for ever.
#[test]
fn a_peer_that_never_connects_is_named_after_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = hostfile(dir.path(), 2);
    let addresses: Vec<String> = std::fs::read_to_string(&hosts)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let out = dir.path().join("out");
    for (me, missing) in [(0usize, 1usize), (1, 0)] {
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_verger"))
            .env("VERGER_WEIGHTS", weights())
            .args(["run", "--input"])
            .arg(sample_dir())
            .arg("--output")
            .arg(&out)
            .args(["-w", "1", "-n", "2", "-p", &me.to_string()])
            .args(["--connect-timeout", "2s", "-H"])
            .arg(&hosts)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "process {me}:\n{stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
        let named = format!("process {missing} ({})", addresses[missing]);
        assert!(
            stderr.contains("did not connect within 2s") && stderr.contains(&named),
            "process {me} must name {named}:\n{stderr}"
        );
    }
}
