//! Frame reader and writer: round trips of every message type, every truncation, every byte flip,
//! and the error for each way a stream can be wrong.

use std::io::Cursor;

use ferry_wire::{
    header_checksum, AgentId, DiskCut, FrameReader, FrameWriter, Message, MsgType, PointKind,
    PointTag, WireError, HEADER_LEN, MAX_DATA, MAX_NAME, MAX_PAYLOAD,
};
use proptest::prelude::*;

/// One message of every type.
fn samples() -> Vec<Message> {
    let disks = vec![
        ("sda".to_string(), 10 << 30),
        ("nvme0n1".to_string(), 1 << 40),
    ];
    let v = vec![
        Message::Hello {
            min_version: 1,
            max_version: 3,
            software: "ferry-agent 0.1.0".into(),
        },
        Message::HelloAck {
            version: 1,
            nonce: [9; 32],
        },
        Message::Register {
            proof: [1; 32],
            hostname: "web01.example".into(),
            public_key: [5; 32],
        },
        Message::Registered {
            agent_id: AgentId([2; 16]),
        },
        Message::Auth {
            agent_id: AgentId([2; 16]),
            public_key: [5; 32],
            signature: [6; 64],
            legacy: [4; 32],
        },
        Message::Welcome {
            credits: 64 << 20,
            resume: vec![("sda".into(), 41)],
        },
        Message::Refused {
            code: ferry_wire::refuse::UNKNOWN_AGENT,
            message: "agent revoked".into(),
        },
        Message::Inventory {
            vm: "web01".into(),
            disks: disks
                .iter()
                .map(|(name, size)| ferry_wire::InvDisk {
                    name: name.clone(),
                    size: *size,
                    id: format!("serial:{name}/1"),
                })
                .collect(),
        },
        Message::Holding {
            store: "00112233445566778899aabbccddeeff".into(),
            open: [3; 16],
            disks: vec![ferry_wire::HeldDisk {
                replica: "sda".into(),
                last_run: [4; 16],
                point_seq: 12,
            }],
        },
        Message::Begin {
            seq: 1,
            run: [5; 16],
            time_ns: 1_700_000_000_000_000_000,
            bases: vec![[6; 16]; disks.len()],
            disks,
        },
        Message::write(2, "sda", 65536, (0..3000u32).map(|i| i as u8).collect()),
        Message::Zero {
            seq: 3,
            disk: "sda".into(),
            offset: 0,
            len: 1 << 20,
        },
        Message::Discard {
            seq: 4,
            disk: "sda".into(),
            offset: 4096,
            len: 8192,
        },
        Message::Tag {
            seq: 5,
            tag: PointTag {
                run: [5; 16],
                time_ns: 1_700_000_000_000_000_001,
                kind: PointKind::App,
                disks: vec![DiskCut {
                    name: "sda".into(),
                    size: 10 << 30,
                    blake3: [6; 32],
                }],
            },
        },
        Message::Ack { seq: 5 },
        Message::Credit { bytes: 8 << 20 },
        Message::CutRequest { app: true },
        Message::CutDone {
            result: Ok("0003-20261101T120000Z".into()),
        },
        Message::CutDone {
            result: Err("freeze timed out after 2s".into()),
        },
        Message::Point {
            run: [7; 16],
            id: "0003-20261101T120000Z".into(),
        },
        Message::Ping { token: 77 },
        Message::Pong { token: 77 },
        Message::Policy {
            crash_every_ms: 30_000,
            app_every_ms: ferry_wire::POLICY_OFF,
        },
        Message::CutoverRequest,
        Message::Notice {
            kind: ferry_wire::notice::CUT,
            freeze_us: 4_200,
            text: "app".into(),
        },
    ];
    let mut types: Vec<MsgType> = v.iter().map(|m| m.ty()).collect();
    types.dedup();
    assert_eq!(types.len(), MsgType::ALL.len(), "a sample of every type");
    v
}

fn encode(msgs: &[Message]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    for m in msgs {
        let n = w.send(m).unwrap();
        assert_eq!(n, m.frame_len().unwrap());
    }
    w.into_inner()
}

fn read_all(bytes: &[u8]) -> Result<Vec<Message>, WireError> {
    let mut r = FrameReader::new(bytes);
    let mut out = Vec::new();
    while let Some(m) = r.read()? {
        out.push(m);
    }
    Ok(out)
}

