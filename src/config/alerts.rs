//! `alerts`: budget alerts, at the top of the config and in a key file
//! entry (which overrides it setting by setting), and the two values they
//! are made of: the webhook URL and the thresholds.
//!
//! Both check themselves while they are deserialized, so a bad URL or an
//! unsorted list is reported at its line in the config and in the key
//! file alike. Sending is the daemon's; counting who crossed what is the
//! `state` layer's.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::values::{parsed, Timeout};

/// The thresholds when neither the key nor the config gives them.
pub const DEFAULT_ALERT_AT: [f64; 2] = [0.8, 1.0];
/// How long one attempt to deliver an alert may take, by default.
pub const DEFAULT_ALERT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most thresholds one list may hold.
const MOST_THRESHOLDS: usize = 8;

/// `alerts: {webhook, at, timeout}` as written, at either level; what a
/// level leaves out comes from the level above (the key's from the
/// config's).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSettings {
    #[serde(default, deserialize_with = "shared_webhook")]
    pub webhook: Option<Arc<Webhook>>,
    #[serde(default)]
    pub at: Option<Thresholds>,
    #[serde(default)]
    pub timeout: Option<Timeout>,
}

/// A webhook, shared by every alert sent to it.
fn shared_webhook<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<Webhook>>, D::Error> {
    Webhook::deserialize(d).map(|w| Some(Arc::new(w)))
}

impl AlertSettings {
    /// The settings that apply to a key whose own are `key`, under the
    /// config's `global`: `None` when no webhook is named or the list of
    /// thresholds is empty (no alerts for the key).
    pub fn effective<'a>(
        key: Option<&'a AlertSettings>,
        global: Option<&'a AlertSettings>,
    ) -> Option<Alerting<'a>> {
        let webhook = key
            .and_then(|k| k.webhook.as_ref())
            .or_else(|| global.and_then(|g| g.webhook.as_ref()))?;
        let at = key
            .and_then(|k| k.at.as_ref())
            .or_else(|| global.and_then(|g| g.at.as_ref()))
            .map_or(&DEFAULT_ALERT_AT[..], |t| &t.0[..]);
        if at.is_empty() {
            return None;
        }
        let timeout = key
            .and_then(|k| k.timeout)
            .or_else(|| global.and_then(|g| g.timeout))
            .map_or(DEFAULT_ALERT_TIMEOUT, |t| t.0);
        Some(Alerting {
            webhook,
            at,
            timeout,
        })
    }
}

/// The settings one crossing is judged and sent by.
#[derive(Debug, Clone)]
pub struct Alerting<'a> {
    pub webhook: &'a Arc<Webhook>,
    pub at: &'a [f64],
    pub timeout: Duration,
}

/// Fractions of a token budget, each in (0, 1], in increasing order; an
/// empty list (only useful in a key file entry) turns alerts off for the
/// key.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds(pub Arc<[f64]>);

impl Thresholds {
    pub fn check(list: Vec<f64>) -> Result<Thresholds, String> {
        if list.len() > MOST_THRESHOLDS {
            return Err(format!(
                "alerts.at lists {} thresholds; at most {MOST_THRESHOLDS}",
                list.len()
            ));
        }
        for t in &list {
            if !(*t > 0.0 && *t <= 1.0) {
                return Err(format!(
                    "alerts.at: {t} is not a fraction of the budget in (0, 1], such as 0.8"
                ));
            }
        }
        if list.windows(2).any(|w| matches!(w, [a, b] if a >= b)) {
            return Err(format!(
                "alerts.at {list:?} must be in increasing order, each once, such as [0.8, 1.0]"
            ));
        }
        Ok(Thresholds(Arc::from(list)))
    }
}

impl<'de> Deserialize<'de> for Thresholds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<f64>::deserialize(d)?;
        Thresholds::check(list).map_err(serde::de::Error::custom)
    }
}

/// An `http://` or `https://` URL, taken apart once: what a connection
/// needs and the request line's target. The target may hold a secret (a
/// Slack-style token in the path), so only [`Webhook::place`] is ever
/// logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub tls: bool,
    /// The host as written (a name, or an address; IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// The path and query, at least `/`.
    pub target: String,
    /// The `Host` header: the authority as written.
    pub authority: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.place())
    }
}

