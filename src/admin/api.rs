//! The key API: `GET /api/keys`, `POST /api/keys`, `PATCH /api/keys/{id}`,
//! `DELETE /api/keys/{id}[?shared=true]`, JSON in and out.
//!
//! Every change is one of the key commands' locked, atomic edits of the
//! key file (so the API and `keygen`/`keys revoke` run side by side
//! without losing each other's entries), followed by a reload: the answer
//! comes once the new snapshot is in service, or says that the file
//! changed and the reload failed. Each change is an audit line
//! (`admin_create`, `admin_patch`, `admin_revoke`) naming the admin key
//! and what was written, never a key.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::auth::AdminCaller;
use super::{error, json as answer, Admin, Control};
use crate::keys::{self, KeyId, KeyPatch, KeyToolError, NewKey};
use crate::ops::AdminRecord;

/// The largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// `POST /api/keys`: the fields of `ai-gateway keygen`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    user: String,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    expires: Option<String>,
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    rate_limit: Option<String>,
    #[serde(default)]
    max_concurrent: Option<NonZeroU32>,
    #[serde(default)]
    token_limit: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// `PATCH /api/keys/{id}`: a field left out stays, `null` removes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    #[serde(default)]
    services: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    expires: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    note: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    max_concurrent: Option<Option<NonZeroU32>>,
    #[serde(default, deserialize_with = "present")]
    token_limit: Option<Option<String>>,
}

/// A field that is present: `null` becomes `Some(None)`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// What a change answers and records.
struct Done {
    status: StatusCode,
    body: Value,
    decision: &'static str,
    target: Option<String>,
    change: Value,
}

/// Why a change failed, as its answer.
fn tool_error(e: &KeyToolError) -> (StatusCode, String) {
    let text = e.to_string();
    let status = match e {
        KeyToolError::Usage(m) if m.starts_with("no key with id") => StatusCode::NOT_FOUND,
        KeyToolError::Usage(_) => StatusCode::BAD_REQUEST,
        KeyToolError::Load(_) | KeyToolError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, text)
}

/// Reloads after a change that is written: the generation in service, or
/// the answer saying the reload failed.
fn reload_after(control: &dyn Control, done: &mut Done) {
    match control.reload("admin API") {
        Ok(generation) => {
            if let Value::Object(m) = &mut done.body {
                m.insert("generation".into(), json!(generation));
            }
        }
        Err(e) => {
            done.status = StatusCode::INTERNAL_SERVER_ERROR;
            done.body = json!({
                "error": format!("the key file was changed, but the reload failed (the gateway still serves the keys it had): {e}"),
                "written": done.body,
            });
        }
    }
}

impl Admin {
    /// Routes `/api/keys` and `/api/keys/{id}`.
    pub(super) async fn keys_api(
        &self,
        session: &mut ServerSession,
        method: &Method,
        id: Option<&str>,
    ) -> Response<Vec<u8>> {
        let caller = match self.authenticate(session, false) {
            Ok(c) => c,
            Err(r) => return *r,
        };
        let keys_path = self.live.load().snapshot.config.keys_file.clone();
        let id = match id.map(KeyId::parse_hex) {
            None => None,
            Some(Some(id)) => Some(id),
            Some(None) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not a key id: give the 12 hex digits GET /api/keys shows",
                )
            }
        };
        match (method.as_str(), id) {
            ("GET", None) => match keys::list(&keys_path, SystemTime::now()) {
                Ok(rows) => answer(StatusCode::OK, &json!({ "keys": rows })),
                Err(e) => {
                    let (status, text) = tool_error(&e);
                    error(status, &text)
                }
            },
            ("POST", None) => {
                let body = match read_json::<Create>(session).await {
                    Ok(b) => b,
                    Err(r) => return *r,
                };
                self.change(session, caller, move |control| {
                    create(control, &keys_path, body)
                })
                .await
            }
            ("PATCH", Some(id)) => {
                let body = match read_json::<Patch>(session).await {
                    Ok(b) => b,
                    Err(r) => return *r,
                };
                self.change(session, caller, move |control| {
                    patch(control, &keys_path, id, body)
                })
                .await
            }
            ("DELETE", Some(id)) => {
                let shared = session
                    .req_header()
                    .uri
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p == "shared=true"));
                let spec = self.live.load().snapshot.config.shared_state.clone();
                if shared && spec.is_none() {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "shared=true: the config has no shared_state (the Redis to publish through)",
                    );
                }
                self.change(session, caller, move |control| {
                    revoke(control, &keys_path, id, spec.filter(|_| shared))
                })
                .await
            }
            (_, None) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "/api/keys answers GET and POST",
            ),
            (_, Some(_)) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "/api/keys/{id} answers PATCH and DELETE",
            ),
        }
    }

    /// Runs `job` off the admin thread, answers its result and records it
    /// in the audit log.
    async fn change(
        &self,
        session: &ServerSession,
        caller: AdminCaller,
        job: impl FnOnce(&dyn Control) -> Result<Done, (StatusCode, String)> + Send + 'static,
    ) -> Response<Vec<u8>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let control = Arc::clone(&self.control);
        self.control.off_thread(Box::new(move || {
            let _ = tx.send(job(&*control));
        }));
        let done = match rx.await {
            Ok(Ok(done)) => done,
            Ok(Err((status, text))) => return error(status, &text),
            Err(_) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the change did not finish",
                )
            }
        };
        if let Some(audit) = &self.audit {
            let req = session.req_header();
            audit.log_admin(AdminRecord {
                ts: SystemTime::now(),
                client: caller.client,
                method: req.method.as_str().to_string(),
                path: req.uri.path().to_string(),
                key_id: caller.id.to_string(),
                user: caller.user,
                decision: done.decision,
                status: done.status.as_u16(),
                target: done.target,
                change: done.change,
            });
        }
        answer(done.status, &done.body)
    }
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes, sent as
/// `application/json` (what a form on another site cannot send).
async fn read_json<T: for<'de> Deserialize<'de>>(
    session: &mut ServerSession,
) -> Result<T, Box<Response<Vec<u8>>>> {
    let json_type = session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(Box::new(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as Content-Type: application/json",
        )));
    }
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(Box::new(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the body is too large",
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "the body could not be read",
                )))
            }
        }
    }
    serde_json::from_slice(&body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("invalid body: {e}"),
        ))
    })
}

