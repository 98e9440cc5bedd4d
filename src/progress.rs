//! Progress reporting for long commands: an indicatif bar on a terminal (or with `-p`), or
//! JSON lines on stderr for programs (`--progress json`), in the shape of QEMU's block-job
//! figures (`cur`/`end` like libvirt's BlockPullInfo, BLOCK_JOB_COMPLETED at the end) plus
//! `copied`, the bytes actually copied, which QEMU's figures do not tell.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::copy::Counters;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Not at all.
    Off,
    /// An indicatif bar on a terminal; plain percentage lines when stderr is not one.
    Bar,
    /// JSON lines on stderr (`--progress json`).
    Json,
}

impl Mode {
    /// `--progress json` wins; `-p` forces the bar; otherwise a bar only on a terminal.
    pub fn choose(json: bool, force_bar: bool, quiet: bool) -> Mode {
        if json {
            Mode::Json
        } else if force_bar || (!quiet && std::io::stderr().is_terminal()) {
            Mode::Bar
        } else {
            Mode::Off
        }
    }
}

/// The cap a job runs under now, in bytes per second (0 = unlimited): read at every update,
/// so that `cowimg job set-speed` shows at once.
pub type Cap = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A running progress display; [`Reporter::finish`] prints the last state and stops it.
pub struct Reporter {
    mode: Mode,
    end: u64,
    cap: Cap,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
}

fn json_line(counters: &Counters, end: u64, speed: u64) -> String {
    format!(
        "{{\"cur\":{},\"end\":{},\"copied\":{},\"speed\":{}}}",
        counters.done.load(Ordering::Relaxed),
        end,
        counters.copied.load(Ordering::Relaxed),
        speed
    )
}

/// How far back the displayed rate looks: long enough to smooth the rate limiter's slices,
/// short enough that a new cap shows within seconds.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// The bytes copied over the last [`RATE_WINDOW`] (since the start before that much has
/// passed): the pace the figures show.
struct Pace {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Pace {
    fn new(started: Instant) -> Pace {
        Pace {
            samples: std::collections::VecDeque::from([(started, 0)]),
        }
    }

    /// Records `copied` now; returns the bytes and the time of the window.
    fn update(&mut self, copied: u64) -> (u64, Duration) {
        let now = Instant::now();
        self.samples.push_back((now, copied));
        while self.samples.len() > 2 && now - self.samples[1].0 >= RATE_WINDOW {
            self.samples.pop_front();
        }
        let (t0, c0) = self.samples[0];
        (copied.saturating_sub(c0), now - t0)
    }
}

impl Reporter {
    /// Starts reporting on `counters` for a job of `end` guest bytes under `cap`.
    pub fn start(mode: Mode, end: u64, cap: Cap, counters: Arc<Counters>) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let thread = match mode {
            Mode::Off => None,
            Mode::Json => {
                let (stop, counters, cap) = (stop.clone(), counters.clone(), cap.clone());
                // At least one line, however short the job, so that readers see the same
                // sequence every time.
                Some(std::thread::spawn(move || loop {
                    eprintln!("{}", json_line(&counters, end, cap()));
                    sleep_unless(&stop, Duration::from_millis(500));
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }))
            }
            // qemu-img's percentage lines when forced with -p but not on a terminal (a log),
            // or in a build without the terminal bar.
            Mode::Bar if !terminal_bar() => {
                let (stop, counters, cap) = (stop.clone(), counters.clone(), cap.clone());
                Some(std::thread::spawn(move || {
                    let mut pace = Pace::new(started);
                    let mut line = |c: &Counters| {
                        let done = c.done.load(Ordering::Relaxed);
                        let pct = if end == 0 {
                            100.0
                        } else {
                            done as f64 * 100.0 / end as f64
                        };
                        eprintln!("    ({pct:.2}/100%) {}", figures(c, end, &mut pace, cap()));
                    };
                    while !stop.load(Ordering::Relaxed) {
                        line(&counters);
                        sleep_unless(&stop, Duration::from_secs(1));
                    }
                    line(&counters);
                }))
            }
            Mode::Bar => {
                let (stop, counters, cap) = (stop.clone(), counters.clone(), cap.clone());
                Some(std::thread::spawn(move || {
                    bar(&stop, &counters, end, &cap, started)
                }))
            }
        };
        Reporter {
            mode,
            end,
            cap,
            counters,
            stop,
            thread,
            started,
        }
    }

    /// Stops reporting; JSON mode ends with the completion event.
    pub fn finish(mut self, error: Option<&str>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.mode == Mode::Json {
            let c = &self.counters;
            let error = match error {
                Some(e) => serde_json::to_string(e).unwrap_or_else(|_| "\"error\"".into()),
                None => "null".into(),
            };
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "{{\"event\":\"completed\",\"len\":{},\"offset\":{},\"copied\":{},\"speed\":{},\"elapsed\":{:.3},\"error\":{}}}",
                self.end,
                c.done.load(Ordering::Relaxed),
                c.copied.load(Ordering::Relaxed),
                (self.cap)(),
                self.started.elapsed().as_secs_f64(),
                error
            );
        }
    }
}

/// `n` bytes as indicatif's `BinaryBytes` shows them ("512 B", "1.50 MiB"), so that the
/// lines read the same with and without the terminal bar (the `cli` feature).
fn binary_bytes(n: u64) -> String {
    const PREFIXES: [&str; 8] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"];
    let mut x = n as f64;
    if x < 1024.0 {
        return format!("{x:.0} B");
    }
    let mut i = 0;
    while x >= 1024.0 && i < PREFIXES.len() {
        x /= 1024.0;
        i += 1;
    }
    format!("{x:.2} {}B", PREFIXES[i - 1])
}