impl Webhook {
    pub fn parse(s: &str) -> Result<Webhook, String> {
        let bad = |why: &str| {
            format!("alerts.webhook: {why}; write it like https://alerts.example.com/hook")
        };
        let uri: http::Uri = s.trim().parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("must be an http:// or https:// URL")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("a user name or password in the URL is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Ok(Webhook {
            tls,
            host: host.to_string(),
            port,
            target: if target.is_empty() {
                "/".into()
            } else {
                target
            },
            authority: authority.as_str().to_string(),
        })
    }

    /// Scheme, host and port, without the path (which may hold a secret).
    pub fn place(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl<'de> Deserialize<'de> for Webhook {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, Webhook::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_are_taken_apart_once() {
        let w = Webhook::parse("https://hooks.example.com/services/T0/secret?x=1").unwrap();
        assert!(w.tls);
        assert_eq!((w.host.as_str(), w.port), ("hooks.example.com", 443));
        assert_eq!(w.target, "/services/T0/secret?x=1");
        assert_eq!(format!("{w:?}"), "https://hooks.example.com");
        let w = Webhook::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((w.port, w.target.as_str(), w.tls), (9000, "/", false));
        let w = Webhook::parse("http://[::1]:81/a").unwrap();
        assert_eq!(w.host, "::1");
        for bad in [
            "ftp://x/",
            "hooks.example.com/a",
            "http://u:p@x/",
            "http://",
        ] {
            let e = Webhook::parse(bad).unwrap_err();
            assert!(e.starts_with("alerts.webhook: "), "{bad}: {e}");
            assert!(!e.contains("u:p"), "{e}");
        }
    }

    #[test]
    fn thresholds_are_fractions_in_increasing_order() {
        assert!(Thresholds::check(vec![0.5, 0.8, 1.0]).is_ok());
        assert!(Thresholds::check(vec![]).is_ok());
        for (bad, why) in [
            (vec![0.0], "(0, 1]"),
            (vec![1.5], "(0, 1]"),
            (vec![f64::NAN], "(0, 1]"),
            (vec![1.0, 0.8], "increasing"),
            (vec![0.8, 0.8], "increasing"),
        ] {
            let e = Thresholds::check(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn errors_name_the_file_line_and_reason() {
        let config = |alerts: &str| {
            format!(
                "listen: \"127.0.0.1:1\"\nkeys_file: k.json\nalerts:\n{alerts}\nroutes:\n  - {{name: a, path_prefix: /a/, service: a, upstreams: [\"127.0.0.1:2\"]}}\n"
            )
        };
        let path = std::path::Path::new("/t/g.yaml");
        for (alerts, line, why) in [
            ("  webhook: ftp://x/", 4, "http:// or https://"),
            (
                "  webhook: http://x/\n  at: [1.0, 0.8]",
                5,
                "increasing order",
            ),
            ("  webhook: http://x/\n  at: [0.5, 2]", 5, "(0, 1]"),
            ("  webhook: http://x/\n  every: 1s", 5, "unknown field"),
        ] {
            let e = super::super::Config::check(path, &config(alerts))
                .expect_err(alerts)
                .to_string();
            assert!(e.starts_with(&format!("/t/g.yaml:{line}:")), "{e}");
            assert!(e.contains(why), "{e}");
        }
        let ok = super::super::Config::parse(path, &config("  webhook: http://x/")).unwrap();
        assert!(ok.alerts.is_some_and(|a| a.webhook.is_some()));
    }

    #[test]
    fn a_key_overrides_the_config_setting_by_setting() {
        let hook = |u: &str| Some(Arc::new(Webhook::parse(u).unwrap()));
        let global = AlertSettings {
            webhook: hook("http://a/"),
            at: None,
            timeout: None,
        };
        let e = AlertSettings::effective(None, Some(&global)).unwrap();
        assert_eq!(
            (e.webhook.host.as_str(), e.at),
            ("a", &DEFAULT_ALERT_AT[..])
        );
        let key = AlertSettings {
            webhook: None,
            at: Some(Thresholds::check(vec![0.5]).unwrap()),
            timeout: None,
        };
        let e = AlertSettings::effective(Some(&key), Some(&global)).unwrap();
        assert_eq!((e.webhook.host.as_str(), e.at), ("a", &[0.5][..]));
        let off = AlertSettings {
            at: Some(Thresholds::check(vec![]).unwrap()),
            ..AlertSettings::default()
        };
        assert!(AlertSettings::effective(Some(&off), Some(&global)).is_none());
        assert!(
            AlertSettings::effective(Some(&key), None).is_none(),
            "no webhook"
        );
    }
}
