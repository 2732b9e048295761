//! What AI APIs say, read without holding bodies back: the model a request
//! names, the token usage an answer reports, model lists cut down to what a
//! key may use, and the usage report over the audit log.
//!
//! Owns: [`Scanner`] (an incremental reader of top-level JSON members:
//! bounded memory, any split), [`RequestInspector`] (models, `stream`, the
//! `include_usage` edit), [`AnswerMeter`] and [`SseHider`] (usage read off
//! NDJSON, JSON and SSE answers as they stream, Anthropic's Messages API
//! included; the usage-only event hidden from clients that did not ask for
//! it), [`ModelListFilter`], [`Endpoint`], and the [`report`].
//!
//! No sockets, threads or clocks: the readers are pure functions of the
//! bytes fed to them. The [`report`] is the exception in I/O: it reads the
//! audit log files it is given and renders tables for `ai-gateway usage`.
//!
//! May import: `config`, `keys`, `state`.

mod answer;
mod anthropic;
mod endpoint;
mod model_list;
pub mod report;
mod request;
mod scan;

pub use answer::{AnswerMeter, SseHider, Usage, UsageSource, HELD_EVENT_LIMIT};
pub use endpoint::{model_in_path, Endpoint};
pub use model_list::{ModelListFilter, MODEL_LIST_LIMIT};
pub use request::{Edit, NamedModel, RequestInspector, INSPECT_LIMIT};
pub use scan::{Event, Scanner};