fn read_one(bytes: &[u8]) -> Result<Option<Message>, WireError> {
    FrameReader::new(bytes).read()
}

#[test]
fn stream_of_every_type_round_trips() {
    let msgs = samples();
    let bytes = encode(&msgs);
    assert_eq!(read_all(&bytes).unwrap(), msgs);
    assert_eq!(read_all(&[]).unwrap(), vec![]);
}

#[test]
fn every_truncation_is_an_error() {
    for m in samples() {
        let bytes = encode(std::slice::from_ref(&m));
        assert!(read_one(&bytes[..0]).unwrap().is_none());
        for n in 1..bytes.len() {
            match read_one(&bytes[..n]) {
                Err(WireError::Truncated { part, got, .. }) => {
                    if n < HEADER_LEN {
                        assert_eq!((part, got), ("header", n as u64));
                    } else {
                        assert_eq!((part, got), ("payload", (n - HEADER_LEN) as u64));
                    }
                }
                other => panic!("{:?} cut at {n}: {other:?}", m.ty()),
            }
        }
    }
}

#[test]
fn every_byte_flip_is_caught_or_changes_the_message() {
    for m in samples() {
        let bytes = encode(std::slice::from_ref(&m));
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let got = read_one(&b);
                match i {
                    0..=3 => assert!(matches!(got, Err(WireError::Magic { .. })), "{i}"),
                    4 => assert!(matches!(got, Err(WireError::Version { .. })), "{i}"),
                    5..=15 => assert!(
                        matches!(got, Err(WireError::HeaderChecksum { .. })),
                        "header byte {i} bit {bit}: {got:?}"
                    ),
                    // The payload has no checksum of its own (TLS authenticates it); a flip is an
                    // error or decodes to a different message, never to the same one.
                    _ => match got {
                        Err(_) => {}
                        Ok(Some(other)) => {
                            assert_ne!(other, m, "flip at {i} accepted silently");
                            if let Message::Write { data, .. } = &m {
                                let digest_at = bytes.len() - data.len() - 32;
                                assert!(i < digest_at, "Write flip at {i} passed its digest");
                            }
                        }
                        Ok(None) => panic!("flip at {i} read as end of stream"),
                    },
                }
            }
        }
    }
}

fn frame(ty: u8, version: u8, flags: u16, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = b"FWIR".to_vec();
    b.push(version);
    b.push(ty);
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    let c = header_checksum(&b);
    b.extend_from_slice(&c);
    b.extend_from_slice(payload);
    b
}

fn err_of(bytes: &[u8]) -> String {
    let e = read_one(bytes).unwrap_err();
    e.to_string()
}

#[test]
fn each_error_has_a_clear_message() {
    let ping = encode(&[Message::Ping { token: 1 }]);

    let mut b = ping.clone();
    b[..4].copy_from_slice(b"HTTP");
    let e = err_of(&b);
    assert!(e.contains("bad magic") && e.contains("FWIR"), "{e}");

    let e = err_of(&frame(48, 2, 0, 8, &[0; 8]));
    assert!(
        e.contains("wire version 2") && e.contains("speaks version 1") && e.contains("upgrade"),
        "{e}"
    );

    let mut b = ping.clone();
    b[12] ^= 0xff;
    assert!(err_of(&b).contains("header checksum mismatch"));

    let e = err_of(&ping[..20]);
    assert!(e.contains("truncated") && e.contains("4 of 8"), "{e}");

    let e = err_of(&frame(48, 1, 0, 9, &[0; 9]));
    assert!(e.contains("Ping payload has 1 trailing bytes"), "{e}");

    let e = err_of(&frame(99, 1, 0, 0, &[]));
    assert!(e.contains("unknown message type 99"), "{e}");

    let e = err_of(&frame(48, 1, 4, 8, &[0; 8]));
    assert!(e.contains("unknown flags 0x0004"), "{e}");

    let e = err_of(&frame(34, 1, 0, 1, &[2]));
    assert!(
        e.contains("malformed CutRequest") && e.contains("app flag 2"),
        "{e}"
    );

    let e = err_of(&frame(48, 1, 0, 4, &[0; 4]));
    assert!(
        e.contains("malformed Ping") && e.contains("ends inside a field"),
        "{e}"
    );

    // Non-UTF-8 and path-like names.
    let e = err_of(&frame(
        3,
        1,
        0,
        36,
        &[[0u8; 32].as_slice(), &[2, 0, 0xff, 0xfe]].concat(),
    ));
    assert!(e.contains("not UTF-8"), "{e}");
    let e = err_of(&frame(
        3,
        1,
        0,
        37,
        &[[0u8; 32].as_slice(), &[3, 0], b"../"].concat(),
    ));
    assert!(e.contains("hostname"), "{e}");

    // A Write whose data does not match its digest.
    let mut w = encode(&[Message::write(1, "sda", 0, vec![1; 100])]);
    let last = w.len() - 1;
    w[last] ^= 1;
    assert!(err_of(&w).contains("does not match its digest"));
}

