//! `pipeline`: end-to-end runs (list, fetch, decode, label, embed, Parquet, commit) over the
//! Fruits-360 sample replicated under new keys to 5,000 images (`VERGER_BENCH_IMAGES` to
//! change), local directory to local directory, with 1, 2 and 4 workers. Criterion reports
//! images/s per worker count; the speedup against 1 worker is printed at the end.
//! Run: `cargo bench --bench pipeline` (about 15 minutes on 2 cores).
//! For one run per worker count with per-stage shares and peak RSS, use `verger bench`.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use verger::dataflow::{self, RunConfig};
use verger::embed::Backend;

fn pipeline(c: &mut Criterion) {
    let images: usize = std::env::var("VERGER_BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("input");
    verger::bench::replicate(&common::sample_dir(), &input, images).expect("sample replicated");
    let embedder = common::embedder(Backend::default());
    let rates: Mutex<BTreeMap<usize, f64>> = Mutex::default();

    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(images as u64));
    for workers in [1usize, 2, 4] {
        group.bench_function(BenchmarkId::new("workers", workers), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let out = tempfile::tempdir().expect("temp dir");
                    let mut config = RunConfig::new(
                        input.to_str().expect("utf-8 path"),
                        out.path().to_str().expect("utf-8 path"),
                    );
                    config.workers = workers;
                    let started = Instant::now();
                    let summary = dataflow::run(&config, &embedder).expect("run succeeds");
                    total += started.elapsed();
                    assert_eq!(summary.embedded as usize, images, "every image embedded");
                }
                let rate = iters as f64 * images as f64 / total.as_secs_f64();
                rates.lock().unwrap().insert(workers, rate);
                total
            })
        });
    }
    group.finish();
    let rates = rates.into_inner().unwrap();
    if let Some(&one) = rates.get(&1) {
        for (workers, rate) in &rates {
            println!(
                "pipeline/{workers} workers: {rate:.1} images/s, speedup {:.2}x",
                rate / one
            );
        }
    }
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
