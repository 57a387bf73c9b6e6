//! Cache files: the file header decoder, and the record decoder run over successive records.
#![no_main]

use ferry_crypto::{Sealer, TAG_LEN};
use ferry_format::cache::{
    decode_record, CacheFileHeader, Decoded, CACHE_HEADER_LEN, CACHE_MAGIC, CACHE_VERSION,
    RECORD_HEADER_LEN, RECORD_MAGIC,
};
use ferry_format::header_checksum;
use ferry_fuzz::{fuzz_key, repaired_header, take_chunk};
use libfuzzer_sys::fuzz_target;

/// Decodes records one after another from `base`, as the cache reader does, until the data ends,
/// is incomplete, or an error stops it.
fn decode_all(sealer: &Sealer, data: &[u8], base: usize) {
    let mut pos = base;
    while pos < data.len() {
        match decode_record(sealer, &data[pos..], pos as u64) {
            Ok(Decoded::Record(_, _, n)) => {
                assert!(
                    n >= RECORD_HEADER_LEN && pos + n <= data.len(),
                    "record length {n} at {pos} out of bounds"
                );
                pos += n;
            }
            Ok(Decoded::Incomplete) | Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let key = fuzz_key();
    let sealer = key.cache_sealer(&[0u8; 16]);

    // 1. Raw bytes: as a record stream, and as a file (header then records).
    let _ = CacheFileHeader::decode(data, key.id());
    decode_all(&sealer, data, 0);

    // 2. Repaired file header with our key id, then the records behind it.
    let fixed = repaired_header(
        data,
        &CACHE_MAGIC,
        CACHE_VERSION,
        CACHE_HEADER_LEN,
        56,
        &[(16, &key.id().0)],
    );
    let _ = CacheFileHeader::decode(&fixed, key.id());
    decode_all(&sealer, &fixed, CACHE_HEADER_LEN);

    // 3. Properly sealed records: the input is a cut length (u8), then repeated
    //    kind (u8) + u16 length + payload plaintext. The stream is cut short by `cut` bytes to model a
    //    torn tail.
    let Some((&cut, mut rest)) = data.split_first() else {
        return;
    };
    let mut stream = Vec::new();
    let mut seq = 0u64;
    while let Some((&kind, tail)) = rest.split_first() {
        let (plain, tail) = take_chunk(tail);
        rest = tail;
        let mut hdr = Vec::with_capacity(RECORD_HEADER_LEN);
        hdr.extend_from_slice(&RECORD_MAGIC);
        hdr.push(kind);
        hdr.push(0);
        hdr.extend_from_slice(&0u16.to_le_bytes());
        hdr.extend_from_slice(&seq.to_le_bytes());
        hdr.extend_from_slice(&((plain.len() + TAG_LEN) as u32).to_le_bytes());
        let c = header_checksum(&hdr);
        hdr.extend_from_slice(&c[..4]);
        let mut p = plain.to_vec();
        sealer.seal(seq, &hdr[..20], &mut p);
        stream.extend_from_slice(&hdr);
        stream.extend_from_slice(&p);
        seq += 1;
    }
    stream.truncate(stream.len().saturating_sub(cut as usize));
    decode_all(&sealer, &stream, 0);
});
