//! `embed`: the network's forward pass on one thread at batch 1, 8 and 32, for every engine
//! compiled in (images/s = batch / time). Run: `cargo bench --bench embed`.

mod common;

use clap::ValueEnum;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use verger::decode::decode_and_resize;
use verger::embed::{Backend, ModelSpec};

fn embed(c: &mut Criterion) {
    let spec = ModelSpec::efficientnet_lite0();
    let pixels = decode_and_resize(&common::sample_jpeg(), spec.input_size)
        .expect("decodes")
        .rgb;
    let mut group = c.benchmark_group("embed");
    group.sample_size(10);
    for &backend in Backend::value_variants() {
        let embedder = common::embedder(backend);
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

criterion_group!(benches, embed);
criterion_main!(benches);
