//! Writes the `decision` target's seed inputs: one file per request shape,
//! each encoded the way `arbitrary` decodes an `Input`, and checked by
//! decoding it again. Not a fuzz target; run it after changing
//! `decision_input.rs`:
//!
//!     cargo +nightly fuzz build decision_seeds
//!     target/x86_64-unknown-linux-gnu/release/decision_seeds seeds/decision

use arbitrary::{Arbitrary, Unstructured};

#[path = "../fuzz_targets/decision_input.rs"]
mod decision_input;
use decision_input::{AuthIn, Input, KeyIn, MethodIn, Now, Scheme, KNOWN_KEYS, PATH_STARTS};

/// An `arbitrary` encoding: fixed-size values are read from the front,
/// lengths from the back (one byte each while the input is at most 256
/// bytes long, which `finish` checks).
#[derive(Default)]
struct Enc {
    front: Vec<u8>,
    lens: Vec<u8>,
}

impl Enc {
    /// Variant `k` of `n`: the derive picks `(u32 * n) >> 32`.
    fn variant(&mut self, k: u64, n: u64) {
        let v = u32::try_from((k << 32).div_ceil(n)).unwrap();
        self.front.extend_from_slice(&v.to_le_bytes());
    }
    fn byte(&mut self, b: u8) {
        self.front.push(b);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.lens.push(u8::try_from(b.len()).unwrap());
        self.front.extend_from_slice(b);
    }
    fn key(&mut self, k: &KeyIn) {
        match k {
            KeyIn::Known(i) => {
                self.variant(0, 2);
                self.byte(*i);
            }
            KeyIn::Raw(b) => {
                self.variant(1, 2);
                self.bytes(b);
            }
        }
    }
    fn input(mut self, input: &Input) -> Vec<u8> {
        match input.method {
            MethodIn::Get => self.variant(0, 4),
            MethodIn::Post => self.variant(1, 4),
            MethodIn::Delete => self.variant(2, 4),
            MethodIn::Raw(m) => {
                self.variant(3, 4);
                self.bytes(m.as_bytes());
            }
        }
        self.byte(input.path_start);
        self.bytes(input.path_tail.as_bytes());
        self.byte(u8::from(input.query.is_some()));
        if let Some(q) = input.query {
            self.bytes(q.as_bytes());
        }
        self.byte(u8::from(input.x_api_key.is_some()));
        if let Some(k) = &input.x_api_key {
            self.key(k);
        }
        self.byte(u8::from(input.authorization.is_some()));
        if let Some(a) = &input.authorization {
            match a.scheme {
                Scheme::Bearer => self.variant(0, 4),
                Scheme::LowerBearer => self.variant(1, 4),
                Scheme::Basic => self.variant(2, 4),
                Scheme::Raw(s) => {
                    self.variant(3, 4);
                    self.bytes(s);
                }
            }
            self.byte(a.pad_before);
            self.key(&a.key);
            self.byte(a.pad_after);
        }
        match input.now {
            Now::Before => self.variant(0, 4),
            Now::AtExpiry => self.variant(1, 4),
            Now::After => self.variant(2, 4),
            Now::Any(t) => {
                self.variant(3, 4);
                self.front.extend_from_slice(&t.to_le_bytes());
            }
        }
        let mut out = self.front;
        out.extend(self.lens.iter().rev());
        assert!(out.len() <= 256, "a seed must stay under 257 bytes");
        out
    }
}

fn start(s: &str) -> u8 {
    u8::try_from(PATH_STARTS.iter().position(|p| *p == s).unwrap()).unwrap()
}

fn known(k: &str) -> KeyIn<'static> {
    KeyIn::Known(u8::try_from(KNOWN_KEYS.iter().position(|x| *x == k).unwrap()).unwrap())
}

fn bearer(key: KeyIn<'static>) -> Option<AuthIn<'static>> {
    Some(AuthIn {
        scheme: Scheme::Bearer,
        pad_before: 0,
        key,
        pad_after: 0,
    })
}

fn req(method: MethodIn<'static>, at: &str, tail: &'static str) -> Input<'static> {
    Input {
        method,
        path_start: start(at),
        path_tail: tail,
        query: None,
        x_api_key: None,
        authorization: None,
        now: Now::Before,
    }
}

