//! End users behind a key on the request path, and the budget alerts a
//! finished request's tokens cross.
//!
//! Only a key whose entry names an `end_user_header` has the header read
//! at all: for any other key it is just a header, forwarded like the
//! rest. The value is forwarded unchanged too (the upstream behind Open
//! WebUI may read it); the gateway only checks it and counts by it.

use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::context::Caller;
use super::phases::{self, Limited};
use crate::config::{AlertSettings, Alerting};
use crate::keys::{unix_millis, Principal};
use crate::policy::{Admission, Refusal, Route, Snapshot};
use crate::state::{crossed, AlertQueue, CounterId, Crossing, TokenMeter, TokenStep};

/// The longest end user value, in bytes.
pub const MAX_END_USER: usize = 128;

/// The end user of a request, and where its limits are counted.
pub struct EndUser {
    /// The header's value, checked; `None` when the key names no end
    /// users or the request sent none (then only the key's limits apply).
    pub value: Option<HeaderValue>,
    pub limited: Limited,
    /// Another end user of the key was forgotten to make room.
    pub evicted: bool,
}

/// The end user phase: the value of the key's `end_user_header`, and,
/// when the key sets `end_user_limits` that apply on `route`, the end
/// user's counter (made on first sight, in the key's table).
pub fn find(
    snapshot: &Snapshot,
    principal: &Principal<'_>,
    route: &Route,
    headers: &HeaderMap,
    now_ms: u64,
    shared: bool,
) -> Result<EndUser, Refusal> {
    let mut found = EndUser {
        value: None,
        limited: Limited::Free,
        evicted: false,
    };
    let Some((extras, spec)) = principal
        .extras
        .and_then(|e| e.end_users.as_ref().map(|s| (e, s)))
    else {
        return Ok(found);
    };
    let Some(value) = read(headers, &spec.header)? else {
        return Ok(found);
    };
    let mut limits = spec.limits;
    if route.api.is_none() {
        limits.tokens = None;
    }
    if limits.counted() {
        let table = snapshot.end_user_table(extras).ok_or(Refusal::Internal)?;
        let name = value.to_str().map_err(|_| Refusal::BadEndUser)?;
        // Full of end users that all have a request in flight.
        let handle = table.find(name, now_ms).ok_or(Refusal::TooManyConcurrent)?;
        let id = CounterId {
            key: principal.id,
            end_user: Some(handle.tag),
        };
        found.limited = phases::limits(Some((limits, &handle.counter)), id, shared);
        found.evicted = handle.evicted;
    }
    found.value = Some(value);
    Ok(found)
}

/// The one value of `name`: 1 to [`MAX_END_USER`] bytes of visible ASCII.
fn read(headers: &HeaderMap, name: &HeaderName) -> Result<Option<HeaderValue>, Refusal> {
    let mut all = headers.get_all(name).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    let b = v.as_bytes();
    let visible = b.iter().all(|c| (0x21..=0x7e).contains(c));
    if all.next().is_some() || b.is_empty() || b.len() > MAX_END_USER || !visible {
        return Err(Refusal::BadEndUser);
    }
    Ok(Some(v.clone()))
}

/// The alert settings of the caller's key (its own over the config's).
fn alerting<'s>(snapshot: &'s Snapshot, caller: &Caller) -> Option<Alerting<'s>> {
    let own = caller
        .extras
        .and_then(|s| snapshot.keys.extras(s))
        .and_then(|e| e.alerts.as_ref());
    AlertSettings::effective(own, snapshot.config.alerts.as_ref())
}

/// With shared state, the sync task sees the crossings (in Redis's
/// totals): each budget's counter is told where its alerts go.
pub fn note_shared_alerts(admission: &Admission, snapshot: &Snapshot, caller: Option<&Caller>) {
    let (Some(caller), Some(_)) = (
        caller,
        admission
            .tokens
            .as_ref()
            .or(admission.end_user_tokens.as_ref()),
    ) else {
        return;
    };
    let Some(alerting) = alerting(snapshot, caller) else {
        return;
    };
    let user = String::from_utf8_lossy(caller.user.as_bytes());
    if let Some(m) = &admission.tokens {
        m.note_alerts(caller.id, &alerting, &user, None);
    }
    if let (Some(m), Some(end_user)) = (&admission.end_user_tokens, &caller.end_user) {
        m.note_alerts(caller.id, &alerting, &user, end_user.to_str().ok());
    }
}

/// Counts a finished request's `n` tokens into its key's budget and its
/// end user's, at `now_ms` (monotonic), and queues an alert for each
/// threshold a budget crossed. Returns the alerts the full queue dropped.
pub fn count_tokens(
    admission: &Admission,
    n: u64,
    now_ms: u64,
    caller: Option<&Caller>,
    snapshot: &Snapshot,
    queue: &AlertQueue,
) -> u64 {
    let add = |m: &TokenMeter| Some((m.add(n, now_ms)?, m.budget().count.get()));
    let key = admission.tokens.as_ref().and_then(add);
    let end_user = admission.end_user_tokens.as_ref().and_then(add);
    if key.is_none() && end_user.is_none() {
        return 0;
    }
    let Some((caller, alerting)) = caller.and_then(|c| Some((c, alerting(snapshot, c)?))) else {
        return 0;
    };
    let steps = [
        key.map(|(s, l)| (s, l, None)),
        end_user.map(|(s, l)| (s, l, caller.end_user.as_ref())),
    ];
    let mut dropped = 0;
    for (step, limit, end_user) in steps.into_iter().flatten() {
        if crossed(alerting.at, limit, step.before, step.after)
            .next()
            .is_none()
        {
            continue;
        }
        let crossing = Crossing {
            key_id: caller.id,
            user: &String::from_utf8_lossy(caller.user.as_bytes()),
            end_user: end_user.and_then(|v| v.to_str().ok()),
            limit,
            before: step.before,
            after: step.after,
            window_end_unix_ms: window_end(&step, now_ms),
        };
        dropped += queue.crossed(&alerting, &crossing);
    }
    dropped
}

/// A window's end on the wall clock.
fn window_end(step: &TokenStep, now_ms: u64) -> i64 {
    let left = i64::try_from(step.window_end_ms.saturating_sub(now_ms)).unwrap_or(i64::MAX);
    unix_millis(SystemTime::now()).saturating_add(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-user", HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn one_value_of_visible_ascii_up_to_128_bytes() {
        let name = HeaderName::from_static("x-user");
        assert_eq!(read(&headers(&[]), &name), Ok(None));
        let ok = read(&headers(&[b"0b5c-user@example.com"]), &name).unwrap();
        assert_eq!(ok.unwrap(), "0b5c-user@example.com");
        assert!(read(&headers(&[&[b'a'; 128]]), &name).unwrap().is_some());
        for bad in [
            &b""[..],
            &[b'a'; 129],
            b"has space",
            b"caf\xc3\xa9",
            b"tab\there",
        ] {
            assert_eq!(
                read(&headers(&[bad]), &name),
                Err(Refusal::BadEndUser),
                "{bad:?}"
            );
        }
        assert_eq!(
            read(&headers(&[b"a", b"b"]), &name),
            Err(Refusal::BadEndUser)
        );
    }
}
