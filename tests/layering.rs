//! The layering rule of `src/`: each folder may import only the layers below
//! it (see the table in `src/lib.rs`). This reads every `crate::…` path in
//! the code of each folder and fails, naming the file and line, on one that
//! reaches a layer it may not.

use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A layer may import itself and those before it.
const LAYERS: &[&str] = &[
    "config", "keys", "state", "tls", "usage", "policy", "ops", "cluster", "admin", "proxy",
    "daemon",
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

/// The `crate::` names a layer's `mod.rs` allows in its "May import:"
/// paragraph (backquoted names up to the paragraph's first full stop);
/// "every other layer" allows every layer below it.
fn documented_imports(layer: &str, doc: &str) -> Vec<String> {
    let Some(at) = doc.find("May import:") else {
        panic!("src/{layer}/mod.rs does not say what it may import (\"May import:\")");
    };
    let para: String = doc[at..]
        .lines()
        .map(|l| l.trim_start_matches("//!").trim())
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let sentence = para.split(". ").next().unwrap_or(&para);
    // What stands in parentheses explains; it lists nothing.
    let mut depth = 0usize;
    let sentence: String = sentence
        .chars()
        .filter(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect();
    let sentence = sentence.as_str();
    if sentence.contains("every other layer") {
        let level = LAYERS.iter().position(|l| *l == layer).unwrap_or(0);
        return LAYERS[..level].iter().map(|l| l.to_string()).collect();
    }
    sentence
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn each_layer_imports_only_what_its_doc_lists() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut report = Vec::new();
    for (level, layer) in LAYERS.iter().enumerate() {
        let doc = fs::read_to_string(src.join(layer).join("mod.rs")).expect("mod.rs");
        let allowed = documented_imports(layer, &doc);
        for name in &allowed {
            match LAYERS.iter().position(|l| l == name) {
                Some(i) if i < level => {}
                _ => report.push(format!(
                    "src/{layer}/mod.rs: lists `{name}`, which is not a layer below {layer}"
                )),
            }
        }
        let mut files = Vec::new();
        rust_files(&src.join(layer), &mut files);
        for f in files {
            let code = fs::read_to_string(&f).expect("read");
            for (line, to) in crate_paths(&code) {
                if to != *layer && !allowed.contains(&to) {
                    report.push(format!(
                        "{}:{line}: imports crate::{to}, which src/{layer}/mod.rs does not list",
                        f.display()
                    ));
                }
            }
        }
    }
    assert!(report.is_empty(), "\n{}", report.join("\n"));
}

/// The module path of a file under `src/` (`proxy/connection/mod.rs` is
/// `["proxy", "connection"]`).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The modules a file names through `super::`, `self::` and `crate::`
/// paths, as absolute module paths (as far as they go; a grouped
/// `super::{a, b}` names each of `a` and `b`).
fn named_modules(module: &[String], is_mod_rs: bool, code: &str) -> Vec<Vec<String>> {
    let is_path_char = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(start) = rest.find(|c: char| is_path_char(c)) {
            let tail = &rest[start..];
            let len = tail.find(|c: char| !is_path_char(c)).unwrap_or(tail.len());
            let token = &tail[..len];
            let after = &tail[len..];
            rest = after;
            let segments: Vec<&str> = token.split("::").collect();
            // The module a file's `self` is: itself (a mod.rs is its
            // folder's module); each `super` goes one up.
            let mut base: Vec<String> = module.to_vec();
            let mut i = 0;
            match segments.first().copied() {
                Some("crate") => {
                    base.clear();
                    i = 1;
                }
                Some("super") => {
                    while segments.get(i) == Some(&"super") {
                        base.pop();
                        i += 1;
                    }
                }
                Some("self") if is_mod_rs => i = 1,
                _ => continue,
            }
            let named: Vec<String> = segments[i..]
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.to_string())
                .collect();
            if named.is_empty() && after.starts_with('{') {
                let group = after[1..].split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let first = item.trim().split("::").next().unwrap_or("").trim();
                    if !first.is_empty() && first != "self" {
                        let mut m = base.clone();
                        m.push(first.to_string());
                        out.push(m);
                    }
                }
            } else {
                base.extend(named);
                out.push(base);
            }
        }
    }
    out
}

