//! `Config::parse` on arbitrary text: it must return `Ok` or `Err`, never
//! panic. A config that parses must also compile into a snapshot with a
//! valid key file, and each route must be found by its own prefix.
#![no_main]

use std::path::Path;

use ai_gateway::config::Config;
use ai_gateway::policy::Snapshot;
use ai_gateway::state::Carried;
use libfuzzer_sys::fuzz_target;

/// A valid key file (JSON; also valid YAML, in case `keys_file` is `.yaml`).
const KEYS: &str = r#"{"k1": {"user": "u", "service": "*"}}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(Path::new("/fuzz/gateway.yaml"), text) else {
        return;
    };
    assert!(!config.listen.is_empty());
    assert!(!config.routes.is_empty());
    let prefixes: Vec<String> = config
        .routes
        .iter()
        .map(|r| {
            assert!(r.path_prefix.starts_with('/'));
            assert!(!r.upstreams.is_empty());
            if let Some(strip) = &r.strip_prefix {
                assert!(r.path_prefix.starts_with(strip.as_str()));
            }
            r.path_prefix.clone()
        })
        .collect();
    let snapshot =
        Snapshot::compile(config, KEYS, 1, &Carried::default()).expect("a valid key file compiles");
    for p in &prefixes {
        let (_, route) = snapshot.router.find(p).expect("a prefix finds its route");
        assert_eq!(&route.prefix, p);
        if let Some(target) = route.upstream_target(p, Some("q=1")) {
            assert!(target.starts_with(b"/"));
            assert!(target.ends_with(b"?q=1"));
        }
    }
});
