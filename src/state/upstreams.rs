//! What is known about each upstream address: its health and its load,
//! kept outside the snapshot by address.
//!
//! A reload (a key added by `keygen`, a route edited) keeps what is known
//! about every upstream the new configuration still names, and drops the
//! rest. Routes that name the same address share it: it is the same
//! server, so its health, its requests in flight and its cap's count are
//! one.
//!
//! Load: requests in flight per upstream, the caps on them, and the
//! queues of requests waiting for a free upstream.
//!
//! Counting is lock-free: taking a slot is one compare-and-swap on the
//! upstream's count (one add when it has no cap), giving it back one
//! subtraction and one load. Only when requests wait does a release take a
//! lock: it hands its slot straight to the first waiter of a queue that
//! the upstream serves, so a freed slot never looks free to a newcomer
//! while others wait (first come, first served).
//!
//! No lost wake-up: a waiter announces itself on every upstream it could
//! use (`waiting`, sequentially consistent) and then looks for a free slot
//! once more, under its queue's lock; a release subtracts from the count
//! and then reads `waiting`. One of the two sees the other: either the
//! waiter finds the slot, or the release sees the waiter and, taking the
//! queue's lock, finds it queued.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::oneshot;

use super::upstream_health::UpstreamHealth;

/// One upstream address's state, shared by every snapshot that names it.
#[derive(Debug, Default)]
pub struct UpstreamState {
    pub health: UpstreamHealth,
    pub load: UpstreamLoad,
}

/// The state of every upstream the running configuration names, by
/// address. Only snapshot builds, reloads and the admin endpoints take its
/// lock; requests hold the `Arc`s their snapshot's routes were built with.
#[derive(Debug, Default)]
pub struct UpstreamBook {
    entries: Mutex<HashMap<SocketAddr, Arc<UpstreamState>>>,
}

impl UpstreamBook {
    /// The state of `addr`: the one already known, or a new one (in
    /// rotation, nothing in flight).
    pub fn entry(&self, addr: SocketAddr) -> Arc<UpstreamState> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(entries.entry(addr).or_default())
    }

    /// Forgets every upstream not in `named` (the addresses of the snapshot
    /// now in service). Requests still in flight to one hold its state
    /// until they end.
    pub fn retain(&self, named: &[SocketAddr]) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|addr, _| named.contains(addr));
    }

    /// Every upstream known, by address (for metrics and `/readyz`).
    pub fn all(&self) -> Vec<(SocketAddr, Arc<UpstreamState>)> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = entries.iter().map(|(a, s)| (*a, Arc::clone(s))).collect();
        all.sort_unstable_by_key(|(a, _)| *a);
        all
    }

    /// How many upstreams are tracked.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An upstream's load: requests in flight through this gateway, and
/// requests queued that it could serve. Lives as long as its address is
/// named (see [`UpstreamBook`]), so counts outlive
/// reloads.
#[derive(Debug, Default)]
pub struct UpstreamLoad {
    in_flight: AtomicU32,
    /// Queued requests this upstream could serve.
    waiting: AtomicU32,
    /// The queues of the pools this upstream is in. Weak: a queue belongs
    /// to its snapshot, and goes with it.
    queues: Mutex<Vec<Weak<WaitQueue>>>,
}

impl UpstreamLoad {
    /// Requests in flight to this upstream now.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests queued that this upstream could serve.
    pub fn queued(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Takes a slot if the upstream is below `cap`.
    #[inline]
    fn try_take(&self, cap: Option<NonZeroU32>) -> bool {
        let Some(cap) = cap else {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            return true;
        };
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |n| {
                (n < cap.get()).then_some(n + 1)
            })
            .is_ok()
    }

    /// Makes `queue` hear of this upstream's freed slots; forgets queues
    /// whose snapshot is gone.
    pub fn subscribe(&self, queue: &Arc<WaitQueue>) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues.retain(|q| q.strong_count() > 0);
        queues.push(Arc::downgrade(queue));
    }

    fn queues(&self) -> Vec<Arc<WaitQueue>> {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues.iter().filter_map(Weak::upgrade).collect()
    }
}

