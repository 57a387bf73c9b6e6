//! The agent's state files: `pending/RUN.bin` (`parse_pending`), the chunk map header of
//! `maps/REPLICA.cv` (`CvHeader::decode`), `clean.json` (`CleanStop::parse`) and `cutover.json`
//! (`ferry_agent::cutover::parse`). Whatever parses
//! must re-encode to the same bytes (pending, version-3 map header) or to a record that parses to
//! itself (clean stop, any map header); nothing may panic or allocate without bound.
#![no_main]

use ferry_format::agent::{encode_pending, parse_pending, CleanStop, CvHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((run, cvs)) = parse_pending(data) {
        assert_eq!(encode_pending(&run, &cvs), data, "pending encoding is not canonical");
    }
    if let Some(h) = CvHeader::decode(data) {
        // Version 3 is canonical; a version-2 header (still read) re-encodes as version 3.
        if data[..8] == ferry_format::agent::CV_MAGIC[..] {
            assert_eq!(h.encode()[..], data[..1024], "chunk map header encoding is not canonical");
        }
        assert_eq!(CvHeader::decode(&h.encode()), Some(h), "chunk map header round trip");
    }
    if let Some(c) = CleanStop::parse(data) {
        let again = serde_json::to_vec(&c).expect("serializable");
        assert_eq!(CleanStop::parse(&again), Some(c));
    }
    if let Ok(c) = ferry_agent::cutover::parse(data) {
        let again = serde_json::to_vec(&c).expect("serializable");
        assert_eq!(ferry_agent::cutover::parse(&again), Ok(c));
    }
});
