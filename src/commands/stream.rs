//! `cowimg stream`: copy into FILE what the layers between it and BASE provide, then make
//! BASE its backing file (none without `--base`).

use std::sync::atomic::AtomicBool;

use cowimg_formats::{BackingRef, Format};

use crate::chain::{Chain, OpenOptions};
use crate::commands::job::{self, JobOptions};
use crate::error::{Error, Result};
use crate::progress::Mode;
use crate::size::size_to_str;
use crate::stream;

pub struct Args {
    pub file: String,
    pub format: Option<Format>,
    pub base: Option<String>,
    pub speed: u64,
    pub jobs: usize,
    pub progress: Mode,
    pub json: bool,
    pub offset: Option<u64>,
    pub length: Option<u64>,
    pub compress: bool,
}

pub fn run(a: &Args, cancel: &AtomicBool) -> Result<i32> {
    let chain = Chain::open(&a.file, OpenOptions::write(a.format))?;
    let top = chain.top();
    let size = top.size();
    let base = match &a.base {
        None => chain.layers.len(),
        Some(b) => match chain.find(b) {
            Some(0) => return Err(Error::Usage(format!("--base '{b}' is the image itself"))),
            Some(i) => i,
            None => {
                let names: Vec<&str> = chain.layers[1..]
                    .iter()
                    .map(|l| l.filename.as_str())
                    .collect();
                return Err(Error::Usage(format!(
                    "'{b}' is not in the backing chain of '{}' (its backing files: {})",
                    a.file,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )));
            }
        },
    };
    if chain.layers.len() == 1 {
        say(
            a,
            &format!("Nothing to stream: '{}' has no backing file.", a.file),
        );
        return Ok(0);
    }
    if base == 1 {
        let below = chain.layers.get(2).map(|l| l.filename.clone());
        let hint = match below {
            Some(_) => format!(
                "; to drop the layers below it, stream that image itself: cowimg stream {}",
                chain.layers[1].filename
            ),
            None => String::new(),
        };
        say(
            a,
            &format!(
                "Nothing to stream: '{}' is already the backing file of '{}'{hint}.",
                chain.layers[1].filename, a.file
            ),
        );
        return Ok(0);
    }
    let partial = a.offset.is_some() || a.length.is_some();
    let start = a.offset.unwrap_or(0).min(size);
    let end = a.length.map_or(size, |l| start.saturating_add(l).min(size));
    let plan = stream::plan(&chain, base, start, end)?;
    let keep_base = base < chain.layers.len();
    let opts = JobOptions {
        speed: a.speed,
        jobs: a.jobs,
        progress: a.progress,
        compress: a.compress,
    };
    let done = job::run(&plan, &opts, cancel, |settings| {
        stream::copy(&chain, &plan, keep_base, None, settings)?;
        if !partial {
            let backing = keep_base.then(|| BackingRef {
                name: stream::backing_name(&chain, base),
                format: Some(chain.layers[base].format.name().to_string()),
            });
            stream::switch(&chain, backing.as_ref())?;
        }
        Ok(chain.top().image.backing())
    })?;
    let backing = done.value.as_ref();
    if a.json {
        println!(
            "{}",
            job::result_json(&a.file, plan.range_len, done.copied, done.elapsed, backing)
        );
    } else if partial {
        say(
            a,
            &format!(
                "Copied {} into '{}' in {:.2} s; the range {start}..{end} is streamed; the backing file is unchanged.",
                size_to_str(done.copied),
                a.file,
                done.elapsed
            ),
        );
    } else {
        say(
            a,
            &job::summary(&a.file, done.copied, done.elapsed, backing),
        );
    }
    Ok(0)
}

fn say(a: &Args, msg: &str) {
    if a.json {
        eprintln!("{msg}");
    } else {
        println!("{msg}");
    }
}
