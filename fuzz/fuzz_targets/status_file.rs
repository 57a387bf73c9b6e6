//! The process server's `STATE_DIR/status.json` as `ferry status` reads it
//! (`ferry_serve::status::parse_status`, which `read_status` runs on the file's bytes), and the RFC
//! 3339 times in it, which `ferry status` parses to compute ages and RPOs. Nothing may panic; a file
//! that parses, written back by `encode_status` (what the server writes), parses to the same value;
//! a time that parses prints and parses back to itself.
#![no_main]

use ferry_serve::status::{encode_status, parse_status, StatusFile};
use libfuzzer_sys::fuzz_target;

fn check_time(t: &str) {
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        let printed = humantime::format_rfc3339_nanos(at).to_string();
        assert_eq!(
            humantime::parse_rfc3339_weak(&printed).ok(),
            Some(at),
            "{t:?} -> {printed}"
        );
        let _ = std::time::SystemTime::now().duration_since(at);
    }
}

fn times(s: &StatusFile) -> Vec<&str> {
    let mut out = vec![s.written_at.as_str(), s.started_at.as_str()];
    for v in &s.vms {
        out.extend(v.since.as_deref());
        out.extend(v.last_point.as_ref().map(|p| p.time.as_str()));
        for d in &v.disks {
            out.extend(d.last_point.as_ref().map(|p| p.time.as_str()));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    check_time(&String::from_utf8_lossy(data));
    let Ok(s) = parse_status(data) else {
        return;
    };
    for t in times(&s) {
        check_time(t);
    }
    let bytes = encode_status(&s).expect("a status serializes");
    let again = parse_status(&bytes).expect("a written status parses");
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&s).unwrap(),
        "status changed through a write and read"
    );
    assert_eq!(
        encode_status(&again).unwrap(),
        bytes,
        "status encoding is not stable"
    );
});
