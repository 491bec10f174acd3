//! `embed`: the network's forward pass on one thread at batch 1, 8 and 32, for every backend
//! compiled in and for int8 on flex (images/s = batch / time), after tables of where the
//! forward pass spends its time, layer by layer (median of 40 passes), with verger's fused
//! kernels (flex, f32 and int8) and with Burn's own operations (flex-plain). Run:
//! `cargo bench --bench embed` (`VERGER_ISA=avx2` measures the AVX2 kernels on an AVX-512 CPU).

mod common;

use clap::ValueEnum;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use verger::decode::decode_and_resize;
use verger::embed::network::LayerTime;
use verger::embed::{Backend, ModelSpec};

/// Prints the per-layer medians over `passes` forward passes on `backend` (and, for each fused
/// block, the medians of its expansion, depthwise and projection kernels).
fn layer_table(backend: Backend, pixels: &[u8], passes: usize) {
    layer_table_of(&common::embedder(backend), backend, "f32", pixels, passes);
}

/// [`layer_table`] of a loaded `embedder` on `backend`, in `precision`.
fn layer_table_of(
    embedder: &verger::embed::Embedder,
    backend: Backend,
    precision: &str,
    pixels: &[u8],
    passes: usize,
) {
    let runs: Vec<Vec<LayerTime>> = (0..passes + 5)
        .map(|_| embedder.layer_times(pixels))
        .skip(5)
        .collect();
    let Some(first) = runs.first() else {
        return;
    };
    let median = |mut t: Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2] * 1e3
    };
    let ms = |f: &dyn Fn(&LayerTime) -> Option<Duration>, i: usize| {
        let t: Option<Vec<f64>> = runs
            .iter()
            .map(|r| f(&r[i]).map(|d| d.as_secs_f64()))
            .collect();
        t.map(median)
    };
    let medians: Vec<f64> = (0..first.len())
        .map(|i| ms(&|l| Some(l.time), i).unwrap_or(0.0))
        .collect();
    let total: f64 = medians.iter().sum();
    let path = match backend.fused() {
        true => format!(
            "verger's kernels, {}",
            verger::embed::kernels::instruction_set()
        ),
        false => "Burn's own operations".to_string(),
    };
    println!("{backend:?} {precision} forward pass ({path}), median of {passes}, one thread (ms):");
    println!("| layer | ms | share | expand | depthwise | project |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (i, (l, t)) in first.iter().zip(&medians).enumerate() {
        let part = |k: usize| {
            ms(&|l| l.kernels.map(|p| p[k]), i).map_or(String::new(), |v| format!("{v:.3}"))
        };
        println!(
            "| {} | {t:.3} | {:.1}% | {} | {} | {} |",
            l.layer,
            100.0 * t / total,
            part(0),
            part(1),
            part(2)
        );
    }
    println!("| total | {total:.3} | {:.0} images/s | | | |", 1e3 / total);
}

fn embed(c: &mut Criterion) {
    let spec = ModelSpec::efficientnet_lite0();
    let pixels = decode_and_resize(&common::sample_jpeg(), spec.input_size)
        .expect("decodes")
        .rgb;
    layer_table(Backend::Flex, &pixels, 40);
    let int8 = common::int8_embedder();
    layer_table_of(&int8, Backend::Flex, "int8", &pixels, 40);
    layer_table(Backend::FlexPlain, &pixels, 10);
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
    for batch in [1usize, 8, 32] {
        let images: Vec<&[u8]> = (0..batch).map(|_| pixels.as_slice()).collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("FlexInt8", batch), &images, |b, images| {
            b.iter(|| int8.embed(images).expect("embeds"))
        });
    }
    group.finish();
}

criterion_group!(benches, embed);
criterion_main!(benches);
