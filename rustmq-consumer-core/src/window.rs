//! The per-partition settle window: one slot per offset from the settle watermark to the fetch
//! position. Settling is O(1) amortised: mark the slot, then move the front past settled slots.
//!
//! The slots sit in a ring of their own rather than a `VecDeque`: a slot is dropped in place when
//! its offset settles, and the front then only moves an index, so a large slot (one that holds
//! a cached record) is never moved out on the ack path.

/// Offsets `[base, base + len)`; `base` is the lowest unsettled offset (the commit point).
#[derive(Debug, Clone)]
pub(crate) struct Window<S> {
    base: u64,
    /// The ring: offset `base + i` is at `ring[(head + i) & (ring.len() - 1)]`. Its length is 0
    /// or a power of two; positions outside the `len` slots from `head` hold `None`.
    ring: Vec<Option<S>>,
    head: usize,
    len: usize,
}

impl<S> Window<S> {
    pub(crate) fn new(base: u64) -> Self {
        Self {
            base,
            ring: Vec::new(),
            head: 0,
            len: 0,
        }
    }

    /// The settle watermark: every offset below it is settled.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// One past the last offset in the window (the next offset to fetch).
    pub(crate) fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    /// Unsettled span: `end - base`.
    pub(crate) fn span(&self) -> u64 {
        self.len as u64
    }

    /// Ring position of the `i`-th slot from the front (`i < len`).
    #[inline]
    fn at(&self, i: usize) -> usize {
        (self.head + i) & (self.ring.len() - 1)
    }

    /// Ring position of `offset`, if it is inside the window.
    #[inline]
    fn position(&self, offset: u64) -> Option<usize> {
        let i = usize::try_from(offset.checked_sub(self.base)?).ok()?;
        (i < self.len).then(|| self.at(i))
    }

    /// Appends the next offset in an unsettled state.
    #[inline]
    pub(crate) fn push(&mut self, state: S) {
        if self.len == self.ring.len() {
            self.grow();
        }
        let at = self.at(self.len);
        self.ring[at] = Some(state);
        self.len += 1;
    }

    /// Room for `additional` more slots without growing on the way: one reallocation where
    /// pushing them one at a time would double the ring repeatedly, moving every slot each time.
    pub(crate) fn reserve(&mut self, additional: usize) {
        let need = self.len.saturating_add(additional);
        if need > self.ring.len() {
            self.grow_to(need.next_power_of_two());
        }
    }

    /// Doubles the ring (at least 8 slots).
    #[cold]
    fn grow(&mut self) {
        self.grow_to(self.ring.len() * 2);
    }

    /// Grows the ring to `cap` slots (a power of two; at least 8), the slots moved to its
    /// front in order.
    #[cold]
    fn grow_to(&mut self, cap: usize) {
        let cap = cap.max(8);
        let mut ring: Vec<Option<S>> = Vec::with_capacity(cap);
        for i in 0..self.len {
            let at = self.at(i);
            ring.push(self.ring[at].take());
        }
        ring.resize_with(cap, || None);
        self.ring = ring;
        self.head = 0;
    }

    /// The state of an unsettled offset; `None` if settled or outside the window.
    #[inline]
    pub(crate) fn get(&self, offset: u64) -> Option<&S> {
        self.ring[self.position(offset)?].as_ref()
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut S> {
        let at = self.position(offset)?;
        self.ring[at].as_mut()
    }

    /// `settle_with` with nothing to do with the slot (the tests' shorthand).
    #[cfg(test)]
    pub(crate) fn settle(&mut self, offset: u64) -> u64 {
        self.settle_with(offset, |_| {})
    }

    /// Settles `offset`, handing its slot to `last` before it is dropped (when it is
    /// unsettled); returns how far the watermark advanced (0 when a gap remains below).
    /// Settling an offset outside the window or already settled does nothing.
    #[inline]
    pub(crate) fn settle_with(&mut self, offset: u64, last: impl FnOnce(&mut S)) -> u64 {
        let Some(at) = self.position(offset) else {
            return 0;
        };
        if let Some(slot) = &mut self.ring[at] {
            last(slot);
        }
        // Dropped in place; the front then moves past settled slots without moving them.
        self.ring[at] = None;
        let before = self.base;
        while self.len > 0 && self.ring[self.head].is_none() {
            self.head = (self.head + 1) & (self.ring.len() - 1);
            self.len -= 1;
            self.base += 1;
        }
        self.base - before
    }

    /// Unsettled offsets with their states, lowest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &S)> {
        let base = self.base;
        (0..self.len)
            .filter_map(move |i| self.ring[self.at(i)].as_ref().map(|s| (base + i as u64, s)))
    }

