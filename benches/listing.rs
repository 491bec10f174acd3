//! `listing`: a local folder of N empty `.jpg` files listed in pages of 1,000, as the source
//! lists its input, for N = 10,000, 100,000 and 1,000,000, flat and spread over 1,000 folders:
//! the time per file must stay flat as N grows (a listing that re-reads a folder for every page
//! grows with N^2). `VERGER_BENCH_LISTING_MAX` caps N (e.g. 100000 for a quicker run).
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
    let max: u64 = std::env::var("VERGER_BENCH_LISTING_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    for files in [10_000u64, 100_000, 1_000_000]
        .into_iter()
        .filter(|&n| n <= max)
    {
        for folders in [1u64, 1_000] {
            let dir = tempfile::tempdir().expect("a temporary folder");
            for f in 0..folders {
                let folder = match folders {
                    1 => dir.path().to_path_buf(),
                    _ => dir.path().join(format!("d{f:04}")),
                };
                std::fs::create_dir_all(&folder).expect("a folder");
                for i in (f..files).step_by(folders as usize) {
                    std::fs::File::create(folder.join(format!("img{i:07}.jpg"))).expect("a file");
                }
            }
            let store = LocalStore::open(dir.path(), false).expect("opens");
            group.throughput(Throughput::Elements(files));
            let layout = match folders {
                1 => "flat".to_string(),
                _ => format!("in-{folders}-folders"),
            };
            let id = BenchmarkId::new(layout, files);
            group.bench_with_input(id, &files, |b, &files| {
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
    }
    group.finish();
}

criterion_group!(benches, listing);
criterion_main!(benches);
