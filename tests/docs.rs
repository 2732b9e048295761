//! The manual: `README.md` and `docs/*.md`.
//!
//! Every relative Markdown link `[text](target)` names a file that exists
//! (relative to the page that holds it), and a `#fragment` names a heading
//! of the target page (its GitHub slug). `README.md` stays short (the rest
//! of the manual lives in `docs/`), and no table row is written twice.
//! Failures name the page, the line and the link.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// README.md stays a summary; the reference lives in docs/.
const README_MAX_LINES: usize = 300;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, then docs/*.md in name order.
fn pages() -> Vec<PathBuf> {
    let root = root();
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .unwrap_or_else(|e| panic!("docs/: {e}"))
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    let mut all = vec![root.join("README.md")];
    all.extend(docs);
    all
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shown(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The lines of a page that are not inside fenced code blocks, with their
/// 1-based line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        match fence {
            None if indent <= 3 && run >= 3 => fence = Some((marker.unwrap(), run)),
            Some((c, n)) if indent <= 3 && marker == Some(c) && run >= n => {
                if trimmed.chars().skip(run).all(char::is_whitespace) {
                    fence = None;
                }
            }
            Some(_) => {}
            None => out.push((i + 1, line)),
        }
    }
    out
}

/// The line with its code spans blanked out, so `[a](b)` inside backticks
/// is not a link.
fn without_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|c| **c == '`').count();
        // The closing run: exactly as many backticks.
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let n = chars[j..].iter().take_while(|c| **c == '`').count();
                if n == run {
                    close = Some(j);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                out.extend(std::iter::repeat_n(' ', j + run - i));
                i = j + run;
            }
            None => {
                out.extend(std::iter::repeat_n('`', run));
                i += run;
            }
        }
    }
    out
}

/// The targets of the inline links `[text](target)` on a line (code spans
/// excluded), without their optional titles.
fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let bytes = line.as_bytes();
    let mut targets = Vec::new();
    let mut i = 0;
    while i + 1 < bytes.len() {
        if bytes[i] == b']' && bytes[i + 1] == b'(' && line[..i].contains('[') {
            let start = i + 2;
            let mut depth = 1;
            let mut j = start;
            while j < bytes.len() {
                match bytes[j] {
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            let inner = line[start..j.min(bytes.len())].trim();
            let target = if let Some(rest) = inner.strip_prefix('<') {
                rest.split('>').next().unwrap_or("")
            } else {
                inner.split_whitespace().next().unwrap_or("")
            };
            targets.push(target.to_string());
            i = j;
        } else {
            i += 1;
        }
    }
    targets
}

fn is_external(target: &str) -> bool {
    let lower = target.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("mailto:")
}

/// GitHub's anchor for a heading: the rendered text, lowercased, spaces to
/// `-`, punctuation other than `-` and `_` dropped.
fn slug(heading: &str) -> String {
    // Links render as their text.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](") else {
            break;
        };
        let Some(close) = rest[open + mid..].find(')') else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..open + mid]);
        rest = &rest[open + mid + close + 1..];
    }
    text.push_str(rest);
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's ATX headings, with GitHub's `-1`, `-2`, ...
/// for repeated ones.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (_, line) in prose_lines(text) {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() > 3 {
            continue;
        }
        let level = trimmed.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&level) {
            continue;
        }
        let after = &trimmed[level..];
        if !(after.is_empty() || after.starts_with(' ') || after.starts_with('\t')) {
            continue;
        }
        let title = after.trim().trim_end_matches('#').trim_end();
        let base = slug(title);
        let n = seen.entry(base.clone()).or_insert(0);
        out.push(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) if bytes[i] == b'%' => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a/b/../c` as `a/c`, without touching the file system.
fn normalized(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The broken links of one page, as `page:line: ...`. `text` is the
/// page's content and `path` where it lives (links resolve from its folder).
fn broken_links(path: &Path, text: &str) -> Vec<String> {
    let name = shown(path);
    let dir = path.parent().expect("a page has a folder");
    let mut problems = Vec::new();
    let mut anchor_cache: HashMap<PathBuf, Vec<String>> = HashMap::new();
    for (line_no, line) in prose_lines(text) {
        for target in link_targets(line) {
            if target.is_empty() {
                problems.push(format!("{name}:{line_no}: empty link target"));
                continue;
            }
            if is_external(&target) {
                continue;
            }
            let (file, fragment) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let file = percent_decode(file);
            let resolved = if file.is_empty() {
                path.to_path_buf()
            } else if let Some(from_root) = file.strip_prefix('/') {
                normalized(&root().join(from_root))
            } else {
                normalized(&dir.join(&file))
            };
            if resolved != path && !resolved.exists() {
                problems.push(format!(
                    "{name}:{line_no}: link `{target}`: {} does not exist",
                    shown(&resolved)
                ));
                continue;
            }
            let Some(fragment) = fragment else { continue };
            if resolved.extension().is_none_or(|e| e != "md") {
                continue; // a code file's #L10 and the like: not headings
            }
            let anchors = anchor_cache.entry(resolved.clone()).or_insert_with(|| {
                if resolved == path {
                    anchors(text)
                } else {
                    anchors(&read(&resolved))
                }
            });
            let fragment = percent_decode(fragment);
            if !anchors.contains(&fragment) {
                problems.push(format!(
                    "{name}:{line_no}: link `{target}`: {} has no heading with the anchor #{fragment}",
                    shown(&resolved)
                ));
            }
        }
    }
    problems
}

#[test]
fn every_relative_link_in_the_manual_resolves() {
    let mut problems = Vec::new();
    let mut links = 0;
    for page in pages() {
        let text = read(&page);
        links += prose_lines(&text)
            .iter()
            .map(|(_, l)| link_targets(l).len())
            .sum::<usize>();
        problems.extend(broken_links(&page, &text));
    }
    assert!(links > 0, "no link found at all: the link reader is broken");
    assert!(
        problems.is_empty(),
        "{} broken link(s) in the manual:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_readme_is_short() {
    let readme = root().join("README.md");
    let lines = read(&readme).lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines, more than {README_MAX_LINES}: move reference text to docs/"
    );
}

#[test]
fn no_table_row_is_written_twice() {
    // The same row twice anywhere in the manual, or the same setting (the
    // first cell) twice in one reference table.
    let mut rows: HashMap<String, Vec<String>> = HashMap::new();
    let mut problems = Vec::new();
    for page in pages() {
        let text = read(&page);
        let name = shown(&page);
        let mut previous = 0;
        let mut header: Option<String> = None;
        let mut first_cells: HashMap<String, usize> = HashMap::new();
        for (line_no, line) in prose_lines(&text) {
            let trimmed = line.trim();
            if !trimmed.starts_with('|') {
                header = None;
                continue;
            }
            let first = trimmed
                .trim_start_matches('|')
                .split('|')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            if header.is_none() || previous + 1 != line_no {
                header = Some(first.to_lowercase());
                first_cells.clear();
                previous = line_no;
                continue;
            }
            previous = line_no;
            if trimmed.chars().all(|c| matches!(c, '|' | '-' | ':' | ' ')) {
                continue;
            }
            rows.entry(trimmed.to_string())
                .or_default()
                .push(format!("{name}:{line_no}"));
            let reference = matches!(
                header.as_deref(),
                Some("setting" | "field" | "command" | "limit" | "check")
            );
            if reference {
                if let Some(earlier) = first_cells.insert(first.clone(), line_no) {
                    problems.push(format!(
                        "{name}:{line_no}: {first} is already a row of this table (line {earlier})"
                    ));
                }
            }
        }
    }
    for (row, places) in rows {
        if places.len() > 1 {
            problems.push(format!("the same row at {}: {row}", places.join(", ")));
        }
    }
    problems.sort();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself: a page with broken links is reported, line by line,
/// and links in code are not links.
#[test]
fn the_link_checker_reports_broken_links() {
    let page = root().join("docs").join("checker-selftest.md");
    let text = "# A page\n\
                \n\
                ## Its `second` heading: yes, (really)\n\
                \n\
                [ok](#its-second-heading-yes-really) [ok](../Cargo.toml) [ok](../README.md)\n\
                [web](https://example.com/x.md) [mail](mailto:a@example.com)\n\
                [gone](missing.md)\n\
                [no heading](#nowhere) and `[in code](nowhere.md)`\n\
                ```\n\
                [in a block](nowhere.md)\n\
                ```\n\
                [a]: not-a-link\n\
                [deeper](../README.md#no-such-heading-anywhere-xyz)\n";
    let problems = broken_links(&page, text);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0].starts_with("docs/checker-selftest.md:7: link `missing.md`"),
        "{problems:#?}"
    );
    assert!(
        problems[1].starts_with("docs/checker-selftest.md:8: link `#nowhere`"),
        "{problems:#?}"
    );
    assert!(
        problems[2].starts_with("docs/checker-selftest.md:13: link `../README.md#no-such"),
        "{problems:#?}"
    );

    assert_eq!(
        slug("Coming from Caddy + Flask"),
        "coming-from-caddy--flask"
    );
    assert_eq!(
        slug("AI usage: tokens, budgets, models"),
        "ai-usage-tokens-budgets-models"
    );
    assert_eq!(
        slug("Listeners (entries of `listen`)"),
        "listeners-entries-of-listen"
    );
    assert_eq!(
        anchors("# A\n## A\n```\n# not a heading\n```\n#nope\n"),
        ["a", "a-1"]
    );
}
