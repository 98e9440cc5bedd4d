//! The `cowimg` command line.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use clap::Parser;
use commands::{
    amend, check, checksum, commit, compare, convert, create, info, jobs, map, measure, rebase,
    reset, resize, serve, snapshot, stream,
};
use cowimg::chain::parse_format;
use cowimg::error::{Error, Result};
use cowimg::progress::Mode;
use cowimg::size::size_arg;
use cowimg_formats::{CheckMode, Format};

// The definitions live beside this file; a path of its own so that the example and tests
// that include this file as a module find it too.
#[path = "cli_args.rs"]
mod cli_args;
#[path = "commands/mod.rs"]
mod commands;

pub(crate) use cli_args::Cli;
use cli_args::{Command, CopyArgs, JobVerb, OnOff, Output};

/// [`CopyArgs`], checked.
struct CopySettings {
    speed: u64,
    jobs: usize,
    progress: Mode,
    json: bool,
}

/// Checks a copy's options; `bar_by_default`: a progress bar on a terminal unless the
/// output is JSON (stream), else only with `-p` (rebase, as qemu-img rebase).
fn copy_settings(c: &CopyArgs, bar_by_default: bool) -> Result<CopySettings> {
    let json = progress_json(c.progress_format.as_deref())?;
    let json_out = matches!(c.output, Output::Json);
    let quiet = !bar_by_default || json_out;
    Ok(CopySettings {
        speed: size_arg("speed (--speed)", "--speed", &c.speed)?,
        jobs: copy_jobs(c.jobs)?,
        progress: Mode::choose(json, c.progress, quiet),
        json: json_out,
    })
}

fn fmt_opt(s: &Option<String>) -> Result<Option<Format>> {
    s.as_deref().map(parse_format).transpose()
}

fn progress_json(v: Option<&str>) -> Result<bool> {
    match v {
        None => Ok(false),
        Some("json") => Ok(true),
        Some(other) => Err(Error::Usage(format!(
            "--progress expects 'json', not '{other}'"
        ))),
    }
}

/// The most copy workers `--jobs` accepts. Each worker is a thread with its own buffers and
/// requests in flight; past a few hundred they only contend for the same disk, and a number
/// far beyond (`--jobs 100000`) would exhaust threads and memory instead of being refused.
const MAX_JOBS: usize = 256;

/// The number of copy workers of a copy (stream, rebase, commit, convert): `--jobs`,
/// checked, or 0 for the copy's own choice (one per core; more for an HTTP source).
fn copy_jobs(j: Option<usize>) -> Result<usize> {
    match j {
        None => Ok(0),
        j => jobs(j),
    }
}

/// The number of workers: `--jobs`, checked, or one per core (at most [`MAX_JOBS`]).
fn jobs(j: Option<usize>) -> Result<usize> {
    match j {
        None => Ok(std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(MAX_JOBS)),
        Some(n) if (1..=MAX_JOBS).contains(&n) => Ok(n),
        Some(n) => Err(Error::Usage(format!(
            "--jobs must be between 1 and {MAX_JOBS}, not {n}"
        ))),
    }
}

/// Checks a qemu cache mode (`-t`/`-T`): cowimg accepts qemu's names; none changes how it
/// writes (it always syncs before exit 0), so the value is only validated.
fn cache_mode(mode: Option<&str>, what: &str) -> Result<()> {
    match mode {
        None | Some("none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe") => {
            Ok(())
        }
        Some(m) => Err(Error::Msg(format!("{what}: {m}"))),
    }
}

/// convert's `-m`, qemu-img's number of coroutines, with its bounds and message.
fn parallel_arg(m: &str) -> Result<usize> {
    let digits = m.strip_prefix('-').unwrap_or(m);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Msg(format!(
            "Invalid number of coroutines specified: '{m}'."
        )));
    }
    match m.parse::<usize>() {
        Ok(n) if (1..=16).contains(&n) => Ok(n),
        _ => Err(Error::Msg(
            "Invalid number of coroutines specified. Must be between 1 and 16.".into(),
        )),
    }
}

