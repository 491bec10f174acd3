//! `startup`: what a restart reads of an output's Delta table after 10, 200 and 1,000
//! committed epochs, on a local table built here (one data file per epoch):
//!
//! - `log/<epochs>`: opening the table and reading its txn version (the last committed
//!   epoch), with checkpoints every 100 versions (the default) and, for comparison, with none;
//!   this must stay flat as epochs grow: it reads the last checkpoint and at most 99 versions;
//! - `state/<epochs>`: the whole of what a run loads before it lists (`Committed::load`:
//!   the log, then the key index of every file of the snapshot) for the same 2,000 rows in
//!   10 or 1,000 epochs, committed as a run commits them (`commit_epoch`, small files merged
//!   by the default compaction policy); `state/1000-no-compaction` keeps one file per
//!   epoch (`--compact-files 0`), so it reads 1,000 files; `…/1000-no-tombstones` drops
//!   removed files from checkpoints at once (`--deleted-file-retention 0s`) instead of
//!   keeping them for Delta's default week.
//!
//! Run: `cargo bench --bench startup`.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use verger::commit::{
    commit_epoch, Committed, CommittedEpoch, CompactionPolicy, DeltaOutput, EpochCommit,
    EpochTarget, Identity, SnapshotIndex,
};
use verger::record::{Embedded, FileKind, WrittenFile, FEATURE_DIM};
use verger::storage::local::LocalStore;
use verger::storage::ObjectStore;
use verger::table::{embeddings_batch, parquet_bytes, FileStats};

/// Rows of every table built here.
const ROWS: usize = 2_000;

/// A local table of `epochs` committed epochs holding `ROWS` rows, checkpointed every
/// `interval` versions, its small files merged as `compaction` says.
fn table(
    runtime: &tokio::runtime::Runtime,
    epochs: usize,
    interval: u64,
    compaction: CompactionPolicy,
    retention: Option<std::time::Duration>,
) -> (tempfile::TempDir, LocalStore, DeltaOutput) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store = LocalStore::open(dir.path(), true).expect("opens");
    let delta = DeltaOutput::of(&store, &Default::default()).expect("a table location");
    let identity = Identity {
        model: "bench".into(),
        weights_sha256: "0".repeat(64),
        derivation: String::new(),
        columns: Vec::new(),
    };
    runtime.block_on(async {
        delta
            .create(&identity, interval, retention)
            .await
            .expect("created");
        let mut open = None;
        let index = std::sync::Mutex::new(SnapshotIndex::default());
        let per_epoch = ROWS / epochs;
        for epoch in 0..epochs as u64 {
            let rows: Vec<Embedded> = (0..per_epoch)
                .map(|i| Embedded {
                    key: format!("class{}/img{epoch:05}-{i:04}.jpg", i % 4),
                    etag: format!("\"{epoch}-{i}\""),
                    label: Some(format!("class{}", i % 4)),
                    columns: Vec::new(),
                    width: 100,
                    height: 100,
                    embedding: vec![0.5; FEATURE_DIM],
                    prediction: None,
                })
                .collect();
            let mut stats = FileStats::default();
            for r in &rows {
                stats.observe(epoch, &r.key, r.label.as_deref(), None);
            }
            let key = verger::commit::delta::file_key(FileKind::Data, epoch, 0, "bench");
            let batch = embeddings_batch(&rows, "bench", epoch, &[]);
            let bytes = parquet_bytes(&[batch], &key).expect("encoded");
            let size = bytes.len() as u64;
            store.put(&key, Bytes::from(bytes)).await.expect("written");
            let file_keys = vec![(key.clone(), rows.iter().map(|r| r.key.clone()).collect())];
            let commit = EpochCommit {
                epoch,
                run: "bench".into(),
                model: "bench".into(),
                weights_sha256: identity.weights_sha256.clone(),
                rows: rows.len() as u64,
                files: vec![WrittenFile {
                    key,
                    kind: FileKind::Data,
                    rows: rows.len() as u64,
                    bytes: size,
                    stats: stats.to_json(),
                }],
                ..EpochCommit::default()
            };
            let mut epoch = CommittedEpoch {
                commit,
                rows: Vec::new(),
                failed_reads: Vec::new(),
                file_keys,
                deleted: Vec::new(),
                deleted_rows: Vec::new(),
            };
            let target = EpochTarget {
                output: &delta,
                store: &store,
                index: &index,
                compaction,
            };
            commit_epoch(target, &mut open, &mut epoch)
                .await
                .expect("committed");
        }
    });
    (dir, store, delta)
}

fn startup(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("startup");
    group.sample_size(10);
    let (merging, never) = (CompactionPolicy::default(), CompactionPolicy::never());
    // Tombstones of merged files dropped from checkpoints at once, not kept for a week.
    let short = Some(std::time::Duration::ZERO);
    for (epochs, interval, compaction, retention, name) in [
        (10, 100, merging, None, "10"),
        (200, 100, merging, None, "200"),
        (1_000, 100, merging, None, "1000"),
        (1_000, 100, merging, short, "1000-no-tombstones"),
        (1_000, 100, never, None, "1000-no-compaction"),
        (
            1_000,
            u64::from(u32::MAX),
            never,
            None,
            "1000-no-checkpoint",
        ),
    ] {
        let (_dir, store, delta) = table(&runtime, epochs, interval, compaction, retention);
        if compaction == merging {
            let files = runtime
                .block_on(Committed::load(&delta, &store, &|_| true))
                .expect("loads")
                .files
                .len();
            println!("startup/{name}: {files} files in the snapshot");
        }
        group.bench_function(BenchmarkId::new("log", name), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let table = delta.open(None).await.expect("opens").expect("a table");
                    let last = delta.txn_version(&table).await.expect("a txn");
                    assert_eq!(last, Some(epochs as i64 - 1));
                })
            })
        });
        if interval == 100 {
            let store: Arc<dyn ObjectStore> = Arc::new(store);
            group.bench_function(BenchmarkId::new("state", name), |b| {
                b.iter(|| {
                    let committed = runtime
                        .block_on(Committed::load(&delta, store.as_ref(), &|_| true))
                        .expect("loads");
                    assert_eq!(committed.rows.len(), ROWS);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, startup);
criterion_main!(benches);
