//! The digest a `Write` carries (`write_digest`, version 5): a chunk-aligned 64 KiB chunk's is its
//! BLAKE3 chaining value at its offset — the value the agent already has — and anything else's is
//! the plain blake3. The reader recomputes it and refuses a mismatch.

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
use ferry_wire::{write_digest, FrameReader, Message, WireError, DIGEST_CHUNK, WIRE_VERSION};

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Chunk digests are real BLAKE3 subtree values: the four of a 256 KiB buffer merge into the
/// plain blake3 of the whole buffer (so they are the CVs the agent merges into a disk's digest).
#[test]
fn chunk_digests_merge_into_the_plain_hash() {
    let c = DIGEST_CHUNK as usize;
    let buf = data(4 * c, 7);
    let cv: Vec<[u8; 32]> = (0..4)
        .map(|i| write_digest((i * c) as u64, &buf[i * c..(i + 1) * c]))
        .collect();
    let left = merge_subtrees_non_root(&cv[0], &cv[1], Mode::Hash);
    let right = merge_subtrees_non_root(&cv[2], &cv[3], Mode::Hash);
    assert_eq!(
        *merge_subtrees_root(&left, &right, Mode::Hash).as_bytes(),
        *blake3::hash(&buf).as_bytes()
    );
    // The same bytes at another chunk: another digest (the offset is part of it).
    assert_ne!(
        write_digest(0, &buf[..c]),
        write_digest(DIGEST_CHUNK, &buf[..c])
    );
}

#[test]
fn other_shapes_carry_the_plain_hash() {
    let d = data(4096, 3);
    assert_eq!(
        write_digest(512, &d),
        *blake3::hash(&d).as_bytes(),
        "unaligned"
    );
    let big = data(2 * DIGEST_CHUNK as usize, 4);
    assert_eq!(
        write_digest(0, &big),
        *blake3::hash(&big).as_bytes(),
        "more than a chunk"
    );
    // A short piece at a chunk's start (a disk's last chunk) is a chunk: its CV.
    assert_ne!(write_digest(DIGEST_CHUNK, &d), *blake3::hash(&d).as_bytes());
}

fn decode(m: &Message) -> Result<Option<Message>, WireError> {
    let bytes = m.encode_frame(WIRE_VERSION).unwrap();
    let mut r = FrameReader::new(bytes.as_slice());
    assert!(r.set_version(WIRE_VERSION));
    r.read()
}

/// The reader takes a chunk with its CV and refuses it with the old plain digest (or any other).
#[test]
fn the_reader_checks_the_digest_by_the_same_rule() {
    let d = data(DIGEST_CHUNK as usize, 9);
    let good = Message::write(3, "sda", 5 * DIGEST_CHUNK, d.clone());
    assert_eq!(decode(&good).unwrap(), Some(good));
    let plain = Message::Write {
        seq: 3,
        disk: "sda".into(),
        offset: 5 * DIGEST_CHUNK,
        digest: *blake3::hash(&d).as_bytes(),
        data: d.clone(),
    };
    let e = decode(&plain).unwrap_err().to_string();
    assert!(e.contains("does not match its digest"), "{e}");
    let elsewhere = Message::Write {
        seq: 3,
        disk: "sda".into(),
        offset: 6 * DIGEST_CHUNK,
        digest: write_digest(5 * DIGEST_CHUNK, &d),
        data: d,
    };
    assert!(decode(&elsewhere).is_err(), "a CV of another offset");
}