#[test]
fn oversized_frame_is_refused_before_reading_the_payload() {
    let mut bytes = frame(17, 1, 0, MAX_PAYLOAD + 1, &[]);
    bytes.resize(bytes.len() + (MAX_PAYLOAD as usize + 1), 0);
    let mut cur = Cursor::new(&bytes);
    let mut r = FrameReader::new(&mut cur);
    let e = r.read().unwrap_err();
    assert!(
        matches!(e, WireError::Oversized { len, .. } if len == MAX_PAYLOAD + 1),
        "{e}"
    );
    assert!(e.to_string().contains("oversized"));
    drop(r);
    assert_eq!(
        cur.position(),
        HEADER_LEN as u64,
        "nothing read past the header"
    );
    // A claimed length the peer never sends costs only what arrives.
    let bytes = frame(17, 1, 0, MAX_PAYLOAD, &[0; 10]);
    assert!(matches!(
        read_one(&bytes),
        Err(WireError::Truncated { got: 10, .. })
    ));
}

#[test]
fn sequence_numbers_are_enforced() {
    let zero = |seq| Message::Zero {
        seq,
        disk: "sda".into(),
        offset: 0,
        len: 4096,
    };
    // Reader: a record that does not increase is refused, with both numbers.
    let mut bytes = encode(&[zero(5)]);
    bytes.extend(encode(&[zero(5)]));
    let e = read_all(&bytes).unwrap_err();
    assert!(matches!(
        e,
        WireError::Sequence {
            found: 5,
            last: 5,
            frame: 1,
            ..
        }
    ));
    assert!(e.to_string().contains("sequence number 5"), "{e}");
    // Acks may repeat but not go back.
    let mut bytes = encode(&[Message::Ack { seq: 5 }, Message::Ack { seq: 5 }]);
    assert_eq!(read_all(&bytes).unwrap().len(), 2);
    bytes.extend(encode(&[Message::Ack { seq: 4 }]));
    assert!(matches!(
        read_all(&bytes),
        Err(WireError::Sequence { found: 4, .. })
    ));
    // Writer: refuses (writing nothing) what a reader would refuse.
    let mut w = FrameWriter::new(Vec::new());
    w.send(&zero(9)).unwrap();
    let len = w.get_ref().len();
    assert!(matches!(
        w.send(&zero(3)),
        Err(WireError::Unencodable { .. })
    ));
    assert_eq!(w.get_ref().len(), len);
}

#[test]
fn writer_refuses_what_readers_refuse() {
    let mut w = FrameWriter::new(Vec::new());
    let bad = [
        Message::write(1, "sda", 0, vec![]),
        Message::write(1, "sda", 0, vec![0; MAX_DATA + 1]),
        Message::write(1, "sda", u64::MAX, vec![0; 2]),
        Message::write(1, "a/b", 0, vec![0; 2]),
        Message::write(1, "x".repeat(MAX_NAME + 1), 0, vec![0; 2]),
        Message::Inventory {
            vm: "vm".into(),
            disks: vec![
                ferry_wire::InvDisk {
                    name: "d".into(),
                    size: 1,
                    id: "x".into()
                };
                257
            ],
        },
        Message::Inventory {
            vm: "vm".into(),
            disks: vec![ferry_wire::InvDisk {
                name: "d".into(),
                size: 1,
                id: "a\nb".into(),
            }],
        },
        Message::Begin {
            seq: 1,
            run: [0; 16],
            time_ns: 0,
            disks: vec![("d".into(), 1)],
            bases: vec![],
        },
        Message::Refused {
            code: 1,
            message: "x".repeat(2000),
        },
        Message::Zero {
            seq: 1,
            disk: "sda".into(),
            offset: 0,
            len: 0,
        },
    ];
    for m in &bad {
        let e = w.send(m).unwrap_err();
        assert!(matches!(e, WireError::Unencodable { .. }), "{e}");
    }
    assert!(w.get_ref().is_empty());
    // The biggest Write fits.
    let big = Message::write(
        1,
        "x".repeat(MAX_NAME),
        u64::MAX - MAX_DATA as u64,
        vec![7; MAX_DATA],
    );
    let bytes = encode(std::slice::from_ref(&big));
    assert_eq!(read_one(&bytes).unwrap().unwrap(), big);
}

