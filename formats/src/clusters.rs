//! Per-cluster serialisation of writes.
//!
//! A write reads a cluster's entry, writes data (completing a partial cluster from what it
//! read before) and then stages the new entry: two writes touching one cluster at once would
//! each decide from the same old entry, and the second to stage would drop what the first
//! wrote (and leak its cluster). Writers therefore hold the guest clusters they touch for the
//! whole write; writes of different clusters still run in parallel, as the copy engine's
//! workers and a server's clients need.

use std::sync::{Condvar, Mutex};

/// The guest cluster ranges being written, with a way to wait for one to be released.
#[derive(Default)]
pub struct ClusterLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// Guest clusters `[first, end)` held by one writer until it is dropped.
pub struct ClusterGuard<'a> {
    locks: &'a ClusterLocks,
    range: (u64, u64),
}

impl ClusterLocks {
    /// Holds guest clusters `[first, end)` (cluster indices), waiting while any of them is
    /// held by another writer.
    ///
    /// ```
    /// use cowimg_formats::clusters::ClusterLocks;
    /// let locks = ClusterLocks::default();
    /// let a = locks.hold(0, 2);
    /// let b = locks.hold(2, 3); // disjoint: does not wait
    /// drop((a, b));
    /// ```
    pub fn hold(&self, first: u64, end: u64) -> ClusterGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.iter().any(|&(a, b)| a < end && first < b) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.push((first, end));
        ClusterGuard {
            locks: self,
            range: (first, end),
        }
    }
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn overlapping_ranges_wait_for_each_other() {
        let locks = ClusterLocks::default();
        let inside = AtomicBool::new(false);
        std::thread::scope(|s| {
            let first = locks.hold(4, 8);
            s.spawn(|| {
                let _g = locks.hold(7, 9);
                inside.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!inside.load(Ordering::SeqCst), "an overlapping range waits");
            drop(first);
        });
        assert!(inside.load(Ordering::SeqCst));
        assert!(locks.held.lock().expect("lock").is_empty());
    }
}
