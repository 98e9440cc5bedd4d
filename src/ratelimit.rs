//! A token bucket for `--speed`, shared by all copy workers.
//!
//! QEMU's block-job limiter: time is cut into 100 ms slices with a quota of speed/10 bytes;
//! a request that exceeds the quota stretches the slice in proportion, so one large request
//! is paid back over the following slices and the long-run average is the cap. The contract
//! is nbdkit's: [`RateLimiter::take`] returns how long the caller must sleep first.
//!
//! The cap can change while a job runs ([`RateLimiter::set_rate`], `cowimg job set-speed`):
//! the new rate starts a fresh slice, and workers sleeping off a debt under the old rate are
//! woken and charged again under the new one, so the change shows within one slice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_millis(100);

/// A shared token bucket; see the module documentation.
pub struct RateLimiter {
    /// Bytes per slice; 0 = unlimited.
    quota: AtomicU64,
    /// The cap as asked for, bytes per second (the quota is a tenth of it, rounded down).
    rate: AtomicU64,
    state: Mutex<State>,
    /// Wakes sleeping workers when the rate changes.
    changed: Condvar,
}

struct State {
    slice_start: Instant,
    slice_end: Instant,
    dispatched: u64,
    /// Bytes that may go without waiting: the cap's worth of time the copy spent paused for
    /// commits, so that the average over the whole copy is the cap.
    credit: u64,
    /// Bumped by every [`RateLimiter::set_rate`], so that sleepers know to recompute.
    generation: u64,
}

fn quota_of(bytes_per_sec: u64) -> u64 {
    if bytes_per_sec == 0 {
        0
    } else {
        (bytes_per_sec / 10).max(1)
    }
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (0 = unlimited).
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            quota: AtomicU64::new(quota_of(bytes_per_sec)),
            rate: AtomicU64::new(bytes_per_sec),
            state: Mutex::new(State {
                slice_start: now,
                slice_end: now,
                dispatched: 0,
                credit: 0,
                generation: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn quota(&self) -> u64 {
        self.quota.load(Ordering::Relaxed)
    }

    /// Whether there is no cap.
    pub fn unlimited(&self) -> bool {
        self.quota() == 0
    }

    /// The cap in bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the cap to `bytes_per_sec` (0 = unlimited) while workers run. A fresh slice
    /// starts at once (what was dispatched under the old rate is forgiven, as QEMU's
    /// `ratelimit_set_speed` does), and sleeping workers recompute their wait.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let mut s = self.lock();
        self.quota.store(quota_of(bytes_per_sec), Ordering::Relaxed);
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
        let now = Instant::now();
        s.slice_start = now;
        s.slice_end = now;
        s.dispatched = 0;
        s.credit = 0;
        s.generation += 1;
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives back the time the copy spent not copying (a commit's syncs): that much data may
    /// then go at once, so pauses do not pull the average below the cap. At most two
    /// seconds' worth is kept.
    pub fn credit(&self, paused: Duration) {
        if self.unlimited() {
            return;
        }
        let mut s = self.lock();
        let bytes = (self.rate() as f64 * paused.as_secs_f64()) as u64;
        s.credit = (s.credit + bytes).min(self.rate() * 2);
    }

    /// Accounts `bytes` about to be copied; returns the time to wait before copying them.
    pub fn take(&self, bytes: u64) -> Duration {
        let mut s = self.lock();
        self.take_locked(&mut s, bytes)
    }

    fn take_locked(&self, s: &mut State, bytes: u64) -> Duration {
        let quota = self.quota();
        if quota == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let from_credit = s.credit.min(bytes);
        s.credit -= from_credit;
        let bytes = bytes - from_credit;
        if bytes == 0 {
            return Duration::ZERO;
        }
        if now >= s.slice_end {
            s.slice_start = now;
            s.slice_end = now + SLICE;
            s.dispatched = 0;
        }
        s.dispatched += bytes;
        if s.dispatched <= quota {
            return Duration::ZERO;
        }
        // Stretch the slice so the debt is paid back at the quota's rate.
        let slices = s.dispatched as f64 / quota as f64;
        s.slice_end = s.slice_start + SLICE.mul_f64(slices);
        s.slice_end.saturating_duration_since(now)
    }

    /// Waits until `bytes` may be copied. A rate change during the wait charges `bytes`
    /// again under the new rate (in its fresh slice) and waits for that instead.
    pub fn wait(&self, bytes: u64) {
        let mut s = self.lock();
        let mut d = self.take_locked(&mut s, bytes);
        let mut generation = s.generation;
        let mut until = Instant::now() + d;
        while !d.is_zero() {
            let (guard, _) = self
                .changed
                .wait_timeout(s, d)
                .unwrap_or_else(|e| e.into_inner());
            s = guard;
            if s.generation != generation {
                generation = s.generation;
                d = self.take_locked(&mut s, bytes);
                until = Instant::now() + d;
            } else {
                d = until.saturating_duration_since(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debt_is_paid_in_proportion() {
        let r = RateLimiter::new(10 << 20);
        assert!(r.take(512 << 10).is_zero());
        // 1 MiB quota per slice; 3 MiB more makes four slices' worth: about 300 ms more.
        let d = r.take(3 << 20);
        assert!(
            d > Duration::from_millis(250) && d <= Duration::from_millis(400),
            "{d:?}"
        );
    }

    #[test]
    fn pauses_are_made_up_for() {
        let r = RateLimiter::new(10 << 20);
        r.credit(Duration::from_millis(300));
        // 3 MiB of credit plus the 1 MiB slice quota go without waiting.
        assert!(r.take(3 << 20).is_zero());
        assert!(r.take(1 << 20).is_zero());
        assert!(!r.take(1 << 20).is_zero());
    }

    #[test]
    fn a_new_rate_wakes_sleepers_within_a_slice() {
        let r = std::sync::Arc::new(RateLimiter::new(1 << 20));
        assert!(r.take(100 << 10).is_zero());
        // 10 MiB at 1 MiB/s: a ten-second debt, cut short when the cap is lifted.
        let sleeper = {
            let r = r.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                r.wait(10 << 20);
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        r.set_rate(0);
        assert!(r.unlimited());
        let waited = sleeper.join().expect("sleeper");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        // And a lower cap applies to the next request at once.
        r.set_rate(10 << 20);
        assert_eq!(r.rate(), 10 << 20);
        assert!(r.take(1 << 20).is_zero());
        assert!(!r.take(1 << 20).is_zero());
    }

    #[test]
    fn zero_means_unlimited() {
        let r = RateLimiter::new(0);
        assert!(r.take(u64::MAX / 2).is_zero());
    }
}
