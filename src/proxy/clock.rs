//! What the client stream and the request hooks tell the connection loop
//! about where a request is, so the loop runs the right clock (the head's,
//! the idle one, an HTTP/2 stream's body clock).
//!
//! The news travels through a [`Signal`]: one small atomic slot shared by
//! the loop and whoever reports. The loop makes one per connection (and
//! one per HTTP/2 stream), clears it before each poll of Pingora's future
//! and reads it right after, so a report is always about its own
//! connection. Reporters reach it explicitly: the client stream holds its
//! connection's signal (and the hooks reach the stream through the
//! session); an HTTP/2 stream has no stream of its own to reach, so its
//! loop runs Pingora's future inside [`H2_STREAM`]'s scope, where the
//! hooks find the stream's signal.
//!
//! Imported by `client_stream` (which reports), `connection` (which reads)
//! and the hooks in `gateway`; it imports nothing of theirs.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Where the current request of a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The first byte of a request head arrived on a keep-alive connection:
    /// the head's clock starts now.
    HeadStarted,
    /// Pingora parsed the head and the request hooks run: no head clock any
    /// more.
    HeadComplete,
    /// HTTP/2: a request body is expected, or a piece of it arrived; its
    /// clock starts (again).
    BodyRead,
    /// HTTP/2: the request body has ended.
    BodyDone,
}

impl Event {
    const ALL: [Event; 4] = [
        Event::HeadStarted,
        Event::HeadComplete,
        Event::BodyRead,
        Event::BodyDone,
    ];

    /// The slot's value for the event (0 is "nothing").
    fn code(self) -> u8 {
        match self {
            Event::HeadStarted => 1,
            Event::HeadComplete => 2,
            Event::BodyRead => 3,
            Event::BodyDone => 4,
        }
    }
}

/// The latest event of a connection (or an HTTP/2 stream) not yet read by
/// its loop. Relaxed atomics: reporter and loop run in the same poll, on
/// one thread; atomic only because the stream is shared by reference.
#[derive(Debug, Default)]
pub struct Signal(AtomicU8);

impl Signal {
    /// Reports `event`; a later event of the same poll replaces it (a head
    /// that arrives whole in one read is started and complete at once).
    pub fn post(&self, event: Event) {
        self.0.store(event.code(), Ordering::Relaxed);
    }

    /// The latest event since the last call, if any.
    pub fn take(&self) -> Option<Event> {
        let code = self.0.swap(0, Ordering::Relaxed);
        Event::ALL.into_iter().find(|e| e.code() == code)
    }
}

tokio::task_local! {
    /// The signal of the HTTP/2 stream whose request the current task
    /// serves (see the module documentation).
    static H2_STREAM: Arc<Signal>;
}

/// Runs `request` (Pingora's future for one HTTP/2 stream) with `signal`
/// as the stream's, for the hooks to report to.
pub async fn in_h2_stream<F: Future>(signal: Arc<Signal>, request: F) -> F::Output {
    H2_STREAM.scope(signal, request).await
}

/// Reports `event` to the HTTP/2 stream being served, if any.
pub fn post_h2(event: Event) {
    let _ = H2_STREAM.try_with(|signal| signal.post(event));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_event_wins_and_is_taken_once() {
        let s = Signal::default();
        assert_eq!(s.take(), None);
        s.post(Event::HeadStarted);
        s.post(Event::HeadComplete);
        assert_eq!(s.take(), Some(Event::HeadComplete));
        assert_eq!(s.take(), None);
        for e in Event::ALL {
            s.post(e);
            assert_eq!(s.take(), Some(e));
        }
    }

    #[test]
    fn an_h2_stream_reports_to_its_own_signal_only_inside_its_scope() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let signal = Arc::new(Signal::default());
        post_h2(Event::BodyRead);
        assert_eq!(signal.take(), None, "outside any stream: dropped");
        rt.block_on(in_h2_stream(Arc::clone(&signal), async {
            post_h2(Event::BodyRead)
        }));
        assert_eq!(signal.take(), Some(Event::BodyRead));
    }
}
