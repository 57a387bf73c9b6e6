//! The agent's identity file `STATE_DIR/agent.json` (`AgentIdentity::from_json`, which
//! `AgentIdentity::load` runs on the file's bytes). Nothing may panic; an identity that parses is
//! written back by `to_json` (what `save` writes), parses to the same identity, and writes the same
//! bytes again.
#![no_main]

use ferry_agent::AgentIdentity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(id) = AgentIdentity::from_json(data) else {
        return;
    };
    let bytes = id.to_json().expect("an identity serializes");
    let again = AgentIdentity::from_json(&bytes).expect("a written identity parses");
    assert_eq!(again.server, id.server);
    assert_eq!(again.agent_id, id.agent_id);
    assert_eq!(
        again.key.as_ref().map(|k| k.public()),
        id.key.as_ref().map(|k| k.public())
    );
    assert_eq!(
        again.legacy.as_ref().map(|c| *c.expose()),
        id.legacy.as_ref().map(|c| *c.expose())
    );
    assert_eq!(again.fingerprint, id.fingerprint);
    assert_eq!(
        again.to_json().unwrap(),
        bytes,
        "identity encoding is not stable"
    );
});
