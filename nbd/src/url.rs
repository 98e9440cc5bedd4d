//! The NBD names qemu accepts as image and backing file names, parsed in one place:
//!
//! * `nbd://HOST[:PORT]/[EXPORT]` (also `nbd+tcp://`): TCP, port 10809 by default, no query;
//! * `nbd+unix:///[EXPORT]?socket=PATH`: a Unix socket; no host or port, and `socket` as the
//!   only query parameter;
//! * `nbd:HOST:PORT[:exportname=NAME]` and `nbd:unix:PATH[:exportname=NAME]`, the legacy forms.
//!
//! As in qemu, a name holding `://` is read as a URI (percent-escapes decoded), any other
//! `nbd:` name in the legacy syntax (the export name after `:exportname=`, found anywhere).

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD, qemu's default.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A TCP host (a name or an address; IPv6 without brackets) and port.
    Tcp {
        /// The host.
        host: String,
        /// The port ([`DEFAULT_PORT`] when the name gives none).
        port: u16,
    },
    /// A Unix socket's path.
    Unix(PathBuf),
}

/// An export of a server: what an NBD name designates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Where the server listens.
    pub address: Address,
    /// The export name (`""` is the server's default export).
    pub export: String,
}

impl Target {
    /// Parses an NBD name: `None` when `name` is not one (no `nbd:`, `nbd+tcp:` or
    /// `nbd+unix:` prefix), else the target or what is wrong with the name.
    pub fn parse(name: &str) -> Option<Result<Target, String>> {
        let scheme = name.split_once(':')?.0;
        if !matches!(scheme, "nbd" | "nbd+tcp" | "nbd+unix") {
            return None;
        }
        let parsed = if name.contains("://") {
            parse_uri(name)
        } else if scheme == "nbd" {
            parse_legacy(&name["nbd:".len()..])
        } else {
            Err(format!("'{scheme}:' names must be URIs ({scheme}://...)"))
        };
        Some(parsed.map_err(|e| format!("invalid NBD name '{name}': {e}")))
    }
}

impl fmt::Display for Target {
    /// The canonical name qemu shows for the export (`nbd://HOST:PORT[/EXPORT]`,
    /// `nbd+unix://[/EXPORT]?socket=PATH`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                write!(f, "nbd://{host}:{port}")?;
                if !self.export.is_empty() {
                    write!(f, "/{}", self.export)?;
                }
                Ok(())
            }
            Address::Unix(path) => {
                f.write_str("nbd+unix://")?;
                if !self.export.is_empty() {
                    write!(f, "/{}", self.export)?;
                }
                write!(f, "?socket={}", path.display())
            }
        }
    }
}

/// Decodes `%XX` escapes (a stray `%` is an error, as in a URI parser).
fn unescape(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("a bad percent-escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' does not decode to UTF-8"))
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 && p.bytes().all(|c| c.is_ascii_digit()) => Ok(n),
        _ => Err(format!("'{p}' is not a port number (1 to 65535)")),
    }
}

/// `[v6]:port`, `host:port` or `:port` (qemu's inet syntax, numeric ports only).
fn parse_host_port(s: &str, port_required: bool) -> Result<(String, Option<u16>), String> {
    let (host, rest) = if let Some(v6) = s.strip_prefix('[') {
        let (h, r) = v6
            .split_once(']')
            .ok_or("an IPv6 address without its closing ']'")?;
        (h.to_string(), r)
    } else {
        match s.find(':') {
            Some(i) => (s[..i].to_string(), &s[i..]),
            None => (s.to_string(), ""),
        }
    };
    let port = match rest.strip_prefix(':') {
        Some(p) => Some(parse_port(p)?),
        None if rest.is_empty() && !port_required => None,
        None if rest.is_empty() => return Err("the port is missing (HOST:PORT)".into()),
        None => return Err(format!("unexpected '{rest}' after the host")),
    };
    Ok((host, port))
}

fn parse_uri(name: &str) -> Result<Target, String> {
    let (scheme, rest) = name.split_once("://").ok_or("not a URI")?;
    if rest.contains('#') {
        return Err("a fragment ('#') is not allowed".into());
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("user names are not supported".into());
    }
    // qemu drops one leading '/': `nbd://h//abs` names the export "/abs".
    let export = unescape(path.strip_prefix('/').unwrap_or(path))?;
    let params: Vec<(&str, &str)> = query
        .filter(|q| !q.is_empty())
        .map(|q| {
            q.split('&')
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect()
        })
        .unwrap_or_default();
    if scheme == "nbd+unix" {
        if !authority.is_empty() {
            return Err(
                "nbd+unix:// takes no host or port (nbd+unix:///EXPORT?socket=PATH)".into(),
            );
        }
        let [("socket", socket)] = params[..] else {
            return Err("nbd+unix:// needs exactly one query parameter, socket=PATH".into());
        };
        let socket = unescape(socket)?;
        if socket.is_empty() {
            return Err("the socket path is empty".into());
        }
        return Ok(Target {
            address: Address::Unix(PathBuf::from(socket)),
            export,
        });
    }
    if !params.is_empty() {
        return Err(format!("{scheme}:// takes no query parameters"));
    }
    let (host, port) = parse_host_port(authority, false)?;
    Ok(tcp(unescape(&host)?, port, export))
}

