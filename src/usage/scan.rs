//! An incremental scanner of top-level JSON object members.
//!
//! Bodies arrive in pieces of any size, split anywhere (inside a key, a
//! string escape, a number). The scanner is fed each piece as it comes and
//! reports, for every top-level object, the members whose keys the caller
//! asked for, with their raw value bytes (up to a limit per key) and their
//! offset in the whole input. Every other value is skipped without being
//! kept, so memory stays bounded whatever the size of the body: a
//! 100,000-token `context` array or a base64 image costs nothing.
//!
//! Keys are compared the way the upstreams' JSON decoders compare them, so
//! that what the gateway reads is what the upstream acts on: escapes are
//! decoded (`"mod\u0065l"` is `model`) and case is ignored, as Go's
//! `encoding/json` (Ollama) does, including its two non-ASCII folds (`ſ` is
//! `s`, the Kelvin sign is `k`).
//!
//! It is not a validator: inside values it only tracks strings and
//! brackets. Structure is right for valid JSON; what it reports for invalid
//! JSON does not matter, because the upstream refuses such a body.

/// Raw key bytes kept for comparison: enough for any wanted key written
/// entirely in `\uXXXX` escapes.
const KEY_LIMIT: usize = 128;

/// What the scanner reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A top-level object begins at this offset (its `{`).
    ObjectStart { at: u64 },
    /// A wanted member: the index of its key in the wanted list, its raw
    /// value (at most the key's limit; `truncated` when longer), and the
    /// offset of the value's first byte.
    Member {
        key: usize,
        raw: &'a [u8],
        at: u64,
        truncated: bool,
    },
    /// The top-level object that began last ends at this offset (its `}`).
    ObjectEnd { at: u64 },
    /// The input is not a sequence of JSON objects (a top-level value of
    /// another kind, or a syntax error between members). Nothing more is
    /// reported.
    NotObjects,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between top-level values.
    Between,
    /// After `{` of a top-level object: a key or `}`.
    KeyOrEnd,
    /// After `,` in a top-level object: a key.
    KeyNext,
    Key,
    KeyEscape,
    Colon,
    /// After `:`: the value's first byte.
    Value,
    Str,
    StrEscape,
    /// Inside an object or array value, `depth` levels deep.
    Nested,
    NestedStr,
    NestedStrEscape,
    /// A number or literal.
    Scalar,
    /// After a member's value: `,` or `}`.
    CommaOrEnd,
    Failed,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Scanner {
    wanted: &'static [(&'static str, usize)],
    /// Bit `n` is set when a wanted key is `n` bytes long.
    wanted_lengths: u128,
    state: State,
    /// Offset of the next byte fed.
    offset: u64,
    depth: u32,
    key: Vec<u8>,
    key_overflow: bool,
    /// The key has an escape (`\`): it must be decoded to be compared.
    key_escaped: bool,
    /// The wanted key just read, until its value starts.
    pending: Option<usize>,
    /// The wanted key whose value is being read, if any.
    capturing: Option<usize>,
    capture: Vec<u8>,
    capture_at: u64,
    capture_truncated: bool,
}

