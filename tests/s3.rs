//! S3 in and out, against a real S3 server (SeaweedFS on loopback), with faults.

mod common;

use std::time::Duration;

use common::fault_proxy::FaultProxy;
use common::s3util::*;
use common::*;
use verger::dataflow::RunConfig;
use verger::record::Miss;
use verger::storage::{ObjectMeta, StoreOptions};

const SAMPLE_IMAGES: usize = 2_624;

fn s3_config(
    input: &str,
    output: &str,
    workers: usize,
    epoch_keys: usize,
    store: StoreOptions,
) -> RunConfig {
    let mut cfg = config(
        std::path::Path::new("."),
        std::path::Path::new("."),
        workers,
        epoch_keys,
    );
    cfg.input = input.to_string();
    cfg.output = output.to_string();
    cfg.store = store;
    cfg
}

/// The sample through S3 both ways: every image once, same embeddings as from local disk,
/// listing over several pages, big files uploaded in parts, nothing left open.
#[test]
fn sample_from_s3_to_s3_equals_the_local_run() {
    let (server, rt, client) = server_with_bucket("fruits");
    let endpoint = server.endpoint();
    let uploaded = rt.block_on(upload_dir(&client, "fruits", "in/", &sample_dir(), |_| {
        true
    }));
    assert_eq!(uploaded.len(), SAMPLE_IMAGES);

    // A multipart upload left open by an "earlier crashed run": the run aborts it.
    rt.block_on(async {
        client
            .create_multipart_upload()
            .bucket("fruits")
            .key("out/data/e0000000007-w0000-crashed.parquet")
            .send()
            .await
            .unwrap();
        assert_eq!(open_uploads(&client, "fruits", "out/").await, 1);
    });

    // 2 MiB multipart threshold and one epoch: each worker's file (~4.5 MiB) goes up as a
    // multipart upload.
    let mut store = options(&endpoint);
    store.multipart_threshold = 2 << 20;
    let cfg = s3_config(
        "s3://fruits/in",
        "s3://fruits/out",
        2,
        SAMPLE_IMAGES,
        store.clone(),
    );
    let summary = run(&cfg);
    assert_eq!(
        (summary.embedded as usize, summary.errors),
        (SAMPLE_IMAGES, 0)
    );
    assert_eq!(summary.removed_leftovers, 1, "the open upload was aborted");
    assert_eq!(
        summary.source.listed as usize, SAMPLE_IMAGES,
        "3 listing pages of <= 1000"
    );

    let from_s3 = by_key(read_location("s3://fruits/out", &store).rows);
    assert_eq!(from_s3.len(), SAMPLE_IMAGES);

    let dir = tempfile::tempdir().unwrap();
    run(&config(&sample_dir(), dir.path(), 2, 512));
    let local = by_key(read_output(dir.path()).rows);
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        from_s3.keys().collect::<Vec<_>>()
    );
    for (key, row) in &local {
        assert_eq!(row.label, from_s3[key].label);
        assert!(
            max_abs_diff(&row.embedding, &from_s3[key].embedding) <= 1e-5,
            "{key}"
        );
    }

    // Files over the threshold were uploaded in parts (multipart ETags end in -<parts>).
    let big = rt.block_on(async {
        let mut big = 0;
        for key in list_keys(&client, "fruits", "out/data/").await {
            let head = client
                .head_object()
                .bucket("fruits")
                .key(&key)
                .send()
                .await
                .unwrap();
            if head.content_length().unwrap_or(0) >= 2 << 20 {
                let etag = head.e_tag().unwrap_or_default().to_string();
                assert!(
                    etag.contains('-'),
                    "{key} ({etag}) was not a multipart upload"
                );
                big += 1;
            }
        }
        big
    });
    assert!(big >= 1, "no output file reached the multipart threshold");
    rt.block_on(assert_clean_output(&client, "fruits", "out/"));
}

/// A file over the threshold goes up in 5 MiB parts and comes back byte for byte.
#[test]
fn large_file_is_uploaded_in_parts_and_reads_back_equal() {
    let (server, rt, client) = server_with_bucket("parts");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let data: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    let mut opts = options(&server.endpoint());
    opts.multipart_threshold = 5 << 20;
    opts.part_size = 5 << 20;
    rt.block_on(async {
        let own = verger::storage::open("s3://parts/out", false, &opts)
            .await
            .unwrap();
        let delta = verger::commit::DeltaOutput::of(own.as_ref(), &opts).unwrap();
        // verger's S3 client, and the table's files through delta-rs's object store.
        for (store, key) in [
            (own.clone(), "data/big.bin"),
            (delta.files(own, &opts).unwrap(), "data/big-table.bin"),
        ] {
            std::fs::write(&path, &data).unwrap();
            store.put_file(key, &path).await.unwrap();
            assert!(
                !path.exists(),
                "{key}: the staged file is removed once uploaded"
            );
            let back = store.get(key).await.unwrap();
            assert!(back[..] == data[..], "{key}: content differs");
            let head = client
                .head_object()
                .bucket("parts")
                .key(format!("out/{key}"))
                .send()
                .await
                .unwrap();
            assert!(
                head.e_tag().unwrap_or_default().ends_with("-3\""),
                "{key}: {:?}",
                head.e_tag()
            );
            assert_eq!(open_uploads(&client, "parts", "out/").await, 0, "{key}");
        }
    });
}

