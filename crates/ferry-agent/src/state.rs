//! The agent's identity (`STATE_DIR/agent.json`, mode `0600`), replaced durably: temp → fsync →
//! rename → fsync directory. The rest of the state is in `persist.rs`.

use std::fs;
use std::path::Path;

use ferry_wire::{AgentId, Credential, Fingerprint};
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// The identity file in the state directory.
pub const IDENTITY_FILE: &str = "agent.json";

/// What registration gave this agent.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub server: String,
    pub agent_id: AgentId,
    pub credential: Credential,
    pub fingerprint: Fingerprint,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    version: u32,
    server: String,
    agent_id: String,
    credential: String,
    fingerprint: String,
}

use crate::state_err;

impl AgentIdentity {
    pub fn save(&self, state_dir: &Path) -> Result<(), AgentError> {
        ferry_durable::create_dir_durable(state_dir).map_err(|e| state_err(state_dir, e))?;
        let f = IdentityFile {
            version: 1,
            server: self.server.clone(),
            agent_id: self.agent_id.to_string(),
            credential: hex::encode(self.credential.expose()),
            fingerprint: self.fingerprint.to_string(),
        };
        let path = state_dir.join(IDENTITY_FILE);
        let bytes = serde_json::to_vec_pretty(&f).map_err(|e| state_err(&path, e))?;
        ferry_wire::write_private(&path, &bytes).map_err(|e| state_err(&path, e))
    }

    pub fn load(state_dir: &Path) -> Result<Self, AgentError> {
        let path = state_dir.join(IDENTITY_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AgentError::NotRegistered(path.display().to_string()))
            }
            Err(e) => return Err(state_err(&path, e)),
        };
        let f: IdentityFile = serde_json::from_slice(&bytes).map_err(|e| state_err(&path, e))?;
        if f.version != 1 {
            return Err(state_err(&path, format!("unknown version {}", f.version)));
        }
        let agent_id = f.agent_id.parse().map_err(|e| state_err(&path, e))?;
        let mut cred = [0u8; 32];
        hex::decode_to_slice(&f.credential, &mut cred).map_err(|e| state_err(&path, e))?;
        let fingerprint = f.fingerprint.parse().map_err(|e| state_err(&path, e))?;
        Ok(AgentIdentity {
            server: f.server,
            agent_id,
            credential: Credential::from_bytes(cred),
            fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_round_trips_privately() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            AgentIdentity::load(dir.path()),
            Err(AgentError::NotRegistered(_))
        ));
        let id = AgentIdentity {
            server: "127.0.0.1:7443".into(),
            agent_id: AgentId([3; 16]),
            credential: Credential::from_bytes([5; 32]),
            fingerprint: Fingerprint([9; 32]),
        };
        id.save(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = AgentIdentity::load(dir.path()).unwrap();
        assert_eq!(back.agent_id, id.agent_id);
        assert_eq!(back.credential.expose(), id.credential.expose());
        assert_eq!(back.fingerprint, id.fingerprint);
    }
}