#[test]
fn errors_poison_the_reader() {
    let mut bytes = b"FWIRjunkjunkjunk".to_vec();
    bytes.extend(encode(&[Message::Ping { token: 1 }]));
    let mut r = FrameReader::new(bytes.as_slice());
    assert!(r.read().is_err());
    assert!(matches!(r.read(), Err(WireError::Poisoned)));
}

#[test]
fn async_reader_and_writer_match_the_blocking_ones() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let msgs = samples();
        let mut w = ferry_wire::AsyncFrameWriter::new(Vec::new());
        for m in &msgs {
            w.send(m).await.unwrap();
        }
        let bytes = w.into_inner();
        assert_eq!(bytes, encode(&msgs));
        let mut r = ferry_wire::AsyncFrameReader::new(bytes.as_slice());
        for m in &msgs {
            assert_eq!(&r.read().await.unwrap().unwrap(), m);
        }
        assert!(r.read().await.unwrap().is_none());
        let mut r = ferry_wire::AsyncFrameReader::new(&bytes[..bytes.len() - 1]);
        let mut last = Ok(None);
        for _ in 0..msgs.len() {
            last = r.read().await;
        }
        assert!(matches!(last, Err(WireError::Truncated { .. })));
    });
}

/// A Write's buffer moves on into the process server's cache: it holds the data, not the doubling
/// growth of reading (128 KiB for 64 KiB).
#[test]
fn a_write_read_holds_a_buffer_of_its_size() {
    for len in [4096usize, 65536, 100_000, 128 * 1024] {
        let m = Message::write(7, "sda", 1 << 20, vec![3u8; len]);
        let bytes = encode(std::slice::from_ref(&m));
        let blocking = FrameReader::new(bytes.as_slice()).read().unwrap().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let async_read = rt.block_on(async {
            ferry_wire::AsyncFrameReader::new(bytes.as_slice())
                .read()
                .await
                .unwrap()
                .unwrap()
        });
        for got in [blocking, async_read] {
            let Message::Write { data, .. } = got else {
                panic!("{got:?}")
            };
            assert_eq!(data.len(), len);
            assert!(
                data.capacity() < len + 256,
                "{len}: capacity {}",
                data.capacity()
            );
        }
    }
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.é-]{1,24}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn disks() -> impl Strategy<Value = Vec<(String, u64)>> {
    prop::collection::vec((name(), any::<u64>()), 0..6)
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (any::<u64>(), 1..u64::MAX).prop_filter("no overflow", |(o, l)| o.checked_add(*l).is_some())
}