/// 20% of requests answered 503 SlowDown and 5% of connections reset: every image is still
/// committed exactly once, with no error record.
#[test]
fn throttling_and_resets_still_commit_every_image_exactly_once() {
    let (server, rt, client) = server_with_bucket("flaky");
    let keys = rt.block_on(upload_dir(&client, "flaky", "in/", &sample_dir(), |k| {
        k.starts_with("Test/")
    }));
    let proxy = FaultProxy::start(&server.endpoint(), 0.2, 0.05, 42);

    // Every data file (~170 KiB) goes up as a multipart upload, so parts meet faults too.
    let mut through_proxy = options(&proxy.endpoint());
    through_proxy.multipart_threshold = 64 << 10;
    let cfg = s3_config("s3://flaky/in", "s3://flaky/out", 2, 100, through_proxy);
    let summary = run(&cfg);
    assert_eq!((summary.embedded as usize, summary.errors), (keys.len(), 0));
    assert!(
        proxy.slowdowns() > 20,
        "slowdowns injected: {}",
        proxy.slowdowns()
    );
    assert!(proxy.resets() > 3, "resets injected: {}", proxy.resets());

    let rows = by_key(read_location("s3://flaky/out", &options(&server.endpoint())).rows);
    assert_eq!(rows.len(), keys.len());
    assert!(keys.iter().all(|k| rows.contains_key(k)));
    rt.block_on(assert_clean_output(&client, "flaky", "out/"));
}

/// Delta commits whose write landed but whose answer was lost (the connection reset once the
/// store had answered: a timeout after the write), for the table's creation and two epochs'
/// versions: the run completes, each epoch is committed once (consecutive versions, no
/// version added twice), every image once.
#[test]
fn a_commit_that_landed_but_whose_answer_was_lost_is_not_made_twice() {
    let (server, rt, client) = server_with_bucket("ambiguous");
    let keys = rt.block_on(upload_dir(
        &client,
        "ambiguous",
        "in/",
        &sample_dir(),
        |k| k.starts_with("Test/apple/"),
    ));
    let proxy = FaultProxy::start(&server.endpoint(), 0.0, 0.0, 7);
    // Version 0 (the table's creation), then the next two epochs' versions.
    proxy.lose_put_answers("/_delta_log/00000000000000000000.json", 0, 1);
    let cfg = s3_config(
        "s3://ambiguous/in",
        "s3://ambiguous/out",
        1,
        40,
        options(&proxy.endpoint()),
    );
    let summary = std::thread::scope(|scope| {
        scope.spawn(|| {
            // Once the table exists, lose the answers of the second and third epochs' commits.
            while rt.block_on(committed_epochs(&client, "ambiguous", "out/")) < 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
            proxy.lose_put_answers("/_delta_log/", 0, 2);
        });
        run(&cfg)
    });
    assert_eq!((summary.embedded as usize, summary.errors), (keys.len(), 0));
    assert_eq!(
        proxy.resets(),
        3,
        "answers lost: the creation and two epochs"
    );
    let table = read_location("s3://ambiguous/out", &options(&server.endpoint()));
    let epochs: Vec<u64> = table.commits.iter().map(|c| c.epoch).collect();
    assert_eq!(epochs, (0..summary.epochs).collect::<Vec<_>>());
    assert_eq!(
        table.version,
        Some(summary.epochs),
        "one version per epoch after the creation"
    );
    assert_eq!(by_key(table.rows).len(), keys.len());
    rt.block_on(assert_clean_output(&client, "ambiguous", "out/"));
}

