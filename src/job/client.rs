//! The client end of a job's control socket, for `cowimg job`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::control::{runtime_dir, socket_for};
use crate::error::{Error, Result};

/// A connection to one job.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The job's greeting (`{"cowimg-job":{"version":..,"id":..,"type":..}}`).
    pub greeting: Value,
    name: String,
}

/// The socket a job is named by: an id (in the runtime directory) or a path (with a `/`).
pub fn socket_of(job: &str) -> Result<PathBuf> {
    if job.contains('/') {
        Ok(PathBuf::from(job))
    } else {
        socket_for(job)
    }
}

impl Client {
    /// Connects to `job` (an id or a socket path) and reads its greeting.
    pub fn connect(job: &str) -> Result<Client> {
        let path = socket_of(job)?;
        Client::connect_path(job, &path)
    }

    fn connect_path(name: &str, path: &Path) -> Result<Client> {
        let stream = UnixStream::connect(path).map_err(|e| {
            Error::Msg(format!(
                "no running job '{name}' (cannot connect to '{}': {e}); 'cowimg job list' lists the running jobs",
                path.display()
            ))
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("control socket", e))?;
        let mut c = Client {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            name: name.to_string(),
        };
        c.set_timeout(Some(Duration::from_secs(90)))?;
        c.greeting = c.read()?;
        if c.greeting.get("cowimg-job").is_none() {
            return Err(Error::Msg(format!(
                "'{}' is not a cowimg job's control socket",
                path.display()
            )));
        }
        Ok(c)
    }

    /// The read timeout (none: wait for ever, as `job wait` does).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .map_err(|e| Error::io("control socket", e))
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| Error::io(format!("reading from job '{}'", self.name), e))?;
        if n == 0 {
            return Err(Error::Msg(format!(
                "job '{}' closed the connection without a reply (it ended, or was killed)",
                self.name
            )));
        }
        serde_json::from_str(&line).map_err(|e| {
            Error::Msg(format!(
                "job '{}' sent something that is not JSON: {e}",
                self.name
            ))
        })
    }

    fn send(&mut self, cmd: &str, args: Value) -> Result<()> {
        let req = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{req}")
            .and_then(|()| self.writer.flush())
            .map_err(|e| Error::io(format!("writing to job '{}'", self.name), e))
    }

    fn result(&self, reply: Value) -> Result<Value> {
        if let Some(r) = reply.get("return") {
            return Ok(r.clone());
        }
        let desc = reply
            .pointer("/error/desc")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        Err(Error::Msg(format!("job '{}': {desc}", self.name)))
    }

    /// Runs `cmd` and returns its `return` value (an error reply becomes an error).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        self.send(cmd, args)?;
        let reply = self.read()?;
        self.result(reply)
    }

    /// The job's `query-block-jobs` entry.
    pub fn query(&mut self) -> Result<Value> {
        let r = self.execute("query-block-jobs", json!({}))?;
        r.get(0)
            .cloned()
            .ok_or_else(|| Error::Msg(format!("job '{}' reported no job", self.name)))
    }

    /// `job-wait`: calls `on_event` with each event line until the job ends, then returns
    /// the final reply (`status`, `exit-status`, `job`).
    pub fn wait(&mut self, mut on_event: impl FnMut(&Value)) -> Result<Value> {
        self.set_timeout(None)?;
        self.send("job-wait", json!({}))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                on_event(&v);
                continue;
            }
            return self.result(v);
        }
    }
}

/// The running jobs of this user: (id, its `query-block-jobs` entry) for each live socket of
/// the runtime directory. Stale sockets (a killed job's) are skipped.
pub fn list() -> Result<Vec<(String, Value)>> {
    let dir = runtime_dir()?;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(format!("listing '{}'", dir.display()), e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".sock"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    let mut out = Vec::new();
    for id in names {
        let Ok(mut c) = Client::connect_path(&id, &dir.join(format!("{id}.sock"))) else {
            continue;
        };
        let _ = c.set_timeout(Some(Duration::from_secs(5)));
        if let Ok(info) = c.query() {
            out.push((id, info));
        }
    }
    Ok(out)
}
