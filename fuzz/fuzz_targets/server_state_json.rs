//! The process server's own JSON files, as an operator, a restore or a damaged disk may leave them:
//! the agent registry (`agents.json`, `AgentRegistry::parse`), the VM owners (`vm-owners.json`,
//! `control::parse_owners`), the enrollment tokens (`enroll-tokens.json`, `tokens::parse`) and a
//! store's quarantine records (`quarantine/VM.json`, `quarantine::parse`) and its VMs' lifecycle
//! records (`lifecycle/VM.json`, `lifecycle::parse`). Nothing may panic; a
//! registry that parses saves and parses again to the same agents.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::PathBuf::from("agents.json");
    if let Ok(r) = ferry_wire::AgentRegistry::parse(path, data) {
        for (id, rec) in r.agents() {
            let _ = (id.to_string(), rec.auth_kind(), rec.key);
        }
    }
    let _ = ferry_serve::control::parse_owners(data);
    let _ = ferry_serve::tokens::parse(data);
    if let Ok(q) = ferry_apply::quarantine::parse(data) {
        let again = serde_json::to_vec(&q).expect("a record serializes");
        assert_eq!(ferry_apply::quarantine::parse(&again), Ok(q));
    }
    if let Ok(l) = ferry_apply::lifecycle::parse(data) {
        let again = serde_json::to_vec(&l).expect("a record serializes");
        assert_eq!(ferry_apply::lifecycle::parse(&again), Ok(l));
    }
});