fn seeds() -> Vec<(&'static str, Input<'static>)> {
    use MethodIn::{Delete, Get, Post, Raw};
    vec![
        (
            "root-get",
            Input {
                x_api_key: Some(known("k-root")),
                ..req(Get, "/", "models")
            },
        ),
        (
            "generate-bearer-query",
            Input {
                query: Some("stream=false"),
                authorization: Some(AuthIn {
                    scheme: Scheme::Bearer,
                    pad_before: 1,
                    key: known("k-ollama"),
                    pad_after: 2,
                }),
                ..req(Post, "/ollama/api/generate", "")
            },
        ),
        (
            "generate-get-405",
            Input {
                x_api_key: Some(known("k-ollama")),
                ..req(Get, "/ollama/api/generate", "")
            },
        ),
        (
            "chat-wrong-service",
            Input {
                x_api_key: Some(known("k-tts")),
                ..req(Post, "/ollama/api/chat", "")
            },
        ),
        (
            "dot-escape",
            Input {
                x_api_key: Some(known("k-ollama")),
                ..req(Post, "/ollama/api/generate/../pull", "")
            },
        ),
        (
            "encoded-dot-escape",
            Input {
                x_api_key: Some(known("k-ollama")),
                ..req(Post, "/ollama/api/generate/%2e%2E/", "pull")
            },
        ),
        (
            "dot-lookalike",
            Input {
                x_api_key: Some(known("k-ollama")),
                ..req(Post, "/ollama/api/generate/", "..x/.y/%2e%2e%2e")
            },
        ),
        (
            "tts-expired",
            Input {
                x_api_key: Some(known("k-tts")),
                now: Now::AtExpiry,
                ..req(Post, "/tts/", "speak")
            },
        ),
        (
            "tts-bare-query",
            Input {
                query: Some("voice=a&x=%20"),
                x_api_key: Some(known("k-tts")),
                ..req(Get, "/tts", "x")
            },
        ),
        (
            "openai-lower-bearer",
            Input {
                authorization: Some(AuthIn {
                    scheme: Scheme::LowerBearer,
                    pad_before: 2,
                    key: known("k-openai"),
                    pad_after: 3,
                }),
                ..req(Post, "/v1/", "chat/completions")
            },
        ),
        (
            "disabled",
            Input {
                x_api_key: Some(known("k-off")),
                ..req(Get, "/v1/", "models")
            },
        ),
        (
            "unknown-and-basic",
            Input {
                x_api_key: Some(KeyIn::Raw(b"nope")),
                authorization: Some(AuthIn {
                    scheme: Scheme::Basic,
                    pad_before: 0,
                    key: known("k-admin"),
                    pad_after: 0,
                }),
                ..req(Get, "/v1/", "models")
            },
        ),
        (
            "basic-only",
            Input {
                authorization: Some(AuthIn {
                    scheme: Scheme::Basic,
                    pad_before: 0,
                    key: known("k-admin"),
                    pad_after: 0,
                }),
                ..req(Get, "/v1/", "models")
            },
        ),
        (
            "raw-auth-scheme",
            Input {
                authorization: Some(AuthIn {
                    scheme: Scheme::Raw(b"BEARER"),
                    pad_before: 1,
                    key: known("k-admin"),
                    pad_after: 0,
                }),
                ..req(Get, "/v1/", "models")
            },
        ),
        (
            "ghost-unserved",
            Input {
                authorization: bearer(known("k-ghost")),
                ..req(Get, "/", "")
            },
        ),
        (
            "admin-delete",
            Input {
                x_api_key: Some(known("k-admin")),
                ..req(Delete, "/ollama/", "api/delete")
            },
        ),
        (
            "raw-method-405",
            Input {
                x_api_key: Some(known("k-admin")),
                ..req(Raw("PATCH"), "/v1/", "x")
            },
        ),
        ("missing-key", req(Get, "/v1/", "models")),
        (
            "both-headers",
            Input {
                x_api_key: Some(known("k-admin")),
                authorization: bearer(known("k-off")),
                ..req(Post, "/ollama/api/chat", "")
            },
        ),
        (
            "no-route",
            Input {
                x_api_key: Some(known("k-admin")),
                ..req(Get, "", "ollama")
            },
        ),
        (
            "far-past",
            Input {
                x_api_key: Some(known("k-tts")),
                now: Now::Any(i64::MIN),
                ..req(Post, "/tts", "/v2")
            },
        ),
    ]
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: decision_seeds DIR");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, input) in seeds() {
        let bytes = Enc::default().input(&input);
        let back = Input::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
        assert_eq!(back, input, "{name} does not decode to itself");
        std::fs::write(format!("{dir}/{name}"), &bytes).unwrap();
        println!("{name}: {} bytes", bytes.len());
    }
}
