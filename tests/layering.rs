//! The layering rule of `src/`: each folder may import only the layers below
//! it (see the table in `src/lib.rs`). This reads every `crate::…` path in
//! the code of each folder and fails, naming the file and line, on one that
//! reaches a layer it may not.

use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A layer may import itself and those before it.
const LAYERS: &[&str] = &[
    "config", "keys", "state", "tls", "usage", "policy", "ops", "cluster", "proxy", "daemon",
];

/// Modules at the top of `src/` that stand above every layer.
const TOP: &[&str] = &["cli", "lib", "main"];

/// One import a layer may not make.
#[derive(Debug, PartialEq, Eq)]
struct Violation {
    file: String,
    line: usize,
    from: String,
    to: String,
}

/// The layer a `crate::NAME` path reaches, for every such path in `code`
/// (comments skipped), with its 1-based line number.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in code.lines().enumerate() {
        let code_part = line.split("//").next().unwrap_or("");
        let mut rest = code_part;
        while let Some(at) = rest.find("crate::") {
            // `crate::` inside a longer identifier (e.g. `my_crate::`) is not ours.
            let before = &rest[..at];
            let standalone = !before
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            let after = &rest[at + "crate::".len()..];
            // A grouped import (`crate::{a, b}`) is reported as `{`: the
            // rule wants one `use` per layer, so each can be checked.
            let name: String = if after.starts_with('{') {
                "{".to_string()
            } else {
                after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect()
            };
            if standalone && !name.is_empty() {
                out.push((i + 1, name));
            }
            rest = after;
        }
    }
    out
}

/// The imports in `code` (a file of layer `from`) that break the rule.
fn check_file(file: &str, from: &str, code: &str) -> Vec<Violation> {
    let Some(level) = LAYERS.iter().position(|l| *l == from) else {
        return Vec::new();
    };
    crate_paths(code)
        .into_iter()
        .filter_map(|(line, to)| {
            // Anything but a layer at or below this one is refused: a top
            // module, a higher layer, a grouped import.
            let allowed = LAYERS
                .iter()
                .position(|l| *l == to)
                .is_some_and(|target| target <= level);
            (!allowed).then(|| Violation {
                file: file.to_string(),
                line,
                from: from.to_string(),
                to,
            })
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_layer_imports_a_higher_one() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    let mut violations = Vec::new();
    for layer in LAYERS {
        let dir = src.join(layer);
        assert!(
            dir.is_dir(),
            "the layer {layer} has no folder {}",
            dir.display()
        );
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        for f in files {
            let code = fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let name = f.strip_prefix(&src).unwrap_or(&f).display().to_string();
            violations.extend(check_file(&name, layer, &code));
            checked += 1;
        }
    }
    assert!(checked >= LAYERS.len(), "only {checked} files checked");
    let report: Vec<String> = violations
        .iter()
        .map(|v| {
            format!(
                "src/{}:{}: the {} layer imports crate::{}, which is above it",
                v.file, v.line, v.from, v.to
            )
        })
        .collect();
    assert!(report.is_empty(), "\n{}", report.join("\n"));
}

#[test]
fn only_the_top_level_modules_sit_beside_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in fs::read_dir(&src).expect("read src") {
        let p = entry.expect("entry").path();
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let known = if p.is_dir() {
            LAYERS.contains(&stem)
        } else {
            TOP.contains(&stem)
        };
        assert!(
            known,
            "{} is neither a layer folder nor a top-level module: add it to a layer",
            p.display()
        );
    }
}

#[test]
fn the_checker_catches_a_wrong_import() {
    let code = "//! uses crate::proxy in a comment only\n\
                use crate::config::Config;\n\
                use crate::proxy::Gateway; // not allowed\n\
                fn f() { let _ = crate::ops::Metrics::new(); }\n";
    let v = check_file("policy/x.rs", "policy", code);
    assert_eq!(
        v,
        vec![
            Violation {
                file: "policy/x.rs".into(),
                line: 3,
                from: "policy".into(),
                to: "proxy".into(),
            },
            Violation {
                file: "policy/x.rs".into(),
                line: 4,
                from: "policy".into(),
                to: "ops".into(),
            },
        ]
    );
    assert!(check_file("daemon/x.rs", "daemon", code).is_empty());
    assert_eq!(
        check_file("config/x.rs", "config", "use crate::cli::Cli;\n").len(),
        1,
        "the top modules are above every layer"
    );
    assert!(crate_paths("use my_crate::x;\n").is_empty());
    assert_eq!(
        check_file("ops/x.rs", "ops", "use crate::{config, proxy};\n").len(),
        1,
        "a grouped import is reported"
    );
}
