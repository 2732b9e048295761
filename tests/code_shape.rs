//! The shape of the code in `src/`: no function longer than
//! [`MAX_FN_LINES`] and no file longer than [`MAX_FILE_LINES`] without its
//! tests, so each can be read at once. Fails naming the file, line and
//! length.

use std::fs;
use std::path::{Path, PathBuf};

/// The longest a function may be, signature to closing brace.
const MAX_FN_LINES: usize = 120;

/// The longest a file may be before its `#[cfg(test)]` module.
const MAX_FILE_LINES: usize = 900;

/// `code` with string, raw string and char literals and comments blanked
/// out (newlines kept), so the braces left are the code's own.
fn code_only(code: &str) -> String {
    let b = code.as_bytes();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    let blank = |out: &mut String, s: &[u8]| {
        out.extend(s.iter().map(|c| if *c == b'\n' { '\n' } else { ' ' }));
    };
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            rest.iter().position(|c| *c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            find(rest, b"*/").map_or(rest.len(), |n| n + 2)
        } else if let Some(hashes) = raw_string_start(rest) {
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let open = hashes + 2 + usize::from(rest[0] == b'b');
            find(&rest[open..], &close).map_or(rest.len(), |n| open + n + close.len())
        } else if rest[0] == b'"' || rest.starts_with(b"b\"") {
            let start = if rest[0] == b'b' { 2 } else { 1 };
            let mut j = start;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(rest.len())
        } else if let Some(n) = char_literal_len(rest) {
            n
        } else {
            out.push(rest[0] as char);
            i += 1;
            continue;
        };
        blank(&mut out, &rest[..end]);
        i += end;
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `r"`, `r#"`, `br##"`...: the number of hashes, if a raw string starts.
fn raw_string_start(s: &[u8]) -> Option<usize> {
    let s = s.strip_prefix(b"b").unwrap_or(s);
    let s = s.strip_prefix(b"r")?;
    let hashes = s.iter().take_while(|c| **c == b'#').count();
    (s.get(hashes) == Some(&b'"')).then_some(hashes)
}

/// The length of a char literal (`'x'`, `b'{'`, `'\n'`) at the start of
/// `s`, if one starts there (a lifetime `'a` does not).
fn char_literal_len(s: &[u8]) -> Option<usize> {
    let start = if s.starts_with(b"b'") { 1 } else { 0 };
    if s.get(start) != Some(&b'\'') {
        return None;
    }
    let body = &s[start + 1..];
    let n = match body.first()? {
        b'\\' => body.iter().skip(1).position(|c| *c == b'\'')? + 1,
        _ => {
            let ch = std::str::from_utf8(&body[..body.len().min(4)])
                .ok()
                .or_else(|| std::str::from_utf8(&body[..1]).ok())?
                .chars()
                .next()?
                .len_utf8();
            if body.get(ch) != Some(&b'\'') {
                return None;
            }
            ch
        }
    };
    Some(start + 1 + n + 1)
}

/// Each function in `code` (before its tests): name, first line, length.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let mut depth = 0i32;
        let mut opened = false;
        for (j, l) in lines.iter().enumerate().skip(i) {
            if !opened && depth == 0 && l.contains(';') && !l.contains('{') {
                break;
            }
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth <= 0 {
                found.push((name.clone(), i + 1, j - i + 1));
                break;
            }
        }
    }
    found
}

/// The name of the function a line starts, if it does.
fn fn_name(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "fn")?;
    let before_ok = words[..at].iter().all(|w| {
        w.starts_with("pub") || matches!(*w, "async" | "const" | "unsafe" | "extern" | "default")
    });
    let name: String = words
        .get(at + 1)?
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (before_ok && !name.is_empty()).then_some(name)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn functions_and_files_are_short_enough_to_read_at_once() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut report = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).expect("read");
        let code = code_only(&text);
        let code = before_tests(&code);
        let rel = f.strip_prefix(&src).unwrap_or(f).display();
        let n = code.lines().count();
        if n > MAX_FILE_LINES {
            report.push(format!(
                "src/{rel}: {n} lines before its tests (at most {MAX_FILE_LINES})"
            ));
        }
        for (name, line, len) in functions(code) {
            if len > MAX_FN_LINES {
                report.push(format!(
                    "src/{rel}:{line}: fn {name} is {len} lines (at most {MAX_FN_LINES})"
                ));
            }
        }
    }
    assert!(files.len() > 50, "only {} files found", files.len());
    assert!(report.is_empty(), "\n{}", report.join("\n"));
}

#[test]
fn the_measure_sees_through_literals_and_comments() {
    let code = "fn a() {\n    let s = \"}}\"; // }\n    let c = b'{';\n    let r = r#\"{\"#;\n    /* { */\n    let l: &'static str = \"x\";\n}\nfn b() -> u8 { 1 }\nfn c();\n";
    let found = functions(&code_only(code));
    assert_eq!(
        found,
        vec![("a".to_string(), 1, 7), ("b".to_string(), 8, 1)]
    );
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
