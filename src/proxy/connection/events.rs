//! What the client stream and the request hooks tell the connection loop.
//!
//! The loop in [`super::ClientApp`] polls Pingora's request future, and
//! everything that reports here happens inside that poll, on the same
//! thread: the stream's reads (`read_request` awaits them directly) and the
//! `early_request_filter` hook. So a thread-local slot, written during the
//! poll and read by the loop right after it, carries the news without a
//! per-connection allocation (tokio's cooperative budget works the same
//! way). The loop clears the slot before each poll, so nothing left over by
//! another connection on this thread is ever read.

use std::cell::Cell;

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

thread_local! {
    static LATEST: Cell<Option<Event>> = const { Cell::new(None) };
}

/// Reports `event`; a later event of the same poll replaces it (a head
/// that arrives whole in one read is started and complete at once).
pub fn post(event: Event) {
    LATEST.with(|slot| slot.set(Some(event)));
}

/// The latest event since the last call, if any.
pub fn take() -> Option<Event> {
    LATEST.with(Cell::take)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_event_wins_and_is_taken_once() {
        assert_eq!(take(), None);
        post(Event::HeadStarted);
        post(Event::HeadComplete);
        assert_eq!(take(), Some(Event::HeadComplete));
        assert_eq!(take(), None);
    }
}
