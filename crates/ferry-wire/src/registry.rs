//! The process server's registry of agents: who may connect, and how to check them.
//!
//! Registering gives an agent a random id and a random 32-byte credential. The registry keeps only
//! the credential's verifier (`blake3::derive_key` of it, [`crate::proof_key`]), never the
//! credential: an agent authenticates by proving the credential over a fresh nonce, which the
//! server checks with the verifier. Revoking an agent removes it. `register` and `revoke` are
//! durable when they return (temp → fsync → rename → fsync dir, mode `0600`).
//!
//! The file is JSON: `{"format": "ferry-agent-registry", "version": 1, "agents": [...]}`; see
//! `docs/WIRE.md`. One process owns it; callers serialize access (a mutex around the registry).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::durable::{loose_mode, write_private};
use crate::fields::check_name;
use crate::message::{Nonce, Proof};
use crate::passphrase::{proof_key, verify_with_key};
use crate::{AuthError, RegistryError};

const FORMAT: &str = "ferry-agent-registry";
const VERSION: u16 = 1;

/// An agent's id: 16 random bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentId(pub [u8; 16]);

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for AgentId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id)
            .map_err(|_| format!("agent id {s:?} is not 32 hex digits"))?;
        Ok(AgentId(id))
    }
}

/// An agent's credential: 32 secret random bytes, kept by the agent (mode `0600`) and shown to
/// nobody. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential([u8; 32]);

impl Credential {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Credential(b)
    }
    /// The secret bytes, to store or to prove with.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
    /// The `Auth` proof for `nonce`.
    pub fn prove(&self, nonce: &Nonce) -> Proof {
        crate::prove(&self.0, nonce)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

/// What the registry knows about one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub hostname: String,
    /// Seconds since the Unix epoch.
    pub registered: u64,
    verifier: [u8; 32],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    id: String,
    hostname: String,
    registered: u64,
    verifier: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: String,
    version: u16,
    agents: Vec<FileAgent>,
}

/// The registered agents, loaded from and saved to one file.
#[derive(Debug)]
pub struct AgentRegistry {
    path: PathBuf,
    agents: BTreeMap<AgentId, AgentRecord>,
}