/// A TCP target; no host means the local one, no port the default port.
fn tcp(host: String, port: Option<u16>, export: String) -> Target {
    Target {
        address: Address::Tcp {
            host: if host.is_empty() {
                "localhost".into()
            } else {
                host
            },
            port: port.unwrap_or(DEFAULT_PORT),
        },
        export,
    }
}

fn parse_legacy(spec: &str) -> Result<Target, String> {
    const EXPORT: &str = ":exportname=";
    let (addr, export) = match spec.find(EXPORT) {
        Some(i) => (&spec[..i], spec[i + EXPORT.len()..].to_string()),
        None => (spec, String::new()),
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("the socket path is empty (nbd:unix:PATH)".into());
        }
        return Ok(Target {
            address: Address::Unix(PathBuf::from(path)),
            export,
        });
    }
    let (host, port) = parse_host_port(addr, true)?;
    Ok(tcp(host, port, export))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> Target {
        super::tcp(host.into(), Some(port), export.into())
    }

    fn unix(path: &str, export: &str) -> Target {
        Target {
            address: Address::Unix(path.into()),
            export: export.into(),
        }
    }

    fn ok(name: &str) -> Target {
        Target::parse(name).unwrap().unwrap()
    }

    fn err(name: &str) -> String {
        Target::parse(name).unwrap().unwrap_err()
    }

    #[test]
    fn uri_forms() {
        assert_eq!(
            ok("nbd://127.0.0.1:40006/src"),
            tcp("127.0.0.1", 40006, "src")
        );
        assert_eq!(ok("nbd://host"), tcp("host", 10809, ""));
        assert_eq!(ok("nbd://host/"), tcp("host", 10809, ""));
        assert_eq!(ok("nbd+tcp://h:1/a/b"), tcp("h", 1, "a/b"));
        assert_eq!(ok("nbd://h//abs"), tcp("h", 10809, "/abs"));
        assert_eq!(ok("nbd://[::1]:99/e%20x"), tcp("::1", 99, "e x"));
        assert_eq!(
            ok("nbd+unix:///src?socket=/s/src.sock"),
            unix("/s/src.sock", "src")
        );
        assert_eq!(
            ok("nbd+unix://?socket=/tmp/x/socket"),
            unix("/tmp/x/socket", "")
        );
        assert_eq!(ok("nbd+unix:///?socket=rel%2Fs"), unix("rel/s", ""));
    }

    #[test]
    fn legacy_forms() {
        assert_eq!(
            ok("nbd:127.0.0.1:40006:exportname=src"),
            tcp("127.0.0.1", 40006, "src")
        );
        assert_eq!(ok("nbd:localhost:10809"), tcp("localhost", 10809, ""));
        assert_eq!(ok("nbd:[::1]:5"), tcp("::1", 5, ""));
        assert_eq!(
            ok("nbd:unix:/s/src.sock:exportname=src"),
            unix("/s/src.sock", "src")
        );
        assert_eq!(ok("nbd:unix:/s/a:b"), unix("/s/a:b", ""));
    }

    #[test]
    fn malformed_names_are_refused_with_a_reason() {
        assert!(err("nbd:host").contains("port is missing"));
        assert!(err("nbd://h:0/x").contains("port"));
        assert!(err("nbd://h:99999").contains("port"));
        assert!(err("nbd://h/x?socket=/s").contains("no query"));
        assert!(err("nbd+unix:///x").contains("socket=PATH"));
        assert!(err("nbd+unix://h/x?socket=/s").contains("no host"));
        assert!(err("nbd+unix:///x?socket=/s&a=b").contains("exactly one"));
        assert!(err("nbd+unix:///x?sock=/s").contains("exactly one"));
        assert!(err("nbd:unix:").contains("empty"));
        assert!(err("nbd://h/%zz").contains("percent"));
        assert!(err("nbd+tcp:h:1").contains("URI"));
    }

    #[test]
    fn other_names_are_not_nbd() {
        for n in [
            "base.qcow2",
            "http://h/x",
            "nbdx://h",
            "dir/nbd:x",
            "json:{}",
        ] {
            assert!(Target::parse(n).is_none(), "{n}");
        }
    }

    #[test]
    fn canonical_names_are_qemus() {
        for (given, shown) in [
            (
                "nbd:127.0.0.1:40006:exportname=src",
                "nbd://127.0.0.1:40006/src",
            ),
            ("nbd://h", "nbd://h:10809"),
            ("nbd:unix:/s/x.sock", "nbd+unix://?socket=/s/x.sock"),
            ("nbd+unix:///e?socket=/s", "nbd+unix:///e?socket=/s"),
            ("nbd://[::1]:7/e", "nbd://[::1]:7/e"),
        ] {
            assert_eq!(ok(given).to_string(), shown);
        }
    }
}
