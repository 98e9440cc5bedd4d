//! The server against this crate's client and against raw bytes, over a Unix socket pair,
//! with an in-memory backend.

use super::*;
use crate::codec::{self, state, tflags};
use crate::{Address, Client, Target};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;

/// An in-memory disk whose never-written 4 KiB blocks are holes.
struct Mem {
    data: Mutex<Vec<u8>>,
    written: Mutex<Vec<bool>>,
    writable: bool,
    /// How long a read takes (a slow device or a remote layer).
    read_delay: std::time::Duration,
    /// Reads running now, and the most that ran at once.
    reading: std::sync::atomic::AtomicUsize,
    most_reading: std::sync::atomic::AtomicUsize,
}

impl Mem {
    fn new(size: usize, writable: bool) -> Arc<Mem> {
        Mem::slow(size, writable, std::time::Duration::ZERO)
    }

    fn slow(size: usize, writable: bool, read_delay: std::time::Duration) -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new(vec![0; size]),
            written: Mutex::new(vec![false; size.div_ceil(4096)]),
            writable,
            read_delay,
            reading: Default::default(),
            most_reading: Default::default(),
        })
    }
}

impl Backend for Mem {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.reading.fetch_add(1, SeqCst) + 1;
        self.most_reading.fetch_max(now, SeqCst);
        std::thread::sleep(self.read_delay);
        {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        }
        self.reading.fetch_sub(1, SeqCst);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> BackendResult<()> {
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        let mut w = self.written.lock().unwrap();
        for b in offset / 4096..(offset + data.len() as u64).div_ceil(4096) {
            w[b as usize] = true;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fast: bool) -> BackendResult<()> {
        if fast {
            return Err(BackendError::new(
                errno::ENOTSUP,
                "zeroing is not fast here",
            ));
        }
        self.write(offset, &vec![0; len as usize])
    }
    fn trim(&self, _offset: u64, _len: u64) -> BackendResult<()> {
        Ok(())
    }
    fn flush(&self) -> BackendResult<()> {
        Ok(())
    }
    fn cache(&self, _offset: u64, _len: u64) -> BackendResult<()> {
        Ok(())
    }
    fn contexts(&self) -> &[&'static str] {
        &[BASE_ALLOCATION]
    }
    fn block_status(&self, _c: &str, offset: u64, len: u32) -> BackendResult<Vec<Extent>> {
        let w = self.written.lock().unwrap();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len as u64 {
            let b = (pos / 4096) as usize;
            let n = (4096 - pos % 4096) as u32;
            let flags = if w[b] { 0 } else { state::HOLE | state::ZERO };
            out.push(Extent { len: n, flags });
            pos += n as u64;
        }
        Ok(out)
    }
}

/// A server of `backend` on a fresh socket, serving connections until the test ends.
fn serve(backend: Arc<Mem>) -> (tempfile::TempDir, Target) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path).unwrap();
    let server = Arc::new(Server::new(vec![Export {
        name: "disk".into(),
        description: "a test disk".into(),
        backend,
    }]));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let s = s.unwrap();
            let server = server.clone();
            std::thread::spawn(move || {
                let _ = server.handle(s.try_clone().unwrap(), s);
            });
        }
    });
    let target = Target {
        address: Address::Unix(path),
        export: "disk".into(),
    };
    (dir, target)
}

#[test]
fn a_client_reads_writes_and_sees_holes() {
    let mem = Mem::new(1 << 20, true);
    let (_dir, target) = serve(mem.clone());
    let c = Client::connect(&target).unwrap();
    let info = c.info().clone();
    assert_eq!(info.size, 1 << 20);
    assert!(info.structured);
    assert!(info.has(tflags::CAN_MULTI_CONN) && info.has(tflags::SEND_FAST_ZERO));
    assert!(!info.read_only());
    assert_eq!((info.min_block, info.max_request), (1, MAX_PAYLOAD));
    c.write(8192 + 7, b"hello", true).unwrap();
    let mut buf = vec![1u8; 3 * 4096];
    c.read(4096, &mut buf).unwrap();
    let mut want = vec![0u8; 3 * 4096];
    want[4096 + 7..4096 + 12].copy_from_slice(b"hello");
    assert_eq!(buf, want);
    assert_eq!(mem.data.lock().unwrap()[8192 + 7..8192 + 12], *b"hello");
    let ext = c.block_status(0, 16384).unwrap().unwrap();
    assert_eq!(
        ext,
        vec![
            Extent {
                len: 8192,
                flags: 3
            },
            Extent {
                len: 4096,
                flags: 0
            },
            Extent {
                len: 4096,
                flags: 3
            }
        ]
    );
    c.write_zeroes(8192, 16, false, false).unwrap();
    assert!(
        c.write_zeroes(8192, 16, true, false).is_err(),
        "FAST_ZERO refused"
    );
    c.flush().unwrap();
    assert!(c.read(1 << 20, &mut [0; 1]).is_err(), "past the end");
    // The server still answers after the errors.
    c.read(8192, &mut buf[..16]).unwrap();
    assert_eq!(buf[..16], [0; 16]);
}

