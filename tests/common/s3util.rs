//! S3 helpers for tests: a client for the test server, uploads, and the checks every S3 test
//! ends with (no open multipart upload, no temporary object, every file of the table there).

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use super::seaweed::{require_weed, SeaweedFs, ACCESS_KEY, SECRET_KEY};

/// Puts the test credentials where aws-config's default chain finds them (environment), once,
/// before any S3 client of this test binary is built.
pub fn s3_env() {
    static ENV: OnceLock<()> = OnceLock::new();
    ENV.get_or_init(|| {
        // Set once, before this process builds any client; no test reads these meanwhile.
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    });
}

/// Store options for a test endpoint.
pub fn options(endpoint: &str) -> verger::storage::StoreOptions {
    verger::storage::StoreOptions {
        endpoint_url: Some(endpoint.to_string()),
        path_style: true,
        ..Default::default()
    }
}

/// A plain SDK client for the test server (setup and checks; verger builds its own).
pub async fn client(endpoint: &str) -> Client {
    s3_env();
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&sdk)
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build();
    Client::from_conf(conf)
}

/// Creates `bucket`.
pub async fn create_bucket(client: &Client, bucket: &str) {
    client.create_bucket().bucket(bucket).send().await.unwrap();
}

/// Uploads every file under `dir` whose relative key passes `keep`, under `prefix`.
/// Returns the uploaded keys (relative to `prefix`).
pub async fn upload_dir(
    client: &Client,
    bucket: &str,
    prefix: &str,
    dir: &Path,
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    let keys: Vec<String> = super::files_under(dir)
        .into_iter()
        .filter(|k| keep(k))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in keys.chunks(keys.len().div_ceil(16).max(1)) {
        let (client, bucket, prefix, dir) = (
            client.clone(),
            bucket.to_string(),
            prefix.to_string(),
            dir.to_path_buf(),
        );
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for key in chunk {
                let body = std::fs::read(dir.join(&key)).unwrap();
                client
                    .put_object()
                    .bucket(&bucket)
                    .key(format!("{prefix}{key}"))
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    keys
}

/// Every key under `prefix`.
pub async fn list_keys(client: &Client, bucket: &str, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        keys.extend(
            page.unwrap()
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
    }
    keys
}

/// Multipart uploads still open under `prefix`.
pub async fn open_uploads(client: &Client, bucket: &str, prefix: &str) -> usize {
    let out = client
        .list_multipart_uploads()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    out.uploads().len()
}

/// Epochs committed to the Delta table under `prefix` of `bucket` so far: its log's versions
/// but the first (the table's creation).
pub async fn committed_epochs(client: &Client, bucket: &str, prefix: &str) -> usize {
    let log = format!("{prefix}_delta_log/");
    let versions = list_keys(client, bucket, &log)
        .await
        .into_iter()
        .filter(|k| k.ends_with(".json"))
        .count();
    versions.saturating_sub(1)
}

/// The end-of-test check: no open multipart upload, no temporary object, and every file the
/// Delta table's snapshot lists is there. (Whole files of epochs that never committed may
/// stay: the log never adds them, so no reader sees them.)
pub async fn assert_clean_output(client: &Client, bucket: &str, prefix: &str) {
    assert_eq!(
        open_uploads(client, bucket, prefix).await,
        0,
        "open multipart uploads"
    );
    let keys: HashSet<String> = list_keys(client, bucket, prefix)
        .await
        .into_iter()
        .collect();
    for key in &keys {
        let name = key.rsplit('/').next().unwrap_or_default();
        assert!(
            !name.starts_with('.') && !name.ends_with(".tmp"),
            "temporary object {key}"
        );
    }
    for file in log_files(client, bucket, prefix).await {
        assert!(
            keys.contains(&format!("{prefix}{file}")),
            "the log lists a missing {file}"
        );
    }
}

/// The files of the Delta table under `prefix`, by replaying its log's JSON versions (adds
/// minus removes; the tests' tables are too young for a checkpoint), independently of
/// verger's reader.
pub async fn log_files(client: &Client, bucket: &str, prefix: &str) -> HashSet<String> {
    let mut versions: Vec<String> = list_keys(client, bucket, &format!("{prefix}_delta_log/"))
        .await
        .into_iter()
        .filter(|k| k.ends_with(".json"))
        .collect();
    versions.sort();
    let mut files = HashSet::new();
    for key in versions {
        let body = client
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .unwrap();
        let bytes = body.body.collect().await.unwrap().into_bytes();
        for line in String::from_utf8_lossy(&bytes).lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(path) = action["add"]["path"].as_str() {
                files.insert(path.to_string());
            }
            if let Some(path) = action["remove"]["path"].as_str() {
                files.remove(path);
            }
        }
    }
    files
}

/// A fresh S3 server with one bucket, a runtime and a plain client for setup and checks.
pub fn server_with_bucket(bucket: &str) -> (SeaweedFs, tokio::runtime::Runtime, Client) {
    require_weed();
    s3_env();
    let server = SeaweedFs::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(client(&server.endpoint()));
    rt.block_on(create_bucket(&client, bucket));
    (server, rt, client)
}