/// S3 answers `503 SlowDown` to the first six PUTs of the Delta log (the table's creation and
/// epochs' versions): each is tried again, the run completes, every epoch is one version
/// (consecutive, none twice), every image once.
#[test]
fn a_503_on_the_delta_log_put_is_retried_and_commits_once() {
    let (server, rt, client) = server_with_bucket("slowlog");
    let keys = rt.block_on(upload_dir(&client, "slowlog", "in/", &sample_dir(), |k| {
        k.starts_with("Test/apple/")
    }));
    let proxy = FaultProxy::start(&server.endpoint(), 0.0, 0.0, 11);
    proxy.slow_down_puts("/_delta_log/", 6);
    let cfg = s3_config(
        "s3://slowlog/in",
        "s3://slowlog/out",
        1,
        40,
        options(&proxy.endpoint()),
    );
    let summary = run(&cfg);
    assert_eq!((summary.embedded as usize, summary.errors), (keys.len(), 0));
    assert_eq!(proxy.slowdowns(), 6, "every injected 503 was met");
    let table = read_location("s3://slowlog/out", &options(&server.endpoint()));
    let epochs: Vec<u64> = table.commits.iter().map(|c| c.epoch).collect();
    assert_eq!(epochs, (0..summary.epochs).collect::<Vec<_>>());
    assert_eq!(table.version, Some(summary.epochs));
    assert_eq!(by_key(table.rows).len(), keys.len());
    rt.block_on(assert_clean_output(&client, "slowlog", "out/"));
}

/// One client per side: the images are listed and read by verger's S3 client (the AWS SDK),
/// the Delta log and every data file it names are written and read through delta-rs's object
/// store, and the lease beside the table stays on the SDK. Told apart by each request's
/// `User-Agent`, as the proxy in front of the server received it.
#[test]
fn the_table_and_its_files_go_through_delta_rs_and_the_images_through_the_sdk() {
    let (server, rt, client) = server_with_bucket("clients");
    let keys = rt.block_on(upload_dir(&client, "clients", "in/", &sample_dir(), |k| {
        k.starts_with("Test/apple/")
    }));
    let proxy = FaultProxy::start(&server.endpoint(), 0.0, 0.0, 5);
    let cfg = s3_config(
        "s3://clients/in",
        "s3://clients/out",
        2,
        20,
        options(&proxy.endpoint()),
    );
    let summary = run(&cfg);
    assert_eq!(summary.embedded as usize, keys.len());
    assert!(summary.epochs > 1, "several epochs, several data files");
    // Read back through the proxy too: the reader's GETs of data files are the crate's.
    let table = read_location("s3://clients/out", &options(&proxy.endpoint()));
    assert_eq!(by_key(table.rows).len(), keys.len());
    let seen = proxy.seen();
    let sent_by = |method: &str, part: &str| -> Vec<String> {
        seen.iter()
            .filter(|r| r.method == method && r.path.contains(part))
            .map(|r| r.agent.clone())
            .collect()
    };
    let by_delta_rs = |agent: &String| agent.starts_with("object_store/");
    let by_sdk = |agent: &String| agent.contains("aws-sdk-rust");
    for (method, part, expected, from_delta_rs) in [
        ("PUT", "/clients/out/data/", summary.epochs as usize, true),
        ("GET", "/clients/out/data/", summary.epochs as usize, true),
        (
            "PUT",
            "/clients/out/_delta_log/",
            1 + summary.epochs as usize,
            true,
        ),
        ("GET", "/clients/in/", keys.len(), false),
        ("PUT", "/clients/out/_lease.json", 1, false),
    ] {
        let agents = sent_by(method, part);
        assert!(
            agents.len() >= expected,
            "{method} {part}: {} requests, expected at least {expected}",
            agents.len()
        );
        let (client, sent) = match from_delta_rs {
            true => ("delta-rs's object store", agents.iter().all(by_delta_rs)),
            false => ("the AWS SDK", agents.iter().all(by_sdk)),
        };
        assert!(sent, "{method} {part} not all sent by {client}: {agents:?}");
    }
}

/// The S3 server is killed mid-run and started again on its data: the run completes and
/// nothing is lost.
#[test]
fn server_restart_mid_run_loses_nothing() {
    let (mut server, rt, client) = server_with_bucket("restart");
    let endpoint = server.endpoint();
    let keys = rt.block_on(upload_dir(&client, "restart", "in/", &sample_dir(), |k| {
        k.starts_with("Training/apple/")
    }));
    let mut store = options(&endpoint);
    store.max_attempts = 20;
    let cfg = s3_config("s3://restart/in", "s3://restart/out", 2, 100, store.clone());
    let running = std::thread::spawn(move || verger::dataflow::run(&cfg, shared_embedder()));
    // Let some epochs commit, then take the server away for a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while rt.block_on(committed_epochs(&client, "restart", "out/")) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no epoch committed in 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.kill();
    std::thread::sleep(Duration::from_secs(3));
    server.restart();
    let summary = running.join().unwrap().expect("run survives the restart");
    assert_eq!(summary.errors, 0);
    let rows = by_key(read_location("s3://restart/out", &store).rows);
    assert_eq!(rows.len(), keys.len());
    rt.block_on(assert_clean_output(&client, "restart", "out/"));
}