/// convert's `-S`: a multiple of 512 up to 16 MiB, or 0; qemu-img's message otherwise.
fn sparse_arg(s: &str) -> Result<u64> {
    const INVALID: &str = "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).";
    match size_arg("sparse size (-S)", "-S", s) {
        Ok(n) if n % 512 == 0 && n <= 16 << 20 => Ok(n),
        _ => Err(Error::Msg(INVALID.into())),
    }
}

/// Runs a command; returns its exit status and whether errors use compare's status 2.
fn dispatch(cmd: Command, cancel: &AtomicBool) -> (Result<i32>, i32) {
    match cmd {
        Command::Create {
            format,
            backing,
            backing_format,
            options,
            cluster_size,
            copy_on_read,
            unsafe_backing,
            force,
            quiet,
            file,
            size,
        } => {
            let r = parse_format(&format).and_then(|format| {
                create::run(&create::Args {
                    file,
                    size,
                    format,
                    backing,
                    backing_format,
                    options,
                    cluster_size,
                    copy_on_read,
                    unsafe_backing,
                    force,
                    quiet,
                    retry: with_force(),
                })
            });
            (r, 1)
        }
        Command::Info {
            format,
            backing_chain,
            output,
            force_share,
            file,
        } => {
            let r = fmt_opt(&format).and_then(|format| {
                info::run(&info::Args {
                    file,
                    format,
                    backing_chain,
                    json: matches!(output, Output::Json),
                    force_share,
                })
            });
            (r, 1)
        }
        Command::Check {
            format,
            repair,
            output,
            quiet,
            force_share,
            file,
        } => {
            let r = (|| {
                let repair = match repair.as_deref() {
                    None => CheckMode::ReadOnly,
                    Some("leaks") => CheckMode::RepairLeaks,
                    Some("all") => CheckMode::RepairAll,
                    Some(other) => {
                        return Err(Error::Usage(format!(
                            "--repair (-r) expects 'leaks' or 'all' not '{other}'\nTry 'cowimg check --help' for more info"
                        )))
                    }
                };
                check::run(&check::Args {
                    file,
                    format: fmt_opt(&format)?,
                    repair,
                    json: matches!(output, Output::Json),
                    quiet,
                    force_share,
                })
            })();
            (r, 1)
        }
        Command::Map {
            format,
            output,
            force_share,
            start_offset,
            max_length,
            file,
        } => {
            let r = (|| {
                map::run(&map::Args {
                    file,
                    format: fmt_opt(&format)?,
                    json: matches!(output, Output::Json),
                    force_share,
                    start: size_arg("start offset", "--start-offset", &start_offset)?,
                    max_length: max_length
                        .as_deref()
                        .map(|s| size_arg("max length", "--max-length", s))
                        .transpose()?,
                })
            })();
            (r, 1)
        }
        Command::Compare {
            format_a,
            format_b,
            strict,
            quiet,
            force_share,
            copy_on_read,
            no_copy_on_read: _,
            diff,
            max,
            output,
            a,
            b,
        } => {
            let r = (|| {
                // An unknown -f/-F is an open failure for qemu-img compare (status 2).
                let format_a = fmt_opt(&format_a).map_err(|e| Error::open(&a, e))?;
                let format_b = fmt_opt(&format_b).map_err(|e| Error::open(&b, e))?;
                compare::run(&compare::Args {
                    a,
                    b,
                    format_a,
                    format_b,
                    strict,
                    quiet,
                    force_share,
                    copy_on_read,
                    diff: diff.then_some(compare::DiffArgs {
                        max,
                        json: matches!(output, Output::Json),
                    }),
                })
            })();
            (r, 2)
        }
        Command::Checksum {
            format,
            algorithm,
            jobs: j,
            progress,
            output,
            force_share,
            job,
            files,
        } => {
            let r = (|| {
                let algorithm =
                    cowimg::checksum::Algorithm::from_name(&algorithm).ok_or_else(|| {
                        Error::Usage(format!(
                            "unknown digest algorithm '{algorithm}': use one of {}",
                            cowimg::checksum::Algorithm::ALL
                                .map(|a| a.name())
                                .join(", ")
                        ))
                    })?;
                checksum::run(
                    &checksum::Args {
                        files,
                        format: fmt_opt(&format)?,
                        algorithm,
                        jobs: jobs(j)?,
                        progress: Mode::choose(false, progress, true),
                        json: matches!(output, Output::Json),
                        force_share,
                        control: job.into(),
                    },
                    cancel,
                )
            })();
            (r, 1)
        }
        Command::Stream {
            format,
            base,
            copy,
            offset,
            length,
            compress,
            job,
            file,
        } => {
            let r = (|| {
                let c = copy_settings(&copy, true)?;
                stream::run(
                    &stream::Args {
                        file,
                        format: fmt_opt(&format)?,
                        base,
                        speed: c.speed,
                        jobs: c.jobs,
                        progress: c.progress,
                        json: c.json,
                        offset: offset
                            .as_deref()
                            .map(|s| size_arg("offset (--offset)", "--offset", s))
                            .transpose()?,
                        length: length
                            .as_deref()
                            .map(|s| size_arg("length (--length)", "--length", s))
                            .transpose()?,
                        compress,
                        control: job.into(),
                    },
                    cancel,
                )
            })();
            (r, 1)
        }
        Command::Serve {
            format,
            socket,
            bind,
            port,
            export,
            description,
            read_only,
            copy_on_read,
            no_copy_on_read,
            shared,
            persistent,
            pid_file,
            stream,
            base,
            speed,
            handshake_limit,
            job,
            image,
        } => {
            let r = (|| {
                let control: cowimg::job::ControlOptions = job.into();
                let stream = match stream {
                    true => Some(serve::StreamArgs {
                        base,
                        speed: size_arg("speed (--speed)", "--speed", &speed)?,
                        control,
                    }),
                    false if control.job_id.is_some()
                        || control.control.is_some()
                        || control.events.is_some() =>
                    {
                        return Err(Error::Usage(
                            "--job-id, --control and --events steer the stream job: give --stream too".into(),
                        ))
                    }
                    false => None,
                };
                serve::run(
                    &serve::Args {
                        image,
                        format: fmt_opt(&format)?,
                        listen: match socket {
                            Some(path) => serve::Listen::Unix(path),
                            None => serve::Listen::Tcp { host: bind, port },
                        },
                        export,
                        description,
                        read_only,
                        copy_on_read: match (copy_on_read, no_copy_on_read) {
                            (true, _) => Some(true),
                            (_, true) => Some(false),
                            _ => None,
                        },
                        shared,
                        persistent,
                        pid_file,
                        stream,
                        handshake_limit,
                    },
                    cancel,
                )
            })();
            (r, 1)
        }
        Command::Rebase {
            format,
            backing,
            backing_format,
            unsafe_mode,
            copy,
            force_share,
            compress,
            job,
            file,
        } => {
            let r = (|| {
                let c = copy_settings(&copy, false)?;
                rebase::run(
                    &rebase::Args {
                        file,
                        format: fmt_opt(&format)?,
                        backing,
                        backing_format,
                        unsafe_mode,
                        speed: c.speed,
                        jobs: c.jobs,
                        progress: c.progress,
                        json: c.json,
                        force_share,
                        compress,
                        control: job.into(),
                    },
                    cancel,
                )
            })();
            (r, 1)
        }
        Command::Commit {
            format,
            base,
            keep_top,
            speed,
            jobs: j,
            progress,
            progress_format,
            output,
            quiet,
            job,
            file,
        } => {
            let r = (|| {
                let json = progress_json(progress_format.as_deref())?;
                commit::run(
                    &commit::Args {
                        file,
                        format: fmt_opt(&format)?,
                        base,
                        keep_top,
                        speed: size_arg("rate limit (-r/--speed)", "--speed", &speed)?,
                        jobs: copy_jobs(j)?,
                        progress: Mode::choose(json, progress, true),
                        json: matches!(output, Output::Json),
                        quiet,
                        control: job.into(),
                    },
                    cancel,
                )
            })();
            (r, 1)
        }
        Command::Resize {
            format,
            shrink,
            preallocation,
            quiet,
            file,
            size,
        } => {
            let r = (|| {
                resize::run(&resize::Args {
                    file,
                    format: fmt_opt(&format)?,
                    size,
                    shrink,
                    prealloc: preallocation.into(),
                    quiet,
                })
            })();
            (r, 1)
        }
        Command::Measure {
            format,
            out_format,
            options,
            size,
            compress,
            output,
            force_share,
            file,
        } => {
            let r = (|| {
                measure::run(&measure::Args {
                    file,
                    format: fmt_opt(&format)?,
                    out_format: parse_format(&out_format)?,
                    options,
                    size: size
                        .as_deref()
                        .map(|s| size_arg("image size", "--size", s))
                        .transpose()?,
                    compress,
                    json: matches!(output, Output::Json),
                    force_share,
                })
            })();
            (r, 1)
        }
        Command::Snapshot {
            list,
            create,
            apply,
            delete,
            format,
            force_share,
            quiet: _,
            file,
        } => {
            let r = snapshot::action(list, create, apply, delete).and_then(|action| {
                snapshot::run(&snapshot::Args {
                    file,
                    format: fmt_opt(&format)?,
                    force_share,
                    action,
                })
            });
            (r, 1)
        }
        Command::Amend {
            options,
            format,
            copy_on_read,
            file,
        } => {
            let r = (|| {
                amend::run(&amend::Args {
                    file,
                    format: fmt_opt(&format)?,
                    copy_on_read: copy_on_read.map(|v| matches!(v, OnOff::On)),
                    options: amend::parse_options(&options)?,
                })
            })();
            (r, 1)
        }
        Command::Reset { format, file } => {
            let r = (|| {
                reset::run(&reset::Args {
                    file,
                    format: fmt_opt(&format)?,
                })
            })();
            (r, 1)
        }
        Command::Job { verb } => {
            let r = (|| {
                let verb = match verb {
                    JobVerb::List { output } => jobs::Verb::List {
                        json: matches!(output, Output::Json),
                    },
                    JobVerb::Query { output, job } => jobs::Verb::Query {
                        job,
                        json: matches!(output, Output::Json),
                    },
                    JobVerb::SetSpeed { job, rate } => jobs::Verb::SetSpeed {
                        job,
                        speed: size_arg("speed (RATE)", "RATE", &rate)?,
                    },
                    JobVerb::Pause { job } => jobs::Verb::Pause { job },
                    JobVerb::Resume { job } => jobs::Verb::Resume { job },
                    JobVerb::Cancel { job } => jobs::Verb::Cancel { job },
                    JobVerb::Wait { events, job } => jobs::Verb::Wait { job, events },
                };
                jobs::run(&verb)
            })();
            (r, 1)
        }
        Command::Convert {
            format,
            out_format,
            options,
            progress,
            progress_format,
            jobs: j,
            force_share,
            copy_on_read,
            no_copy_on_read: _,
            compress,
            no_create,
            backing,
            backing_format,
            sparse_size,
            speed,
            parallel,
            oob_writes: _,
            target_cache,
            source_cache,
            quiet,
            target_is_zero,
            source_snapshot,
            job,
            mut files,
        } => {
            let r = (|| {
                let json = progress_json(progress_format.as_deref())?;
                // qemu-img checks the source cache mode first, the target's after opening.
                cache_mode(source_cache.as_deref(), "Invalid source cache option")?;
                cache_mode(target_cache.as_deref(), "Invalid cache option")?;
                let jobs = match (j, parallel) {
                    (None, Some(m)) => parallel_arg(&m)?,
                    (j, m) => {
                        if let Some(m) = m {
                            parallel_arg(&m)?;
                        }
                        copy_jobs(j)?
                    }
                };
                let sparse = sparse_size.as_deref().map(sparse_arg).transpose()?;
                let dst = files.pop().unwrap_or_default();
                convert::run(
                    &convert::Args {
                        srcs: files,
                        dst,
                        format: fmt_opt(&format)?,
                        out_format: parse_format(&out_format)?,
                        options,
                        progress: Mode::choose(json, progress && !quiet, !progress || quiet),
                        jobs,
                        force_share,
                        copy_on_read,
                        compress,
                        no_create,
                        backing: backing.map(|name| (name, backing_format)),
                        sparse,
                        speed: size_arg("rate limit (-r/--speed)", "--speed", &speed)?,
                        target_is_zero,
                        snapshot: source_snapshot,
                        control: job.into(),
                    },
                    cancel,
                )
            })();
            (r, 1)
        }
    }
}

