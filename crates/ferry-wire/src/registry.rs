//! The process server's registry of agents: who may connect, and how to check them.
//!
//! Registering gives an agent a random id; the agent brings its own Ed25519 public key
//! ([`crate::agentkey`]), which is all the registry keeps of it: nothing here lets anyone act as
//! the agent. An agent authenticates by signing the server's nonce and the TLS session. Agents
//! registered before keys existed (wire version 2) have a verifier of a 32-byte credential
//! instead (`blake3::derive_key` of it, [`crate::proof_key`], which is enough to forge that
//! credential's proofs); their first authentication proves the old credential and signs with a new
//! key, and from then on the registry keeps only that key ([`AgentRegistry::move_to_key`]).
//! Revoking an agent removes it. `register`, `move_to_key` and `revoke` are durable when they
//! return (temp → fsync → rename → fsync dir, mode `0600`).
//!
//! The file is JSON: `{"format": "ferry-agent-registry", "version": 2, "agents": [...]}` (version
//! 1, verifiers only, is read); see `docs/WIRE.md`. One process owns it; callers serialize access (a mutex around the registry).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::agentkey::Binding;
use crate::durable::{loose_mode, write_private};
use crate::fields::check_name;
use crate::message::{Nonce, Proof, PublicKey, Signature};
use crate::passphrase::{proof_key, verify_with_key};
use crate::{AuthError, RegistryError};

const FORMAT: &str = "ferry-agent-registry";
const VERSION: u16 = 2;

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
    /// The agent's public key; `None` for an agent registered before keys that has not
    /// authenticated since.
    pub key: Option<PublicKey>,
    verifier: Option<[u8; 32]>,
    /// Enrolled with a one-time token for this VM: the agent may claim no other VM name (the
    /// operator can still move VMs to it).
    pub only_vm: Option<String>,
}

impl AgentRecord {
    /// `"key"`, or `"legacy credential"` until the agent's first authentication moves it to a key.
    pub fn auth_kind(&self) -> &'static str {
        if self.key.is_some() {
            "key"
        } else {
            "legacy credential"
        }
    }
}

