//! The agent's configuration file `/etc/ferry/agent.toml` (`AgentConfig::parse`, which
//! `AgentConfig::load` runs on the file's text) and its duration settings (`config::duration`, on
//! the raw input and on every duration key of a configuration that parses). Nothing may panic; a
//! duration that parses prints (humantime) and parses back to the same value.
#![no_main]

use ferry_agent::config::{duration, AgentConfig};
use libfuzzer_sys::fuzz_target;

fn check_duration(key: &str, v: &str) {
    if let Ok(d) = duration(key, v) {
        let printed = humantime::format_duration(d).to_string();
        let again = duration(key, &printed).expect("a printed duration parses");
        assert_eq!(again, d, "duration round trip through {printed:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_duration("crash_interval", &text);
    let Ok(c) = AgentConfig::parse(&text) else {
        return;
    };
    for (key, v) in [
        ("crash_interval", &c.crash_interval),
        ("app_interval", &c.app_interval),
        ("freeze_bound", &c.freeze_bound),
        ("hook_timeout", &c.hook_timeout),
    ] {
        if let Some(v) = v {
            check_duration(key, v);
        }
    }
    if let Some(t) = c.mysql.as_ref().and_then(|m| m.timeout.as_deref()) {
        check_duration("mysql.timeout", t);
    }
});