/// A key replaced or deleted between listing and reading is skipped, not an error: the read
/// asks for the listed version (If-Match), and the next listing has the new one.
#[test]
fn object_replaced_or_deleted_after_listing_vanishes_without_an_error() {
    let (server, rt, client) = server_with_bucket("gone");
    let put = |body: &'static [u8]| {
        rt.block_on(
            client
                .put_object()
                .bucket("gone")
                .key("in/Lemon/a.jpg")
                .body(body.to_vec().into())
                .send(),
        )
        .unwrap();
    };
    let metrics = std::sync::Arc::new(verger::metrics::Metrics::new());
    let store = rt
        .block_on(verger::storage::open(
            "s3://gone/in",
            false,
            &options(&server.endpoint()),
        ))
        .unwrap();
    let listed = || -> ObjectMeta {
        let page = rt.block_on(store.list_page("", None, 10)).unwrap();
        page.objects.into_iter().next().unwrap()
    };
    let fetch = |meta: ObjectMeta| {
        rt.block_on(verger::fetch::fetch(
            store.clone(),
            meta,
            verger::fetch::MAX_OBJECT_BYTES,
            metrics.clone(),
        ))
    };
    put(b"first version");
    let first = listed();
    put(b"second version");
    let second = listed();
    assert_ne!(first.etag, second.etag, "an overwrite changes the ETag");
    match fetch(first.clone()) {
        Err(Miss::Vanished { key, reason }) => {
            assert_eq!(key, "Lemon/a.jpg");
            assert!(reason.contains("changed"), "{reason}");
        }
        other => panic!("the replaced version must vanish, got {other:?}"),
    }
    assert_eq!(&fetch(second.clone()).unwrap().bytes[..], b"second version");
    rt.block_on(
        client
            .delete_object()
            .bucket("gone")
            .key("in/Lemon/a.jpg")
            .send(),
    )
    .unwrap();
    match fetch(second) {
        Err(Miss::Vanished { reason, .. }) => assert!(reason.contains("not found"), "{reason}"),
        other => panic!("the deleted object must vanish, got {other:?}"),
    }
    assert_eq!(metrics.vanished.get(), 2);
    assert_eq!(metrics.fetched.get(), 1);
}

/// The binary with S3 flags and credentials from the environment: works, and never prints
/// the secret.
#[test]
fn cli_reads_and_writes_s3_without_printing_credentials() {
    let (server, rt, client) = server_with_bucket("cli");
    let keys = rt.block_on(upload_dir(&client, "cli", "in/", &sample_dir(), |k| {
        k.starts_with("Test/lemon/1")
    }));
    assert!(!keys.is_empty());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verger"))
        .env("VERGER_WEIGHTS", weights())
        .env("VERGER_LOG", "debug")
        .args([
            "run",
            "-w",
            "2",
            "--input",
            "s3://cli/in",
            "--output",
            "s3://cli/out",
            "--path-style",
            "--include",
            "*.JPG",
        ])
        .args(["--endpoint-url", &server.endpoint()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("embedded {}, errors 0", keys.len())),
        "{stdout}"
    );
    let secret = common::seaweed::SECRET_KEY;
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "secret printed"
    );
    rt.block_on(assert_clean_output(&client, "cli", "out/"));
}

/// One rule for both stores: hidden names (`.DS_Store`, macOS's `._x.jpg`, `.hidden.jpg`,
/// anything under a `.folder/`) are left out of an S3 listing exactly as of a local one, so
/// the same tree gives the same keys from either store.
#[test]
fn local_and_s3_listings_leave_out_the_same_hidden_files() {
    let (server, rt, client) = server_with_bucket("hidden");
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "Lemon/a.jpg",
        "Lemon/.hidden.jpg",
        "Lemon/._a.jpg",
        ".DS_Store",
        "Lemon/.DS_Store",
        ".thumbnails/Lemon/a.jpg",
        "b.jpg",
    ] {
        let path = dir.path().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, key.as_bytes()).unwrap();
    }
    let uploaded = rt.block_on(upload_dir(&client, "hidden", "in/", dir.path(), |_| true));
    assert_eq!(uploaded.len(), 7, "{uploaded:?}");
    let list = |location: &str| {
        rt.block_on(async {
            let store = verger::storage::open(location, false, &options(&server.endpoint()))
                .await
                .unwrap();
            let mut keys = Vec::new();
            verger::storage::list_all(store.as_ref(), "", 2, |page| {
                keys.extend(page.into_iter().map(|o| o.key));
                true
            })
            .await
            .unwrap();
            keys.sort();
            keys
        })
    };
    let s3 = list("s3://hidden/in");
    assert_eq!(s3, ["Lemon/a.jpg", "b.jpg"]);
    assert_eq!(list(dir.path().to_str().unwrap()), s3);
}
