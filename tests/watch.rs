//! Watch mode as a service, against a real S3 server (SeaweedFS on loopback): waves of new
//! images are committed as they land, a replaced object's new row takes its old one's place
//! in the table's snapshot, deleted objects' rows leave it (stopping nothing), the metrics
//! endpoint agrees with the output, and SIGTERM finishes cleanly.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use common::process::{eventually, label_rows, scrape, Verger};
use common::s3util::*;
use common::*;

const POLL: Duration = Duration::from_secs(1);
/// Processing allowance for a wave of 100 images: 5 images/s, a fraction of what one core
/// does, so a loaded CI machine still passes.
const PROCESSING: Duration = Duration::from_secs(20);

fn upload(rt: &tokio::runtime::Runtime, client: &aws_sdk_s3::Client, key: &str, source: &str) {
    let body = std::fs::read(sample_dir().join(source)).unwrap();
    rt.block_on(
        client
            .put_object()
            .bucket("watch")
            .key(format!("in/{key}"))
            .body(ByteStream::from(body))
            .send(),
    )
    .unwrap();
}

fn per_label(rows: &[&verger::record::Embedded]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for r in rows {
        *counts
            .entry(r.label.clone().unwrap_or_default())
            .or_default() += 1;
    }
    counts
}

#[test]
fn waves_replacements_and_deletions_while_watching_then_sigterm() {
    let (server, rt, client) = server_with_bucket("watch");
    let opts = options(&server.endpoint());

    // Images spread over every class: every 8th file of the sample.
    let sample = files_under(&sample_dir());
    let pick = |offset: usize, n: usize| -> Vec<String> {
        sample
            .iter()
            .skip(offset)
            .step_by(8)
            .take(n)
            .cloned()
            .collect()
    };
    let waves: Vec<Vec<String>> = pick(0, 300).chunks(100).map(|c| c.to_vec()).collect();
    assert_eq!(waves.iter().map(Vec::len).sum::<usize>(), 300);

    let verger = Verger::start(&[
        "run",
        "--watch",
        "--poll-interval",
        "1s",
        "--input",
        "s3://watch/in",
        "--output",
        "s3://watch/out",
        "--endpoint-url",
        &server.endpoint(),
        "--path-style",
        "-w",
        "2",
        "--epoch-size",
        "64",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let metrics = verger.metrics_addr();
    // Empty prefix: it polls without committing anything.
    verger.wait_for_line("poll done", Duration::from_secs(60));
    assert!(read_location("s3://watch/out", &opts).rows.is_empty());

    let mut expected: HashSet<String> = HashSet::new();
    for (i, wave) in waves.iter().enumerate() {
        for key in wave {
            upload(&rt, &client, key, key);
        }
        let landed = Instant::now();
        expected.extend(wave.iter().cloned());
        let latency = eventually("wave committed", 2 * POLL + PROCESSING, || {
            let rows = read_location("s3://watch/out", &opts).rows;
            let keys: HashSet<String> = rows.into_iter().map(|r| r.key).collect();
            (keys == expected).then(|| landed.elapsed())
        });
        eprintln!(
            "wave {} ({} images) committed {:.2} s after its upload ended",
            i + 1,
            wave.len(),
            latency.as_secs_f64()
        );
    }

    // The endpoint answers during the run and agrees with the output.
    let table = read_location("s3://watch/out", &opts);
    assert_eq!(table.rows.len(), 300);
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    let latest = table.latest_rows();
    let m = eventually("metrics caught up", Duration::from_secs(10), || {
        let m = scrape(&metrics);
        (m["verger_objects_committed_total"] == 300.0 && label_rows(&m) == per_label(&latest))
            .then_some(m)
    });
    assert_eq!(m["verger_objects_embedded_total"], 300.0);
    assert_eq!(m["verger_objects_failed_total"], 0.0);
    assert!(m["verger_objects_listed_total"] >= 300.0);
    assert!(m["verger_read_bytes_total"] > 0.0 && m["verger_written_bytes_total"] > 0.0);

    // Ten objects replaced by other pictures of their class: ten superseding rows, each
    // removing its predecessor from the snapshot in the same commit.
    let before = by_key(table.rows.clone());
    let replaced: Vec<(String, String)> = waves[0]
        .iter()
        .take(10)
        .map(|k| {
            let class = k.rsplit_once('/').unwrap().0;
            let other = sample
                .iter()
                .find(|s| s.starts_with(class) && !expected.contains(*s))
                .unwrap();
            (k.clone(), other.clone())
        })
        .collect();
    for (key, source) in &replaced {
        upload(&rt, &client, key, source);
    }
    let table = eventually("replacements committed", 2 * POLL + PROCESSING, || {
        let t = read_location("s3://watch/out", &opts);
        let rows: BTreeMap<&str, &str> = t
            .rows
            .iter()
            .map(|r| (r.key.as_str(), r.etag.as_str()))
            .collect();
        replaced
            .iter()
            .all(|(k, _)| rows.get(k.as_str()).is_some_and(|e| *e != before[k].etag))
            .then_some(t)
    });
    assert_eq!(table.rows.len(), 300, "superseded, not added");
    let now = by_key(table.rows.clone());
    for (key, _) in &replaced {
        assert!(
            cosine(&before[key].embedding, &now[key].embedding) < 0.9999,
            "{key}: the new row embeds the new picture"
        );
    }
    let latest = table.latest_rows();
    let m = eventually("label counts unchanged", Duration::from_secs(10), || {
        let m = scrape(&metrics);
        (m["verger_objects_committed_total"] == 310.0).then_some(m)
    });
    assert_eq!(label_rows(&m), per_label(&latest), "latest rows per label");

    // Deleting objects stops nothing: the next wave still lands, and the deleted objects'
    // rows leave the snapshot.
    let deleted: Vec<&String> = waves[1].iter().take(10).collect();
    for key in &deleted {
        rt.block_on(
            client
                .delete_object()
                .bucket("watch")
                .key(format!("in/{key}"))
                .send(),
        )
        .unwrap();
    }
    let last = pick(2, 20);
    for key in &last {
        upload(&rt, &client, key, key);
    }
    let table = eventually(
        "wave after deletions committed",
        2 * POLL + PROCESSING,
        || {
            let t = read_location("s3://watch/out", &opts);
            (t.rows.len() == 310).then_some(t)
        },
    );
    let keys: HashSet<&str> = table.rows.iter().map(|r| r.key.as_str()).collect();
    assert!(deleted.iter().all(|k| !keys.contains(k.as_str())));
    assert!(last.iter().all(|k| keys.contains(k.as_str())));
    let latest = table.latest_rows();
    eventually(
        "label counts without the deleted",
        Duration::from_secs(10),
        || (label_rows(&scrape(&metrics)) == per_label(&latest)).then_some(()),
    );

    // SIGTERM: stop listing, finish what is in flight, exit 0.
    verger.terminate();
    let (status, stdout) = verger.wait(Duration::from_secs(60));
    assert!(status.success(), "exit {status:?}\n{stdout}");
    assert!(stdout.contains("embedded 330, errors 0"), "{stdout}");
    let table = read_location("s3://watch/out", &opts);
    assert!(
        table.errors.is_empty(),
        "deletions are not errors: {:?}",
        table.errors
    );
    assert_eq!(table.rows.len(), 310);
    rt.block_on(assert_clean_output(&client, "watch", "out/"));
}

/// A read that fails in watch mode is tried again at a later poll (not only after a restart):
/// the object ends embedded, and the commit of its row removes its error record from the
/// snapshot (an earlier version still has it).
#[test]
fn a_failed_read_is_retried_at_the_next_poll_and_its_error_superseded() {
    use common::fault_proxy::FaultProxy;
    let (server, rt, client) = server_with_bucket("retry");
    let keys = rt.block_on(upload_dir(&client, "retry", "in/", &sample_dir(), |k| {
        k.starts_with("Test/apple/32")
    }));
    assert!(keys.len() >= 5, "{keys:?}");
    let unlucky = keys[2].clone();
    let proxy = FaultProxy::start(&server.endpoint(), 0.0, 0.0, 7);
    proxy.fail_gets(&format!("/retry/in/{unlucky}"), 1);
    let verger = Verger::start(&[
        "run",
        "--watch",
        "--poll-interval",
        "1s",
        "--input",
        "s3://retry/in",
        "--output",
        "s3://retry/out",
        "--endpoint-url",
        &proxy.endpoint(),
        "--path-style",
        "--s3-max-attempts",
        "1",
        "--s3-outage-retries",
        "0",
        "-w",
        "1",
    ]);
    let opts = options(&server.endpoint());
    let table = eventually("every image embedded", PROCESSING, || {
        let table = read_location("s3://retry/out", &opts);
        (table.rows.len() == keys.len()).then_some(table)
    });
    verger.terminate();
    let (status, stdout) = verger.wait(Duration::from_secs(60));
    assert!(status.success(), "{stdout}");
    assert!(
        table.errors.is_empty(),
        "superseded by the row: {:?}",
        table.errors
    );
    assert_eq!(table.commits.iter().map(|c| c.superseded).sum::<u64>(), 1);
    let earlier: Vec<_> = (1..table.version.unwrap())
        .flat_map(|v| read_location_at("s3://retry/out", &opts, Some(v)).errors)
        .map(|e| (e.key, e.stage))
        .collect();
    assert!(
        earlier.contains(&(unlucky.clone(), verger::record::Stage::Fetch)),
        "time travel finds the error record: {earlier:?}"
    );
    by_key(table.rows); // once each
}
