//! The admin socket's messages (`ferry_serve::admin`): a request line from any local client the
//! socket's permissions let in, and a reply line as the `ferry` command reads it. Nothing may
//! panic; a message that parses serializes and parses again to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = ferry_serve::admin::parse_request(data) {
        let again = serde_json::to_vec(&r).expect("serializes");
        assert_eq!(ferry_serve::admin::parse_request(&again), Ok(r));
    }
    if let Ok(r) = ferry_serve::admin::parse_reply(data) {
        let again = serde_json::to_vec(&r).expect("serializes");
        assert_eq!(ferry_serve::admin::parse_reply(&again), Ok(r));
    }
});
