//! A job's events: JSON lines with a timestamp, written to `--events FILE|-` and to every
//! `job-wait` client. The line's shape is QMP's event:
//! `{"timestamp":{"seconds":S,"microseconds":U},"event":"completed","data":{...}}`.

use std::io::Write;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Where a job's events go. Writing them never fails the job: a sink that fails is dropped
/// with one warning, a client that went away is forgotten.
pub struct Events {
    sink: Mutex<Option<Box<dyn Write + Send>>>,
    subscribers: Mutex<Vec<Sender<String>>>,
}

/// The current time as QMP stamps its events.
pub fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

impl Events {
    /// Events written to `sink` (none: only to clients).
    pub fn new(sink: Option<Box<dyn Write + Send>>) -> Events {
        Events {
            sink: Mutex::new(sink),
            subscribers: Mutex::new(Vec::new()),
        }
    }

    /// Events for `--events`: `-` is stdout, anything else a file created (or truncated).
    pub fn to_path(path: Option<&str>) -> crate::Result<Events> {
        let sink: Option<Box<dyn Write + Send>> = match path {
            None => None,
            Some("-") => Some(Box::new(std::io::stdout())),
            Some(p) => Some(Box::new(std::fs::File::create(p).map_err(|e| {
                crate::Error::io(format!("Could not create the events file '{p}'"), e)
            })?)),
        };
        Ok(Events::new(sink))
    }

    /// Writes one event line everywhere.
    pub fn emit(&self, event: &str, data: Value) {
        let line = json!({"timestamp": timestamp(), "event": event, "data": data}).to_string();
        {
            let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(w) = sink.as_mut() {
                if let Err(e) = writeln!(w, "{line}").and_then(|()| w.flush()) {
                    eprintln!("cowimg: warning: writing job events failed ({e}); no more events are written there");
                    *sink = None;
                }
            }
        }
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| s.send(line.clone()).is_ok());
    }

    /// A stream of the events from now on; it ends after the job's closing event.
    pub fn subscribe(&self) -> Receiver<String> {
        let (tx, rx) = channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    /// After the closing event: ends every subscription.
    pub fn close(&self) {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}
