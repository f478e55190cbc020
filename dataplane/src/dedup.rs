//! Dedup across cores: each core owns one bloom shard; the owner of an event id is
//! `shard_for(event_hash(id), ncores)`.
//!
//! A request's hashes owned by another core travel in one [`LookupReq`] per owner over
//! a bounded channel of the request mesh built at start-up; the owner answers on the
//! reply mesh with the same vector, each hash replaced by 1 (duplicate) or 0 (new).
//! The vector comes back to the core that sent it and returns to its pool, so no
//! allocation happens per request once warm. A waiting connection task parks on a
//! slot of the core's [`Waiters`] table; the core's reply task fills the slot.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};

/// A batch of lookups from core `from` for the hashes the receiving core owns.
pub struct LookupReq {
    pub slot: u32,
    pub hashes: Vec<u64>,
}

/// The answer: `hashes[i]` is now 1 when the i-th hash was already present.
pub struct LookupResp {
    pub slot: u32,
    pub verdicts: Vec<u64>,
}

enum Slot {
    Free,
    Waiting(Option<Waker>),
    Done(Vec<u64>),
    /// The waiting task went away; the reply is dropped (its vector recycled) on arrival.
    Abandoned,
}

/// Pending cross-core lookups of one core. Only that core touches it.
#[derive(Default)]
pub struct Waiters {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Vectors returned by replies, ready to carry the next request's hashes.
    pool: Vec<Vec<u64>>,
}

/// Vectors kept for reuse per core, at most (each holds up to batch_events_max hashes).
pub const HASH_VEC_POOL_MAX: usize = 256;

impl Waiters {
    pub fn take_vec(&mut self) -> Vec<u64> {
        self.pool.pop().unwrap_or_default()
    }

    pub fn recycle(&mut self, mut v: Vec<u64>) {
        if self.pool.len() < HASH_VEC_POOL_MAX {
            v.clear();
            self.pool.push(v);
        }
    }

    pub fn register(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Slot::Waiting(None);
                i
            }
            None => {
                self.slots.push(Slot::Waiting(None));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// A reply arrived for `slot`.
    pub fn complete(&mut self, slot: u32, verdicts: Vec<u64>) {
        let Some(s) = self.slots.get_mut(slot as usize) else {
            debug_assert!(false, "reply for unknown slot {slot}");
            return;
        };
        match std::mem::replace(s, Slot::Done(verdicts)) {
            Slot::Waiting(w) => {
                if let Some(w) = w {
                    w.wake();
                }
            }
            Slot::Abandoned => {
                let Slot::Done(v) = std::mem::replace(s, Slot::Free) else {
                    unreachable!()
                };
                self.free.push(slot);
                self.recycle(v);
            }
            Slot::Free | Slot::Done(_) => debug_assert!(false, "reply for slot {slot} not waiting"),
        }
    }

    /// Polls for `slot`'s reply; frees the slot when it returns `Ready`.
    pub fn poll(&mut self, slot: u32, cx: &mut Context<'_>) -> Poll<Vec<u64>> {
        let s = &mut self.slots[slot as usize];
        match s {
            Slot::Done(_) => {
                let Slot::Done(v) = std::mem::replace(s, Slot::Free) else {
                    unreachable!()
                };
                self.free.push(slot);
                Poll::Ready(v)
            }
            Slot::Waiting(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Free | Slot::Abandoned => unreachable!("polling slot {slot} not registered"),
        }
    }

    /// A registered slot whose request was never sent.
    pub fn abandon_unsent(&mut self, slot: u32) {
        self.slots[slot as usize] = Slot::Free;
        self.free.push(slot);
    }

    /// The waiting task is gone before its reply came.
    pub fn abandon(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        match s {
            Slot::Waiting(_) => *s = Slot::Abandoned,
            Slot::Done(_) => {
                let Slot::Done(v) = std::mem::replace(s, Slot::Free) else {
                    unreachable!()
                };
                self.free.push(slot);
                self.recycle(v);
            }
            Slot::Free | Slot::Abandoned => {}
        }
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Waiting(_) | Slot::Done(_)))
            .count()
    }
}

/// Waits for a slot's reply; abandons the slot if dropped first.
pub struct Wait<'a> {
    pub waiters: &'a RefCell<Waiters>,
    pub slot: u32,
    pub done: bool,
}

impl std::future::Future for Wait<'_> {
    type Output = Vec<u64>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<u64>> {
        let r = self.waiters.borrow_mut().poll(self.slot, cx);
        if r.is_ready() {
            self.done = true;
        }
        r
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.waiters.borrow_mut().abandon(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;

    #[test]
    fn waiters_complete_poll_and_abandon() {
        let waiters = RefCell::new(Waiters::default());
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);

        let a = waiters.borrow_mut().register();
        let mut wait = pin!(Wait {
            waiters: &waiters,
            slot: a,
            done: false
        });
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        waiters.borrow_mut().complete(a, vec![1, 0]);
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(vec![1, 0]));

        // The slot is reused; an abandoned wait recycles the late reply's vector.
        let b = waiters.borrow_mut().register();
        assert_eq!(a, b);
        {
            let _w = Wait {
                waiters: &waiters,
                slot: b,
                done: false,
            };
        }
        waiters.borrow_mut().complete(b, vec![7; 3]);
        assert_eq!(waiters.borrow().pending(), 0);
        let v = waiters.borrow_mut().take_vec();
        assert!(v.is_empty() && v.capacity() >= 3);
        assert_eq!(waiters.borrow_mut().register(), b);
    }
}
