//! Extents: guest ranges of a target with what a copy does there, and the two operations
//! every planner applies to them: widening a range to whole allocation units of the target
//! (a unit is written whole, so a partly concerned unit is copied whole) and appending with
//! merging (touching or overlapping extents that do the same become one).

/// What to do with a guest range of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Copy what the source reads there.
    Copy,
    /// Make it read as zeros, hiding whatever lies below.
    Zero,
}

/// A guest range of the target, `[start, start + len)`, and what to do there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the copy does with the range.
    pub action: Action,
}

impl Extent {
    /// The offset just past the range.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// `[start, end)` widened outwards to whole `unit`s, its end clipped to `limit` (the end of
/// the image, or of the range the caller may touch). `unit` 0 counts as 1.
pub fn widen_range(start: u64, end: u64, unit: u64, limit: u64) -> (u64, u64) {
    let unit = unit.max(1);
    (
        start / unit * unit,
        end.div_ceil(unit).saturating_mul(unit).min(limit),
    )
}

/// Appends `e` to sorted `out`, merged into the last extent when both do the same and they
/// touch or overlap. Only extents with the same action may overlap (checked in debug builds):
/// two actions on one byte would be a planning error.
pub fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        let last_end = last.end();
        debug_assert!(
            last_end <= e.start || last.action == e.action,
            "{last:?} overlaps {e:?}"
        );
        if last.action == e.action && last_end >= e.start {
            last.len = last_end.max(e.end()) - last.start;
            return;
        }
    }
    out.push(e);
}

/// Widens sorted extents to whole `unit`s (ends clipped to `size`) and merges those that then
/// touch or overlap.
pub fn widen(extents: impl IntoIterator<Item = Extent>, unit: u64, size: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    for e in extents {
        let (start, end) = widen_range(e.start, e.end(), unit, size);
        push_merged(
            &mut out,
            Extent {
                start,
                len: end - start,
                action: e.action,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, len: u64, action: Action) -> Extent {
        Extent { start, len, action }
    }

    #[test]
    fn extents_widen_to_units_and_merge() {
        use Action::Copy;
        assert_eq!(
            widen(
                vec![e(100, 10, Copy), e(600, 10, Copy), e(5000, 100, Copy)],
                512,
                5050
            ),
            vec![e(0, 1024, Copy), e(4608, 442, Copy)]
        );
    }

    #[test]
    fn ranges_widen_outwards_and_stop_at_the_limit() {
        assert_eq!(widen_range(4096, 8192, 4096, u64::MAX), (4096, 8192));
        assert_eq!(widen_range(4097, 8191, 4096, u64::MAX), (4096, 8192));
        assert_eq!(widen_range(4097, 8191, 4096, 6000), (4096, 6000));
        assert_eq!(widen_range(3, 5, 0, 10), (3, 5));
        // No overflow at the top of the offset space.
        assert_eq!(
            widen_range(u64::MAX - 1, u64::MAX, 4096, u64::MAX).1,
            u64::MAX
        );
    }

    #[test]
    fn only_same_actions_merge() {
        use Action::{Copy, Zero};
        let mut v = Vec::new();
        push_merged(&mut v, e(0, 512, Copy));
        push_merged(&mut v, e(512, 512, Copy));
        push_merged(&mut v, e(1024, 512, Zero));
        push_merged(&mut v, e(1536, 512, Copy));
        push_merged(&mut v, e(1600, 1000, Copy));
        push_merged(&mut v, e(4096, 512, Copy));
        assert_eq!(
            v,
            [
                e(0, 1024, Copy),
                e(1024, 512, Zero),
                e(1536, 1064, Copy),
                e(4096, 512, Copy)
            ]
        );
    }
}
