//! The agent's identity (`STATE_DIR/agent.json`, mode `0600`), replaced durably: temp → fsync →
//! rename → fsync directory. The rest of the state is in `persist.rs`.

use std::fs;
use std::path::Path;

use ferry_wire::{AgentId, AgentKey, Credential, Fingerprint};
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// The identity file in the state directory.
pub const IDENTITY_FILE: &str = "agent.json";

/// What registration gave this agent.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub server: String,
    pub agent_id: AgentId,
    /// The agent's private key (version 2 files); `None` for an agent registered before keys.
    pub key: Option<AgentKey>,
    /// The credential of an agent registered before keys (version 1 files), proved once to move
    /// to a key.
    pub legacy: Option<Credential>,
    pub fingerprint: Fingerprint,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    version: u32,
    server: String,
    agent_id: String,
    /// Version 1: the credential (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credential: Option<String>,
    /// Version 2: the Ed25519 private key, PKCS#8 (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
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
            version: if self.key.is_some() { 2 } else { 1 },
            server: self.server.clone(),
            agent_id: self.agent_id.to_string(),
            // Kept next to a new key until the server has taken the key (moving from version 1).
            credential: self.legacy.as_ref().map(|c| hex::encode(c.expose())),
            key: self.key.as_ref().map(|k| hex::encode(k.pkcs8())),
            fingerprint: self.fingerprint.to_string(),
        };
        serde_json::to_vec_pretty(&f)
    }

    /// Parses the identity file's contents; the error says what is wrong (the caller adds the
    /// path).
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let f: IdentityFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let agent_id = f.agent_id.parse()?;
        let fingerprint = f.fingerprint.parse()?;
        let cred = |c: &String| -> Result<Credential, String> {
            let mut b = [0u8; 32];
            hex::decode_to_slice(c, &mut b).map_err(|e| format!("credential: {e}"))?;
            Ok(Credential::from_bytes(b))
        };
        let (key, legacy) = match (f.version, &f.key, &f.credential) {
            (2, Some(k), c) => {
                let bytes = hex::decode(k).map_err(|e| format!("key: {e}"))?;
                (
                    Some(AgentKey::from_pkcs8(&bytes)?),
                    c.as_ref().map(cred).transpose()?,
                )
            }
            (1, None, Some(c)) => (None, Some(cred(c)?)),
            (1 | 2, _, _) => {
                return Err(format!(
                    "version {} needs {}",
                    f.version,
                    if f.version == 2 {
                        "a key"
                    } else {
                        "a credential and no key"
                    }
                ))
            }
            (v, _, _) => return Err(format!("unknown version {v}")),
        };
        Ok(AgentIdentity {
            server: f.server,
            agent_id,
            key,
            legacy,
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
            key: Some(AgentKey::generate().unwrap()),
            legacy: None,
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
        assert_eq!(
            back.key.as_ref().unwrap().public(),
            id.key.as_ref().unwrap().public()
        );
        assert!(back.legacy.is_none());
        assert_eq!(back.fingerprint, id.fingerprint);
    }

    /// A version-1 file (a credential, from before keys) still loads; saved with a key it becomes
    /// version 2 and the credential is gone from it.
    #[test]
    fn a_legacy_identity_loads_and_is_replaced_by_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = format!(
            r#"{{"version":1,"server":"ps:7443","agent_id":"{}","credential":"{}","fingerprint":"{}"}}"#,
            AgentId([3; 16]),
            hex::encode([5u8; 32]),
            Fingerprint([9; 32])
        );
        fs::write(dir.path().join(IDENTITY_FILE), &v1).unwrap();
        let mut id = AgentIdentity::load(dir.path()).unwrap();
        assert!(id.key.is_none());
        assert_eq!(id.legacy.as_ref().unwrap().expose(), &[5u8; 32]);
        // Moving: the new key is kept next to the credential until the server took it.
        id.key = Some(AgentKey::generate().unwrap());
        id.save(dir.path()).unwrap();
        let back = AgentIdentity::load(dir.path()).unwrap();
        assert_eq!(
            back.key.as_ref().unwrap().public(),
            id.key.as_ref().unwrap().public()
        );
        assert!(back.legacy.is_some());
        id.legacy = None;
        id.save(dir.path()).unwrap();
        let text = fs::read_to_string(dir.path().join(IDENTITY_FILE)).unwrap();
        assert!(
            text.contains("\"version\": 2") && !text.contains("credential"),
            "{text}"
        );
        let back = AgentIdentity::load(dir.path()).unwrap();
        assert!(back.key.is_some() && back.legacy.is_none());
    }
}
