//! Golden vectors: fixed bytes for a few messages, laid out field by field as `docs/WIRE.md` says.
//! Header checksums were checked independently (`b3sum`; Python's `blake3` for the version-5
//! frames): the first 4 bytes of blake3 of the header's first 12 bytes. A change here is a wire format change: it needs a new version.

use ferry_wire::{
    DiskCut, FrameReader, Message, MsgType, PointKind, PointTag, HELLO_VERSION, WIRE_VERSION,
};

fn hex_of(parts: &[&str]) -> Vec<u8> {
    hex::decode(parts.concat()).unwrap()
}

fn check(m: Message, bytes: Vec<u8>) {
    // Hello and HelloAck always travel in version-1 frames; everything else in version 5.
    let version = match m.ty() {
        MsgType::Hello | MsgType::HelloAck => HELLO_VERSION,
        _ => WIRE_VERSION,
    };
    assert_eq!(
        hex::encode(m.encode_frame(version).unwrap()),
        hex::encode(&bytes),
        "{:?}",
        m.ty()
    );
    let mut r = FrameReader::new(bytes.as_slice());
    if version != HELLO_VERSION {
        assert!(r.set_version(version));
    }
    assert_eq!(r.read().unwrap(), Some(m));
    assert_eq!(r.read().unwrap(), None);
}

#[test]
fn ping() {
    check(
        Message::Ping {
            token: 0x0102_0304_0506_0708,
        },
        hex_of(&[
            "46574952", // magic "FWIR"
            "05",       // version 5
            "30",       // type 48 = Ping
            "0000",     // flags
            "08000000", // payload length 8
            "9fa6cf7e", // header checksum
            "0807060504030201",
        ]),
    );
}

#[test]
fn ack() {
    check(
        Message::Ack { seq: 42 },
        hex_of(&[
            "46574952",
            "05",
            "20",
            "0000",
            "08000000",
            "2d146812",         // header, type 32
            "2a00000000000000", // seq 42
        ]),
    );
}

#[test]
fn hello() {
    check(
        Message::Hello {
            min_version: 1,
            max_version: 1,
            software: "ferry 0.1".into(),
        },
        hex_of(&[
            "46574952",
            "01",
            "01",
            "0000",
            "0d000000",
            "18301e07",           // header, type 1, 13 bytes
            "01",                 // min_version
            "01",                 // max_version
            "0900",               // software: 9 bytes
            "666572727920302e31", // "ferry 0.1"
        ]),
    );
}

#[test]
fn write() {
    check(
        Message::write(7, "sda", 65536, b"hello".to_vec()),
        hex_of(&[
            "46574952",
            "05",
            "11",
            "0000",
            "3a000000",
            "ac35f8ba",         // header, type 17, 58 bytes
            "0700000000000000", // seq 7
            "0300",
            "736461",           // disk "sda"
            "0000010000000000", // offset 65536: chunk-aligned, so the digest is the chunk's CV:
            // BLAKE3's compression of "hello" as the only block of chunk 64 (counter 64, flags
            // CHUNK_START | CHUNK_END, no ROOT), computed by a from-the-spec Python
            // implementation that gives blake3("hello") = ea8f163d… with counter 0 and ROOT.
            "b0fa251fe050726c56a36e80dd2369b17b485bb3965361c6049e235f35091927",
            "68656c6c6f", // data "hello"
        ]),
    );
}

#[test]
fn write_unaligned() {
    check(
        Message::write(7, "sda", 65537, b"hello".to_vec()),
        hex_of(&[
            "46574952",
            "05",
            "11",
            "0000",
            "3a000000",
            "ac35f8ba",         // the same header
            "0700000000000000", // seq 7
            "0300",
            "736461",           // disk "sda"
            "0100010000000000", // offset 65537: not chunk-aligned, so plain blake3("hello")
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f",
            "68656c6c6f", // data "hello"
        ]),
    );
}

#[test]
fn tag() {
    check(
        Message::Tag {
            seq: 9,
            tag: PointTag {
                run: [0x11; 16],
                time_ns: 1_000_000_000,
                kind: PointKind::Crash,
                disks: vec![DiskCut {
                    name: "sda".into(),
                    size: 1 << 20,
                    blake3: [0x22; 32],
                }],
            },
        },
        hex_of(&[
            "46574952",
            "05",
            "14",
            "0000",
            "50000000",
            "e4b8c06d",                         // header, type 20, 80 bytes
            "0900000000000000",                 // seq 9
            "11111111111111111111111111111111", // run id
            "00ca9a3b00000000",                 // time_ns 1e9
            "01",                               // kind 1 = crash
            "0100",                             // 1 disk
            "0300",
            "736461",           // "sda"
            "0000100000000000", // size 1 MiB
            "2222222222222222222222222222222222222222222222222222222222222222",
        ]),
    );
}

/// Wire version 3's `Auth`: agent id, public key, signature, legacy proof, fixed widths, in that
/// order (header checksum from Python's `blake3`).
#[test]
fn auth() {
    check(
        Message::Auth {
            agent_id: ferry_wire::AgentId([0x11; 16]),
            public_key: [0x22; 32],
            signature: [0x33; 64],
            legacy: [0x44; 32],
        },
        hex_of(&[
            "46574952",
            "05",
            "05", // type 5 = Auth
            "0000",
            "90000000", // payload length 144
            "5a1e40b0",
            &"11".repeat(16),
            &"22".repeat(32),
            &"33".repeat(64),
            &"44".repeat(32),
        ]),
    );
}

#[test]
fn policy() {
    check(
        Message::Policy {
            crash_every_ms: 30_000,
            app_every_ms: ferry_wire::POLICY_OFF,
        },
        hex_of(&[
            "46574952",
            "05",
            "25", // type 37 = Policy
            "0000",
            "10000000",
            "90d3ee59",         // header checksum (Python's blake3)
            "3075000000000000", // crash every 30000 ms
            "ffffffffffffffff", // app: off
        ]),
    );
}

#[test]
fn notice() {
    check(
        Message::Notice {
            kind: ferry_wire::notice::CUT,
            freeze_us: 4200,
            text: "app".into(),
        },
        hex_of(&[
            "46574952",
            "05",
            "28", // type 40 = Notice
            "0000",
            "0e000000",
            "5477edf5",         // header checksum (Python's blake3)
            "01",               // kind 1 = cut
            "6810000000000000", // freeze 4200 µs
            "0300",             // text length 3 (u16)
            "617070",           // "app"
        ]),
    );
}
