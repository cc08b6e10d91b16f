//! Host-side addresses: the daemon's pool is cut into /31 links, one per sandbox (the host's
//! end and the sandbox namespace's end of its veth pair). Link 0 is the daemon's own: its
//! service address (resolver, proxies) is the link's second address, on a dummy interface.
//! A link given back is handed out again only after every other free one, so what the last
//! holder left (conntrack entries, a resolver's late answer) never meets the next.

use std::collections::{BTreeSet, VecDeque};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::NetworkError;

/// One sandbox's link: a /31 of the pool.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Slot(pub u32);

impl Slot {
    /// The host's end of the link.
    pub fn host_address(self, pool: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(pool.network()) + 2 * self.0)
    }

    /// The sandbox namespace's end: the address its traffic leaves with, and the one the
    /// daemon reaches the sandbox at.
    pub fn sandbox_address(self, pool: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(pool.network()) + 2 * self.0 + 1)
    }

    /// The slot whose link holds `address`, if it is in `pool` (never slot 0).
    pub fn of(address: Ipv4Addr, pool: Ipv4Net) -> Option<Slot> {
        if !pool.contains(&address) {
            return None;
        }
        let index = (u32::from(address) - u32::from(pool.network())) / 2;
        (index > 0).then_some(Slot(index))
    }
}

/// The daemon's service address in `pool`: the second address of link 0.
pub fn service_address(pool: Ipv4Net) -> Ipv4Addr {
    Slot(0).sandbox_address(pool)
}

/// Links handed out and free ones, oldest-freed first.
#[derive(Debug)]
pub struct SlotPool {
    pool: Ipv4Net,
    taken: BTreeSet<Slot>,
    /// Given back, in the order they were: reused last.
    returned: VecDeque<Slot>,
    /// Never handed out yet: slots from here up.
    next_fresh: u32,
    count: u32,
}

impl SlotPool {
    /// The links of `pool` (at least a /30: link 0 is the daemon's).
    pub fn new(pool: Ipv4Net) -> Result<SlotPool, NetworkError> {
        let count = 1u32
            .checked_shl(32 - u32::from(pool.prefix_len()))
            .unwrap_or(u32::MAX)
            / 2;
        if count < 2 {
            return Err(NetworkError::Config(format!(
                "the address pool {pool} is too small: it needs at least a /30"
            )));
        }
        Ok(SlotPool {
            pool: pool.trunc(),
            taken: BTreeSet::new(),
            returned: VecDeque::new(),
            next_fresh: 1,
            count,
        })
    }

    /// How many sandboxes it can hold.
    pub fn capacity(&self) -> u32 {
        self.count - 1
    }

    /// The pool.
    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

    /// Takes a link.
    pub fn take(&mut self) -> Result<Slot, NetworkError> {
        let slot = if self.next_fresh < self.count {
            self.next_fresh += 1;
            Slot(self.next_fresh - 1)
        } else if let Some(slot) = self.returned.pop_front() {
            slot
        } else {
            return Err(NetworkError::Exhausted(format!(
                "all {} addresses of the pool {} are in use (set a larger network pool)",
                self.capacity(),
                self.pool
            )));
        };
        self.taken.insert(slot);
        Ok(slot)
    }

    /// Claims `slot` for a sandbox of an earlier run being adopted; false if it is not free.
    pub fn claim(&mut self, slot: Slot) -> bool {
        if slot.0 == 0 || slot.0 >= self.count || self.taken.contains(&slot) {
            return false;
        }
        if slot.0 >= self.next_fresh {
            // Fresh slots below it stay fresh: queue them as returned, in order.
            for skipped in self.next_fresh..slot.0 {
                self.returned.push_back(Slot(skipped));
            }
            self.next_fresh = slot.0 + 1;
        } else {
            self.returned.retain(|s| *s != slot);
        }
        self.taken.insert(slot);
        true
    }

    /// Gives `slot` back (call once everything of its sandbox is gone).
    pub fn give_back(&mut self, slot: Slot) {
        if self.taken.remove(&slot) {
            self.returned.push_back(slot);
        }
    }

    /// How many are in use.
    pub fn in_use(&self) -> usize {
        self.taken.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_pairs_of_the_pool_and_link_zero_is_the_daemons() {
        let pool: Ipv4Net = "10.251.0.0/16".parse().expect("net");
        assert_eq!(service_address(pool), Ipv4Addr::new(10, 251, 0, 1));
        let mut slots = SlotPool::new(pool).expect("pool");
        assert_eq!(
            slots.capacity(),
            32767,
            "a /16 holds more than 16,384 sandboxes"
        );
        let first = slots.take().expect("slot");
        assert_eq!(first, Slot(1));
        assert_eq!(first.host_address(pool), Ipv4Addr::new(10, 251, 0, 2));
        assert_eq!(first.sandbox_address(pool), Ipv4Addr::new(10, 251, 0, 3));
        assert_eq!(Slot::of(Ipv4Addr::new(10, 251, 0, 3), pool), Some(first));
        assert_eq!(
            Slot::of(Ipv4Addr::new(10, 251, 0, 1), pool),
            None,
            "the daemon's"
        );
        assert_eq!(Slot::of(Ipv4Addr::new(10, 252, 0, 3), pool), None);
        let last = Slot(32767);
        assert_eq!(last.sandbox_address(pool), Ipv4Addr::new(10, 251, 255, 255));
    }

    #[test]
    fn a_returned_link_is_reused_last() {
        let pool: Ipv4Net = "192.0.2.0/29".parse().expect("net");
        let mut slots = SlotPool::new(pool).expect("pool");
        assert_eq!(slots.capacity(), 3);
        let a = slots.take().expect("a");
        let b = slots.take().expect("b");
        slots.give_back(a);
        let c = slots.take().expect("c");
        assert_eq!(c, Slot(3), "a fresh one before the returned one");
        slots.give_back(b);
        assert_eq!(slots.take().expect("d"), a, "then the oldest returned");
        assert_eq!(slots.take().expect("e"), b);
        let err = slots.take().expect_err("full");
        assert!(err.to_string().contains("larger network pool"), "{err}");
        assert!(SlotPool::new("192.0.2.0/31".parse().expect("net")).is_err());
    }

    #[test]
    fn adopted_links_are_claimed_once() {
        let pool: Ipv4Net = "192.0.2.0/28".parse().expect("net");
        let mut slots = SlotPool::new(pool).expect("pool");
        assert!(slots.claim(Slot(5)));
        assert!(!slots.claim(Slot(5)), "taken");
        assert!(!slots.claim(Slot(0)), "the daemon's");
        assert!(!slots.claim(Slot(8)), "outside");
        let mut handed = BTreeSet::new();
        while let Ok(slot) = slots.take() {
            assert!(handed.insert(slot), "{slot:?} twice");
        }
        assert_eq!(handed.len(), 6, "1..=7 but 5");
        assert!(!handed.contains(&Slot(5)));
        assert_eq!(slots.in_use(), 7);
    }
}
