//! The local store's own readers of bytes from disk: `DeltaReader` (undo/redo page deltas, checked
//! whole before a page is yielded) and the writer lock's holder record.
#![no_main]

use ferry_format::delta::{DeltaHeader, DELTA_ENTRY_LEN, DELTA_HEADER_LEN, DELTA_TRAILER_LEN};
use libfuzzer_sys::fuzz_target;

fn read_all(bytes: &[u8]) {
    let p = std::env::temp_dir().join(format!("ferry-fuzz-delta-{}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    if let Ok(r) = ferry_store::replica::DeltaReader::open(&p) {
        let mut last = None;
        for e in r {
            let Ok((page, _)) = e else { break };
            assert!(last.is_none_or(|l| page > l), "pages must ascend");
            last = Some(page);
        }
    }
    let _ = std::fs::remove_file(&p);
}

fuzz_target!(|data: &[u8]| {
    let _ = ferry_store::readers::parse_holder(data);
    read_all(data);
    // Repaired: a valid header whose count fits the body, and a matching trailer, so the entry
    // order checks are reached.
    let body = &data[..data.len() / DELTA_ENTRY_LEN * DELTA_ENTRY_LEN];
    let count = (body.len() / DELTA_ENTRY_LEN) as u64;
    let mut v = DeltaHeader { count }.encode().to_vec();
    assert_eq!(v.len(), DELTA_HEADER_LEN);
    v.extend_from_slice(body);
    v.extend_from_slice(blake3::hash(body).as_bytes());
    assert_eq!(v.len(), DELTA_HEADER_LEN + body.len() + DELTA_TRAILER_LEN);
    read_all(&v);
});
