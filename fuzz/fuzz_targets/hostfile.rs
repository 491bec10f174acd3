//! Hostile hostfile text: `parse_hostfile` returns only clean `host:port` entries, and its
//! error line numbers are within the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verger::cluster::parse_hostfile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_hostfile(text) {
        Ok(hosts) => {
            for entry in &hosts {
                assert!(!entry.is_empty(), "empty entry");
                assert!(!entry.contains('#'), "entry {entry:?} holds a comment");
                assert!(
                    !entry.chars().any(char::is_whitespace),
                    "entry {entry:?} holds whitespace"
                );
                let (_, port) = entry
                    .rsplit_once(':')
                    .unwrap_or_else(|| panic!("entry {entry:?} has no `:port`"));
                match port.parse::<u16>() {
                    Ok(p) if p > 0 => {}
                    _ => panic!("entry {entry:?}: {port:?} is not a port 1-65535"),
                }
            }
        }
        Err((line, reason)) => {
            let lines = text.lines().count();
            assert!(
                (1..=lines).contains(&line),
                "error line {line} outside 1..={lines} ({reason})"
            );
        }
    }
});
