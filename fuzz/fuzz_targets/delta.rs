//! Page-map headers and page-map delta files.
#![no_main]

use ferry_format::delta::{
    parse_delta, DeltaHeader, MapHeader, DELTA_ENTRY_LEN, DELTA_HEADER_LEN, DELTA_MAGIC,
    DELTA_TRAILER_LEN, DELTA_VERSION, MAP_HEADER_LEN, MAP_MAGIC, MAP_VERSION,
};
use ferry_fuzz::repaired_header;
use libfuzzer_sys::fuzz_target;

/// Replaces the last 32 bytes of a delta (padded to header + trailer) with the blake3 of its entries.
fn fix_trailer(v: &mut Vec<u8>) {
    if v.len() < DELTA_HEADER_LEN + DELTA_TRAILER_LEN {
        v.resize(DELTA_HEADER_LEN + DELTA_TRAILER_LEN, 0);
    }
    let end = v.len() - DELTA_TRAILER_LEN;
    let h = blake3::hash(&v[DELTA_HEADER_LEN..end]);
    v[end..].copy_from_slice(h.as_bytes());
}

fuzz_target!(|data: &[u8]| {
    // 1. Raw bytes.
    let _ = MapHeader::decode(data);
    let _ = DeltaHeader::decode(data);
    let _ = parse_delta(data);

    // 2. Repaired map header: reaches the field decoders.
    let map = repaired_header(data, &MAP_MAGIC, MAP_VERSION, MAP_HEADER_LEN, 56, &[]);
    let _ = MapHeader::decode(&map);

    // 3. Repaired delta header and trailer, the entry count taken from the input: reaches the
    //    count/length arithmetic.
    let mut d = repaired_header(data, &DELTA_MAGIC, DELTA_VERSION, DELTA_HEADER_LEN, 24, &[]);
    fix_trailer(&mut d);
    let _ = parse_delta(&d);

    // 4. As 3, with a count that matches the length: reaches the entry order checks.
    let entries = data
        .len()
        .saturating_sub(DELTA_HEADER_LEN + DELTA_TRAILER_LEN)
        / DELTA_ENTRY_LEN;
    let count = (entries as u64).to_le_bytes();
    let mut d = repaired_header(
        data,
        &DELTA_MAGIC,
        DELTA_VERSION,
        DELTA_HEADER_LEN,
        24,
        &[(16, &count)],
    );
    d.truncate(DELTA_HEADER_LEN + entries * DELTA_ENTRY_LEN + DELTA_TRAILER_LEN);
    fix_trailer(&mut d);
    let _ = parse_delta(&d);
});