/// A good `Auth`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    /// Signed with the registered key.
    Key,
    /// A legacy agent proved its credential and signed with `key`: record it
    /// ([`AgentRegistry::move_to_key`]) before welcoming the agent.
    MoveToKey(PublicKey),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    id: String,
    hostname: String,
    registered: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    only_vm: Option<String>,
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
        Self::parse(path, &bytes)
    }

    /// The registry in `bytes`, as if loaded from `path` (fuzzed: `server_state_json`).
    pub fn parse(path: PathBuf, bytes: &[u8]) -> Result<Self, RegistryError> {
        let corrupt = |detail: String| RegistryError::Corrupt {
            path: path.clone(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(corrupt(format!("\"format\" is not {FORMAT:?}")));
        }
        let found = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if found != 1 && found != u64::from(VERSION) {
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
            let hex32 =
                |what: &str, v: &Option<String>| -> Result<Option<[u8; 32]>, RegistryError> {
                    let Some(v) = v else { return Ok(None) };
                    let mut b = [0u8; 32];
                    hex::decode_to_slice(v, &mut b)
                        .map_err(|_| corrupt(format!("agent {id}: {what} is not 64 hex digits")))?;
                    Ok(Some(b))
                };
            let key = hex32("public_key", &a.public_key)?;
            let verifier = hex32("verifier", &a.verifier)?;
            if key.is_none() && verifier.is_none() {
                return Err(corrupt(format!(
                    "agent {id} has neither a public_key nor a verifier"
                )));
            }
            let record = AgentRecord {
                hostname: a.hostname,
                registered: a.registered,
                key,
                // With a key, a leftover verifier is never used.
                verifier: if key.is_some() { None } else { verifier },
                only_vm: a.only_vm,
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

    /// Registers a new agent for `hostname` with the agent's `key` and saves the registry. Call
    /// only after the agent proved the passphrase (or a token).
    pub fn register(&mut self, hostname: &str, key: PublicKey) -> Result<AgentId, RegistryError> {
        self.register_with(hostname, key, None)
    }

    /// [`Self::register`] for an agent enrolled with a token for `only_vm` (see
    /// [`AgentRecord::only_vm`]).
    pub fn register_with(
        &mut self,
        hostname: &str,
        key: PublicKey,
        only_vm: Option<&str>,
    ) -> Result<AgentId, RegistryError> {
        check_name("hostname", hostname).map_err(|detail| RegistryError::Hostname {
            hostname: hostname.to_string(),
            detail,
        })?;
        let rand = |e: getrandom::Error| RegistryError::Random(e.to_string());
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).map_err(rand)?;
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
                key: Some(key),
                verifier: None,
                only_vm: only_vm.map(str::to_owned),
            },
        );
        if let Err(e) = self.save() {
            self.agents.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Registers an agent the way wire version 2 did (a credential whose verifier is kept): for
    /// tests of the move to keys, and nothing else.
    #[doc(hidden)]
    pub fn register_legacy(
        &mut self,
        hostname: &str,
    ) -> Result<(AgentId, Credential), RegistryError> {
        let rand = |e: getrandom::Error| RegistryError::Random(e.to_string());
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).map_err(rand)?;
        let mut cred = [0u8; 32];
        getrandom::getrandom(&mut cred).map_err(rand)?;
        let id = AgentId(id);
        self.agents.insert(
            id,
            AgentRecord {
                hostname: hostname.to_string(),
                registered: 0,
                key: None,
                verifier: Some(proof_key(&cred)),
                only_vm: None,
            },
        );
        self.save()?;
        Ok((id, Credential(cred)))
    }

    /// Checks an `Auth`: `signature` by the registered key over `nonce` and the session's
    /// `binding`; for a legacy agent, its old credential's `legacy` proof over `nonce` and a
    /// signature by the `key` it moves to.
    pub fn verify(
        &self,
        id: &AgentId,
        (key, signature, legacy): (&PublicKey, &Signature, &Proof),
        nonce: &Nonce,
        binding: &Binding,
    ) -> Result<Verified, AuthError> {
        let rec = self
            .agents
            .get(id)
            .ok_or_else(|| AuthError::UnknownAgent(id.to_string()))?;
        let bad = || AuthError::BadProof(id.to_string());
        match (&rec.key, &rec.verifier) {
            (Some(k), _) => {
                if k != key || !crate::agentkey::verify(k, id, nonce, binding, signature) {
                    return Err(bad());
                }
                Ok(Verified::Key)
            }
            (None, Some(v)) => {
                if !verify_with_key(v, nonce, legacy)
                    || !crate::agentkey::verify(key, id, nonce, binding, signature)
                {
                    return Err(bad());
                }
                Ok(Verified::MoveToKey(*key))
            }
            (None, None) => Err(bad()),
        }
    }

    /// Records `key` as the agent's, forgetting its legacy verifier, and saves.
    pub fn move_to_key(&mut self, id: &AgentId, key: PublicKey) -> Result<(), RegistryError> {
        let Some(rec) = self.agents.get_mut(id) else {
            return Ok(());
        };
        let before = rec.clone();
        rec.key = Some(key);
        rec.verifier = None;
        if let Err(e) = self.save() {
            self.agents.insert(*id, before);
            return Err(e);
        }
        Ok(())
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
                    public_key: r.key.map(hex::encode),
                    verifier: r.verifier.map(hex::encode),
                    only_vm: r.only_vm.clone(),
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
    use crate::agentkey::AgentKey;
    use std::os::unix::fs::PermissionsExt;

    const NONE: Proof = [0; 32];

    #[test]
    fn register_verify_revoke_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.json");
        let mut reg = AgentRegistry::load(&path).unwrap();
        assert_eq!(reg.agents().count(), 0);
        let (ka, kb) = (AgentKey::generate().unwrap(), AgentKey::generate().unwrap());
        let a = reg.register("web01", ka.public()).unwrap();
        let b = reg.register("db01", kb.public()).unwrap();
        assert_ne!(a, b);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Only public keys are written.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&hex::encode(ka.public())));
        assert!(!text.contains("verifier"));
        assert!(text.contains("web01"));

        let (nonce, tls) = ([3u8; 32], [7u8; 32]);
        let auth = |k: &AgentKey, id: &AgentId| (k.public(), k.sign(id, &nonce, &tls));
        let (pa, sa) = auth(&ka, &a);
        assert_eq!(
            reg.verify(&a, (&pa, &sa, &NONE), &nonce, &tls),
            Ok(Verified::Key)
        );
        // Another agent's key, another nonce, another TLS session: refused.
        let (pb, sb) = auth(&kb, &a);
        assert_eq!(
            reg.verify(&a, (&pb, &sb, &NONE), &nonce, &tls),
            Err(AuthError::BadProof(a.to_string()))
        );
        assert!(reg.verify(&a, (&pa, &sa, &NONE), &[4u8; 32], &tls).is_err());
        assert!(reg
            .verify(&a, (&pa, &sa, &NONE), &nonce, &[8u8; 32])
            .is_err());

        // Reload: same agents, same verdicts.
        let mut reg = AgentRegistry::load(&path).unwrap();
        assert_eq!(reg.agents().count(), 2);
        let (pb, sb) = auth(&kb, &b);
        assert!(reg.verify(&b, (&pb, &sb, &NONE), &nonce, &tls).is_ok());

        // Revoked: refused, also after a reload; revoking twice is a no-op.
        assert_eq!(reg.revoke(&a).unwrap().unwrap().hostname, "web01");
        assert!(reg.revoke(&a).unwrap().is_none());
        let reg = AgentRegistry::load(&path).unwrap();
        let e = reg.verify(&a, (&pa, &sa, &NONE), &nonce, &tls).unwrap_err();
        assert_eq!(e, AuthError::UnknownAgent(a.to_string()));
        assert!(e.to_string().contains("revoked"), "{e}");
        assert!(reg.verify(&b, (&pb, &sb, &NONE), &nonce, &tls).is_ok());
    }

    /// An agent registered with a credential (wire version 2) moves to a key at its first
    /// authentication: it must prove the old credential and sign with the new key; afterwards the
    /// registry holds no verifier, and the credential alone no longer authenticates.
    #[test]
    fn a_legacy_agent_moves_to_a_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.json");
        let mut reg = AgentRegistry::load(&path).unwrap();
        let (id, cred) = reg.register_legacy("old01").unwrap();
        assert_eq!(
            reg.agents().next().unwrap().1.auth_kind(),
            "legacy credential"
        );
        let k = AgentKey::generate().unwrap();
        let (nonce, tls) = ([1u8; 32], [2u8; 32]);
        let sig = k.sign(&id, &nonce, &tls);
        // Without the credential's proof, a key is not taken.
        assert!(reg
            .verify(&id, (&k.public(), &sig, &NONE), &nonce, &tls)
            .is_err());
        let proof = cred.prove(&nonce);
        // With it, but a signature of another session: refused.
        let other = k.sign(&id, &nonce, &[9; 32]);
        assert!(reg
            .verify(&id, (&k.public(), &other, &proof), &nonce, &tls)
            .is_err());
        let v = reg
            .verify(&id, (&k.public(), &sig, &proof), &nonce, &tls)
            .unwrap();
        assert_eq!(v, Verified::MoveToKey(k.public()));
        reg.move_to_key(&id, k.public()).unwrap();
        let reg = AgentRegistry::load(&path).unwrap();
        assert_eq!(reg.agents().next().unwrap().1.auth_kind(), "key");
        assert!(!std::fs::read_to_string(&path).unwrap().contains("verifier"));
        // The old credential is worth nothing now, even with a new key of the thief's.
        let thief = AgentKey::generate().unwrap();
        let ts = thief.sign(&id, &nonce, &tls);
        assert!(reg
            .verify(&id, (&thief.public(), &ts, &proof), &nonce, &tls)
            .is_err());
        assert_eq!(
            reg.verify(&id, (&k.public(), &sig, &NONE), &nonce, &tls),
            Ok(Verified::Key)
        );
    }

    #[test]
    fn refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.json");
        let mut reg = AgentRegistry::load(&path).unwrap();
        let k = AgentKey::generate().unwrap().public();
        assert!(matches!(
            reg.register("a/b", k),
            Err(RegistryError::Hostname { .. })
        ));
        assert!(matches!(
            reg.register("", k),
            Err(RegistryError::Hostname { .. })
        ));
        reg.register("ok", k).unwrap();

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
            text.replace("\"version\": 2", "\"version\": 3").as_bytes(),
        )
        .unwrap();
        let e = AgentRegistry::load(&path).unwrap_err();
        assert!(
            e.to_string().contains("version 3") && e.to_string().contains("upgrade"),
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
        write_private(
            &path,
            text.replace("\"public_key\"", "\"nothing\"").as_bytes(),
        )
        .unwrap();
        assert!(matches!(
            AgentRegistry::load(&path),
            Err(RegistryError::Corrupt { .. })
        ));
    }
}
