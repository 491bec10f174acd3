//! `listing`: a flat local folder of N files listed in pages of 1,000, as the source lists its
//! input, for N = 10,000 and 40,000: the time per file must stay flat as N grows (a listing
//! that re-reads the folder for every page grows with N^2).
//! Run: `cargo bench --bench listing`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use verger::storage::list_all;
use verger::storage::local::LocalStore;

fn listing(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("listing");
    group.sample_size(10);
    for files in [10_000u64, 40_000] {
        let dir = tempfile::tempdir().expect("a temporary folder");
        for i in 0..files {
            std::fs::File::create(dir.path().join(format!("img{i:07}.jpg"))).expect("a file");
        }
        let store = LocalStore::open(dir.path(), false).expect("opens");
        group.throughput(Throughput::Elements(files));
        group.bench_with_input(BenchmarkId::from_parameter(files), &files, |b, &files| {
            b.iter(|| {
                let mut listed = 0u64;
                runtime
                    .block_on(list_all(&store, "", 1000, |page| {
                        listed += page.len() as u64;
                        true
                    }))
                    .expect("lists");
                assert_eq!(listed, files);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, listing);
criterion_main!(benches);
