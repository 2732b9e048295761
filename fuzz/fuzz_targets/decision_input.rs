//! The decision target's input, shared by the target (`decision.rs`) and
//! the seed writer (`decision_seeds.rs`). libFuzzer's bytes become an
//! `Input` through `arbitrary`; the enums steer the fuzzer towards the
//! route prefixes and known keys it could not guess through a hash lookup.

use arbitrary::Arbitrary;

/// Path starts that reach the routes (the fuzzer cannot find a prefix
/// through the router's hash lookups) and the dot-segment checks. The path
/// is `PATH_STARTS[path_start % len]` followed by `path_tail`.
pub const PATH_STARTS: &[&str] = &[
    "",
    "/",
    "/ollama",
    "/ollama/",
    "/ollama/api/generate",
    "/ollama/api/generate/",
    "/ollama/api/chat",
    "/ollama/api/generate/../pull",
    "/ollama/api/generate/%2e%2E/",
    "/tts",
    "/tts/",
    "/v1",
    "/v1/",
    "/v1/./",
];

/// The keys of the target's key file, for `KeyIn::Known(i % len)`.
pub const KNOWN_KEYS: &[&str] = &[
    "k-ollama", "k-admin", "k-tts", "k-off", "k-openai", "k-root", "k-ghost",
];

/// The request method.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum MethodIn<'a> {
    Get,
    Post,
    Delete,
    Raw(&'a str),
}

/// A key: one of [`KNOWN_KEYS`], or any bytes.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum KeyIn<'a> {
    Known(u8),
    Raw(&'a [u8]),
}

/// The start of the `Authorization` value (`Raw` bytes as they are).
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Scheme<'a> {
    Bearer,
    LowerBearer,
    Basic,
    Raw(&'a [u8]),
}

/// `Authorization`: scheme, whitespace (`pad_*` % 4 picks none, a space, a
/// tab or a mix), key, whitespace.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct AuthIn<'a> {
    pub scheme: Scheme<'a>,
    pub pad_before: u8,
    pub key: KeyIn<'a>,
    pub pad_after: u8,
}

/// The time of the decision: just before, at, or after `k-tts` expires.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Now {
    Before,
    AtExpiry,
    After,
    Any(i64),
}

/// One request. Header values that HTTP forbids are left out.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Input<'a> {
    pub method: MethodIn<'a>,
    pub path_start: u8,
    pub path_tail: &'a str,
    pub query: Option<&'a str>,
    pub x_api_key: Option<KeyIn<'a>>,
    pub authorization: Option<AuthIn<'a>>,
    pub now: Now,
}
