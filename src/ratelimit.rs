//! A token bucket for `--speed`, shared by all copy workers.
//!
//! QEMU's block-job limiter: time is cut into 100 ms slices with a quota of speed/10 bytes;
//! a request that exceeds the quota stretches the slice in proportion, so one large request
//! is paid back over the following slices and the long-run average is the cap. The contract
//! is nbdkit's: [`RateLimiter::take`] returns how long the caller must sleep first.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_millis(100);

pub struct RateLimiter {
    /// Bytes per slice; 0 = unlimited.
    quota: u64,
    state: Mutex<State>,
}

struct State {
    slice_start: Instant,
    slice_end: Instant,
    dispatched: u64,
    /// Bytes that may go without waiting: the cap's worth of time the copy spent paused for
    /// commits, so that the average over the whole copy is the cap.
    credit: u64,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (0 = unlimited).
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        let quota = if bytes_per_sec == 0 {
            0
        } else {
            (bytes_per_sec / 10).max(1)
        };
        let now = Instant::now();
        RateLimiter {
            quota,
            state: Mutex::new(State {
                slice_start: now,
                slice_end: now,
                dispatched: 0,
                credit: 0,
            }),
        }
    }

    pub fn unlimited(&self) -> bool {
        self.quota == 0
    }

    /// The cap in bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.quota * 10
    }

    /// Gives back the time the copy spent not copying (a commit's syncs): that much data may
    /// then go at once, so pauses do not pull the average below the cap. At most two
    /// seconds' worth is kept.
    pub fn credit(&self, paused: Duration) {
        if self.quota == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = (self.rate() as f64 * paused.as_secs_f64()) as u64;
        s.credit = (s.credit + bytes).min(self.rate() * 2);
    }

    /// Accounts `bytes` about to be copied; returns the time to wait before copying them.
    pub fn take(&self, bytes: u64) -> Duration {
        if self.quota == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
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
        if s.dispatched <= self.quota {
            return Duration::ZERO;
        }
        // Stretch the slice so the debt is paid back at the quota's rate.
        let slices = s.dispatched as f64 / self.quota as f64;
        s.slice_end = s.slice_start + SLICE.mul_f64(slices);
        s.slice_end.saturating_duration_since(now)
    }

    /// Waits until `bytes` may be copied.
    pub fn wait(&self, bytes: u64) {
        let d = self.take(bytes);
        if !d.is_zero() {
            std::thread::sleep(d);
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
    fn zero_means_unlimited() {
        let r = RateLimiter::new(0);
        assert!(r.take(u64::MAX / 2).is_zero());
    }
}