    /// The states of the unsettled offsets (in no particular order).
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut S> {
        // Positions outside the window hold `None`.
        self.ring.iter_mut().flatten()
    }

    /// Drops unsettled offsets off the end while `drop` says so (the fetch position moves
    /// back to the first one dropped); a settled offset stops it.
    pub(crate) fn trim_back(&mut self, drop: impl Fn(&S) -> bool) {
        while self.len > 0 {
            let at = self.at(self.len - 1);
            if !self.ring[at].as_ref().is_some_and(&drop) {
                break;
            }
            self.ring[at] = None;
            self.len -= 1;
        }
    }

    /// Forgets everything and restarts at `base` (seek, reassignment).
    pub(crate) fn reset(&mut self, base: u64) {
        self.base = base;
        for slot in &mut self.ring {
            *slot = None;
        }
        self.head = 0;
        self.len = 0;
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
    fn reserved_room_takes_the_pushes_without_growing_and_keeps_the_order() {
        let mut w = Window::new(0);
        for i in 0..5 {
            w.push(i);
        }
        // Wrap the ring: its head is no longer at the front.
        assert_eq!(w.settle(0), 1);
        assert_eq!(w.settle(1), 1);
        w.reserve(1_000);
        let ring = w.ring.len();
        assert_eq!(ring, 1_024, "the next power of two of 3 + 1,000");
        for i in 5..1_003 {
            w.push(i);
        }
        assert_eq!(w.ring.len(), ring, "no growth on the way");
        let kept: Vec<_> = w.iter().map(|(offset, &s)| (offset, s)).collect();
        let expected: Vec<_> = (2..1_003).map(|i| (i, i)).collect();
        assert_eq!(kept, expected);
        w.reserve(0);
        assert_eq!(w.ring.len(), ring, "enough room: nothing moves");
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

    #[test]
    fn the_ring_grows_across_its_wrap_in_order() {
        let mut w = Window::new(100);
        for i in 0..6u64 {
            w.push(i);
        }
        for o in 100..105 {
            w.settle(o);
        }
        // The front is past the start of the ring: the next pushes wrap, then grow it.
        for i in 6..30u64 {
            w.push(i);
        }
        assert_eq!(w.base(), 105);
        assert_eq!(w.end(), 130);
        let states: Vec<(u64, u64)> = w.iter().map(|(o, &s)| (o, s)).collect();
        assert_eq!(states, (105..130).map(|o| (o, o - 100)).collect::<Vec<_>>());
        assert_eq!(w.get(117), Some(&17));
        assert_eq!(w.get(130), None);
        assert_eq!(w.iter_mut().count(), 25);
        w.reset(7);
        assert_eq!((w.base(), w.end(), w.iter_mut().count()), (7, 7, 0));
    }

    proptest! {
        /// Pushes, settles and trims mixed, so the ring wraps and grows at any point.
        #[test]
        fn matches_a_map_model(ops in proptest::collection::vec((0u8..4, 0u64..40), 0..300)) {
            let mut w = Window::new(3);
            let mut model: std::collections::BTreeMap<u64, u64> = Default::default();
            let (mut base, mut end) = (3u64, 3u64);
            for (i, (op, arg)) in ops.into_iter().enumerate() {
                match op {
                    0 | 1 => {
                        w.push(i as u64);
                        model.insert(end, i as u64);
                        end += 1;
                    }
                    2 => {
                        let off = base + arg;
                        w.settle(off);
                        model.remove(&off);
                        while base < end && !model.contains_key(&base) {
                            base += 1;
                        }
                    }
                    _ => {
                        let odd = arg % 2 == 1;
                        w.trim_back(|s| (s % 2 == 1) == odd);
                        while end > base && model.get(&(end - 1)).is_some_and(|s| (s % 2 == 1) == odd) {
                            end -= 1;
                            model.remove(&end);
                        }
                    }
                }
                prop_assert_eq!((w.base(), w.end()), (base, end));
                let got: Vec<(u64, u64)> = w.iter().map(|(o, &s)| (o, s)).collect();
                let want: Vec<(u64, u64)> = model.iter().map(|(&o, &s)| (o, s)).collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(w.iter_mut().count(), model.len());
            }
        }
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