/// What an interrupted command leaves behind, said after "interrupted".
fn after_interrupt(cmd: &Command) -> String {
    match cmd {
        // Written in place (-n, a device), DST holds part of the copy; otherwise the output is
        // a temporary file until complete, removed when stopped (see output.rs). Either way
        // a rerun copies everything again.
        Command::Convert {
            files, no_create, ..
        } => {
            let dst = files.last().map_or("", String::as_str);
            if *no_create || is_device(dst) || cowimg::output::is_nbd(dst) {
                format!("'{dst}' was being written in place and holds a partial copy: run the same command again to write it whole")
            } else {
                format!("the partial output was removed and nothing changed at '{dst}': run the same command again to start over")
            }
        }
        Command::Checksum { .. } => "no image was changed".to_string(),
        // stream and rebase commit what they copied before stopping.
        _ => "what was copied is kept: run the same command again to finish".to_string(),
    }
}

/// Whether `path` (through symlinks) is a block or character device.
fn is_device(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| {
        let t = m.file_type();
        t.is_block_device() || t.is_char_device()
    })
}

/// This very command line with `--force` added after the command name, quoted for a shell,
/// for the message that refuses to replace an existing file.
fn with_force() -> String {
    let mut args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let at = args
        .iter()
        .position(|a| a == "create")
        .map_or(args.len(), |i| i + 1);
    args.insert(at, "--force".into());
    shlex::try_join(args.iter().map(String::as_str)).unwrap_or_else(|_| args.join(" "))
}

