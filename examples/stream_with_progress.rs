//! Streams an overlay's backing chain into it with the library, printing progress from
//! another thread; Ctrl-C is not handled here (the CLI's `cowimg stream` does), so a kill
//! leaves what earlier batches committed, and a rerun resumes.
//!
//! ```sh
//! qemu-img create -f raw base.raw 64M && qemu-io -f raw -c 'write -P 7 0 32M' base.raw
//! qemu-img create -f qcow2 -b base.raw -F raw top.qcow2
//! cargo run --release --example stream_with_progress -- top.qcow2
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cowimg::chain::{Chain, OpenOptions};
use cowimg::copy::Counters;
use cowimg::ratelimit::RateLimiter;
use cowimg::stream::{self, Settings};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(file) = std::env::args().nth(1) else {
        return Err("usage: stream_with_progress OVERLAY [RATE_BYTES_PER_SEC]".into());
    };
    let rate = match std::env::args().nth(2) {
        Some(r) => r.parse()?,
        None => 0,
    };
    let chain = Chain::open(&file, OpenOptions::write(None))?;
    let size = chain.size();
    let counters = Counters::default();
    let limiter = RateLimiter::new(rate);
    let cancel = AtomicBool::new(false);
    let finished = AtomicBool::new(false);
    let backing = std::thread::scope(|s| {
        s.spawn(|| {
            while !finished.load(Ordering::Relaxed) {
                let done = counters.done.load(Ordering::Relaxed);
                let copied = counters.copied.load(Ordering::Relaxed);
                eprintln!(
                    "{:5.1}% of the disk dealt with, {} MiB copied",
                    done as f64 * 100.0 / size.max(1) as f64,
                    copied >> 20
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let settings = Settings {
            jobs: 0,
            limiter: &limiter,
            cancel: &cancel,
            counters: &counters,
            compress: false,
            job: None,
        };
        // Past the last layer: everything is streamed and the backing file dropped.
        let r = stream::run(&chain, chain.layers.len(), &settings);
        finished.store(true, Ordering::Relaxed);
        r
    })?;
    println!(
        "{file}: {} MiB copied; backing file now {}",
        counters.copied.load(Ordering::Relaxed) >> 20,
        backing.map_or("none".into(), |b| b.name)
    );
    Ok(())
}
