//! The agent's key: how an agent proves who it is without the server holding its secret.
//!
//! At registration the agent makes an Ed25519 key pair (ring) and sends only the public key; the
//! server's registry keeps that public key. To authenticate, the agent signs
//! `"ferry-agent-auth-v3\0" ‖ agent id ‖ server nonce ‖ TLS binding`, where the binding is 32 bytes
//! exported from the TLS 1.3 session ([`tls_binding`], RFC 8446 §7.5 exporter, label
//! [`BINDING_LABEL`]). So:
//! - a thief of the server's state directory (or the server itself) holds no secret that lets it
//!   act as the agent toward this or any other server;
//! - a signature is good for one nonce on one TLS session: relayed to another session (a server
//!   passing it on) it does not verify.
//!
//! The private key is kept by the agent as PKCS#8 (its identity file, mode 0600). `Debug` never
//! prints it.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::message::{Nonce, PublicKey, Signature};
use crate::registry::AgentId;

/// The TLS exporter label of the session binding.
pub const BINDING_LABEL: &[u8] = b"EXPORTER-ferry-agent-auth";
/// What the signature covers starts with this.
const CONTEXT: &[u8] = b"ferry-agent-auth-v3\0";

/// 32 bytes both ends of one TLS session derive alike, and no other session has.
pub type Binding = [u8; 32];

/// The session binding of a TLS connection (either end).
pub fn tls_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Binding, rustls::Error> {
    conn.export_keying_material([0u8; 32], BINDING_LABEL, None)
}

fn signed(agent: &AgentId, nonce: &Nonce, binding: &Binding) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 16 + 32 + 32);
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(&agent.0);
    m.extend_from_slice(nonce);
    m.extend_from_slice(binding);
    m
}

/// An agent's private key.
pub struct AgentKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentKey(public {})", hex::encode(self.public()))
    }
}

impl Clone for AgentKey {
    fn clone(&self) -> Self {
        AgentKey::from_pkcs8(&self.pkcs8).expect("a key that parsed once parses again")
    }
}

impl AgentKey {
    /// A new random key.
    pub fn generate() -> Result<AgentKey, String> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
        AgentKey::from_pkcs8(doc.as_ref())
    }

    /// The key stored as PKCS#8 v2 (what [`Self::pkcs8`] gives).
    pub fn from_pkcs8(bytes: &[u8]) -> Result<AgentKey, String> {
        let pair =
            Ed25519KeyPair::from_pkcs8(bytes).map_err(|e| format!("not an Ed25519 key: {e}"))?;
        Ok(AgentKey {
            pair,
            pkcs8: bytes.to_vec(),
        })
    }

    /// The bytes to store (secret).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        k
    }

    /// The `Auth` signature of `agent` for `nonce` on the session with `binding`.
    pub fn sign(&self, agent: &AgentId, nonce: &Nonce, binding: &Binding) -> Signature {
        let mut s = [0u8; 64];
        s.copy_from_slice(self.pair.sign(&signed(agent, nonce, binding)).as_ref());
        s
    }
}

/// Whether `signature` is `key`'s signature of `agent` for `nonce` on the session with `binding`.
pub fn verify(
    key: &PublicKey,
    agent: &AgentId,
    nonce: &Nonce,
    binding: &Binding,
    signature: &Signature,
) -> bool {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&signed(agent, nonce, binding), signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_key_agent_nonce_and_session_only() {
        let k = AgentKey::generate().unwrap();
        let (a, n, b) = (AgentId([1; 16]), [2u8; 32], [3u8; 32]);
        let s = k.sign(&a, &n, &b);
        assert!(verify(&k.public(), &a, &n, &b, &s));
        assert!(
            !verify(&k.public(), &AgentId([9; 16]), &n, &b, &s),
            "another agent id"
        );
        assert!(!verify(&k.public(), &a, &[9; 32], &b, &s), "another nonce");
        assert!(
            !verify(&k.public(), &a, &n, &[9; 32], &s),
            "another TLS session"
        );
        let other = AgentKey::generate().unwrap();
        assert!(!verify(&other.public(), &a, &n, &b, &s), "another key");
        let again = AgentKey::from_pkcs8(k.pkcs8()).unwrap();
        assert_eq!(again.public(), k.public());
        assert!(!format!("{k:?}").contains(&hex::encode(k.pkcs8())));
    }
}
