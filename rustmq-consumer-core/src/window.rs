//! The per-partition settle window: one slot per offset from the settle watermark to the fetch
//! position. Settling is O(1) amortised: mark the slot, then pop settled slots off the front.

use std::collections::VecDeque;

/// Offsets `[base, base + len)`; `base` is the lowest unsettled offset (the commit point).
#[derive(Debug, Clone)]
pub(crate) struct Window<S> {
    base: u64,
    slots: VecDeque<Option<S>>,
}

impl<S> Window<S> {
    pub(crate) fn new(base: u64) -> Self {
        Self {
            base,
            slots: VecDeque::new(),
        }
    }

    /// The settle watermark: every offset below it is settled.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// One past the last offset in the window (the next offset to fetch).
    pub(crate) fn end(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    /// Unsettled span: `end - base`.
    pub(crate) fn span(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Appends the next offset in an unsettled state.
    pub(crate) fn push(&mut self, state: S) {
        self.slots.push_back(Some(state));
    }

    /// The state of an unsettled offset; `None` if settled or outside the window.
    pub(crate) fn get(&self, offset: u64) -> Option<&S> {
        let i = offset.checked_sub(self.base)?;
        self.slots.get(usize::try_from(i).ok()?)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut S> {
        let i = offset.checked_sub(self.base)?;
        self.slots.get_mut(usize::try_from(i).ok()?)?.as_mut()
    }

    /// Settles `offset`; returns how far the watermark advanced (0 when a gap remains below).
    /// Settling an offset outside the window or already settled does nothing.
    pub(crate) fn settle(&mut self, offset: u64) -> u64 {
        let Some(slot) = self.get_mut_slot(offset) else {
            return 0;
        };
        *slot = None;
        let before = self.base;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        self.base - before
    }

    fn get_mut_slot(&mut self, offset: u64) -> Option<&mut Option<S>> {
        let i = offset.checked_sub(self.base)?;
        self.slots.get_mut(usize::try_from(i).ok()?)
    }

    /// Unsettled offsets with their states, lowest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &S)> {
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .filter_map(move |(i, s)| s.as_ref().map(|s| (base + i as u64, s)))
    }

    /// The states of the unsettled offsets, lowest first.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut S> {
        self.slots.iter_mut().flatten()
    }

    /// Drops unsettled offsets off the end while `drop` says so (the fetch position moves
    /// back to the first one dropped); a settled offset stops it.
    pub(crate) fn trim_back(&mut self, drop: impl Fn(&S) -> bool) {
        while self
            .slots
            .back()
            .is_some_and(|s| s.as_ref().is_some_and(&drop))
        {
            self.slots.pop_back();
        }
    }

    /// Forgets everything and restarts at `base` (seek, reassignment).
    pub(crate) fn reset(&mut self, base: u64) {
        self.base = base;
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn out_of_order_settles_never_pass_a_gap() {
        let mut w = Window::new(0);
        for _ in 0..5 {
            w.push(());
        }
        assert_eq!(w.settle(2), 0);
        assert_eq!(w.settle(1), 0);
        assert_eq!(w.base(), 0, "offset 0 is still unsettled");
        assert_eq!(w.settle(0), 3);
        assert_eq!(w.base(), 3);
        assert_eq!(w.end(), 5);
    }

    #[test]
    fn offset_zero_is_consumed_and_committable() {
        let mut w = Window::new(0);
        w.push(());
        assert_eq!(w.settle(0), 1);
        assert_eq!(w.base(), 1, "commit offset is the next offset to read");
    }

    #[test]
    fn trimming_the_back_stops_at_a_kept_or_settled_offset() {
        let mut w = Window::new(10);
        for s in [1, 2, 9, 9, 2, 9, 9] {
            w.push(s);
        }
        w.trim_back(|&s| s == 9);
        assert_eq!(w.end(), 15);
        w.settle(14);
        w.trim_back(|&s| s == 2);
        assert_eq!(w.end(), 15, "a settled offset stops the trim");
        assert_eq!(w.base(), 10);
    }

    #[test]
    fn settles_outside_the_window_do_nothing() {
        let mut w = Window::new(10);
        w.push(());
        assert_eq!(w.settle(9), 0);
        assert_eq!(w.settle(11), 0);
        assert_eq!(w.settle(10), 1);
        assert_eq!(w.settle(10), 0);
        assert_eq!(w.base(), 11);
    }

    proptest! {
        #[test]
        fn matches_a_set_model(n in 1usize..200, order in proptest::collection::vec(0usize..200, 0..400)) {
            let mut w = Window::new(7);
            for _ in 0..n { w.push(()); }
            let mut settled = BTreeSet::new();
            for i in order {
                let off = 7 + (i % n) as u64;
                w.settle(off);
                settled.insert(off);
                let mut expect = 7;
                while settled.contains(&expect) { expect += 1; }
                prop_assert_eq!(w.base(), expect);
                prop_assert_eq!(w.end(), 7 + n as u64);
                prop_assert!(w.iter().all(|(o, _)| !settled.contains(&o)));
            }
        }
    }
}
