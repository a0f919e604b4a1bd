//! The listening sockets as the loop keeps them: one slot per listener, holding the socket and
//! the two flags the loop writes on every event, all in memory the children do not inherit
//! (see `parent_memory`: a heap page the parent writes between two forks is a copy-on-write
//! fault). A listener's index is its poll token's (`token::Source::Listener(i)`).

use std::ops::{Index, IndexMut};

use allocator_api2::vec::Vec as ParentVec;

use crate::listen::Listener;
use crate::parent_memory::ParentOnly;

/// One listener and what the loop knows about it.
pub(super) struct Slot {
    pub(super) listener: Listener,
    /// It may have connections queued: edge-triggered readiness is reported once, so this is
    /// remembered until `accept` says WouldBlock.
    pub(super) ready: bool,
    /// It is in the poll set. Kept per listener, so that one whose re-registration failed is
    /// retried instead of staying deaf for good.
    pub(super) registered: bool,
}

/// The listeners in token order.
pub(super) struct Listeners {
    slots: ParentVec<Slot, ParentOnly>,
}

impl Listeners {
    /// Slots for `listeners`, each marked ready (connections may be queued before the first
    /// edge is seen) and `registered` as the caller says.
    pub(super) fn new(listeners: Vec<Listener>, registered: bool) -> Self {
        let mut set = Listeners {
            slots: ParentVec::new_in(ParentOnly),
        };
        set.fill(listeners, registered);
        set
    }

    /// Replaces every slot by `listeners`, none registered, all ready. The storage is reused:
    /// parent-only memory is never given back (see `parent_memory`).
    pub(super) fn replace(&mut self, listeners: Vec<Listener>) {
        self.slots.clear();
        self.fill(listeners, false);
    }

    fn fill(&mut self, listeners: Vec<Listener>, registered: bool) {
        self.slots.reserve(listeners.len());
        for listener in listeners {
            self.slots.push(Slot {
                listener,
                ready: true,
                registered,
            });
        }
    }

    /// Removes every slot and returns the listeners, in token order.
    pub(super) fn take_all(&mut self) -> Vec<Listener> {
        self.slots.drain(..).map(|slot| slot.listener).collect()
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Slot> {
        self.slots.iter_mut()
    }

    /// Listener `i` had an event: it may have connections queued. An index no slot has (an
    /// event for a listener closed in this turn) is ignored.
    pub(super) fn mark_ready(&mut self, i: usize) {
        if let Some(slot) = self.slots.get_mut(i) {
            slot.ready = true;
        }
    }

    /// Every listener may have connections queued (they queued while out of the poll set,
    /// and an edge-triggered poll reports none of them).
    pub(super) fn mark_all_ready(&mut self) {
        self.slots.iter_mut().for_each(|slot| slot.ready = true);
    }
}

impl Index<usize> for Listeners {
    type Output = Slot;

    fn index(&self, i: usize) -> &Slot {
        &self.slots[i]
    }
}

impl IndexMut<usize> for Listeners {
    fn index_mut(&mut self, i: usize) -> &mut Slot {
        &mut self.slots[i]
    }
}
