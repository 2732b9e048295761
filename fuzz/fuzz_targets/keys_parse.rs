//! `KeyStore::parse` on arbitrary text, read as JSON (a `.json` name) and as
//! YAML (a `.yaml` name): it must return `Ok` or `Err`, never panic. A store
//! that loads is then asked about a few keys, including words taken from
//! the input itself (so the fuzzer's own keys are found), and its answers
//! must be consistent.
#![no_main]

use std::path::Path;

use ai_gateway::keys::{KeyDenial, KeyDigest, KeyStore, ServiceTable};
use libfuzzer_sys::fuzz_target;

/// Times to check expiry against: the epoch, a day in 2027 and the far ends.
const NOWS: [i64; 4] = [0, 1_798_761_600_000, i64::MIN, i64::MAX];

fn services() -> ServiceTable {
    let mut s = ServiceTable::default();
    for name in ["chat", "tts", "ollama", "openai"] {
        s.intern(name);
    }
    s
}

/// Candidate keys: a few fixed ones and the first words of the input.
fn candidates(text: &str) -> Vec<&[u8]> {
    let mut keys: Vec<&[u8]> = vec![
        b"k1",
        b"k3",
        b"agw_demo_not_a_secret",
        b"e5c4b8c2-537c-47af-94a8-c8489709b49b",
    ];
    keys.extend(
        text.split(|c: char| c.is_whitespace() || "\"'{}[],:".contains(c))
            .filter(|w| !w.is_empty())
            .take(16)
            .map(str::as_bytes),
    );
    keys
}

fn exercise(store: &KeyStore, services: &ServiceTable, text: &str) {
    assert_eq!(store.check(None, 0, 0).unwrap_err(), KeyDenial::Missing);
    assert_eq!(
        store.check(Some(b""), 0, 0).unwrap_err(),
        KeyDenial::Missing
    );
    assert!(store.plaintext_entries <= store.len());
    let n = u16::try_from(services.len()).unwrap_or(u16::MAX);
    for key in candidates(text) {
        // One service past the table too: a grant of "*" allows it, no
        // other grant does.
        for service in 0..=n {
            for now in NOWS {
                match store.check(Some(key), service, now) {
                    Ok(p) => {
                        assert_eq!(p.id, KeyDigest::of(key).id());
                        assert_eq!(p.user.header.as_bytes(), p.user.name.as_bytes());
                        assert!(!p.user.name.trim().is_empty());
                    }
                    Err(KeyDenial::Missing) => panic!("a non-empty key is never Missing"),
                    Err(_) => {}
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let services = services();
    for name in ["/fuzz/keys.json", "/fuzz/keys.yaml"] {
        if let Ok(store) = KeyStore::parse(Path::new(name), text, &services) {
            exercise(&store, &services, text);
        }
    }
});
