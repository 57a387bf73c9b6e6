//! The process server's and agent's small state parsers: the registration passphrase (typed by an
//! operator), agent ids, and the agent registry file. What parses must print and parse back to the
//! same value.
#![no_main]

use std::str::FromStr;

use ferry_wire::{AgentId, AgentRegistry, Passphrase};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(p) = Passphrase::from_str(&s) {
        let again = Passphrase::from_str(&p.to_string()).expect("a printed passphrase parses");
        assert!(again == p, "passphrase round trip");
    }
    if let Ok(id) = AgentId::from_str(&s) {
        assert_eq!(AgentId::from_str(&id.to_string()).unwrap(), id);
    }
    // The registry file (0600, as the server writes it).
    let p = std::env::temp_dir().join(format!("ferry-fuzz-registry-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        f.write_all(data).unwrap();
    }
    let _ = AgentRegistry::load(&p);
    let _ = std::fs::remove_file(&p);
});