/// One request's slot on an upstream: taken when the upstream is chosen,
/// given back when the lease is dropped (the request's context goes when
/// its answer ends or its client leaves, on every path). `tag` is the
/// chooser's name for the upstream (its index in the route).
#[derive(Debug)]
pub struct Lease {
    state: Arc<UpstreamState>,
    pub tag: usize,
}

impl Lease {
    /// Takes a slot on `state` if it is below `cap`.
    #[inline]
    pub fn take(state: &Arc<UpstreamState>, cap: Option<NonZeroU32>, tag: usize) -> Option<Lease> {
        state.load.try_take(cap).then(|| Lease {
            state: Arc::clone(state),
            tag,
        })
    }

    pub fn upstream(&self) -> &UpstreamState {
        &self.state
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let load = &self.state.load;
        load.in_flight.fetch_sub(1, Ordering::SeqCst);
        if load.waiting.load(Ordering::SeqCst) > 0 {
            for queue in load.queues() {
                if queue.offer(&self.state) {
                    break;
                }
            }
        }
    }
}

/// One member of a queued pool: the upstream, its cap and its tag.
#[derive(Debug)]
pub struct Member {
    pub state: Arc<UpstreamState>,
    pub cap: Option<NonZeroU32>,
    pub tag: usize,
}

/// Requests waiting for a slot on any upstream of one pool, served in
/// order of arrival.
#[derive(Debug)]
pub struct WaitQueue {
    max: u32,
    members: Box<[Member]>,
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    queue: VecDeque<(u64, oneshot::Sender<Lease>)>,
    next_id: u64,
}

/// What [`WaitQueue::enter`] got.
#[derive(Debug)]
pub enum Entered {
    /// A slot came free while entering.
    Slot(Lease),
    Queued(Waiting),
    /// `max` requests wait already.
    Full,
}

/// A place in a queue; dropping it leaves the queue.
#[derive(Debug)]
pub struct Waiting {
    queue: Arc<WaitQueue>,
    id: u64,
    rx: oneshot::Receiver<Lease>,
}

