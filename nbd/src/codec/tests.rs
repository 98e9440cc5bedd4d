use super::*;
use proptest::prelude::*;

#[test]
fn greeting_round_trips_and_refuses_oldstyle() {
    let g = encode_greeting(3);
    assert_eq!(decode_greeting(&g), Ok(3));
    let mut old = g;
    old[8..16].copy_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
    assert!(decode_greeting(&old).unwrap_err().0.contains("oldstyle"));
    assert!(decode_greeting(&encode_greeting(2)).is_err());
}

#[test]
fn block_sizes_follow_the_rules() {
    let bs = |minimum, preferred, maximum| {
        Info::decode(
            &Info::BlockSize {
                minimum,
                preferred,
                maximum,
            }
            .encode(),
        )
    };
    assert!(bs(1, 4096, 32 << 20).is_ok());
    assert!(bs(3, 4096, 32 << 20).is_err());
    assert!(bs(1 << 17, 1 << 17, 1 << 20).is_err());
    assert!(bs(1, 256, 4096).is_err());
    assert!(bs(1, 4096, 1024).is_err());
}

#[test]
fn chunks_with_bad_lengths_are_refused() {
    assert!(Chunk::decode(chunk::OFFSET_HOLE, &[0; 11]).is_err());
    assert!(Chunk::decode(chunk::OFFSET_HOLE, &[0; 13]).is_err());
    assert!(Chunk::decode(chunk::OFFSET_DATA, &[0; 8]).is_err());
    assert!(Chunk::decode(chunk::BLOCK_STATUS, &[0; 4]).is_err());
    assert!(
        Chunk::decode(chunk::BLOCK_STATUS, &[0; 12]).is_err(),
        "zero-length extent"
    );
    assert!(Chunk::decode(chunk::NONE, &[0]).is_err());
    assert!(Chunk::decode(7, &[]).is_err(), "unknown non-error type");
    // An error chunk whose message length runs past the payload.
    assert!(Chunk::decode(chunk::ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
    // Unknown error types are errors.
    let c = Chunk::decode(0x8007, &[0, 0, 0, 5, 0, 1, b'x', 1, 2]).unwrap();
    assert!(matches!(c, Chunk::Error { code: 5, .. }));
}

#[test]
fn reply_headers_need_all_their_bytes() {
    let h = ReplyHeader::Chunk {
        flags: 1,
        kind: 5,
        cookie: 7,
        len: 12,
    }
    .encode();
    for n in 0..h.len() {
        assert_eq!(ReplyHeader::decode(&h[..n]), Ok(None));
    }
    assert!(ReplyHeader::decode(&[1, 2, 3, 4]).is_err());
}

fn arb_chunk() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let data = prop::collection::vec(any::<u8>(), 1..64);
    let extents = prop::collection::vec((1u32.., any::<u32>()), 1..16);
    prop_oneof![
        Just((chunk::NONE, vec![])),
        (any::<u64>(), data).prop_map(|(offset, d)| (
            chunk::OFFSET_DATA,
            Chunk::OffsetData { offset, data: &d }.encode()
        )),
        (any::<u64>(), 1u32..).prop_map(|(offset, len)| (
            chunk::OFFSET_HOLE,
            Chunk::OffsetHole { offset, len }.encode()
        )),
        (any::<u32>(), extents).prop_map(|(context, e)| (
            chunk::BLOCK_STATUS,
            Chunk::BlockStatus {
                context,
                extents: e
                    .into_iter()
                    .map(|(len, flags)| Extent { len, flags })
                    .collect()
            }
            .encode()
        )),
        (1u32.., "[a-z ]{0,40}", prop::option::of(any::<u64>())).prop_map(|(code, m, offset)| {
            let kind = if offset.is_some() {
                chunk::ERROR_OFFSET
            } else {
                chunk::ERROR
            };
            (
                kind,
                Chunk::Error {
                    kind,
                    code,
                    message: m,
                    offset,
                }
                .encode(),
            )
        }),
    ]
}

proptest! {
    #[test]
    fn decoders_never_panic_on_random_bytes(b in prop::collection::vec(any::<u8>(), 0..200), kind in any::<u16>()) {
        let _ = Chunk::decode(kind, &b);
        let _ = ReplyHeader::decode(&b);
        let _ = Info::decode(&b);
        let _ = MetaContext::decode(&b);
        let _ = GoRequest::decode(&b);
        let _ = MetaContextRequest::decode(&b);
        let _ = option_error_text(&b);
        if let Ok(a) = <[u8; 20]>::try_from(&b[..b.len().min(20)]) {
            let _ = OptionReplyHeader::decode(&a);
        }
        if let Ok(a) = <[u8; 28]>::try_from(&b[..b.len().min(28)]) {
            let _ = Request::decode(&a);
        }
        if let Ok(a) = <[u8; 18]>::try_from(&b[..b.len().min(18)]) {
            let _ = decode_greeting(&a);
        }
    }

    #[test]
    fn chunks_round_trip((kind, payload) in arb_chunk()) {
        let c = Chunk::decode(kind, &payload).unwrap();
        prop_assert_eq!(c.kind(), kind);
        prop_assert_eq!(c.encode(), payload);
    }

    #[test]
    fn requests_and_replies_round_trip(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), len in any::<u32>(), error in any::<u32>()) {
        let r = Request { flags, kind, cookie, offset, len };
        prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        for h in [ReplyHeader::Simple { error, cookie }, ReplyHeader::Chunk { flags, kind, cookie, len }] {
            let b = h.encode();
            prop_assert_eq!(ReplyHeader::decode(&b), Ok(Some((h, b.len()))));
        }
    }

    #[test]
    fn options_round_trip(export in "[a-z/]{0,20}", infos in prop::collection::vec(any::<u16>(), 0..8), queries in prop::collection::vec("[a-z:]{0,20}", 0..4), id in any::<u32>(), size in any::<u64>(), tf in any::<u16>()) {
        let g = GoRequest { export: export.clone(), infos };
        prop_assert_eq!(GoRequest::decode(&g.encode()), Ok(g));
        let m = MetaContextRequest { export: export.clone(), queries };
        prop_assert_eq!(MetaContextRequest::decode(&m.encode()), Ok(m));
        let c = MetaContext { id, name: export.clone() };
        prop_assert_eq!(MetaContext::decode(&c.encode()), Ok(c));
        for i in [Info::Export { size, flags: tf }, Info::Name(export.clone()), Info::Description(export)] {
            prop_assert_eq!(Info::decode(&i.encode()), Ok(i));
        }
        let h = OptionReplyHeader { option: id, reply: tf as u32, len: (size % 1000) as u32 };
        prop_assert_eq!(OptionReplyHeader::decode(&h.encode()), Ok(h));
        let o = OptionRequest { code: id, data: vec![1; (size % 100) as usize] };
        let b = o.encode();
        let hdr: [u8; 16] = b[..16].try_into().unwrap();
        prop_assert_eq!(OptionRequest::decode_header(&hdr), Ok((id, o.data.len() as u32)));
    }
}
