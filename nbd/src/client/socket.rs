//! The connection's socket: TCP or Unix, with the timeouts of a handshake and of requests.

use super::*;

/// A socket of either kind.
#[derive(Debug)]
pub(super) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub(super) fn connect(address: &Address) -> Result<Socket> {
        let err = |source| Error::Connect {
            address: match address {
                Address::Tcp { host, port } => format!("{host} port {port}"),
                Address::Unix(p) => format!("the socket {}", p.display()),
            },
            source,
        };
        Ok(match address {
            Address::Tcp { host, port } => {
                let addrs = (host.as_str(), *port).to_socket_addrs().map_err(err)?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address found");
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or_else(|| err(last))?;
                // Requests are small and latency matters: no Nagle delay.
                s.set_nodelay(true).map_err(err)?;
                Socket::Tcp(s)
            }
            Address::Unix(path) => Socket::Unix(UnixStream::connect(path).map_err(err)?),
        })
    }

    pub(super) fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    pub(super) fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
            Socket::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
        }
    }

    pub(super) fn shutdown(&self) {
        // Errors mean the socket is already closed, which is what is wanted.
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(super) fn io_err(context: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| {
        let source = if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer in time ({} s in the handshake, {} s with requests in flight)",
                    HANDSHAKE_TIMEOUT.as_secs(),
                    IO_TIMEOUT.as_secs()
                ),
            )
        } else if source.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )
        } else {
            source
        };
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
}
