//! The client against a hostile server (built here from the codec, on a Unix socket): every
//! malformed reply is a clean error, never a panic, a hang or a huge allocation.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

use cowimg_nbd::client::{Client, Error};
use cowimg_nbd::codec::{
    self, chunk, encode_greeting, handshake, opt, rep, tflags, Chunk, Extent, Info, MetaContext,
    OptionReplyHeader, OptionRequest, ReplyHeader, Request,
};
use cowimg_nbd::{Address, Target};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

fn reply(s: &mut UnixStream, option: u32, reply: u32, data: &[u8]) {
    let h = OptionReplyHeader {
        option,
        reply,
        len: data.len() as u32,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(data).unwrap();
}

/// Serves the handshake as a well-behaved server (structured replies, base:allocation id 7),
/// then hands the socket to `transmission`.
fn serve(
    structured: bool,
    transmission: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, Target, thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let l = UnixListener::bind(&path).unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&encode_greeting(
            handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
        ))
        .unwrap();
        let mut f = [0u8; 4];
        s.read_exact(&mut f).unwrap();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let (code, len) = OptionRequest::decode_header(&h).unwrap();
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            match code {
                opt::STRUCTURED_REPLY if structured => reply(&mut s, code, rep::ACK, &[]),
                opt::SET_META_CONTEXT => {
                    let m = MetaContext {
                        id: 7,
                        name: codec::BASE_ALLOCATION.into(),
                    };
                    reply(&mut s, code, rep::META_CONTEXT, &m.encode());
                    reply(&mut s, code, rep::ACK, &[]);
                }
                opt::GO => {
                    let i = Info::Export {
                        size: SIZE,
                        flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
                    };
                    reply(&mut s, code, rep::INFO, &i.encode());
                    reply(&mut s, code, rep::ACK, &[]);
                    break;
                }
                _ => reply(&mut s, code, rep::ERR_UNSUP, &[]),
            }
        }
        transmission(&mut s);
    });
    let target = Target {
        address: Address::Unix(path),
        export: String::new(),
    };
    (dir, target, t)
}

fn read_request(s: &mut UnixStream) -> Request {
    let mut r = [0u8; 28];
    s.read_exact(&mut r).unwrap();
    Request::decode(&r).unwrap()
}

fn chunk_header(kind: u16, flags: u16, cookie: u64, len: u32) -> Vec<u8> {
    ReplyHeader::Chunk {
        flags,
        kind,
        cookie,
        len,
    }
    .encode()
}

/// Connects, reads 4 KiB at 4096 (or asks block status) and returns the error.
fn failing_read(structured: bool, answer: impl Fn(Request) -> Vec<u8> + Send + 'static) -> String {
    let (_d, target, t) = serve(structured, move |s| {
        let r = read_request(s);
        // The server hangs up after its answer: a reply left incomplete must end in an
        // error, not a wait.
        let _ = s.write_all(&answer(r));
    });
    let c = Client::connect(&target).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(4096, &mut buf).unwrap_err();
    drop(c);
    t.join().unwrap();
    e.to_string()
}

