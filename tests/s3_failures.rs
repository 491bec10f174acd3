//! S3 mistakes as a user makes them, through the binary: each fails fast, in one line that
//! says what is wrong, and refusals are never retried. Every endpoint is on loopback, and the
//! instance metadata service is disabled (its address is not loopback).

mod common;

use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::fault_proxy::FaultProxy;
use common::s3util::{server_with_bucket, upload_dir};
use common::seaweed::{ACCESS_KEY, SECRET_KEY};
use common::*;

/// `verger ARGS` with no AWS settings of the developer's: only `env` (and an empty HOME, so
/// no ~/.aws files).
fn verger_s3(home: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_verger"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_REGION", "us-east-1")
        .env("VERGER_WEIGHTS", weights())
        .envs(env.iter().copied())
        .args(args);
    cmd.output().unwrap()
}

/// An endpoint on loopback that accepts every connection, counts it and never answers: how
/// many connections a command opened is what says whether it retried (or asked at all), with
/// no timing in the assertion.
struct SilentEndpoint {
    url: String,
    connections: Arc<AtomicUsize>,
}

impl SilentEndpoint {
    fn start() -> SilentEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            let mut open = Vec::new(); // held open, never answered
            for stream in listener.incoming().flatten() {
                counted.fetch_add(1, Ordering::SeqCst);
                open.push(stream);
            }
        });
        SilentEndpoint { url, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failure whose stderr is one `verger: error:` line containing every `needle`.
fn fails_in_one_line(out: &Output, needles: &[&str]) -> String {
    let text = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(errors.len(), 1, "one line, no dumps:\n{text}");
    assert!(errors[0].starts_with("verger: error: "), "{text}");
    for needle in needles {
        assert!(errors[0].contains(needle), "no {needle:?} in {text}");
    }
    text
}

const KEYS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
    ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
];

#[test]
fn no_credentials_at_all_fail_before_any_request_naming_the_chain() {
    let home = tempfile::tempdir().unwrap();
    let out_dir = home.path().join("out");
    let endpoint = SilentEndpoint::start();
    let out = verger_s3(
        home.path(),
        &[],
        &[
            "run",
            "--input",
            "s3://images/in",
            "--output",
            out_dir.to_str().unwrap(),
            "--endpoint-url",
            &endpoint.url,
        ],
    );
    fails_in_one_line(
        &out,
        &[
            "input s3://images/in: no AWS credentials",
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "instance role",
        ],
    );
    // The chain is resolved once, up front: no request is sent (so none waits on the silent
    // endpoint's timeouts), and nothing is created.
    assert_eq!(endpoint.connections(), 0, "no request without credentials");
    assert!(
        !out_dir.exists(),
        "nothing created before the input is known good"
    );
}

#[test]
fn an_unknown_aws_profile_is_an_error_naming_it() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".aws")).unwrap();
    std::fs::write(
        home.path().join(".aws/credentials"),
        format!("[work]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"),
    )
    .unwrap();
    let out = verger_s3(
        home.path(),
        &[("AWS_PROFILE", "wrok")],
        &[
            "inspect",
            "s3://images/out",
            "--endpoint-url",
            "http://127.0.0.1:9",
        ],
    );
    fails_in_one_line(
        &out,
        &["AWS_PROFILE is `wrok`", "the profiles defined are work"],
    );
}

#[test]
fn a_refused_endpoint_fails_as_unreachable_not_as_silent() {
    // A port nobody listens on: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let home = tempfile::tempdir().unwrap();
    let out = verger_s3(
        home.path(),
        &KEYS,
        &["inspect", "s3://images/out", "--endpoint-url", &endpoint],
    );
    // "cannot be reached ... refused", not "did not answer": the refusal ended the check, no
    // attempt waited for its timeout (the silent endpoint below is that other case).
    let text = fails_in_one_line(
        &out,
        &[
            "output s3://images/out/",
            &endpoint,
            "cannot be reached",
            "refused",
        ],
    );
    assert!(!text.contains("did not answer"), "{text}");
}

#[test]
fn an_endpoint_that_never_answers_fails_after_three_attempts() {
    let silent = SilentEndpoint::start();
    let home = tempfile::tempdir().unwrap();
    let out = verger_s3(
        home.path(),
        &KEYS,
        &["inspect", "s3://images/out", "--endpoint-url", &silent.url],
    );
    fails_in_one_line(&out, &[&silent.url, "did not answer"]);
    assert_eq!(
        silent.connections(),
        3,
        "one connection per attempt, three attempts, then the start-up check gives up"
    );
}

#[test]
fn a_missing_bucket_and_wrong_keys_are_refusals_not_retried() {
    let (server, _rt, _client) = server_with_bucket("present");
    // Through a proxy that injects nothing and counts requests: a refusal is sent once, so
    // "not retried" is a count, not a time a loaded machine could stretch.
    let proxy = FaultProxy::start(&server.endpoint(), 0.0, 0.0, 1);
    let endpoint = proxy.endpoint();
    let sent = std::cell::Cell::new(0u64);
    let requests = || {
        let now = proxy.forwarded();
        now - sent.replace(now)
    };
    let home = tempfile::tempdir().unwrap();
    let out_dir = home.path().join("out");
    let run = |env: &[(&str, &str)], input: &str| {
        verger_s3(
            home.path(),
            env,
            &[
                "run",
                "--input",
                input,
                "--output",
                out_dir.to_str().unwrap(),
                "--endpoint-url",
                &endpoint,
                "--path-style",
            ],
        )
    };
    let out = run(&KEYS, "s3://absent/in");
    fails_in_one_line(
        &out,
        &[
            "input s3://absent/in/",
            "the bucket does not exist (NoSuchBucket)",
        ],
    );
    assert_eq!(requests(), 1, "NoSuchBucket is not retried");

    let wrong_secret = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "nope"),
    ];
    let out = run(&wrong_secret, "s3://present/in");
    fails_in_one_line(&out, &["input s3://present/in/", "SignatureDoesNotMatch"]);
    assert_eq!(requests(), 1, "a wrong secret is not retried");

    let unknown_key = [
        ("AWS_ACCESS_KEY_ID", "nobody"),
        ("AWS_SECRET_ACCESS_KEY", "nope"),
    ];
    let out = run(&unknown_key, "s3://present/in");
    fails_in_one_line(&out, &["InvalidAccessKeyId"]);
    assert_eq!(requests(), 1, "an unknown key is not retried");
}

#[test]
fn a_denied_listing_of_open_uploads_is_a_warning_not_a_failure() {
    let (server, rt, client) = server_with_bucket("fruit");
    let sample = sample_dir().join("Test");
    let keys = rt.block_on(upload_dir(&client, "fruit", "in/", &sample, |k| {
        k.starts_with("lemon/")
    }));
    assert!(!keys.is_empty());
    // The policy of deploy/ before its fix: ListBucketMultipartUploads denied.
    let proxy = FaultProxy::start(&server.endpoint(), 0.0, 0.0, 1);
    proxy.deny_queries("uploads");
    let home = tempfile::tempdir().unwrap();
    let out = verger_s3(
        home.path(),
        &KEYS,
        &[
            "run",
            "-w",
            "1",
            "--input",
            "s3://fruit/in",
            "--output",
            "s3://fruit/out",
            "--endpoint-url",
            &proxy.endpoint(),
            "--path-style",
        ],
    );
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("cannot list the multipart uploads")
            && text.contains("s3:ListBucketMultipartUploads"),
        "{text}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("embedded {}, errors 0", keys.len())),
        "{stdout}"
    );
}
