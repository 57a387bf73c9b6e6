//! Azure store markers (`ferry-store.json`): parse, and re-encode what parses (round trip).
#![no_main]

use ferry_format::marker::StoreMarker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = StoreMarker::parse(data) {
        let again = StoreMarker::parse(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(m, again);
    }
    // Structured: the schema's fields with values from the input.
    let s = String::from_utf8_lossy(data);
    let v = serde_json::json!({
        "format": "ferry-azure-store", "version": 1,
        "store_id": s.chars().take(32).collect::<String>(),
        "generation": data.len() as u64, "key_id": s, "created": s,
    });
    let _ = StoreMarker::parse(&serde_json::to_vec(&v).unwrap());
});