impl AgentRegistry {
    /// Loads `path`; a missing file is an empty registry (created on the first registration).
    /// Refuses a file others may read, an unknown version, and anything malformed.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let path = path.to_path_buf();
        let io = |op| {
            let path = path.clone();
            move |source| RegistryError::Io { op, path, source }
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(AgentRegistry {
                    path,
                    agents: BTreeMap::new(),
                })
            }
            Err(e) => return Err(io("read")(e)),
        };
        if let Some(mode) = loose_mode(&path).map_err(io("stat"))? {
            return Err(RegistryError::Permissions { path, mode });
        }
        let corrupt = |detail: String| RegistryError::Corrupt {
            path: path.clone(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(corrupt(format!("\"format\" is not {FORMAT:?}")));
        }
        let found = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if found != u64::from(VERSION) {
            return Err(RegistryError::Version {
                path,
                found,
                supported: VERSION,
            });
        }
        let file: File = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        let mut agents = BTreeMap::new();
        for a in file.agents {
            let id: AgentId = a.id.parse().map_err(corrupt)?;
            let mut verifier = [0u8; 32];
            hex::decode_to_slice(&a.verifier, &mut verifier)
                .map_err(|_| corrupt(format!("agent {id}: verifier is not 64 hex digits")))?;
            let record = AgentRecord {
                hostname: a.hostname,
                registered: a.registered,
                verifier,
            };
            if agents.insert(id, record).is_some() {
                return Err(corrupt(format!("agent {id} is listed twice")));
            }
        }
        Ok(AgentRegistry { path, agents })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Registers a new agent for `hostname` and saves the registry; the credential is returned
    /// once and never stored. Call only after the agent proved the passphrase.
    pub fn register(&mut self, hostname: &str) -> Result<(AgentId, Credential), RegistryError> {
        check_name("hostname", hostname).map_err(|detail| RegistryError::Hostname {
            hostname: hostname.to_string(),
            detail,
        })?;
        let rand = |e: getrandom::Error| RegistryError::Random(e.to_string());
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).map_err(rand)?;
        let mut cred = [0u8; 32];
        getrandom::getrandom(&mut cred).map_err(rand)?;
        let id = AgentId(id);
        let registered = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.agents.insert(
            id,
            AgentRecord {
                hostname: hostname.to_string(),
                registered,
                verifier: proof_key(&cred),
            },
        );
        if let Err(e) = self.save() {
            self.agents.remove(&id);
            return Err(e);
        }
        Ok((id, Credential(cred)))
    }

    /// Checks an `Auth` proof made over `nonce`; returns the agent's record.
    pub fn verify(
        &self,
        id: &AgentId,
        proof: &Proof,
        nonce: &Nonce,
    ) -> Result<&AgentRecord, AuthError> {
        let rec = self
            .agents
            .get(id)
            .ok_or_else(|| AuthError::UnknownAgent(id.to_string()))?;
        if !verify_with_key(&rec.verifier, nonce, proof) {
            return Err(AuthError::BadProof(id.to_string()));
        }
        Ok(rec)
    }

    /// Removes the agent and saves; returns its record, or `None` if it was not registered.
    /// Connections it already has stay up until the process server drops them.
    pub fn revoke(&mut self, id: &AgentId) -> Result<Option<AgentRecord>, RegistryError> {
        let Some(rec) = self.agents.remove(id) else {
            return Ok(None);
        };
        if let Err(e) = self.save() {
            self.agents.insert(*id, rec);
            return Err(e);
        }
        Ok(Some(rec))
    }

    /// The registered agents, by id.
    pub fn agents(&self) -> impl Iterator<Item = (&AgentId, &AgentRecord)> {
        self.agents.iter()
    }

    /// Writes the registry durably (mode `0600`).
    pub fn save(&self) -> Result<(), RegistryError> {
        let file = File {
            format: FORMAT.to_string(),
            version: VERSION,
            agents: self
                .agents
                .iter()
                .map(|(id, r)| FileAgent {
                    id: id.to_string(),
                    hostname: r.hostname.clone(),
                    registered: r.registered,
                    verifier: hex::encode(r.verifier),
                })
                .collect(),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(|e| RegistryError::Corrupt {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        json.push(b'\n');
        write_private(&self.path, &json).map_err(|source| RegistryError::Io {
            op: "write",
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn register_verify_revoke_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.json");
        let mut reg = AgentRegistry::load(&path).unwrap();
        assert_eq!(reg.agents().count(), 0);
        let (a, ca) = reg.register("web01").unwrap();
        let (b, cb) = reg.register("db01").unwrap();
        assert_ne!(a, b);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The credential itself is never written.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(ca.expose())));
        assert!(text.contains("web01"));

        let nonce = [3u8; 32];
        assert_eq!(
            reg.verify(&a, &ca.prove(&nonce), &nonce).unwrap().hostname,
            "web01"
        );
        // Another agent's credential, another nonce, or a replayed proof fail.
        assert_eq!(
            reg.verify(&a, &cb.prove(&nonce), &nonce),
            Err(AuthError::BadProof(a.to_string()))
        );
        assert!(reg.verify(&a, &ca.prove(&nonce), &[4u8; 32]).is_err());

        // Reload: same agents, same verdicts.
        let mut reg = AgentRegistry::load(&path).unwrap();
        assert_eq!(reg.agents().count(), 2);
        assert!(reg.verify(&b, &cb.prove(&nonce), &nonce).is_ok());

        // Revoked: refused, also after a reload; revoking twice is a no-op.
        assert_eq!(reg.revoke(&a).unwrap().unwrap().hostname, "web01");
        assert!(reg.revoke(&a).unwrap().is_none());
        let reg = AgentRegistry::load(&path).unwrap();
        let e = reg.verify(&a, &ca.prove(&nonce), &nonce).unwrap_err();
        assert_eq!(e, AuthError::UnknownAgent(a.to_string()));
        assert!(e.to_string().contains("revoked"), "{e}");
        assert!(reg.verify(&b, &cb.prove(&nonce), &nonce).is_ok());
        assert_eq!(format!("{cb:?}"), "Credential(<redacted>)");
    }

    #[test]
    fn refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.json");
        let mut reg = AgentRegistry::load(&path).unwrap();
        assert!(matches!(
            reg.register("a/b"),
            Err(RegistryError::Hostname { .. })
        ));
        assert!(matches!(
            reg.register(""),
            Err(RegistryError::Hostname { .. })
        ));
        reg.register("ok").unwrap();

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = AgentRegistry::load(&path).unwrap_err();
        assert!(
            matches!(e, RegistryError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        write_private(
            &path,
            text.replace("\"version\": 1", "\"version\": 2").as_bytes(),
        )
        .unwrap();
        let e = AgentRegistry::load(&path).unwrap_err();
        assert!(
            e.to_string().contains("version 2") && e.to_string().contains("upgrade"),
            "{e}"
        );
        write_private(&path, b"{not json").unwrap();
        assert!(matches!(
            AgentRegistry::load(&path),
            Err(RegistryError::Corrupt { .. })
        ));
        write_private(&path, text.replace("\"agents\"", "\"agentz\"").as_bytes()).unwrap();
        assert!(matches!(
            AgentRegistry::load(&path),
            Err(RegistryError::Corrupt { .. })
        ));
    }
}
