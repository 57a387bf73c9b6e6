//! The appliance's settings as a hypervisor or an operator may give them
//! (`ferry_job::appliance`): an OVF environment document, and a NoCloud volume's meta-data,
//! user-data and network-config (the input split in three at NUL bytes), and an exported master
//! key (`ferry key import`). Nothing may panic; what
//! parses renders files that hold no line break inside a value, and a ferry.toml that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn rendered(s: &ferry_job::appliance::Settings) {
    let toml = ferry_job::appliance::ferry_toml(s, 1 << 30);
    ferry_job::serve_config::parse_file_config(&toml).expect("the generated ferry.toml parses");
    if let Some(env) = ferry_job::appliance::serve_env(s) {
        for line in env.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains('='), "{line:?}");
        }
    }
    for (name, text) in ferry_job::appliance::networkd(s) {
        assert!(name.ends_with(".network"));
        assert!(text.contains("[Match]\n") && text.contains("[Network]\n"));
    }
    let _ = ferry_job::appliance::summary(s);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(k) = ferry_job::appliance::parse_key_export(text) {
        assert!(k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    if let Ok(s) = ferry_job::appliance::from_ovf_env(text) {
        rendered(&s);
    }
    let mut parts = text.splitn(3, '\0');
    let (m, u, n) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    if let Ok(s) = ferry_job::appliance::from_nocloud(m, u, n) {
        rendered(&s);
    }
});