fn message() -> impl Strategy<Value = Message> {
    let tag = (
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<bool>(),
        prop::collection::vec((name(), any::<u64>(), any::<[u8; 32]>()), 0..5),
    )
        .prop_map(|(seq, run, time_ns, app, d)| Message::Tag {
            seq,
            tag: PointTag {
                run,
                time_ns,
                kind: if app {
                    PointKind::App
                } else {
                    PointKind::Crash
                },
                disks: d
                    .into_iter()
                    .map(|(name, size, blake3)| DiskCut { name, size, blake3 })
                    .collect(),
            },
        });
    prop_oneof![
        (any::<u8>(), any::<u8>(), ".{0,40}").prop_map(|(a, b, s)| Message::Hello {
            min_version: a,
            max_version: b,
            software: s
        }),
        (any::<u8>(), any::<[u8; 32]>())
            .prop_map(|(version, nonce)| Message::HelloAck { version, nonce }),
        (any::<[u8; 32]>(), name(), any::<[u8; 32]>()).prop_map(|(proof, hostname, public_key)| {
            Message::Register {
                proof,
                hostname,
                public_key,
            }
        }),
        any::<[u8; 16]>().prop_map(|a| Message::Registered {
            agent_id: AgentId(a)
        }),
        (
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(a, public_key, s, legacy)| {
                let mut signature = [0u8; 64];
                signature[..32].copy_from_slice(&s);
                signature[32..].copy_from_slice(&legacy);
                Message::Auth {
                    agent_id: AgentId(a),
                    public_key,
                    signature,
                    legacy,
                }
            }),
        (any::<u64>(), disks()).prop_map(|(credits, resume)| Message::Welcome { credits, resume }),
        (any::<u16>(), ".{0,100}").prop_map(|(code, message)| Message::Refused { code, message }),
        (name(), disks(), "[a-z0-9:._-]{1,40}").prop_map(|(vm, disks, id)| Message::Inventory {
            vm,
            disks: disks
                .into_iter()
                .map(|(name, size)| ferry_wire::InvDisk {
                    name,
                    size,
                    id: id.clone()
                })
                .collect()
        }),
        (name(), any::<[u8; 16]>(), disks()).prop_map(|(store, open, disks)| Message::Holding {
            store,
            open,
            disks: disks
                .into_iter()
                .map(|(replica, point_seq)| ferry_wire::HeldDisk {
                    replica,
                    last_run: open,
                    point_seq
                })
                .collect()
        }),
        (any::<u64>(), any::<[u8; 16]>(), any::<u64>(), disks()).prop_map(
            |(seq, run, time_ns, disks)| Message::Begin {
                seq,
                run,
                time_ns,
                bases: vec![run; disks.len()],
                disks
            }
        ),
        (
            any::<u64>(),
            name(),
            0..u64::MAX / 2,
            prop::collection::vec(any::<u8>(), 1..5000)
        )
            .prop_map(|(seq, disk, offset, data)| Message::write(seq, disk, offset, data)),
        (any::<u64>(), name(), range()).prop_map(|(seq, disk, (offset, len))| Message::Zero {
            seq,
            disk,
            offset,
            len
        }),
        (any::<u64>(), name(), range()).prop_map(|(seq, disk, (offset, len))| {
            Message::Discard {
                seq,
                disk,
                offset,
                len,
            }
        }),
        tag,
        any::<u64>().prop_map(|seq| Message::Ack { seq }),
        any::<u64>().prop_map(|bytes| Message::Credit { bytes }),
        any::<bool>().prop_map(|app| Message::CutRequest { app }),
        Just(Message::CutoverRequest),
        name().prop_map(|p| Message::CutDone { result: Ok(p) }),
        ".{0,200}".prop_map(|e| Message::CutDone { result: Err(e) }),
        (any::<[u8; 16]>(), name()).prop_map(|(run, id)| Message::Point { run, id }),
        any::<u64>().prop_map(|token| Message::Ping { token }),
        any::<u64>().prop_map(|token| Message::Pong { token }),
        (any::<u64>(), any::<u64>()).prop_map(|(crash_every_ms, app_every_ms)| Message::Policy {
            crash_every_ms,
            app_every_ms
        }),
        (1..=ferry_wire::notice::MAX, any::<u64>(), ".{0,100}").prop_map(
            |(kind, freeze_us, text)| Message::Notice {
                kind,
                freeze_us,
                text
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_message_round_trips(m in message()) {
        let bytes = m.encode_frame(1).unwrap();
        prop_assert_eq!(bytes.len(), m.frame_len().unwrap());
        prop_assert_eq!(&encode(std::slice::from_ref(&m)), &bytes);
        let mut r = FrameReader::new(bytes.as_slice());
        prop_assert_eq!(r.read().unwrap(), Some(m));
        prop_assert!(r.read().unwrap().is_none());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = read_all(&bytes);
        // Behind a valid header too, so the payload decoders see the noise.
        for ty in MsgType::ALL {
            let f = frame(*ty as u8, 1, 0, bytes.len() as u32, &bytes);
            let _ = read_all(&f);
        }
    }
}
