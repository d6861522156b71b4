//! The two allocators the reconciler keeps: ids (service ids, backend ids) and ranges of
//! MAGLEV slots. Both can be rebuilt from what the maps hold (`with_used`, `reserve`), so
//! an adopting agent continues where the previous one stopped.

use std::collections::{BTreeMap, BTreeSet};

/// Ids below `limit`, lowest free first.
#[derive(Clone, Debug)]
pub(super) struct IdAlloc {
    limit: u32,
    /// Every id >= next is free.
    next: u32,
    /// Free ids below `next`.
    free: BTreeSet<u32>,
}

impl IdAlloc {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            limit,
            next: 0,
            free: BTreeSet::new(),
        }
    }

    /// Marks adopted ids as used.
    pub(super) fn with_used(limit: u32, used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().filter(|&i| i < limit).collect();
        let next = used.last().map_or(0, |m| m + 1);
        let free = (0..next).filter(|i| !used.contains(i)).collect();
        Self { limit, next, free }
    }

    pub(super) fn available(&self) -> usize {
        self.free.len() + (self.limit - self.next) as usize
    }

    pub(super) fn alloc(&mut self) -> Option<u32> {
        if let Some(i) = self.free.pop_first() {
            return Some(i);
        }
        if self.next < self.limit {
            self.next += 1;
            return Some(self.next - 1);
        }
        None
    }

    pub(super) fn release(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
        // Keeps `free` below `next` only, so `available` counts every id once.
        while self.next > 0 && self.free.remove(&(self.next - 1)) {
            self.next -= 1;
        }
    }
}

/// Ranges of MAGLEV, first fit, coalescing on release.
#[derive(Clone, Debug)]
pub(super) struct RangeAlloc {
    /// start → len of every free range; never two adjacent ones.
    free: BTreeMap<u32, u32>,
}

impl RangeAlloc {
    pub(super) fn new(slots: u32) -> Self {
        let mut free = BTreeMap::new();
        if slots > 0 {
            free.insert(0, slots);
        }
        Self { free }
    }

    pub(super) fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&start, &free_len) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&start);
        if free_len > len {
            self.free.insert(start + len, free_len - len);
        }
        Some(start)
    }

    /// Takes `[start, start+len)` out of the free ranges (adopting). False if any part of
    /// it was not free (overlapping or out-of-bounds ranges in the maps).
    pub(super) fn reserve(&mut self, start: u32, len: u32) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let Some((&free_start, &free_len)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if free_start + free_len < end {
            return false;
        }
        self.free.remove(&free_start);
        if start > free_start {
            self.free.insert(free_start, start - free_start);
        }
        if free_start + free_len > end {
            self.free.insert(end, free_start + free_len - end);
        }
        true
    }

    pub(super) fn release(&mut self, start: u32, len: u32) {
        let mut start = start;
        let mut len = len;
        if let Some((&prev_start, &prev_len)) = self.free.range(..start).next_back() {
            if prev_start + prev_len == start {
                self.free.remove(&prev_start);
                start = prev_start;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        self.free.insert(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocators_coalesce_and_fit_first() {
        let mut a = RangeAlloc::new(1000);
        let x = a.alloc(101).expect("x");
        let y = a.alloc(101).expect("y");
        let z = a.alloc(101).expect("z");
        assert_eq!((x, y, z), (0, 101, 202));
        a.release(x, 101);
        a.release(y, 101);
        assert_eq!(a.alloc(202), Some(0), "x and y coalesced");
        a.release(0, 202);
        a.release(z, 101);
        assert_eq!(a.free.len(), 1, "{:?}", a.free);
        assert_eq!(a.alloc(1000), Some(0));
        assert_eq!(a.alloc(1), None);

        let mut ids = IdAlloc::with_used(4, [0, 2]);
        assert_eq!(ids.available(), 2);
        assert_eq!(ids.alloc(), Some(1));
        assert_eq!(ids.alloc(), Some(3));
        assert_eq!(ids.alloc(), None);
    }
}