/// "copied 40.0 MiB at 20.0 MiB/s, ETA 8s (cap 20.0 MiB/s)": the rate is the bytes actually
/// copied over the last few seconds, the ETA what is left of the job at that rate (at most the
/// cap `speed`; at the cap while nothing is copied yet; unknown, "?", without either), and
/// the cap the one in force now.
fn figures(c: &Counters, end: u64, pace: &mut Pace, speed: u64) -> String {
    let copied = c.copied.load(Ordering::Relaxed);
    let left = end.saturating_sub(c.done.load(Ordering::Relaxed));
    let (recent, window) = pace.update(copied);
    let (rate, eta) = rate_and_eta(recent, left, window, speed);
    let eta = match eta {
        Some(eta) => format_eta(eta),
        None => "?".to_string(),
    };
    let cap = if speed > 0 {
        format!(" (cap {}/s)", binary_bytes(speed))
    } else {
        String::new()
    };
    format!(
        "copied {} at {}/s, ETA {eta}{cap}",
        binary_bytes(copied),
        binary_bytes(rate as u64)
    )
}

/// Bytes per second of `copied` bytes over `elapsed`, and the time `left` bytes take at that
/// rate (or the cap).
fn rate_and_eta(copied: u64, left: u64, elapsed: Duration, speed: u64) -> (f64, Option<Duration>) {
    let secs = elapsed.as_secs_f64();
    let mut rate = if secs > 0.0 {
        copied as f64 / secs
    } else {
        0.0
    };
    if speed > 0 {
        // The cap is a long-run average: the bucket's first slice is free, so the first
        // moments can measure far above it, which is noise, not the pace of the job.
        rate = rate.min(speed as f64);
    }
    if left == 0 {
        return (rate, Some(Duration::ZERO));
    }
    let pace = match (rate > 0.0, speed > 0) {
        (true, _) => rate,
        (false, true) => speed as f64,
        (false, false) => return (rate, None),
    };
    (rate, Some(Duration::from_secs_f64(left as f64 / pace)))
}

/// "8s", "2m05s", "1h02m"; rounded up, so that only a finished job shows "0s".
fn format_eta(d: Duration) -> String {
    let s = d.as_secs_f64().ceil() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Whether the bar goes to a terminal: stderr is one, and the build has the bar.
fn terminal_bar() -> bool {
    cfg!(feature = "cli") && std::io::stderr().is_terminal()
}

/// The terminal bar, until `stop`.
#[cfg(feature = "cli")]
fn bar(stop: &AtomicBool, counters: &Counters, end: u64, cap: &Cap, started: Instant) {
    let bar = indicatif::ProgressBar::new(end);
    // Not indicatif's rate and ETA: they follow the position, which jumps over what needs
    // no copying and would show TiB/s and "ETA 0s".
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {percent}% {msg}")
            .expect("valid template"),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    let mut pace = Pace::new(started);
    let mut update = |bar: &indicatif::ProgressBar| {
        bar.set_position(counters.done.load(Ordering::Relaxed));
        bar.set_message(figures(counters, end, &mut pace, cap()));
    };
    while !stop.load(Ordering::Relaxed) {
        update(&bar);
        sleep_unless(stop, Duration::from_millis(200));
    }
    update(&bar);
    bar.abandon();
}

/// Without the `cli` feature there is no terminal bar ([`terminal_bar`] is false).
#[cfg(not(feature = "cli"))]
fn bar(_: &AtomicBool, _: &Counters, _: u64, _: &Cap, _: Instant) {}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "cli")]
    #[test]
    fn binary_bytes_reads_as_indicatif_shows_sizes() {
        for n in [
            0,
            1,
            1023,
            1024,
            1536,
            (1 << 20) - 1,
            1 << 20,
            40 << 20,
            3 << 30,
            u64::MAX,
        ] {
            assert_eq!(
                binary_bytes(n),
                indicatif::BinaryBytes(n).to_string(),
                "{n}"
            );
        }
    }

    #[test]
    fn rate_is_bytes_copied_over_time_and_eta_honours_the_cap() {
        let secs = Duration::from_secs;
        // 80 MiB in 4 s, 240 MiB left: 20 MiB/s, 12 s.
        let (rate, eta) = rate_and_eta(80 << 20, 240 << 20, secs(4), 0);
        assert_eq!(rate, (20 << 20) as f64);
        assert_eq!(eta, Some(secs(12)));
        // A burst above the cap (the first slice is free) shows as the cap.
        let (rate, eta) = rate_and_eta(80 << 20, 240 << 20, secs(2), 20 << 20);
        assert_eq!(rate, (20 << 20) as f64);
        assert_eq!(eta, Some(secs(12)));
        // Nothing copied yet: the cap tells, or nothing does.
        assert_eq!(
            rate_and_eta(0, 40 << 20, secs(1), 20 << 20).1,
            Some(secs(2))
        );
        assert_eq!(rate_and_eta(0, 40 << 20, secs(1), 0).1, None);
        assert_eq!(rate_and_eta(5, 0, secs(1), 0).1, Some(Duration::ZERO));
        assert_eq!(format_eta(secs(125)), "2m05s");
        assert_eq!(format_eta(Duration::from_millis(800)), "1s");
        assert_eq!(format_eta(secs(3720)), "1h02m");
    }
}