#[test]
fn a_read_only_export_refuses_writes() {
    let (_dir, target) = serve(Mem::new(65536, false));
    let c = Client::connect(&target).unwrap();
    assert!(c.info().read_only());
    assert!(!c.info().has(tflags::SEND_TRIM));
    // This crate's client refuses to send the write: send it raw.
    let mut s = raw(&target);
    go(&mut s);
    for kind in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
        let r = Request {
            flags: 0,
            kind,
            cookie: 1,
            offset: 0,
            len: 1,
        };
        s.write_all(&r.encode()).unwrap();
        if kind == cmd::WRITE {
            s.write_all(b"x").unwrap();
        }
        assert_eq!(
            simple_reply(&mut s),
            (errno::EPERM, 1),
            "{}",
            cmd::name(kind)
        );
    }
    c.read(0, &mut [0; 4]).unwrap();
}

/// Raw bytes: the handshake by hand, then whatever the test sends.
fn raw(target: &Target) -> UnixStream {
    let Address::Unix(p) = &target.address else {
        unreachable!()
    };
    let mut s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    codec::decode_greeting(&g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let h = codec::OptionReplyHeader::decode(&h).unwrap();
    let mut d = vec![0; h.len as usize];
    s.read_exact(&mut d).unwrap();
    (h.reply, d)
}

fn go(s: &mut UnixStream) {
    let data = codec::GoRequest {
        export: "disk".into(),
        infos: vec![],
    }
    .encode();
    s.write_all(
        &codec::OptionRequest {
            code: codec::opt::GO,
            data,
        }
        .encode(),
    )
    .unwrap();
    while option_reply(s).0 != codec::rep::ACK {}
}

fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    match ReplyHeader::decode(&h).unwrap() {
        Some((ReplyHeader::Simple { error, cookie }, 16)) => (error, cookie),
        other => panic!("not a simple reply: {other:?}"),
    }
}

use crate::codec::ReplyHeader;

#[test]
fn options_unknown_list_and_export_name() {
    let (_dir, target) = serve(Mem::new(65536, true));
    let mut s = raw(&target);
    s.write_all(
        &codec::OptionRequest {
            code: 99,
            data: vec![1, 2],
        }
        .encode(),
    )
    .unwrap();
    assert_eq!(option_reply(&mut s).0, codec::rep::ERR_UNSUP);
    s.write_all(
        &codec::OptionRequest {
            code: codec::opt::LIST,
            data: vec![],
        }
        .encode(),
    )
    .unwrap();
    let (kind, d) = option_reply(&mut s);
    assert_eq!(kind, codec::rep::SERVER);
    assert_eq!(&d[4..8], b"disk");
    assert_eq!(option_reply(&mut s).0, codec::rep::ACK);
    let go_unknown = codec::GoRequest {
        export: "nope".into(),
        infos: vec![],
    };
    s.write_all(
        &codec::OptionRequest {
            code: codec::opt::INFO,
            data: go_unknown.encode(),
        }
        .encode(),
    )
    .unwrap();
    assert_eq!(option_reply(&mut s).0, codec::rep::ERR_UNKNOWN);
    s.write_all(
        &codec::OptionRequest {
            code: codec::opt::EXPORT_NAME,
            data: b"disk".to_vec(),
        }
        .encode(),
    )
    .unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    let (size, flags) = codec::decode_export_name_reply(&r).unwrap();
    assert_eq!(size, 65536);
    assert_eq!(flags & tflags::SEND_DF, 0, "no structured replies asked");
    // Simple replies: a read's data follows its header.
    let req = Request {
        flags: 0,
        kind: cmd::READ,
        cookie: 9,
        offset: 0,
        len: 4,
    };
    s.write_all(&req.encode()).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 9));
    let mut d = [1u8; 4];
    s.read_exact(&mut d).unwrap();
    assert_eq!(d, [0; 4]);
}

use crate::codec::{cmd, Request};

