//! `decode`: one real Fruits-360 JPEG (100x100) decoded, resized to 224x224 (PIL-compatible
//! bilinear) and normalised to the network's float input, on one thread; and a phone-size
//! photo (the same JPEG upscaled to 4032x3024 with noise, quality 90) decoded at a DCT scale,
//! as verger does, against the full-size decode + resize of before.
//! Run: `cargo bench --bench decode`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use verger::decode::{decode_and_resize, normalise_interleaved_into, resize_rgb};
use verger::embed::ModelSpec;

fn decode(c: &mut Criterion) {
    let spec = ModelSpec::efficientnet_lite0();
    let jpeg = common::sample_jpeg();
    let side = spec.input_size;
    let mut input = vec![0f32; (side * side * 3) as usize];
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("jpeg_100x100_to_224x224", |b| {
        b.iter(|| decode_and_resize(&jpeg, side).expect("decodes"))
    });
    group.bench_function("jpeg_100x100_to_224x224_normalised", |b| {
        b.iter(|| {
            let pixels = decode_and_resize(&jpeg, side).expect("decodes");
            normalise_interleaved_into(&pixels.rgb, spec.mean, spec.std, &mut input);
        })
    });
    let photo = verger::bench::phone_photo(&jpeg, (4032, 3024), 90).expect("a 12 MP photo");
    group.sample_size(20);
    group.bench_function("jpeg_4032x3024_to_224x224_dct_scaled", |b| {
        b.iter(|| decode_and_resize(&photo, side).expect("decodes"))
    });
    group.bench_function("jpeg_4032x3024_to_224x224_full_decode", |b| {
        b.iter(|| {
            let full = image::load_from_memory(&photo)
                .expect("decodes")
                .into_rgb8();
            let (w, h) = full.dimensions();
            resize_rgb(full.into_raw(), w, h, side)
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
