//! Per-stage costs on one thread: decode + resize of a real sample JPEG, and the network's
//! forward pass at several batch sizes (images/s = batch / time). Run: `cargo bench --bench stages`.
//! Needs `../shared` (or `VERGER_SHARED`) and the weights (fetched by verger's own code).

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use verger::decode::decode_and_resize;
use verger::embed::{weights_file, Backend, Embedder, ModelSpec};

fn sample_jpeg() -> Vec<u8> {
    let shared = std::env::var_os("VERGER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let paths = std::fs::read_to_string(shared.join("reference/paths.txt")).expect("shared data");
    let first = paths.lines().next().expect("a reference path");
    std::fs::read(shared.join("data/fruits-360-sample").join(first)).expect("sample image")
}

fn decode(c: &mut Criterion) {
    let jpeg = sample_jpeg();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("jpeg_100x100_to_224x224", |b| {
        b.iter(|| decode_and_resize(&jpeg, 224).expect("decodes"))
    });
    group.finish();
}

fn embed(c: &mut Criterion) {
    let spec = ModelSpec::efficientnet_lite0();
    let weights = weights_file::ensure_weights(&spec, None, None).expect("weights");
    let pixels = decode_and_resize(&sample_jpeg(), spec.input_size)
        .expect("decodes")
        .rgb;
    let mut group = c.benchmark_group("embed");
    group.sample_size(10);
    for backend in [Backend::Flex, Backend::Ndarray] {
        let embedder = Embedder::load(&spec, &weights, backend).expect("weights load");
        for batch in [1usize, 8, 32] {
            let images: Vec<&[u8]> = (0..batch).map(|_| pixels.as_slice()).collect();
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{backend:?}"), batch),
                &images,
                |b, images| b.iter(|| embedder.embed(images).expect("embeds")),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, decode, embed);
criterion_main!(benches);