impl WaitQueue {
    pub fn new(max: u32, members: Box<[Member]>) -> Arc<WaitQueue> {
        let queue = Arc::new(WaitQueue {
            max,
            members,
            waiters: Mutex::default(),
        });
        for m in queue.members.iter() {
            m.state.load.subscribe(&queue);
        }
        queue
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the queue, unless a slot on a member that `usable` accepts
    /// came free meanwhile, or the queue is full.
    pub fn enter(self: &Arc<Self>, usable: impl Fn(&Member) -> bool) -> Entered {
        let mut w = self.lock();
        if w.queue.len() >= self.max as usize {
            return Entered::Full;
        }
        for m in self.members.iter() {
            m.state.load.waiting.fetch_add(1, Ordering::SeqCst);
        }
        let free = self
            .members
            .iter()
            .filter(|m| usable(m))
            .find_map(|m| Lease::take(&m.state, m.cap, m.tag));
        if let Some(lease) = free {
            self.unannounce();
            return Entered::Slot(lease);
        }
        let (tx, rx) = oneshot::channel();
        let id = w.next_id;
        w.next_id += 1;
        w.queue.push_back((id, tx));
        Entered::Queued(Waiting {
            queue: Arc::clone(self),
            id,
            rx,
        })
    }

    fn unannounce(&self) {
        for m in self.members.iter() {
            m.state.load.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A slot of `from` came free: takes it again for the first waiter
    /// still there. True if a waiter got it. Leases that found no taker
    /// are dropped only after the lock is let go (their release may offer
    /// to this queue again).
    fn offer(&self, from: &Arc<UpstreamState>) -> bool {
        let Some(member) = self.members.iter().find(|m| Arc::ptr_eq(&m.state, from)) else {
            return false;
        };
        let mut spare: Option<Lease> = None;
        let given = {
            let mut w = self.lock();
            let mut given = false;
            while let Some((_, tx)) = w.queue.pop_front() {
                self.unannounce();
                let lease = match spare.take() {
                    Some(l) => l,
                    None => match Lease::take(from, member.cap, member.tag) {
                        Some(l) => l,
                        None => break,
                    },
                };
                match tx.send(lease) {
                    Ok(()) => {
                        given = true;
                        break;
                    }
                    // The waiter left: the slot goes to the next one.
                    Err(lease) => spare = Some(lease),
                }
            }
            given
        };
        drop(spare);
        given
    }

    /// Leaves the queue (a waiter that timed out or whose client left).
    fn leave(&self, id: u64) {
        let mut w = self.lock();
        if let Some(i) = w.queue.iter().position(|(wid, _)| *wid == id) {
            w.queue.remove(i);
            self.unannounce();
        }
    }
}

impl Waiting {
    /// The slot, when one is handed over.
    pub async fn slot(&mut self) -> Option<Lease> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.queue.leave(self.id);
        // A lease sent just before leaving sits in the channel; closing
        // it and dropping the lease gives the slot back (lock let go).
        self.rx.close();
        drop(self.rx.try_recv());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_keeps_known_upstreams_and_drops_the_rest() {
        let book = UpstreamBook::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        book.entry(a).health.connect_failed(1000, false);
        book.entry(b);
        assert!(
            !book.entry(a).health.is_up(1001),
            "the same state is handed out again"
        );
        book.retain(&[a]);
        assert_eq!(book.len(), 1);
        assert!(!book.entry(a).health.is_up(1001));
        assert!(
            book.entry(b).health.is_up(1001),
            "a dropped upstream starts afresh"
        );
    }

    fn member(cap: u32, tag: usize) -> Member {
        Member {
            state: Arc::new(UpstreamState::default()),
            cap: NonZeroU32::new(cap),
            tag,
        }
    }

    #[test]
    fn a_cap_holds_and_a_dropped_lease_frees_its_slot() {
        let m = member(2, 0);
        let a = Lease::take(&m.state, m.cap, 0).unwrap();
        let _b = Lease::take(&m.state, m.cap, 0).unwrap();
        assert!(Lease::take(&m.state, m.cap, 0).is_none());
        assert_eq!(m.state.load.in_flight(), 2);
        drop(a);
        assert_eq!(m.state.load.in_flight(), 1);
        assert!(Lease::take(&m.state, m.cap, 0).is_some());
    }

    #[test]
    fn waiters_are_served_in_order_and_the_queue_is_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let m = member(1, 7);
            let state = Arc::clone(&m.state);
            let queue = WaitQueue::new(2, Box::new([m]));
            let held = Lease::take(&state, NonZeroU32::new(1), 7).unwrap();
            let Entered::Queued(mut first) = queue.enter(|_| true) else {
                panic!("the upstream is full")
            };
            let Entered::Queued(mut second) = queue.enter(|_| true) else {
                panic!("room for two")
            };
            assert!(matches!(queue.enter(|_| true), Entered::Full));
            assert_eq!(state.load.queued(), 2);
            drop(held);
            let lease = first.slot().await.expect("the first waiter is served");
            assert_eq!((lease.tag, state.load.in_flight()), (7, 1));
            drop(lease);
            assert!(second.slot().await.is_some());
            assert_eq!(state.load.queued(), 0);
        });
    }

    #[test]
    fn a_waiter_that_leaves_is_gone_and_its_slot_goes_on() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let m = member(1, 0);
            let state = Arc::clone(&m.state);
            let queue = WaitQueue::new(5, Box::new([m]));
            let held = Lease::take(&state, NonZeroU32::new(1), 0).unwrap();
            let Entered::Queued(gone) = queue.enter(|_| true) else {
                panic!()
            };
            let Entered::Queued(mut stays) = queue.enter(|_| true) else {
                panic!()
            };
            drop(gone);
            assert_eq!(queue.len(), 1);
            drop(held);
            let lease = stays.slot().await;
            assert!(lease.is_some());
            assert_eq!(state.load.in_flight(), 1);
        });
        let m = member(1, 0);
        let state = Arc::clone(&m.state);
        let queue = WaitQueue::new(5, Box::new([m]));
        let held = Lease::take(&state, NonZeroU32::new(1), 0).unwrap();
        let Entered::Queued(w) = queue.enter(|_| true) else {
            panic!()
        };
        // Handed over, then the waiter leaves before reading it: the slot
        // is given back.
        drop(held);
        assert_eq!(state.load.in_flight(), 1);
        drop(w);
        assert_eq!((state.load.in_flight(), state.load.queued()), (0, 0));
    }
}
