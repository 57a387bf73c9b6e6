//! One-time enrollment tokens (`ferry agents token --vm VM --expires 24h`): a registration
//! passphrase for one machine, valid once, until it expires, that registers an agent *and* gives it
//! VM `VM`. An operator enrolls one machine without handing out the appliance's passphrase (which
//! registers any machine), and a rebuilt guest takes its VM over without a separate `ferry vms
//! move`. The agent it registers is an ordinary agent: it may also claim VM names no one owns yet
//! (up to the per-agent cap), like any agent. `ferry passphrase rotate` cancels unused tokens.
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
    parse_tokens(&bytes).map_err(|why| ControlError::Damaged { path: p, why })
}

/// How many tokens `enroll-tokens.json` holds, or why the bytes are not that file (fuzzed:
/// `server_state_json`).
pub fn parse(bytes: &[u8]) -> Result<usize, String> {
    parse_tokens(bytes).map(|t| t.len())
}

fn parse_tokens(bytes: &[u8]) -> Result<Vec<Token>, String> {
    let f: TokensFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if f.format != FORMAT || f.version != VERSION {
        return Err(format!(
            "format {:?} version {} is not this Ferry's",
            f.format, f.version
        ));
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
        if lifetime.as_secs() == 0 || lifetime > MAX_LIFETIME {
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

    /// Whether an unexpired token's secret proves `proof` for `nonce`, read without the lock
    /// (the file is replaced atomically): a stranger's wrong proof costs no lock.
    pub fn token_may_match(&self, nonce: &Nonce, proof: &Proof, fingerprint: Fingerprint) -> bool {
        load(self.dir())
            .map(|t| matching(&t, nonce, proof, fingerprint).is_some())
            .unwrap_or(false)
    }

    /// The VM of the unexpired token whose secret `proof` proves for `nonce`, which is removed
    /// (durably) before this returns; `None` if no token matches. The caller holds
    /// `control.lock`.
    pub fn use_token_locked(
        &self,
        nonce: &Nonce,
        proof: &Proof,
        fingerprint: Fingerprint,
    ) -> Result<Option<String>, ControlError> {
        let tokens = load(self.dir())?;
        let Some(i) = matching(&tokens, nonce, proof, fingerprint) else {
            return Ok(None);
        };
        let t = now();
        let vm = tokens[i].vm.clone();
        let keep: Vec<Token> = tokens
            .into_iter()
            .enumerate()
            .filter(|(j, k)| *j != i && k.expires > t)
            .map(|(_, k)| k)
            .collect();
        save(self.dir(), &keep)?;
        Ok(Some(vm))
    }

    /// Cancels every unused token (`ferry passphrase rotate` does, under the lock).
    pub fn cancel_tokens_locked(&self) -> Result<usize, ControlError> {
        let n = load(self.dir())?.len();
        if n > 0 {
            save(self.dir(), &[])?;
        }
        Ok(n)
    }

    /// Gives `vm` to `agent` (an enrollment token's registration; the caller holds
    /// `control.lock` and has just registered `agent`).
    pub fn give_vm_locked(&self, vm: &str, agent: &str) -> Result<(), ControlError> {
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

/// Index of the unexpired token whose secret proves `proof` for `nonce`.
fn matching(
    tokens: &[Token],
    nonce: &Nonce,
    proof: &Proof,
    fingerprint: Fingerprint,
) -> Option<usize> {
    let t = now();
    tokens.iter().position(|k| {
        let mut secret = [0u8; 16];
        k.expires > t
            && hex::decode(&k.secret)
                .ok()
                .filter(|b| b.len() == 16)
                .map(|b| secret.copy_from_slice(&b))
                .is_some()
            && Passphrase {
                secret,
                fingerprint,
            }
            .verify(nonce, proof)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_once_before_it_expires_and_rotation_cancels_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let c = Control::new(d.path());
        let id = ferry_wire::ServerIdentity::load_or_create(d.path()).unwrap();
        let pass = Passphrase::generate(id.fingerprint()).unwrap();
        let (tok, _) = c
            .make_token("web01", Duration::from_secs(60), &pass)
            .unwrap();
        let nonce = [5u8; 32];
        let proof = tok.prove(&nonce);
        let fp = pass.fingerprint;
        assert!(
            !c.token_may_match(&nonce, &pass.prove(&nonce), fp),
            "the passphrase is no token"
        );
        assert!(c.token_may_match(&nonce, &proof, fp));
        assert_eq!(
            c.use_token_locked(&nonce, &proof, fp).unwrap().as_deref(),
            Some("web01")
        );
        assert_eq!(
            c.use_token_locked(&nonce, &proof, fp).unwrap(),
            None,
            "used twice"
        );
        let e = c.make_token("web01", Duration::from_millis(500), &pass);
        assert!(
            matches!(e, Err(ControlError::Usage(_))),
            "sub-second lifetimes are refused"
        );
        let (t2, _) = c
            .make_token("web02", Duration::from_secs(60), &pass)
            .unwrap();
        assert_eq!(c.cancel_tokens_locked().unwrap(), 1);
        assert!(!c.token_may_match(&nonce, &t2.prove(&nonce), fp));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join(TOKENS_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
