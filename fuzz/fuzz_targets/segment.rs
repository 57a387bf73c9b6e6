//! Segment files: the header decoder, and `verify` (header, sealed index, sealed blobs).
#![no_main]

use ferry_crypto::TAG_LEN;
use ferry_format::segment::{
    self, blob_aad, SegmentHeader, SEGMENT_HEADER_LEN, SEGMENT_MAGIC, SEGMENT_VERSION,
};
use ferry_fuzz::{fuzz_key, repaired_header, take_chunk};
use libfuzzer_sys::fuzz_target;

/// Store-relative path the target claims the segment has (short so the fuzzer finds it).
const PATH: &str = "s";
const SALT: [u8; 16] = [1u8; 16];

fuzz_target!(|data: &[u8]| {
    let key = fuzz_key();

    // 1. Raw bytes.
    let _ = SegmentHeader::decode(data, None);
    let _ = SegmentHeader::decode(data, Some(key.id()));
    let _ = segment::verify(&key, PATH, data);

    // 2. Repaired header with our key id: reaches index_offset checks and the index tag check.
    let fixed = repaired_header(
        data,
        &SEGMENT_MAGIC,
        SEGMENT_VERSION,
        SEGMENT_HEADER_LEN,
        56,
        &[(16, &key.id().0)],
    );
    let _ = SegmentHeader::decode(&fixed, Some(key.id()));
    let _ = segment::verify(&key, PATH, &fixed);

    // 3. A properly sealed segment: u16 length + blob plaintext (sealed as blob 0 at offset 64),
    //    then the index plaintext. Reaches the index record decoder and blob opening/decoding.
    let (blob_plain, index_plain) = take_chunk(data);
    let mut header = SegmentHeader {
        key_id: key.id(),
        salt: SALT,
        seq: 1,
        index_offset: (SEGMENT_HEADER_LEN + blob_plain.len() + TAG_LEN) as u64,
    };
    let mut prefix = [0u8; 48];
    prefix.copy_from_slice(&header.encode()[..48]);
    let sealer = key.segment_sealer(&SALT);
    let mut blob = blob_plain.to_vec();
    sealer.seal(1, &blob_aad(&prefix, 0), &mut blob);
    let mut index = index_plain.to_vec();
    let mut aad = prefix.to_vec();
    aad.extend_from_slice(b"index");
    sealer.seal(0, &aad, &mut index);
    header.index_offset = (SEGMENT_HEADER_LEN + blob.len()) as u64;
    let mut file = header.encode().to_vec();
    file.extend_from_slice(&blob);
    file.extend_from_slice(&index);
    let _ = segment::verify(&key, PATH, &file);
});
