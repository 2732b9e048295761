//! Reading YAML, for the configuration and for YAML key files alike: one
//! set of parser options, and the parser's errors turned into
//! [`LoadError`]s that name the file, the line, the column and the setting.
//!
//! The parser is serde-saphyr: pure Rust, written not to panic on any
//! input, with limits on nesting and alias expansion, and it gives each
//! value its position ([`Spanned`]), so checks that run after parsing
//! (a duplicate route, an upstream that does not resolve) still point at
//! the line they are about. The setting an error is about (`routes[2].
//! path_prefix: ...`) is tracked with `serde_path_to_error`, as serde_yaml
//! printed it before.

use std::borrow::Cow;
use std::path::Path;

use serde::de::{Deserialize, DeserializeSeed};
use serde_path_to_error::Segment;
use serde_saphyr::{
    DefaultMessageFormatter, DuplicateKeyPolicy, Error, MergeKeyPolicy, MessageFormatter, Options,
    Spanned,
};

use super::error::{LoadError, Location};

/// Parses `text`, read from `path`, as one YAML document of `T`.
pub(crate) fn from_str<'de, T: Deserialize<'de>>(
    path: &Path,
    text: &'de str,
) -> Result<T, LoadError> {
    let mut setting = String::new();
    serde_saphyr::with_deserializer_from_str_with_options(text, options(text), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            setting = setting_path(e.path().iter(), is_unknown_field(e.inner()));
            e.into_inner()
        })
    })
    .map_err(|e| error(path, &e, &setting))
}

/// Drives `seed` over `text`, read from `path`, as one YAML document (the
/// key file is read entry by entry this way).
pub(crate) fn from_str_seed<'de, S: DeserializeSeed<'de>>(
    path: &Path,
    text: &'de str,
    seed: S,
) -> Result<S::Value, LoadError> {
    serde_saphyr::with_deserializer_from_str_with_options(text, options(text), |de| {
        seed.deserialize(de)
    })
    .map_err(|e| error(path, &e, ""))
}

/// `value` as YAML text (a key file written back).
pub(crate) fn to_string<T: serde::Serialize>(path: &Path, value: &T) -> Result<String, LoadError> {
    serde_saphyr::to_string(value).map_err(|e| LoadError::invalid(path, e.to_string()))
}

/// Where `value` is written, for errors found after parsing.
pub(crate) fn location<T>(value: &Spanned<T>) -> Location {
    let at = value.referenced;
    match (usize::try_from(at.line()), usize::try_from(at.column())) {
        (Ok(line), Ok(column)) if line > 0 => Location::new(line, column),
        _ => Location::default(),
    }
}

/// The parser's options. YAML allows more than the gateway's files need;
/// each departure from the defaults keeps what serde_yaml, used before,
/// accepted and refused.
fn options(text: &str) -> Options {
    let mut o = Options::default();
    // Only `true` and `false` are booleans (YAML 1.2): `yes`, `on` and `y`
    // stay strings, so `enabled: no` is an error rather than a surprise.
    o.strict_booleans = true;
    // A key written twice reaches the visitor: serde refuses a struct field
    // given twice, and the key file's builder reports a key listed twice by
    // its id. The parser's own message would quote the key itself.
    o.duplicate_keys = DuplicateKeyPolicy::PassThrough;
    // `<<` merges are refused by name rather than taken as a key.
    o.merge_keys = MergeKeyPolicy::Error;
    // Errors are one line (`file:line:col: reason`), without source excerpts.
    o.with_snippet = false;
    // The default budget caps a document at 250,000 nodes and a million
    // parser events, fewer than a key file of 100,000 keys holds. Without
    // aliases a node takes at least a byte of text, so the caps grow with
    // the text; the limits on aliases and nesting stay as they are.
    if let Some(budget) = o.budget.as_mut() {
        let room = text.len().saturating_mul(2).saturating_add(1024);
        budget.max_nodes = budget.max_nodes.max(room);
        budget.max_events = budget.max_events.max(room.saturating_mul(2));
    }
    o
}

/// The parser's error as a [`LoadError`] about `path`; `setting` is the
/// path of the setting it is about (empty when unknown).
fn error(path: &Path, err: &Error, setting: &str) -> LoadError {
    let original = original(err);
    let (message, inner_at) = strip_positions(&sanitize(&message(original)));
    // A message that wraps another error (a key file entry) carries the
    // inner error's position in its text: it is the more precise one.
    let location = inner_at
        .or_else(|| {
            original.location().and_then(|l| {
                let line = usize::try_from(l.line()).ok().filter(|n| *n > 0)?;
                Some(Location::new(line, usize::try_from(l.column()).ok()?))
            })
        })
        .unwrap_or_default();
    let message = if setting.is_empty() {
        message
    } else {
        format!("{setting}: {message}")
    };
    LoadError::at(path, location, message)
}

/// The error under the parser's wrappers (alias sites, source excerpts).
fn original(mut err: &Error) -> &Error {
    while let Error::AliasError { error, .. } | Error::WithSnippet { error, .. } = err {
        err = error;
    }
    err
}

fn is_unknown_field(err: &Error) -> bool {
    matches!(original(err), Error::SerdeUnknownField { .. })
}

