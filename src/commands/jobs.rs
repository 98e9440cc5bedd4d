//! `cowimg job`: the client verbs that watch and steer running jobs over their control
//! sockets (list, query, set-speed, pause, resume, cancel, wait). The protocol is in
//! `cowimg::job::client`; this only calls it and prints.

use serde_json::{json, Value};

use super::pretty_json;
use cowimg::error::Result;
use cowimg::job::client::{list, Client};
use cowimg::size::size_to_str;

/// One `cowimg job` invocation.
pub enum Verb {
    /// `job list`: the live jobs.
    List {
        /// JSON output.
        json: bool,
    },
    /// `job query JOB`: one job's state.
    Query {
        /// The job's id.
        job: String,
        /// JSON output.
        json: bool,
    },
    /// `job set-speed JOB RATE`: a new cap.
    SetSpeed {
        /// The job's id.
        job: String,
        /// Bytes per second (0: none).
        speed: u64,
    },
    /// `job pause JOB`.
    Pause {
        /// The job's id.
        job: String,
    },
    /// `job resume JOB`.
    Resume {
        /// The job's id.
        job: String,
    },
    /// `job cancel JOB`.
    Cancel {
        /// The job's id.
        job: String,
    },
    /// `job wait JOB`: until it ends; with `events`, print its events meanwhile.
    Wait {
        /// The job's id.
        job: String,
        /// Print the job's events as they come.
        events: bool,
    },
}

/// Runs `cowimg jobs`; returns the exit status.
pub fn run(v: &Verb) -> Result<i32> {
    match v {
        Verb::List { json } => {
            let jobs = list()?;
            if *json {
                let all: Vec<Value> = jobs.into_iter().map(|(_, info)| info).collect();
                println!("{}", pretty_json(&Value::Array(all)));
            } else if jobs.is_empty() {
                println!("No running jobs.");
            } else {
                println!(
                    "{:<24} {:<9} {:<10} {:>8} {:>12} {:>12}  DEVICE",
                    "ID", "TYPE", "STATUS", "DONE", "SPEED", "CAP"
                );
                for (id, i) in &jobs {
                    println!(
                        "{:<24} {:<9} {:<10} {:>7.2}% {:>10}/s {:>12}  {}",
                        id,
                        text(i, "type"),
                        text(i, "status"),
                        percent(i),
                        size_to_str(num(i, "current-speed")),
                        cap(num(i, "speed")),
                        text(i, "device"),
                    );
                }
            }
            Ok(0)
        }
        Verb::Query { job, json } => {
            let info = Client::connect(job)?.query()?;
            if *json {
                println!("{}", pretty_json(&info));
            } else {
                print!("{}", describe(&info));
            }
            Ok(0)
        }
        Verb::SetSpeed { job, speed } => {
            Client::connect(job)?.execute("block-job-set-speed", json!({"speed": speed}))?;
            println!("Job '{job}': speed cap now {}.", cap(*speed));
            Ok(0)
        }
        Verb::Pause { job } => {
            let r = Client::connect(job)?.execute("block-job-pause", json!({}))?;
            match r.get("status").and_then(Value::as_str) {
                Some("paused") => println!(
                    "Job '{job}' is paused with everything copied committed: resume it with 'cowimg job resume {job}' (killing it now is safe too: running its command again resumes)."
                ),
                Some(s) => println!("Job '{job}' did not pause: it has {s}."),
                None => println!("Job '{job}' is paused."),
            }
            Ok(0)
        }
        Verb::Resume { job } => {
            Client::connect(job)?.execute("block-job-resume", json!({}))?;
            println!("Job '{job}' resumed.");
            Ok(0)
        }
        Verb::Cancel { job } => {
            let mut c = Client::connect(job)?;
            c.execute("block-job-cancel", json!({}))?;
            // Returns once the job has committed and stopped, so that a script can rerun it.
            // A job that stopped before the wait was read has closed its socket: that too
            // means it stopped.
            let end = c
                .wait(|_| {})
                .unwrap_or_else(|_| json!({"status": "cancelled"}));
            match end.get("status").and_then(Value::as_str) {
                Some("cancelled") => println!(
                    "Job '{job}' cancelled; what was copied is kept: run its command again to finish."
                ),
                Some(s) => println!("Job '{job}' ended before the cancel took effect: {s}."),
                None => println!("Job '{job}' cancelled."),
            }
            Ok(0)
        }
        Verb::Wait { job, events } => {
            let mut c = Client::connect(job)?;
            let end = c.wait(|e| {
                if *events {
                    println!("{e}");
                }
            })?;
            let info = end.get("job").cloned().unwrap_or(Value::Null);
            let status = end.get("exit-status").and_then(Value::as_i64).unwrap_or(1) as i32;
            match end.get("status").and_then(Value::as_str) {
                Some("completed") => {
                    if !events {
                        println!(
                            "Job '{job}' completed: {} of {} done, {} copied in {:.2} s.",
                            num(&info, "offset"),
                            num(&info, "len"),
                            size_to_str(num(&info, "copied")),
                            info.get("elapsed").and_then(Value::as_f64).unwrap_or(0.0)
                        );
                    }
                }
                Some("cancelled") => eprintln!(
                    "cowimg: job '{job}' was cancelled; what was copied is kept: run its command again to finish"
                ),
                _ => eprintln!("cowimg: job '{job}' failed: {}", text(&info, "error")),
            }
            Ok(status)
        }
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("?")
}

fn percent(v: &Value) -> f64 {
    let len = num(v, "len");
    if len == 0 {
        100.0
    } else {
        num(v, "offset") as f64 * 100.0 / len as f64
    }
}

fn cap(speed: u64) -> String {
    if speed == 0 {
        "unlimited".into()
    } else {
        format!("{}/s", size_to_str(speed))
    }
}

/// The human form of `job query`.
fn describe(i: &Value) -> String {
    let eta = match i.get("eta").and_then(Value::as_f64) {
        Some(s) => format!("{:.0} s", s.ceil()),
        None => "unknown".into(),
    };
    let mut out = format!(
        "Job '{}': {} of '{}', {}\n",
        text(i, "id"),
        text(i, "type"),
        text(i, "device"),
        text(i, "status")
    );
    out += &format!(
        "cur/end:  {}/{} ({:.2}%)\n",
        num(i, "offset"),
        num(i, "len"),
        percent(i)
    );
    out += &format!("copied:   {}\n", size_to_str(num(i, "copied")));
    out += &format!(
        "speed:    {}/s (cap: {})\n",
        size_to_str(num(i, "current-speed")),
        cap(num(i, "speed"))
    );
    out += &format!(
        "elapsed:  {:.1} s, ETA {eta}\n",
        i.get("elapsed").and_then(Value::as_f64).unwrap_or(0.0)
    );
    if let Some(e) = i.get("error").and_then(Value::as_str) {
        out += &format!("error:    {e}\n");
    }
    out
}
