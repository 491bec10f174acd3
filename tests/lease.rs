//! One writer per output: a second `verger run` on an output in use fails at once naming the
//! holder, and the first run still ends with exactly one row per image; on S3 the lease is a
//! conditional-put object that is renewed, expires, and is taken over from a dead holder.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::process::Verger;
use common::s3util::*;
use common::*;
use verger::sink::lease::{host_name, Holder, Lease, LeaseError, LeaseSettings, LEASE_KEY};
use verger::storage::ObjectStore;

/// Images under `Test/` in the sample.
const TEST_IMAGES: usize = 662;

/// Starts a run of `Test/` into `output`, waits until it holds the lease, then launches a
/// second run on the same output (another prefix, as an operator's slip would): it must fail
/// within seconds naming the first run's pid, and the first must commit every image once.
fn second_run_fails_fast_and_the_first_completes(
    output: &str,
    extra: &[&str],
    read: impl Fn() -> verger::sink::reader::Table,
) {
    let (input, prefix_a, prefix_b) = match extra.is_empty() {
        true => (
            sample_dir().to_str().unwrap().to_string(),
            "Test/",
            "Training/",
        ),
        false => ("s3://lease/in".to_string(), "Test/", "Training/"),
    };
    let args = |prefix: &'static str| -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "--input",
            &input,
            "--output",
            output,
            "--prefix",
            prefix,
            "-w",
            "1",
            "--epoch-size",
            "64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let first_args = args(prefix_a);
    let first = Verger::start(&first_args.iter().map(String::as_str).collect::<Vec<_>>());
    first.wait_for_line("output state loaded", Duration::from_secs(120));
    let pid = first.child.id();

    let started = Instant::now();
    let second_args = args(prefix_b);
    let second = Verger::start(&second_args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = second.stderr.clone();
    let (status, _) = second.wait(Duration::from_secs(60));
    let took = started.elapsed();
    let stderr = stderr.lock().unwrap().join("\n");
    assert!(!status.success(), "the second run must fail:\n{stderr}");
    assert!(
        took < Duration::from_secs(20),
        "the second run took {took:?} to fail"
    );
    assert!(
        stderr.contains("in use by another verger run")
            && stderr.contains(&format!("pid {pid}"))
            && stderr.contains(&host_name())
            && stderr.contains("since"),
        "the message names the holder:\n{stderr}"
    );

    let (status, stdout) = first.wait(Duration::from_secs(600));
    assert!(status.success(), "the first run: {stdout}");
    let table = read();
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    let rows = by_key(table.rows);
    assert_eq!(rows.len(), TEST_IMAGES);
    assert!(rows.keys().all(|k| k.starts_with("Test/")));
}

#[test]
fn a_second_run_on_a_local_output_in_use_fails_fast_and_the_first_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let location = out.to_str().unwrap().to_string();
    second_run_fails_fast_and_the_first_completes(&location, &[], || read_output(&out));
}

#[test]
fn s3_lease_one_writer_renewal_expiry_and_takeover() {
    let (server, rt, client) = server_with_bucket("lease");
    let endpoint = server.endpoint();
    rt.block_on(upload_dir(&client, "lease", "in/", &sample_dir(), |k| {
        k.starts_with("Test/")
    }));

    // Two runs on one S3 output.
    let flags = ["--endpoint-url", endpoint.as_str(), "--path-style"];
    second_run_fails_fast_and_the_first_completes("s3://lease/out", &flags, || {
        read_location("s3://lease/out", &options(&endpoint))
    });
    rt.block_on(assert_clean_output(&client, "lease", "out/"));
    let left = rt.block_on(list_keys(&client, "lease", "out/_lease.json"));
    assert!(
        left.is_empty(),
        "a finished run releases its lease: {left:?}"
    );

    let store: Arc<dyn ObjectStore> = rt
        .block_on(verger::storage::open(
            "s3://lease/leases",
            false,
            &options(&endpoint),
        ))
        .unwrap();
    let short = LeaseSettings {
        ttl: Duration::from_secs(3),
    };
    let holder_text = |store: &Arc<dyn ObjectStore>| -> Holder {
        let (bytes, _) = rt.block_on(store.get_tagged(LEASE_KEY)).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    let put_holder = |store: &Arc<dyn ObjectStore>, holder: &Holder| {
        let body = Bytes::from(serde_json::to_vec(holder).unwrap());
        rt.block_on(store.put(LEASE_KEY, body)).unwrap();
    };

    rt.block_on(async {
        // Held: a second taker is refused; the holder renews before expiry.
        let lease = Lease::acquire(store.clone(), "run-a", short).await.unwrap();
        let err = Lease::acquire(store.clone(), "run-b", short)
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        let first_expiry = lease.holder().expires;
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let (bytes, _) = store.get_tagged(LEASE_KEY).await.unwrap();
        let renewed: Holder = serde_json::from_slice(&bytes).unwrap();
        assert!(renewed.expires > first_expiry, "renewed: {renewed:?}");
        assert!(!lease.is_lost());
        lease.release().await.unwrap();
        assert!(matches!(
            store.get_tagged(LEASE_KEY).await,
            Err(verger::storage::StorageError::NotFound { .. })
        ));
    });

    // A holder on this host whose process is gone (kill -9): taken over at once.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let dead = Holder {
        host: host_name(),
        pid: i32::MAX as u32,
        run: "killed".into(),
        since: now,
        expires: now + 3600,
    };
    put_holder(&store, &dead);
    let lease = rt
        .block_on(Lease::acquire(store.clone(), "run-c", short))
        .unwrap();
    assert_eq!(holder_text(&store).run, "run-c");
    rt.block_on(lease.release()).unwrap();

    // A live holder on another host: refused until its lease expires.
    let mut remote = Holder {
        host: "some-other-host".into(),
        ..dead.clone()
    };
    put_holder(&store, &remote);
    let err = rt
        .block_on(Lease::acquire(store.clone(), "run-d", short))
        .unwrap_err();
    assert!(err.to_string().contains("host some-other-host"), "{err}");
    remote.expires = now.saturating_sub(1);
    put_holder(&store, &remote);
    let lease = rt
        .block_on(Lease::acquire(store.clone(), "run-d", short))
        .unwrap();

    // Taken over behind the holder's back (another process deciding it expired): the holder
    // notices at its next renewal and stops committing.
    put_holder(
        &store,
        &Holder {
            run: "thief".into(),
            ..remote
        },
    );
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(1_600)).await });
    assert!(lease.is_lost(), "the holder must notice the lost lease");
    rt.block_on(lease.release()).unwrap();
    assert_eq!(
        holder_text(&store).run,
        "thief",
        "a lost lease is not deleted"
    );
}