/// The first byte at or after `i` that `stop` is true of, with its index.
#[inline]
fn next_of(input: &[u8], i: usize, stop: impl Fn(u8) -> bool) -> Option<(usize, u8)> {
    let rest = input.get(i..)?;
    let n = rest.iter().position(|c| stop(*c))?;
    rest.get(n).map(|c| (i + n, *c))
}

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Scanner {
    /// A scanner reporting the members named in `wanted` (lower-case keys,
    /// each with the most value bytes to keep).
    pub fn new(wanted: &'static [(&'static str, usize)]) -> Scanner {
        let wanted_lengths = wanted
            .iter()
            .filter(|(k, _)| k.len() < 128)
            .fold(0u128, |m, (k, _)| m | 1 << k.len());
        Scanner {
            wanted,
            wanted_lengths,
            state: State::Between,
            offset: 0,
            depth: 0,
            key: Vec::new(),
            key_overflow: false,
            key_escaped: false,
            pending: None,
            capturing: None,
            capture: Vec::new(),
            capture_at: 0,
            capture_truncated: false,
        }
    }

    /// Whether the input so far is not a sequence of objects.
    pub fn failed(&self) -> bool {
        self.state == State::Failed
    }

    /// Whether the scanner is between top-level values (no object open).
    pub fn between(&self) -> bool {
        self.state == State::Between
    }

    /// Passes over `n` bytes the caller has judged to be one whole
    /// top-level value it does not want read (only between values).
    pub fn skip(&mut self, n: usize) {
        debug_assert!(self.between());
        self.offset += n as u64;
    }

    /// Bytes the scanner keeps between pieces (the key and value buffers):
    /// bounded by the wanted keys' limits, whatever the input.
    #[cfg(test)]
    pub fn kept_bytes(&self) -> usize {
        self.key.capacity() + self.capture.capacity()
    }

    /// Bytes fed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// `State::Key` at `i`: the key up to its closing quote or an escape.
    /// The next state and the index of the byte that ended the part;
    /// `None` when the piece ended inside the key (what was read is kept).
    #[inline]
    fn key_part(&mut self, input: &[u8], i: usize) -> Option<(State, usize)> {
        let rest = input.get(i..).unwrap_or_default();
        let n = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
        let part = rest.get(..n).unwrap_or_default();
        let at = i + n;
        let Some(&c) = input.get(at) else {
            self.keep_key(part);
            return None;
        };
        if c != b'"' {
            self.keep_key(part);
            self.keep_key(&[c]);
            self.key_escaped = true;
            return Some((State::KeyEscape, at));
        }
        // A key within one piece is compared where it is.
        self.pending = if self.key.is_empty() && !self.key_escaped {
            wanted_index(self.wanted, self.wanted_lengths, part, false)
        } else {
            self.keep_key(part);
            if self.key_overflow {
                None
            } else {
                wanted_index(
                    self.wanted,
                    self.wanted_lengths,
                    &self.key,
                    self.key_escaped,
                )
            }
        };
        Some((State::Colon, at))
    }

    /// A byte `b` (at offset `at`) read between the members of the
    /// top-level objects, where only structure and white space may stand:
    /// the next state.
    #[inline]
    fn structural(
        &mut self,
        state: State,
        b: u8,
        at: u64,
        on: &mut impl FnMut(Event<'_>),
    ) -> State {
        match (state, b) {
            (State::Between, b'{') => {
                on(Event::ObjectStart { at });
                State::KeyOrEnd
            }
            (State::KeyOrEnd | State::KeyNext, b'"') => {
                self.key.clear();
                self.key_overflow = false;
                self.key_escaped = false;
                State::Key
            }
            (State::KeyOrEnd | State::CommaOrEnd, b'}') => {
                on(Event::ObjectEnd { at });
                State::Between
            }
            (State::Colon, b':') => {
                self.capturing = self.pending.take();
                State::Value
            }
            (State::CommaOrEnd, b',') => State::KeyNext,
            (_, b) if is_ws(b) => state,
            _ => self.fail(on),
        }
    }

    /// The state a value starting with `b` puts the scanner in
    /// (`State::Scalar` for a literal, read from that byte on).
    #[inline]
    fn value_start(&mut self, b: u8, on: &mut impl FnMut(Event<'_>)) -> State {
        match b {
            b'"' => State::Str,
            b'{' | b'[' => {
                self.depth = 1;
                State::Nested
            }
            b',' | b'}' | b']' | b':' => self.fail(on),
            _ => State::Scalar,
        }
    }

    /// Scans `input`, the next piece of the body, calling `on` for each
    /// event.
    pub fn feed(&mut self, input: &[u8], on: &mut impl FnMut(Event<'_>)) {
        // The state lives in a local while the piece is read; a wanted
        // value that starts in this piece is reported from it (`cap_from`),
        // and copied only when it continues in the next one.
        let mut state = self.state;
        let mut cap_from: Option<usize> = None;
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match state {
                State::Failed => break,
                State::Between
                | State::KeyOrEnd
                | State::KeyNext
                | State::Colon
                | State::CommaOrEnd => {
                    state = self.structural(state, b, self.offset + i as u64, on);
                }
                State::KeyEscape => {
                    state = State::Key;
                    self.keep_key(&[b]);
                }
                State::Key => match self.key_part(input, i) {
                    Some((next, at)) => {
                        state = next;
                        i = at;
                    }
                    None => break,
                },
                State::Value => {
                    if !is_ws(b) {
                        if self.capturing.is_some() {
                            self.capture.clear();
                            self.capture_at = self.offset + i as u64;
                            self.capture_truncated = false;
                            cap_from = Some(i);
                        }
                        state = self.value_start(b, on);
                        if state == State::Scalar {
                            // A literal, read from this byte on.
                            continue;
                        }
                    }
                }
                State::Str | State::NestedStr => {
                    // Skip ahead to the next quote or backslash.
                    let rest = input.get(i..).unwrap_or_default();
                    let Some(n) = memchr::memchr2(b'"', b'\\', rest) else {
                        break;
                    };
                    i += n;
                    state = match (rest.get(n), state) {
                        (Some(b'\\'), State::Str) => State::StrEscape,
                        (Some(b'\\'), _) => State::NestedStrEscape,
                        (_, State::Str) => self.member_done(input, cap_from.take(), i + 1, on),
                        _ => State::Nested,
                    };
                }
                State::StrEscape => state = State::Str,
                State::NestedStrEscape => state = State::NestedStr,
                State::Nested => {
                    // Skip ahead to the next byte that matters.
                    let Some((at, c)) =
                        next_of(input, i, |c| matches!(c, b'"' | b'{' | b'[' | b'}' | b']'))
                    else {
                        break;
                    };
                    i = at;
                    match c {
                        b'"' => state = State::NestedStr,
                        b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                        _ => {
                            self.depth = self.depth.saturating_sub(1);
                            if self.depth == 0 {
                                state = self.member_done(input, cap_from.take(), i + 1, on);
                            }
                        }
                    }
                }
                State::Scalar => {
                    // A literal (a number, `true`, `false`, `null`), up to
                    // its delimiter, which belongs to what follows it; it
                    // may have begun in an earlier piece.
                    match next_of(input, i, |c| is_ws(c) || matches!(c, b',' | b'}' | b']')) {
                        Some((at, _)) => {
                            i = at;
                            state = self.member_done(input, cap_from.take(), i, on);
                        }
                        None => i = input.len(),
                    }
                    continue;
                }
            }
            i += 1;
        }
        // A wanted value that goes on in the next piece: keep what is here.
        if self.capturing.is_some() && state != State::Failed {
            let from = cap_from.unwrap_or(0);
            self.keep(input.get(from..).unwrap_or_default());
        }
        self.state = state;
        self.offset += input.len() as u64;
    }

    /// Ends the input: a number or literal that ends the body with nothing
    /// after it is complete only now. (A top-level object always ends with
    /// `}`, so for valid input this reports nothing.)
    pub fn finish(&mut self, on: &mut impl FnMut(Event<'_>)) {
        if self.state == State::Scalar {
            self.state = self.member_done(&[], None, 0, on);
        }
    }

    #[inline]
    fn keep_key(&mut self, bytes: &[u8]) {
        let room = KEY_LIMIT.saturating_sub(self.key.len());
        if bytes.len() > room {
            self.key_overflow = true;
        }
        self.key
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
    }

    /// Adds to the value being captured, up to its key's limit.
    fn keep(&mut self, bytes: &[u8]) {
        let Some(key) = self.capturing else { return };
        let limit = self.wanted.get(key).map_or(0, |(_, l)| *l);
        let room = limit.saturating_sub(self.capture.len());
        if bytes.len() > room {
            self.capture_truncated = true;
        }
        self.capture
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
    }

    /// A member's value ended just before `end` in `input`; reports it if
    /// it is wanted (from `input` when it began there, at `from`, else from
    /// what earlier pieces left) and returns the state after a value.
    fn member_done(
        &mut self,
        input: &[u8],
        from: Option<usize>,
        end: usize,
        on: &mut impl FnMut(Event<'_>),
    ) -> State {
        let Some(key) = self.capturing.take() else {
            return State::CommaOrEnd;
        };
        let limit = self.wanted.get(key).map_or(0, |(_, l)| *l);
        match from {
            Some(from) => {
                let value = input.get(from..end).unwrap_or_default();
                let truncated = value.len() > limit;
                on(Event::Member {
                    key,
                    raw: value.get(..limit.min(value.len())).unwrap_or_default(),
                    at: self.capture_at,
                    truncated,
                });
            }
            None => {
                self.capturing = Some(key);
                self.keep(input.get(..end).unwrap_or_default());
                self.capturing = None;
                on(Event::Member {
                    key,
                    raw: &self.capture,
                    at: self.capture_at,
                    truncated: self.capture_truncated,
                });
            }
        }
        State::CommaOrEnd
    }

    fn fail(&mut self, on: &mut impl FnMut(Event<'_>)) -> State {
        self.capturing = None;
        on(Event::NotObjects);
        State::Failed
    }
}

/// The index in `wanted` of the key whose raw (still escaped, if
/// `escaped`) bytes are `raw`, compared as Go's `encoding/json` compares
/// keys.
#[inline]
fn wanted_index(
    wanted: &[(&str, usize)],
    lengths: u128,
    raw: &[u8],
    escaped: bool,
) -> Option<usize> {
    // Wanted keys are ASCII: an ASCII match needs no decoding, and an
    // ASCII key of another length matches none.
    let length_wanted = raw.len() < 128 && lengths & (1 << raw.len()) != 0;
    if length_wanted {
        for (i, (k, _)) in wanted.iter().enumerate() {
            let k = k.as_bytes();
            if k.len() == raw.len()
                && k.iter()
                    .zip(raw)
                    .all(|(a, b)| *a == *b || *a == b.to_ascii_lowercase())
            {
                return Some(i);
            }
        }
    }
    if !escaped && raw.is_ascii() {
        return None;
    }
    decoded_index(wanted, raw)
}

/// [`wanted_index`] for a key with escapes or other than ASCII characters.
#[cold]
fn decoded_index(wanted: &[(&str, usize)], raw: &[u8]) -> Option<usize> {
    // Escapes or non-ASCII: decode, then fold.
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    let decoded: String = serde_json::from_slice(&quoted).ok()?;
    let folded: String = decoded
        .chars()
        .map(|c| match c {
            '\u{17f}' => 's',
            '\u{212a}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    wanted.iter().position(|(k, _)| *k == folded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: &[(&str, usize)] = &[("model", 64), ("stream", 8), ("usage", 16)];

    /// Every event for `input` fed in pieces of `step` bytes, as text.
    fn events(input: &str, step: usize) -> Vec<String> {
        let mut s = Scanner::new(WANTED);
        let mut out = Vec::new();
        for piece in input.as_bytes().chunks(step) {
            s.feed(piece, &mut |e| out.push(describe(&e)));
        }
        s.finish(&mut |e| out.push(describe(&e)));
        out
    }

    fn describe(e: &Event<'_>) -> String {
        match e {
            Event::ObjectStart { at } => format!("start@{at}"),
            Event::ObjectEnd { at } => format!("end@{at}"),
            Event::Member {
                key,
                raw,
                at,
                truncated,
            } => format!(
                "{}={}@{at}{}",
                WANTED[*key].0,
                String::from_utf8_lossy(raw),
                if *truncated { "..." } else { "" }
            ),
            Event::NotObjects => "not-objects".into(),
        }
    }

    /// The same events whatever the pieces the input arrives in.
    fn check(input: &str, expected: &[&str]) {
        for step in [1, 2, 3, 7, 64, input.len().max(1)] {
            assert_eq!(
                events(input, step),
                expected,
                "{input:?} in pieces of {step}"
            );
        }
    }

    #[test]
    fn top_level_members_only() {
        check(
            r#"{"messages":[{"model":"no","content":"{\"model\":\"x\"}"}],"model":"llama3.2","stream":true}"#,
            &[
                "start@0",
                r#"model="llama3.2"@67"#,
                "stream=true@87",
                "end@91",
            ],
        );
    }

    #[test]
    fn keys_fold_like_go() {
        check(
            r#"{"MODEL":"a","mod\u0065l":"b","Mo\u0044EL":"c","\u017ftream":false}"#,
            &[
                "start@0",
                r#"model="a"@9"#,
                r#"model="b"@26"#,
                r#"model="c"@43"#,
                "stream=false@61",
                "end@66",
            ],
        );
        // Not the same key: longer, shorter, or only similar.
        check(
            r#"{"models":"a","mode":"b","model ":"c"}"#,
            &["start@0", "end@37"],
        );
    }

    #[test]
    fn nested_values_and_strings_with_brackets_are_skipped() {
        check(
            r#"{"a":{"b":[1,{"c":"]}\"}"}]},"x":[[],[]],"model":"m","e":"\\"}"#,
            &["start@0", r#"model="m"@49"#, "end@61"],
        );
    }

    #[test]
    fn values_longer_than_the_limit_are_truncated() {
        let long = "x".repeat(100);
        let input = format!(r#"{{"model":"{long}","usage":{{"prompt_tokens":12345}}}}"#);
        let ev = events(&input, 5);
        assert_eq!(ev.len(), 4, "{ev:?}");
        assert!(
            ev[1].starts_with("model=\"xxx") && ev[1].ends_with("..."),
            "{ev:?}"
        );
        assert_eq!(ev[1].len(), "model=".len() + 64 + "@9...".len(), "{ev:?}");
        assert_eq!(ev[2], r#"usage={"prompt_tokens"@120..."#);
    }

    #[test]
    fn a_sequence_of_objects_as_ndjson() {
        check(
            "{\"model\":\"m\",\"done\":false}\n{\"done\":true,\"model\":\"m\"}\n",
            &[
                "start@0",
                r#"model="m"@9"#,
                "end@25",
                "start@27",
                r#"model="m"@48"#,
                "end@51",
            ],
        );
    }

    #[test]
    fn scalars_end_at_delimiters_and_at_the_end_of_input() {
        check(
            r#"{ "stream" : true , "usage":null}"#,
            &["start@0", "stream=true@13", "usage=null@28", "end@32"],
        );
        check(r#"{"stream":12"#, &["start@0", "stream=12@10"]);
    }

    #[test]
    fn what_is_not_an_object_stops_the_scanner() {
        check("[1,2]", &["not-objects"]);
        check("hello", &["not-objects"]);
        check(r#"{"model" "x"}{"model":"y"}"#, &["start@0", "not-objects"]);
        check(r#"{"model":,"x":1}"#, &["start@0", "not-objects"]);
        check("{\"a\":1}\ndata: {}", &["start@0", "end@6", "not-objects"]);
        let mut s = Scanner::new(WANTED);
        s.feed(b"]", &mut |_| {});
        assert!(s.failed());
        let mut after = 0;
        s.feed(br#"{"model":"x"}"#, &mut |_| after += 1);
        assert_eq!(after, 0, "nothing is reported once failed");
    }

    #[test]
    fn offsets_count_every_byte_fed() {
        let mut s = Scanner::new(WANTED);
        s.feed(b"  {}", &mut |_| {});
        s.feed(b"\n", &mut |_| {});
        assert_eq!(s.offset(), 5);
        assert!(s.between());
    }
}
