//! Wire frames: `ferry_wire::FrameReader` reading frame after frame from a byte stream, as the
//! process server and the agent do from their TLS streams.
#![no_main]

use ferry_fuzz::take_chunk;
use ferry_wire::{header_checksum, write_digest, FrameReader, HEADER_LEN, MAGIC, WIRE_VERSION};
use libfuzzer_sys::fuzz_target;

/// Reads frames until the stream ends or an error stops it. Every message read must re-encode to
/// exactly the bytes it was read from (encodings are canonical, and a writer accepts whatever a
/// reader accepts), and after an error the reader must refuse to go on.
fn read_all(data: &[u8]) {
    let mut rest = data;
    let mut r = FrameReader::new(&mut rest);
    let mut pos = 0;
    loop {
        match r.read() {
            Ok(Some(m)) => {
                let end = data.len() - r.get_ref().len();
                let again = m
                    .encode_frame(WIRE_VERSION)
                    .unwrap_or_else(|e| panic!("read {:?} but cannot write it: {e}", m.ty()));
                assert_eq!(again, &data[pos..end], "{:?} is not canonical", m.ty());
                assert_eq!(m.frame_len().ok(), Some(end - pos));
                pos = end;
            }
            Ok(None) => {
                assert_eq!(pos, data.len(), "end of stream inside the data");
                break;
            }
            Err(_) => {
                assert!(r.read().is_err(), "reader went on after an error");
                break;
            }
        }
    }
}

/// A frame header with a valid checksum around `payload` (type and flags from the input).
/// The offset field of Write fields (seq `u64`, disk name `u16`-length-prefixed, offset `u64`).
fn offset_of(fields: &[u8]) -> Option<u64> {
    let n = u16::from_le_bytes(fields.get(8..10)?.try_into().ok()?) as usize;
    Some(u64::from_le_bytes(fields.get(10 + n..18 + n)?.try_into().ok()?))
}

fn frame(ty: u8, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(&MAGIC);
    f.push(WIRE_VERSION);
    f.push(ty);
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let c = header_checksum(&f);
    f.extend_from_slice(&c);
    f.extend_from_slice(payload);
    f
}

fuzz_target!(|data: &[u8]| {
    // 1. Raw bytes: almost always stopped by the magic or the header checksum.
    read_all(data);

    // 2. Valid headers around the input's payloads, so random bytes reach the message decoders.
    //    The input is a cut length (u8), then repeated: type (u8), a flags selector (u8: flags are
    //    zero unless it is 255), a u16 length and that many payload bytes. The stream is cut short
    //    by `cut` bytes to model a connection that drops mid-frame.
    let Some((&cut, mut rest)) = data.split_first() else {
        return;
    };
    let mut stream = Vec::new();
    while let [ty, flags, tail @ ..] = rest {
        let (payload, tail) = take_chunk(tail);
        rest = tail;
        let flags = if *flags == 255 { 1 } else { 0 };
        stream.extend_from_slice(&frame(*ty, flags, payload));
    }
    read_all(&stream);
    stream.truncate(stream.len().saturating_sub(cut as usize));
    read_all(&stream);

    // 3. A valid frame of each record type around the same payload bytes, so the decoders of the
    //    big messages (Write's digest check, Tag's disk list) are reached more often.
    if let Some((&pick, payload)) = data.split_first() {
        let types = [17u8, 20, 16, 6, 8, 35];
        let f = frame(types[pick as usize % types.len()], 0, payload);
        read_all(&f);
        // And a Write whose digest matches, whatever its data (the plain blake3: the digest for
        // any offset that is not chunk-aligned): the fields before it are fuzzed.
        let split = (pick as usize).min(payload.len());
        let (fields, body) = payload.split_at(split);
        let mut p = fields.to_vec();
        p.extend_from_slice(blake3::hash(body).as_bytes());
        p.extend_from_slice(body);
        read_all(&frame(17, 0, &p));
        // And with the digest the fuzzed offset calls for (a chunk-aligned one: its chunk's CV).
        if let Some(offset) = offset_of(fields) {
            let mut p = fields.to_vec();
            p.extend_from_slice(&write_digest(offset, body));
            p.extend_from_slice(body);
            read_all(&frame(17, 0, &p));
        }
    }
});
