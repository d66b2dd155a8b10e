//! A broadcast bounded by bytes: what a session publishes to its subscribers.
//!
//! `tokio::sync::broadcast` bounds its buffer by the number of values, whatever their size, and
//! keeps every value until each receiver has read it or the slot is reused: one subscriber
//! that stops reading pins the whole buffer. Here the buffer is bounded by the sum of its
//! values' weights (their bytes) as well as by their number; a value leaves it as soon as
//! every listener has taken it, and a listener that falls behind past either bound finds that
//! it [lagged](Lagged) and starts again from its own position (the subscription re-reads what
//! it missed from the session). Nothing is kept while nobody listens.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A listener fell behind by more than the buffer holds: what it missed is gone from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Missed {
    /// Values were dropped before this listener took them.
    Lagged,
    /// The sender is gone: nothing more will come.
    Closed,
}

/// The sending side; dropping it closes the channel.
pub(crate) struct Fanout<T> {
    shared: Arc<Shared<T>>,
}

/// One listener: takes every value sent after it subscribed, in order.
pub(crate) struct Listener<T> {
    shared: Arc<Shared<T>>,
    /// Index of the next value to take.
    next: u64,
}

impl<T> std::fmt::Debug for Listener<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("next", &self.next)
            .finish()
    }
}

struct Shared<T> {
    ring: Mutex<Ring<T>>,
    /// Woken on every send and on close.
    sent: Notify,
    /// Sum of weights the buffer holds at most.
    max_bytes: usize,
    /// Values the buffer holds at most.
    max_values: usize,
}

struct Ring<T> {
    slots: VecDeque<Slot<T>>,
    /// Index of `slots[0]`: indices grow by one per value sent, and are never reused.
    first: u64,
    /// Sum of the weights in `slots`.
    bytes: usize,
    listeners: usize,
    closed: bool,
}

struct Slot<T> {
    value: T,
    weight: usize,
    /// Listeners that have yet to take it.
    waiting: usize,
}

impl<T> Ring<T> {
    fn end(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    /// Drops the values at the front that every listener has taken.
    fn drop_taken(&mut self) {
        while self.slots.front().is_some_and(|slot| slot.waiting == 0) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(slot) = self.slots.pop_front() {
            self.bytes -= slot.weight;
            self.first += 1;
        }
    }
}

impl<T> Shared<T> {
    fn ring(&self) -> MutexGuard<'_, Ring<T>> {
        // Nothing panics while holding the lock, and the ring stays consistent if it did.
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T: Clone> Fanout<T> {
    /// A channel that holds at most `max_bytes` of weight and `max_values` values for the
    /// listeners that have not yet taken them.
    pub fn new(max_bytes: usize, max_values: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                ring: Mutex::new(Ring {
                    slots: VecDeque::new(),
                    first: 0,
                    bytes: 0,
                    listeners: 0,
                    closed: false,
                }),
                sent: Notify::new(),
                max_bytes,
                max_values: max_values.max(1),
            }),
        }
    }

    /// Sends `value` to every listener, counting `weight` bytes for it. The oldest values go
    /// while the buffer is over a bound: the listeners that had not taken them have lagged.
    pub fn send(&self, value: T, weight: usize) {
        let mut ring = self.shared.ring();
        if ring.listeners == 0 {
            return;
        }
        let waiting = ring.listeners;
        ring.slots.push_back(Slot {
            value,
            weight,
            waiting,
        });
        ring.bytes += weight;
        while ring.bytes > self.shared.max_bytes || ring.slots.len() > self.shared.max_values {
            ring.pop_front();
        }
        drop(ring);
        self.shared.sent.notify_waiters();
    }

    /// A listener for every value sent from now on.
    pub fn subscribe(&self) -> Listener<T> {
        let mut ring = self.shared.ring();
        ring.listeners += 1;
        let next = ring.end();
        drop(ring);
        Listener {
            shared: self.shared.clone(),
            next,
        }
    }

    /// How many listeners there are.
    pub fn listener_count(&self) -> usize {
        self.shared.ring().listeners
    }

    /// Sum of the weights held for listeners that have not taken them.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.shared.ring().bytes
    }
}

