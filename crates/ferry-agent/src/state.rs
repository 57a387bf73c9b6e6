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
        let path = state_dir.join(IDENTITY_FILE);
        let bytes = self.to_json().map_err(|e| state_err(&path, e))?;
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
        Self::from_json(&bytes).map_err(|e| state_err(&path, e))
    }

    /// The identity file's contents.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let f = IdentityFile {
            version: 1,
            server: self.server.clone(),
            agent_id: self.agent_id.to_string(),
            credential: hex::encode(self.credential.expose()),
            fingerprint: self.fingerprint.to_string(),
        };
        serde_json::to_vec_pretty(&f)
    }

    /// Parses the identity file's contents; the error says what is wrong (the caller adds the
    /// path).
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let f: IdentityFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if f.version != 1 {
            return Err(format!("unknown version {}", f.version));
        }
        let agent_id = f.agent_id.parse()?;
        let mut cred = [0u8; 32];
        hex::decode_to_slice(&f.credential, &mut cred).map_err(|e| e.to_string())?;
        let fingerprint = f.fingerprint.parse()?;
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
