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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    /// An indicatif bar on a terminal; plain percentage lines when stderr is not one.
    Bar,
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

pub struct Reporter {
    mode: Mode,
    end: u64,
    speed: u64,
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

impl Reporter {
    /// Starts reporting on `counters` for a job of `end` guest bytes under cap `speed`.
    pub fn start(mode: Mode, end: u64, speed: u64, counters: Arc<Counters>) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = match mode {
            Mode::Off => None,
            Mode::Json => {
                let (stop, counters) = (stop.clone(), counters.clone());
                // At least one line, however short the job, so that readers see the same
                // sequence every time.
                Some(std::thread::spawn(move || loop {
                    eprintln!("{}", json_line(&counters, end, speed));
                    sleep_unless(&stop, Duration::from_millis(500));
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }))
            }
            Mode::Bar if !std::io::stderr().is_terminal() => {
                // Forced with -p but not on a terminal (a log): qemu-img's percentage lines.
                let (stop, counters) = (stop.clone(), counters.clone());
                Some(std::thread::spawn(move || {
                    let line = |c: &Counters| {
                        let done = c.done.load(Ordering::Relaxed);
                        let pct = if end == 0 {
                            100.0
                        } else {
                            done as f64 * 100.0 / end as f64
                        };
                        eprintln!(
                            "    ({pct:.2}/100%) copied {}",
                            indicatif::BinaryBytes(c.copied.load(Ordering::Relaxed))
                        );
                    };
                    while !stop.load(Ordering::Relaxed) {
                        line(&counters);
                        sleep_unless(&stop, Duration::from_secs(1));
                    }
                    line(&counters);
                }))
            }
            Mode::Bar => {
                let (stop, counters) = (stop.clone(), counters.clone());
                Some(std::thread::spawn(move || {
                    let bar = indicatif::ProgressBar::new(end);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{bar:40} {bytes}/{total_bytes} {percent}% {binary_bytes_per_sec} ETA {eta} {msg}",
                        )
                        .expect("valid template"),
                    );
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
                    while !stop.load(Ordering::Relaxed) {
                        bar.set_position(counters.done.load(Ordering::Relaxed));
                        bar.set_message(format!(
                            "copied {}",
                            indicatif::BinaryBytes(counters.copied.load(Ordering::Relaxed))
                        ));
                        sleep_unless(&stop, Duration::from_millis(200));
                    }
                    bar.set_position(counters.done.load(Ordering::Relaxed));
                    bar.set_message(format!(
                        "copied {}",
                        indicatif::BinaryBytes(counters.copied.load(Ordering::Relaxed))
                    ));
                    bar.abandon();
                }))
            }
        };
        Reporter {
            mode,
            end,
            speed,
            counters,
            stop,
            thread,
            started: Instant::now(),
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
                self.speed,
                self.started.elapsed().as_secs_f64(),
                error
            );
        }
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
}