#[test]
fn lengths_and_cookies_from_the_server_are_checked() {
    type Answer = Box<dyn Fn(Request) -> Vec<u8> + Send>;
    let cases: Vec<(&str, Answer)> = vec![
        (
            "OFFSET_DATA chunk of 4294967295 bytes",
            Box::new(|r| chunk_header(chunk::OFFSET_DATA, 1, r.cookie, u32::MAX)),
        ),
        (
            "outside the 4096 bytes asked",
            Box::new(|r| {
                let mut b = chunk_header(chunk::OFFSET_DATA, 1, r.cookie, 8 + 16);
                b.extend_from_slice(&(r.offset + 4090).to_be_bytes());
                b.extend_from_slice(&[0xab; 16]);
                b
            }),
        ),
        (
            "no request in flight has",
            Box::new(|r| chunk_header(chunk::NONE, 1, r.cookie + 1, 0)),
        ),
        (
            "did not cover all of it",
            Box::new(|r| {
                let mut b = chunk_header(chunk::OFFSET_HOLE, 0, r.cookie, 12);
                b.extend_from_slice(
                    &Chunk::OffsetHole {
                        offset: r.offset,
                        len: 512,
                    }
                    .encode(),
                );
                b.extend(chunk_header(chunk::NONE, 1, r.cookie, 0));
                b
            }),
        ),
        (
            "overlapping read chunks",
            Box::new(|r| {
                let mut b = Vec::new();
                for _ in 0..2 {
                    b.extend(chunk_header(chunk::OFFSET_HOLE, 0, r.cookie, 12));
                    b.extend_from_slice(
                        &Chunk::OffsetHole {
                            offset: r.offset,
                            len: 512,
                        }
                        .encode(),
                    );
                }
                b
            }),
        ),
        (
            "with 16777216 bytes of payload",
            Box::new(|r| chunk_header(chunk::ERROR, 1, r.cookie, 16 << 20)),
        ),
        (
            "unknown type 77",
            Box::new(|r| chunk_header(77, 1, r.cookie, 0)),
        ),
        (
            "unknown magic",
            Box::new(|_| vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
        ),
        (
            "the server closed the connection",
            Box::new(|r| chunk_header(chunk::OFFSET_DATA, 1, r.cookie, 8 + 4096)),
        ),
    ];
    for (want, answer) in cases {
        let e = failing_read(true, answer);
        assert!(e.contains(want), "expected '{want}' in: {e}");
    }
    // Structured chunks where simple replies were agreed.
    let e = failing_read(false, |r| chunk_header(chunk::NONE, 1, r.cookie, 0));
    assert!(e.contains("not agreed"), "{e}");
}

#[test]
fn an_error_chunk_is_the_requests_error_and_the_connection_stays_usable() {
    let (_d, target, t) = serve(true, |s| {
        let r = read_request(s);
        let c = Chunk::Error {
            kind: chunk::ERROR_OFFSET,
            code: codec::errno::EIO,
            message: "disk on fire".into(),
            offset: Some(r.offset + 10),
        };
        let p = c.encode();
        s.write_all(&chunk_header(
            chunk::ERROR_OFFSET,
            1,
            r.cookie,
            p.len() as u32,
        ))
        .unwrap();
        s.write_all(&p).unwrap();
        // A block status answer whose last extent runs past the request is cut to it.
        let r = read_request(s);
        let p = Chunk::BlockStatus {
            context: 7,
            extents: vec![
                Extent { len: 512, flags: 3 },
                Extent {
                    len: 1 << 19,
                    flags: 0,
                },
            ],
        }
        .encode();
        s.write_all(&chunk_header(
            chunk::BLOCK_STATUS,
            1,
            r.cookie,
            p.len() as u32,
        ))
        .unwrap();
        s.write_all(&p).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let c = Client::connect(&target).unwrap();
    let mut buf = vec![0u8; 4096];
    match c.read(0, &mut buf).unwrap_err() {
        Error::Command { code, message, .. } => {
            assert_eq!((code, message.as_str()), (5, "disk on fire"))
        }
        e => panic!("{e}"),
    }
    let e = c.block_status(0, 4096).unwrap().unwrap();
    assert_eq!(
        e,
        vec![
            Extent { len: 512, flags: 3 },
            Extent {
                len: 3584,
                flags: 0
            }
        ]
    );
    // Out of range and read-only requests are refused before anything is sent.
    assert!(matches!(c.read(SIZE - 1, &mut buf), Err(Error::Invalid(_))));
    drop(c);
    t.join().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random bytes as the answer to a read: an error or (by chance) data, never a panic.
    #[test]
    fn random_replies_never_panic(garbage in prop::collection::vec(any::<u8>(), 0..256), keep_header in any::<bool>()) {
        let (_d, target, t) = serve(true, move |s| {
            let r = read_request(s);
            let mut b = Vec::new();
            if keep_header {
                b.extend(chunk_header(u16::from_be_bytes([garbage.first().copied().unwrap_or(0) & 0x80, 1]), 1, r.cookie, garbage.len() as u32));
            }
            b.extend_from_slice(&garbage);
            let _ = s.write_all(&b);
            // Hang up: a reply still incomplete must end in an error, not a wait.
        });
        let c = Client::connect(&target).unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = c.read(0, &mut buf);
        drop(c);
        t.join().unwrap();
    }
}
