//! One-time enrollment tokens (`ferry agents token --vm VM --expires 24h`): a registration
//! passphrase for one machine, valid once, until it expires, that registers an agent *and* gives it
//! VM `VM`. An operator enrolls one machine without handing out the appliance's passphrase (which
//! registers any machine), and a rebuilt guest takes its VM over without a separate `ferry vms
//! move`.
//!
//! A token looks like the passphrase (`FERRY1-…`, the server's fingerprint pinned in it), so
//! `ferry-agent register --passphrase-file` takes it unchanged. The server keeps each token's
//! secret in `STATE/enroll-tokens.json` (mode 0600, like the passphrase) until it is used or
//! expires; a used token is removed (durably) *before* the agent is registered, so a crash burns it
//! rather than letting it be used twice. Every change holds `control.lock`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_wire::{Fingerprint, Nonce, Passphrase, Proof};
use serde::{Deserialize, Serialize};

use crate::control::{Control, ControlError};

/// The tokens file, in the state directory.
pub const TOKENS_FILE: &str = "enroll-tokens.json";
const FORMAT: &str = "ferry-enroll-tokens";
const VERSION: u32 = 1;
/// Longest validity an operator may give a token.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Token {
    /// The VM the token gives.
    vm: String,
    /// The secret (hex): the token is this secret with the server's fingerprint.
    secret: String,
    /// Unix seconds.
    created: u64,
    expires: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    format: String,
    version: u32,
    tokens: Vec<Token>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn path(dir: &Path) -> PathBuf {
    dir.join(TOKENS_FILE)
}

fn load(dir: &Path) -> Result<Vec<Token>, ControlError> {
    let p = path(dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ControlError::Io { path: p, source }),
    };
    let f: TokensFile = serde_json::from_slice(&bytes).map_err(|e| ControlError::Damaged {
        path: p.clone(),
        why: e.to_string(),
    })?;
    if f.format != FORMAT || f.version != VERSION {
        return Err(ControlError::Damaged {
            path: p,
            why: format!(
                "format {:?} version {} is not this Ferry's",
                f.format, f.version
            ),
        });
    }
    Ok(f.tokens)
}

fn save(dir: &Path, tokens: &[Token]) -> Result<(), ControlError> {
    let p = path(dir);
    let f = TokensFile {
        format: FORMAT.into(),
        version: VERSION,
        tokens: tokens.to_vec(),
    };
    let mut bytes = serde_json::to_vec_pretty(&f).expect("tokens serialize");
    bytes.push(b'\n');
    ferry_durable::write_private(&p, &bytes).map_err(|source| ControlError::Io { path: p, source })
}

impl Control {
    /// Makes a token that registers one agent and gives it `vm`, valid for `lifetime`. `pass` is
    /// the appliance's passphrase (for its fingerprint).
    pub fn make_token(
        &self,
        vm: &str,
        lifetime: Duration,
        pass: &Passphrase,
    ) -> Result<(Passphrase, SystemTime), ControlError> {
        if lifetime.is_zero() || lifetime > MAX_LIFETIME {
            return Err(ControlError::Usage(format!(
                "--expires must be between 1 s and {} days",
                MAX_LIFETIME.as_secs() / 86400
            )));
        }
        let token = Passphrase::generate(pass.fingerprint)
            .map_err(|e| ControlError::Usage(e.to_string()))?;
        let _l = self.lock()?;
        let t = now();
        let mut tokens: Vec<Token> = load(self.dir())?
            .into_iter()
            .filter(|k| k.expires > t)
            .collect();
        let expires = t + lifetime.as_secs();
        tokens.push(Token {
            vm: vm.to_owned(),
            secret: hex::encode(token.secret),
            created: t,
            expires,
        });
        save(self.dir(), &tokens)?;
        Ok((token, UNIX_EPOCH + Duration::from_secs(expires)))
    }

    /// The VM of the unexpired token whose secret `proof` proves for `nonce`, which is removed
    /// (durably) before this returns; `None` if no token matches.
    pub fn use_token(
        &self,
        nonce: &Nonce,
        proof: &Proof,
        fingerprint: Fingerprint,
    ) -> Result<Option<String>, ControlError> {
        let _l = self.lock()?;
        let t = now();
        let tokens = load(self.dir())?;
        let mut found = None;
        let mut keep = Vec::new();
        for k in tokens {
            if k.expires <= t {
                continue; // expired: dropped at the next save
            }
            let mut secret = [0u8; 16];
            let ok = hex::decode(&k.secret)
                .ok()
                .filter(|b| b.len() == 16)
                .map(|b| secret.copy_from_slice(&b))
                .is_some();
            let matches = ok
                && found.is_none()
                && Passphrase {
                    secret,
                    fingerprint,
                }
                .verify(nonce, proof);
            if matches {
                found = Some(k.vm.clone());
            } else {
                keep.push(k);
            }
        }
        if found.is_some() {
            save(self.dir(), &keep)?;
        }
        Ok(found)
    }

    /// Gives `vm` to `agent` (an enrollment token's registration).
    pub fn give_vm(&self, vm: &str, agent: &str) -> Result<(), ControlError> {
        let _l = self.lock()?;
        let mut vms = self.owners()?;
        vms.insert(
            vm.to_owned(),
            crate::control::Owner {
                agent: agent.to_owned(),
                since: now(),
            },
        );
        self.save_owners_locked(&vms)
    }
}
