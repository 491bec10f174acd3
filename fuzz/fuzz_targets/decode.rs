//! Hostile image bytes: `decode_and_resize_within` must return `Ok` with a `side x side` RGB8
//! buffer or an `Err`, never panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verger::decode::decode_and_resize_within;

const SIDE: u32 = 224;
/// A small budget, so that the fuzzer does not spend its time on huge (legitimate) images.
const MAX_PIXELS: u64 = 4_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(pixels) = decode_and_resize_within(data, SIDE, MAX_PIXELS) {
        assert_eq!(
            pixels.rgb.len(),
            (SIDE * SIDE * 3) as usize,
            "{}x{} picture resized to a buffer of the wrong size",
            pixels.width,
            pixels.height
        );
        assert!(pixels.width > 0 && pixels.height > 0, "Ok with an empty picture");
    }
});