/// A circle among the children of one module (files and subfolders of
/// one folder), if any, as the names on it.
fn find_circle(
    edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut circle = stack[at..].to_vec();
            circle.push(n.to_string());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = Default::default();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_circle_between_the_files_of_a_folder() {
    use std::collections::{BTreeMap, BTreeSet};
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // main.rs is a crate of its own.
    files.retain(|f| !f.ends_with("main.rs"));
    // For each folder (module), the edges between its children.
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in &files {
        let module = module_path(&src, f);
        let is_mod_rs = f
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let code = fs::read_to_string(f).expect("read");
        let code = before_tests(&code);
        for target in named_modules(&module, is_mod_rs, code) {
            // The deepest folder both paths are inside, and the child of
            // it each one is in.
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            let (Some(from), Some(to)) = (module.get(common), target.get(common)) else {
                continue;
            };
            graphs
                .entry(module[..common].to_vec())
                .or_default()
                .entry(from.clone())
                .or_default()
                .insert(to.clone());
        }
    }
    let circles: Vec<String> = graphs
        .iter()
        .filter_map(|(folder, edges)| {
            find_circle(edges).map(|c| format!("src/{}: {}", folder.join("/"), c.join(" -> ")))
        })
        .collect();
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_circle_finder_finds_one() {
    let mut edges = std::collections::BTreeMap::new();
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
    edges.insert("connection".to_string(), set(&["gateway", "clock"]));
    edges.insert("gateway".to_string(), set(&["clock"]));
    assert_eq!(find_circle(&edges), None);
    edges.insert("gateway".to_string(), set(&["connection"]));
    assert_eq!(
        find_circle(&edges),
        Some(vec![
            "connection".into(),
            "gateway".into(),
            "connection".into()
        ])
    );
    let m = |s: &str| s.split('/').map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        named_modules(
            &m("proxy/gateway"),
            false,
            "use super::clock::Signal;\nuse crate::ops::Metrics;"
        ),
        vec![m("proxy/clock/Signal"), m("ops/Metrics")]
    );
    assert_eq!(
        named_modules(
            &m("proxy/connection"),
            true,
            "use self::slots::Slots;\nuse super::super::x;\nuse super::{ai, clock::Signal};"
        ),
        vec![
            m("proxy/connection/slots/Slots"),
            m("x"),
            m("proxy/ai"),
            m("proxy/clock")
        ]
    );
}

/// Where the code may start threads or tasks, and why; each layer named
/// here says so in its `mod.rs` (the word "spawns").
const SPAWNERS: &[(&str, &str, &str)] = &[
    ("daemon/", "threads and tasks", "start-up owns every thread"),
    (
        "cluster/",
        "tasks",
        "on the runtime the daemon starts for it: the pub/sub listener and Redis calls off the request path",
    ),
    (
        "proxy/connection/",
        "tasks",
        "one per HTTP/2 stream, as Pingora's own accept loop does",
    ),
];

#[test]
fn only_the_layers_whose_doc_says_so_spawn() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut report = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap_or(f).display().to_string();
        let code = fs::read_to_string(f).expect("read");
        let code = before_tests(&code);
        for (i, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or("");
            let thread = ["thread::spawn", "thread::Builder", "thread::scope"]
                .iter()
                .any(|p| line.contains(p));
            let task = !thread
                && ["spawn(", "spawn_blocking", "spawn_local", "JoinSet"]
                    .iter()
                    .any(|p| line.contains(p));
            let allowed = SPAWNERS.iter().find(|(dir, _, _)| rel.starts_with(dir));
            let ok = match allowed {
                Some((_, what, _)) => !thread || what.contains("threads"),
                None => !thread && !task,
            };
            if !ok {
                report.push(format!("src/{rel}:{}: spawns, and may not", i + 1));
            }
        }
    }
    for (dir, what, why) in SPAWNERS {
        let layer = dir.split('/').next().unwrap_or_default();
        let doc = fs::read_to_string(src.join(layer).join("mod.rs")).expect("mod.rs");
        if !doc.contains("spawns") {
            report.push(format!(
                "src/{layer}/mod.rs does not say that it spawns {what} ({why})"
            ));
        }
    }
    assert!(report.is_empty(), "\n{}", report.join("\n"));
}

/// The code of a file before its `#[cfg(test)] mod tests` (a
/// `#[cfg(test)]` on a single item does not end the checked part).
fn before_tests(code: &str) -> &str {
    let mut at = 0;
    for line in code.split_inclusive('\n') {
        let rest = &code[at + line.len()..];
        if line.trim() == "#[cfg(test)]" && rest.trim_start().starts_with("mod tests") {
            return &code[..at];
        }
        at += line.len();
    }
    code
}