fn main() -> ExitCode {
    // qemu-img exits 1 on a usage error; clap's own status for one is 2, which for `check`
    // and `compare` means "corrupt" and "different", so scripts would misread it.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.exit_code() == 0 { 0 } else { 1 });
        }
    };
    cowimg::chain::raise_descriptor_limit();
    if let Some(ca) = &cli.ca_file {
        cowimg::remote::http::set_ca_file(ca);
    }
    let after_interrupt = after_interrupt(&cli.command);
    // SIGINT and SIGTERM ask the running job to stop at the next chunk and commit what it
    // copied; a second signal falls back to the default action.
    let cancel = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicI32::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let (c, s) = (cancel.clone(), signal.clone());
        // SAFETY: the handler only stores to atomics, which is async-signal-safe.
        let _ = unsafe {
            signal_hook::low_level::register(sig, move || {
                if c.swap(true, Ordering::SeqCst) {
                    signal_hook::low_level::emulate_default_handler(sig).ok();
                }
                s.store(sig, Ordering::SeqCst);
            })
        };
    }
    let (result, error_status) = dispatch(cli.command, &cancel);
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(Error::Interrupted(_)) => {
            let sig = signal.load(Ordering::SeqCst);
            eprintln!("cowimg: interrupted; {after_interrupt}");
            ExitCode::from(if sig == signal_hook::consts::SIGTERM {
                143
            } else {
                130
            })
        }
        Err(e) => {
            eprintln!("cowimg: {e}");
            for hint in e.hints() {
                eprintln!("hint: {hint}");
            }
            // A usage error is 1 for every command, compare included (as qemu-img).
            let status = if e.is_usage() { 1 } else { error_status };
            ExitCode::from(status as u8)
        }
    }
}