#[test]
fn hostile_requests_get_errors_or_a_hang_up_and_the_server_lives_on() {
    let (_dir, target) = serve(Mem::new(65536, true));
    let mut s = raw(&target);
    go(&mut s);
    let send = |s: &mut UnixStream, kind, offset, len, cookie| {
        let r = Request {
            flags: 0,
            kind,
            cookie,
            offset,
            len,
        };
        s.write_all(&r.encode()).unwrap();
    };
    // Past the end, and an offset that would wrap.
    send(&mut s, cmd::READ, 65536, 1, 1);
    assert_eq!(simple_reply(&mut s), (errno::EINVAL, 1));
    send(&mut s, cmd::TRIM, u64::MAX, 2, 2);
    assert_eq!(simple_reply(&mut s), (errno::EINVAL, 2));
    // A write past the end: its data is read and dropped, the stream stays in step.
    send(&mut s, cmd::WRITE, 65535, 2, 3);
    s.write_all(&[7, 7]).unwrap();
    assert_eq!(simple_reply(&mut s), (errno::EINVAL, 3));
    // A huge read is refused without allocating it.
    send(&mut s, cmd::READ, 0, u32::MAX, 4);
    assert_eq!(simple_reply(&mut s), (errno::EINVAL, 4));
    send(&mut s, 77, 0, 0, 5);
    assert_eq!(simple_reply(&mut s), (errno::EINVAL, 5));
    // Block status without structured replies.
    send(&mut s, cmd::BLOCK_STATUS, 0, 512, 6);
    assert_eq!(simple_reply(&mut s), (errno::EINVAL, 6));
    // A huge write cannot be skipped: the server hangs up.
    send(&mut s, cmd::WRITE, 0, u32::MAX, 7);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "disconnected");
    // Bad magic: hang up too.
    let mut s = raw(&target);
    go(&mut s);
    s.write_all(&[0xff; 28]).unwrap();
    assert_eq!(s.read(&mut b).unwrap(), 0, "disconnected");
    // A bad option magic during the handshake.
    let mut s = raw(&target);
    s.write_all(&[0u8; 16]).unwrap();
    assert_eq!(s.read(&mut b).unwrap(), 0, "disconnected");
    // And the server still serves.
    let c = Client::connect(&target).unwrap();
    c.read(0, &mut [0; 16]).unwrap();
}

#[test]
fn holes_and_req_one() {
    let (a, b) = (
        vec![(0, 4096, true), (4096, 8192, false), (8192, 12288, true)],
        {
            let mut buf = vec![0u8; 12288];
            buf[5000] = 1;
            transmission::split_holes(0, &buf)
        },
    );
    assert_eq!(a, b);
    // Unaligned reads: partial blocks are data even when zero.
    assert_eq!(
        transmission::split_holes(100, &[0u8; 8192]),
        vec![(0, 3996, false), (3996, 8092, true), (8092, 8192, false)]
    );
    let e = |len, flags| Extent { len, flags };
    assert_eq!(
        transmission::clip(vec![e(100, 3), e(100, 3), e(100, 0)], 250, false),
        vec![e(200, 3), e(50, 0)]
    );
    assert_eq!(
        transmission::clip(vec![e(100, 3), e(100, 0)], 50, true),
        vec![e(50, 3)]
    );
    assert_eq!(transmission::clip(vec![], 50, false), vec![e(50, 0)]);
}

/// Reads that wait (a slow device, a remote layer) turn the connection to workers: requests
/// pipelined on one connection then run at once, and every reply reaches its own request
/// (replies leave in any order, matched by cookie). Quick requests afterwards turn it back.
#[test]
fn slow_requests_of_one_connection_run_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let mem = Mem::slow(1 << 20, true, transmission::SLOW * 5);
    {
        let mut d = mem.data.lock().unwrap();
        for (i, b) in d.iter_mut().enumerate() {
            *b = (i / 4096) as u8 ^ (i % 251) as u8;
        }
    }
    let want = mem.data.lock().unwrap()[..64 * 4096].to_vec();
    let (_dir, target) = serve(mem.clone());
    let c = Client::connect(&target).unwrap();
    // 64 reads of 4 KiB, 16 in flight at a time on the one connection.
    let mut buf = vec![0u8; 64 * 4096];
    crate::client::read_across(&[&c], 0, 0, &mut buf, 4096).unwrap();
    assert_eq!(buf, want);
    let most = mem.most_reading.load(SeqCst);
    assert!(most >= 2, "at most {most} read ran at once");
    // Writes pipelined meanwhile land where they belong.
    let data: Vec<u8> = (0..32 * 4096).map(|i| (i % 253) as u8).collect();
    crate::client::write_across(&[&c], 0, 65536, &data, 4096, false).unwrap();
    c.flush().unwrap();
    assert_eq!(
        mem.data.lock().unwrap()[65536..65536 + data.len()],
        data[..]
    );
}
