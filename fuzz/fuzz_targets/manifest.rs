//! Hostile manifest JSON: `Manifest::parse` must refuse any manifest listing a key outside
//! `data/` and `errors/` (or escaping with `..` / an absolute path), and what it accepts must
//! survive a serde_json round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verger::commit::Manifest;

fuzz_target!(|data: &[u8]| {
    let key = Manifest::key_for(0);
    let Ok(manifest) = Manifest::parse(&key, data) else {
        return;
    };
    assert_eq!(manifest.key(), key, "accepted a manifest of another epoch");
    for file in &manifest.files {
        let k = &file.key;
        assert!(
            k.starts_with("data/") || k.starts_with("errors/"),
            "accepted file key {k:?} outside data/ and errors/"
        );
        assert!(!k.starts_with('/'), "accepted absolute file key {k:?}");
        assert!(
            !k.split('/').any(|part| part == ".."),
            "accepted file key {k:?} with a `..` component"
        );
    }
    let json = serde_json::to_vec(&manifest).expect("an accepted manifest serialises");
    let again: Manifest = serde_json::from_slice(&json).expect("re-serialised manifest parses");
    assert_eq!(again, manifest, "serde_json round trip changed the manifest");
    let reparsed = Manifest::parse(&key, &json).expect("re-serialised manifest is accepted");
    assert_eq!(reparsed, manifest, "Manifest::parse round trip changed the manifest");
});
