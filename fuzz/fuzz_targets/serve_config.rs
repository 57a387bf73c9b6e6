//! The `ferry` command's configuration file `ferry.toml` (`ferry_job::serve_config::
//! parse_file_config`, which `ferry serve` runs on the file's text) and its human units
//! (`parse_size`, `parse_retention`, `parse_interval`, `parse_rate`, on the raw input). Nothing may
//! panic. Round trips: a unit value that parses prints and parses back to itself; a `[serve]` table
//! that parses, written back as TOML (sizes and durations as strings), parses to the same settings.
#![no_main]

use std::time::Duration;

use ferry_job::serve_config::{
    parse_file_config, parse_interval, parse_rate, parse_retention, parse_size, ServeFile,
};
use libfuzzer_sys::fuzz_target;

fn duration_text(d: Duration) -> String {
    if d.is_zero() {
        "0".into()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// `s` written back as a `ferry.toml`.
fn to_toml(s: &ServeFile) -> String {
    use toml::Value;
    let mut t = toml::Table::new();
    let path = |p: &std::path::PathBuf| Value::String(p.to_str().expect("TOML text").into());
    if let Some(v) = &s.listen {
        t.insert("listen".into(), Value::String(v.clone()));
    }
    if let Some(v) = &s.store {
        t.insert("store".into(), Value::String(v.clone()));
    }
    if let Some(v) = &s.key_file {
        t.insert("key_file".into(), path(v));
    }
    if let Some(v) = &s.cache_dir {
        t.insert("cache_dir".into(), path(v));
    }
    if let Some(v) = s.cache_size {
        t.insert("cache_size".into(), Value::String(v.to_string()));
    }
    if let Some(v) = &s.state_dir {
        t.insert("state_dir".into(), path(v));
    }
    if let Some(v) = s.threads {
        t.insert(
            "threads".into(),
            Value::Integer(i64::try_from(v).expect("TOML integers are i64")),
        );
    }
    if let Some(v) = s.retention {
        t.insert("retention".into(), Value::String(duration_text(v)));
    }
    if let Some(v) = s.log_json {
        t.insert("log_json".into(), Value::Boolean(v));
    }
    let mut top = toml::Table::new();
    top.insert("serve".into(), Value::Table(t));
    toml::to_string(&top).expect("a table serializes")
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(n) = parse_size(&text) {
        assert_eq!(parse_size(&n.to_string()), Ok(n), "size {n}");
    }
    if let Ok(d) = parse_retention(&text) {
        assert_eq!(parse_retention(&duration_text(d)), Ok(d), "retention {d:?}");
    }
    if let Ok(d) = parse_interval(&text) {
        let printed = humantime::format_duration(d).to_string();
        assert_eq!(parse_interval(&printed), Ok(d), "interval {d:?}");
    }
    if let Ok(r) = parse_rate(&text) {
        assert_eq!(parse_rate(&format!("{r}B/s")), Ok(r), "rate {r}");
    }
    let Ok(f) = parse_file_config(&text) else {
        return;
    };
    let written = to_toml(&f.serve);
    let again = parse_file_config(&written)
        .unwrap_or_else(|e| panic!("written back config does not parse: {e}\n{written}"));
    assert_eq!(
        format!("{:?}", again.serve),
        format!("{:?}", f.serve),
        "settings changed through\n{written}"
    );
});