fn create(
    control: &dyn Control,
    keys_path: &std::path::Path,
    c: Create,
) -> Result<Done, (StatusCode, String)> {
    let mut services = c.services;
    if let Some(one) = c.service {
        services.insert(0, one);
    }
    let req = NewKey {
        user: &c.user,
        services: &services,
        expires: c.expires.as_deref(),
        note: c.note.as_deref(),
        rate_limit: c.rate_limit.as_deref(),
        max_concurrent: c.max_concurrent,
        token_limit: c.token_limit.as_deref(),
        models: &c.models,
        admin: c.admin,
        end_users: None,
    };
    let (key, digest) =
        keys::keygen(keys_path, &req, SystemTime::now()).map_err(|e| tool_error(&e))?;
    let id = digest.id().to_string();
    let change = json!({
        "user": c.user,
        "services": services,
        "expires": c.expires,
        "note": c.note,
        "rate_limit": c.rate_limit,
        "max_concurrent": c.max_concurrent,
        "token_limit": c.token_limit,
        "models": c.models,
        "admin": c.admin,
    });
    let mut done = Done {
        status: StatusCode::CREATED,
        body: json!({ "id": id, "key": key, "user": c.user }),
        decision: "admin_create",
        target: Some(id),
        change,
    };
    reload_after(control, &mut done);
    Ok(done)
}

fn patch(
    control: &dyn Control,
    keys_path: &std::path::Path,
    id: KeyId,
    p: Patch,
) -> Result<Done, (StatusCode, String)> {
    let patch = KeyPatch {
        services: p.services,
        models: p.models,
        expires: p.expires,
        note: p.note,
        rate_limit: p.rate_limit,
        max_concurrent: p.max_concurrent,
        token_limit: p.token_limit,
    };
    let (id, set) = keys::update(keys_path, &id.to_string(), &patch, SystemTime::now())
        .map_err(|e| tool_error(&e))?;
    let id = id.to_string();
    let mut done = Done {
        status: StatusCode::OK,
        body: json!({ "id": id, "changed": set }),
        decision: "admin_patch",
        target: Some(id),
        change: Value::Object(set),
    };
    reload_after(control, &mut done);
    Ok(done)
}

fn revoke(
    control: &dyn Control,
    keys_path: &std::path::Path,
    id: KeyId,
    shared: Option<crate::config::SharedStateSpec>,
) -> Result<Done, (StatusCode, String)> {
    let id_text = id.to_string();
    keys::revoke(keys_path, &id_text, false, SystemTime::now()).map_err(|e| tool_error(&e))?;
    let published = shared
        .as_ref()
        .map(|spec| crate::cluster::publish_revocations(spec, &[id]));
    let mut done = Done {
        status: StatusCode::OK,
        body: json!({ "id": id_text, "state": "disabled", "shared": published.as_ref().map(Result::is_ok) }),
        decision: "admin_revoke",
        target: Some(id_text.clone()),
        change: json!({ "disabled": true, "shared": shared.is_some() }),
    };
    if let Some(Err(e)) = published {
        done.status = StatusCode::BAD_GATEWAY;
        done.body = json!({
            "error": format!("key {id_text} revoked in the key file but not published to the other instances: {e}"),
        });
    }
    reload_after(control, &mut done);
    Ok(done)
}