/// The message of `err`, worded as serde words it (`` expected one of
/// `name`, `path_prefix` ``), which is what serde_yaml printed.
fn message(err: &Error) -> String {
    match err {
        Error::SerdeUnknownField {
            field, expected, ..
        } => unknown("field", field, expected),
        Error::SerdeUnknownVariant {
            variant, expected, ..
        } => unknown("variant", variant, expected),
        // The parser's own wording of these is meant for programmers
        // ("expected sequence start", "use Option<String>").
        Error::Unexpected {
            expected: "sequence start",
            ..
        } => "invalid type: expected a list, such as [a, b]".into(),
        Error::Unexpected {
            expected: "mapping start",
            ..
        } => "invalid type: expected a mapping, such as {key: value}".into(),
        Error::Unexpected {
            expected: "string scalar" | "scalar",
            ..
        } => "invalid type: expected a single value, not a list or a mapping".into(),
        Error::NullIntoString { .. } => "invalid type: null, expected a string".into(),
        Error::InvalidBooleanStrict { .. } => "invalid type: expected true or false".into(),
        other => DefaultMessageFormatter.format_message(other).into_owned(),
    }
}

/// serde's own wording of an unknown field or variant.
fn unknown(what: &str, name: &str, expected: &[&str]) -> String {
    let quoted: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
    match quoted.as_slice() {
        [] => format!("unknown {what} `{name}`, there are no {what}s"),
        [one] => format!("unknown {what} `{name}`, expected {one}"),
        [a, b] => format!("unknown {what} `{name}`, expected {a} or {b}"),
        all => format!(
            "unknown {what} `{name}`, expected one of {}",
            all.join(", ")
        ),
    }
}

/// `routes[2].path_prefix`, from the segments serde_path_to_error
/// recorded. The `value` segments that [`Spanned`] adds are left out (no
/// setting of the gateway is called `value`); for an unknown field the path
/// stops at the mapping that holds it, as serde_yaml's did.
fn setting_path<'a>(segments: impl Iterator<Item = &'a Segment>, unknown_field: bool) -> String {
    let mut parts: Vec<String> = Vec::new();
    for s in segments {
        match s {
            Segment::Seq { index } => match parts.last_mut() {
                Some(last) => last.push_str(&format!("[{index}]")),
                None => parts.push(format!("[{index}]")),
            },
            Segment::Map { key } if key == "value" => {}
            Segment::Map { key } => parts.push(key.clone()),
            Segment::Enum { variant } => parts.push(variant.clone()),
            Segment::Unknown => {}
        }
    }
    if unknown_field {
        parts.pop();
    }
    parts.join(".")
}

/// Control characters in a message (from a quoted value) are escaped, so
/// an error stays one line of plain text.
fn sanitize(message: &str) -> Cow<'_, str> {
    if message.chars().any(char::is_control) {
        Cow::Owned(
            message
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_debug().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(message)
    }
}

/// `message` without the parser's ` at line N, column M` suffixes (the
/// position is printed once, up front), and the first such position.
fn strip_positions(message: &str) -> (String, Option<Location>) {
    const AT: &str = " at line ";
    let mut out = String::with_capacity(message.len());
    let mut first = None;
    let mut rest = message;
    while let Some(i) = rest.find(AT) {
        let (before, tail) = rest.split_at(i);
        out.push_str(before);
        let after = tail.get(AT.len()..).unwrap_or("");
        match parse_position(after) {
            Some((loc, used)) => {
                first = first.or(Some(loc));
                rest = after.get(used..).unwrap_or("");
            }
            None => {
                out.push_str(AT);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    (out, first)
}

/// `N, column M` at the start of `s`: the position and the bytes it takes.
fn parse_position(s: &str) -> Option<(Location, usize)> {
    let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
    let n = digits(s);
    let line: usize = s.get(..n)?.parse().ok()?;
    let rest = s.get(n..)?.strip_prefix(", column ")?;
    let m = digits(rest);
    let column: usize = rest.get(..m)?.parse().ok()?;
    let used = n + ", column ".len() + m;
    Some((Location::new(line, column), used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_taken_out_of_messages() {
        let (m, at) = strip_positions("entry for key ab: unknown field `x` at line 4, column 3");
        assert_eq!(m, "entry for key ab: unknown field `x`");
        assert_eq!(at, Some(Location::new(4, 3)));
        let (m, at) = strip_positions("said at line nine");
        assert_eq!((m.as_str(), at), ("said at line nine", None));
    }

    #[test]
    fn serde_wording_of_unknown_names() {
        assert_eq!(
            unknown("field", "x", &["a", "b", "c"]),
            "unknown field `x`, expected one of `a`, `b`, `c`"
        );
        assert_eq!(
            unknown("variant", "grpc", &["ollama", "openai"]),
            "unknown variant `grpc`, expected `ollama` or `openai`"
        );
    }

    #[test]
    fn errors_name_the_setting_and_its_position() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Doc {
            items: Vec<Spanned<Item>>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Item {
            n: u64,
        }
        let p = Path::new("d.yaml");
        let e = from_str::<Doc>(p, "items:\n  - n: 1\n  - m: 2\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "d.yaml:3:5: items[1]: unknown field `m`, expected `n`");
        let e = from_str::<Doc>(p, "items: {n: 1}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "d.yaml:1:8: items: invalid type: expected a list, such as [a, b]"
        );
        let e = from_str::<Doc>(p, "items:\n  - n: \"\u{7}\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("d.yaml:2:") && !e.contains('\u{7}'), "{e}");
        let d = from_str::<Doc>(p, "items:\n  - n: 1\n  - {n: 2}\n").unwrap();
        assert_eq!(location(&d.items[1]), Location::new(3, 5));
    }
}
