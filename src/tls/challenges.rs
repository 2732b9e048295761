//! ACME HTTP-01 challenges in progress: token → key authorization, set by
//! the ACME client while an order is pending and read by the proxy when the
//! ACME server fetches `/.well-known/acme-challenge/TOKEN`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Where HTTP-01 challenge answers live.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The challenges being answered now (a handful at most, while an order
/// is pending; empty the rest of the time).
#[derive(Debug, Default)]
pub struct Challenges {
    tokens: Mutex<HashMap<String, String>>,
}

impl Challenges {
    fn tokens(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, token: &str, key_authorization: &str) {
        self.tokens()
            .insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove(&self, token: &str) {
        self.tokens().remove(token);
    }

    /// The answer for the request path `path`, if it is a challenge path
    /// with a token in progress.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(CHALLENGE_PREFIX)?;
        self.tokens().get(token).cloned()
    }
}

/// Whether `path` is an HTTP-01 challenge path (answered before any key
/// check, and never redirected).
pub fn is_challenge_path(path: &str) -> bool {
    path.starts_with(CHALLENGE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_known_tokens() {
        let c = Challenges::default();
        assert_eq!(c.answer("/.well-known/acme-challenge/abc"), None);
        c.set("abc", "abc.thumb");
        assert_eq!(
            c.answer("/.well-known/acme-challenge/abc").as_deref(),
            Some("abc.thumb")
        );
        assert_eq!(c.answer("/.well-known/acme-challenge/abcd"), None);
        assert_eq!(c.answer("/abc"), None);
        c.remove("abc");
        assert_eq!(c.answer("/.well-known/acme-challenge/abc"), None);
        assert!(is_challenge_path("/.well-known/acme-challenge/x"));
        assert!(!is_challenge_path("/.well-known/other"));
    }
}