impl<T> Drop for Fanout<T> {
    fn drop(&mut self) {
        self.shared.ring().closed = true;
        self.shared.sent.notify_waiters();
    }
}

impl<T: Clone> Listener<T> {
    /// The next value, waiting for one if need be. After [`Missed::Lagged`] the listener
    /// goes on from the oldest value still held.
    pub async fn recv(&mut self) -> Result<T, Missed> {
        loop {
            let sent = self.shared.sent.notified();
            tokio::pin!(sent);
            // Registered before looking, so a send between the look and the wait wakes it.
            sent.as_mut().enable();
            if let Some(taken) = take(&self.shared, &mut self.next) {
                return taken;
            }
            sent.await;
        }
    }
}

/// The value at `next` if one is there, the end of the channel, or `None` to wait.
fn take<T: Clone>(shared: &Shared<T>, next: &mut u64) -> Option<Result<T, Missed>> {
    let mut ring = shared.ring();
    if *next < ring.first {
        *next = ring.first;
        return Some(Err(Missed::Lagged));
    }
    let index = usize::try_from(*next - ring.first).ok()?;
    let Some(slot) = ring.slots.get_mut(index) else {
        return ring.closed.then_some(Err(Missed::Closed));
    };
    slot.waiting -= 1;
    let value = slot.value.clone();
    *next += 1;
    ring.drop_taken();
    Some(Ok(value))
}

impl<T> Drop for Listener<T> {
    fn drop(&mut self) {
        let mut ring = self.shared.ring();
        ring.listeners -= 1;
        // What this listener had yet to take no longer waits for it.
        let start = usize::try_from(self.next.saturating_sub(ring.first)).unwrap_or(usize::MAX);
        for slot in ring.slots.iter_mut().skip(start) {
            slot.waiting -= 1;
        }
        ring.drop_taken();
    }
}

#[cfg(test)]
mod tests {
    use super::{Fanout, Missed};

    #[tokio::test]
    async fn every_listener_takes_every_value_in_order_and_nothing_stays() {
        let fanout = Fanout::new(1 << 20, 64);
        let mut a = fanout.subscribe();
        let mut b = fanout.subscribe();
        for value in 0..10 {
            fanout.send(value, 100);
        }
        for value in 0..10 {
            assert_eq!(a.recv().await, Ok(value));
        }
        // Still held for b.
        assert_eq!(fanout.held_bytes(), 1000);
        for value in 0..10 {
            assert_eq!(b.recv().await, Ok(value));
        }
        assert_eq!(fanout.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_stalled_listener_holds_at_most_the_byte_bound_then_lags() {
        let fanout = Fanout::new(1000, 1024);
        let mut stalled = fanout.subscribe();
        let mut reading = fanout.subscribe();
        for value in 0..100 {
            fanout.send(value, 60);
            assert_eq!(reading.recv().await, Ok(value));
            assert!(fanout.held_bytes() <= 1000);
        }
        assert_eq!(stalled.recv().await, Err(Missed::Lagged));
        // It goes on from the oldest value still held: the newest that fit.
        assert_eq!(stalled.recv().await, Ok(100 - 1000 / 60));
    }

    #[tokio::test]
    async fn nothing_is_kept_without_listeners_and_a_dropped_listener_releases() {
        let fanout = Fanout::new(1 << 20, 64);
        fanout.send(1, 10);
        assert_eq!(fanout.held_bytes(), 0);
        let listener = fanout.subscribe();
        fanout.send(2, 10);
        assert_eq!(fanout.held_bytes(), 10);
        drop(listener);
        assert_eq!(fanout.held_bytes(), 0);
        assert_eq!(fanout.listener_count(), 0);
    }

    #[tokio::test]
    async fn a_waiting_listener_is_woken_by_a_send_and_by_the_close() {
        let fanout = Fanout::new(1 << 20, 64);
        let mut listener = fanout.subscribe();
        let waiting = tokio::spawn(async move {
            let first = listener.recv().await;
            let second = listener.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        fanout.send(7, 1);
        drop(fanout);
        assert_eq!(waiting.await.ok(), Some((Ok(7), Err(Missed::Closed))));
    }
}
