//! The agent's control socket (`STATE_DIR/agent.sock`): request lines as the agent reads them
//! (`control::parse_request`) and reply lines as `ferry-agent cut|status|resync` reads them
//! (`control::parse_reply`, then the `CutReply` under `point`). Nothing may panic. Round trips: a
//! request that parses, written by the client's `encode_request`, parses to the same command; a
//! reply that parses, written back as the agent writes it (`{"ok":true,"point":…}` or
//! `{"ok":false,"error":…}`), parses to the same point or error.
#![no_main]

use ferry_agent::control::{encode_request, parse_reply, parse_request, CutReply, Reply};
use libfuzzer_sys::fuzz_target;

fn cut_reply(v: &serde_json::Value) -> Option<CutReply> {
    serde_json::from_value(v["point"].clone()).ok()
}

fn same_point(a: &CutReply, b: &CutReply) -> bool {
    let close = match (a.freeze_ms, b.freeze_ms) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
        (x, y) => x == y,
    };
    close
        && a.run == b.run
        && a.kind == b.kind
        && a.point == b.point
        && a.note == b.note
        && a.time_ns == b.time_ns
}

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Ok(c) = parse_request(&line) {
        let again = encode_request(c).expect("a request serializes");
        assert_eq!(parse_request(&again), Ok(c), "{again}");
    }
    match parse_reply(&line) {
        Ok(Reply::Ok(v)) => {
            let _ = &v["status"];
            if let Some(p) = cut_reply(&v) {
                let again = serde_json::json!({"ok": true, "point": p}).to_string();
                match parse_reply(&again) {
                    Ok(Reply::Ok(v2)) => {
                        let p2 = cut_reply(&v2).expect("a written point parses");
                        assert!(same_point(&p, &p2), "{p:?} became {p2:?}");
                    }
                    _ => panic!("a written reply is not ok: {again}"),
                }
            }
        }
        Ok(Reply::Refused(why)) => {
            let again = serde_json::json!({"ok": false, "error": why}).to_string();
            match parse_reply(&again) {
                Ok(Reply::Refused(w)) => assert_eq!(w, why),
                _ => panic!("a written refusal does not parse as one: {again}"),
            }
        }
        Err(_) => {}
    }
});
