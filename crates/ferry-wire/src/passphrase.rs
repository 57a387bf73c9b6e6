//! The registration passphrase and the proofs agents make with secrets.
//!
//! A passphrase carries the appliance's registration secret (16 random bytes) and the SHA-256
//! fingerprint of its TLS certificate (32 bytes), so one string both pins the server and proves
//! the agent may register. It is printed as `FERRY1-` and 84 Crockford base32 characters in
//! groups of 6; the encoded bytes end with a 4-byte checksum, so a typo (or a missing, doubled or
//! swapped character) is reported, not turned into a wrong pin.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::durable::{loose_mode, write_private};
use crate::message::{Nonce, Proof};
use crate::tls::Fingerprint;
use crate::PassphraseError;

/// The file in the process server's state directory holding its passphrase (mode `0600`).
pub const PASSPHRASE_FILE: &str = "registration.passphrase";

const PREFIX: &str = "FERRY1-";
const CHECK_CONTEXT: &str = "ferry-wire 2026-11 passphrase checksum v1";
const PROOF_CONTEXT: &str = "ferry-wire 2026-11 proof key v1";
/// Crockford's base32 alphabet: no I, L, O, U.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const RAW_LEN: usize = 16 + 32 + 4;
/// Base32 characters of a passphrase: ceil(52 * 8 / 5).
pub const PASSPHRASE_CHARS: usize = (RAW_LEN * 8).div_ceil(5);
const GROUP: usize = 6;

/// What an agent needs to register: the appliance's secret and its certificate fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct Passphrase {
    pub secret: [u8; 16],
    pub fingerprint: Fingerprint,
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Passphrase")
            .field("secret", &"<redacted>")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Passphrase {
    /// A new passphrase with a random secret for the server whose certificate has `fingerprint`.
    pub fn generate(fingerprint: Fingerprint) -> Result<Self, PassphraseError> {
        let mut secret = [0u8; 16];
        getrandom::getrandom(&mut secret).map_err(|e| PassphraseError::Random(e.to_string()))?;
        Ok(Passphrase {
            secret,
            fingerprint,
        })
    }

    /// The appliance's passphrase from `state_dir/registration.passphrase`, generated (and saved
    /// durably, mode `0600`) on first start. A saved passphrase that pins another certificate (the
    /// identity was recreated) is replaced: it could not work any more.
    pub fn load_or_generate(
        state_dir: &Path,
        fingerprint: Fingerprint,
    ) -> Result<Self, PassphraseError> {
        let path = state_dir.join(PASSPHRASE_FILE);
        if path.exists() {
            if let Some(mode) = loose_mode(&path).map_err(|e| io_err(&path, e))? {
                return Err(PassphraseError::Io {
                    path: path.display().to_string(),
                    detail: format!("readable by group or others (mode {mode:o}): chmod 600 it"),
                });
            }
            let p = Self::read_file(&path)?;
            if p.fingerprint == fingerprint {
                return Ok(p);
            }
        }
        Self::rotate(state_dir, fingerprint)
    }

    /// Replaces the saved passphrase with a new secret. Registered agents are not affected (they
    /// hold credentials); only new registrations need the new passphrase.
    pub fn rotate(state_dir: &Path, fingerprint: Fingerprint) -> Result<Self, PassphraseError> {
        let p = Self::generate(fingerprint)?;
        let path = state_dir.join(PASSPHRASE_FILE);
        ferry_durable::create_dir_durable(state_dir).map_err(|e| io_err(state_dir, e))?;
        write_private(&path, format!("{p}\n").as_bytes()).map_err(|e| io_err(&path, e))?;
        Ok(p)
    }

    /// Reads a passphrase file (the agent's `--passphrase-file`): the passphrase, surrounding
    /// whitespace allowed.
    pub fn read_file(path: &Path) -> Result<Self, PassphraseError> {
        std::fs::read_to_string(path)
            .map_err(|e| io_err(path, e))?
            .parse()
    }

    /// The agent's registration proof for `nonce`.
    pub fn prove(&self, nonce: &Nonce) -> Proof {
        prove(&self.secret, nonce)
    }

    /// Whether `proof` shows knowledge of this passphrase's secret for `nonce` (constant time).
    pub fn verify(&self, nonce: &Nonce, proof: &Proof) -> bool {
        verify(&self.secret, nonce, proof)
    }

    fn raw(&self) -> [u8; RAW_LEN] {
        let mut raw = [0u8; RAW_LEN];
        raw[..16].copy_from_slice(&self.secret);
        raw[16..48].copy_from_slice(&self.fingerprint.0);
        let check = checksum(&raw[..48]);
        raw[48..].copy_from_slice(&check);
        raw
    }
}

fn io_err(path: &Path, e: std::io::Error) -> PassphraseError {
    PassphraseError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

fn checksum(body: &[u8]) -> [u8; 4] {
    let h = blake3::Hasher::new_derive_key(CHECK_CONTEXT)
        .update(body)
        .finalize();
    let mut c = [0u8; 4];
    c.copy_from_slice(&h.as_bytes()[..4]);
    c
}

impl fmt::Display for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chars = encode_base32(&self.raw());
        f.write_str(PREFIX)?;
        for (i, group) in chars.chunks(GROUP).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            // ALPHABET is ASCII.
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl FromStr for Passphrase {
    type Err = PassphraseError;

    /// Accepts any case, dashes and whitespace anywhere, and reads the look-alikes I and L as 1 and
    /// O as 0.
    fn from_str(s: &str) -> Result<Self, PassphraseError> {
        let s = s.trim();
        let head = s.get(..PREFIX.len()).ok_or(PassphraseError::Prefix)?;
        if !head.eq_ignore_ascii_case(PREFIX) {
            return Err(PassphraseError::Prefix);
        }
        let mut values = Vec::with_capacity(PASSPHRASE_CHARS);
        for (pos, ch) in s.char_indices().skip(PREFIX.len()) {
            if ch == '-' || ch.is_whitespace() {
                continue;
            }
            let v = match ch.to_ascii_uppercase() {
                'I' | 'L' => 1,
                'O' => 0,
                c => match ALPHABET.iter().position(|a| *a as char == c) {
                    Some(v) => v as u8,
                    None => return Err(PassphraseError::Character { ch, pos }),
                },
            };
            values.push(v);
        }
        if values.len() != PASSPHRASE_CHARS {
            return Err(PassphraseError::Length {
                found: values.len(),
                expected: PASSPHRASE_CHARS,
            });
        }
        let raw = decode_base32(&values).ok_or(PassphraseError::Checksum)?;
        if checksum(&raw[..48]) != raw[48..] {
            return Err(PassphraseError::Checksum);
        }
        let mut secret = [0u8; 16];
        secret.copy_from_slice(&raw[..16]);
        let mut fp = [0u8; 32];
        fp.copy_from_slice(&raw[16..48]);
        Ok(Passphrase {
            secret,
            fingerprint: Fingerprint(fp),
        })
    }
}

/// Big-endian bit order, the last character padded with zero bits.
fn encode_base32(raw: &[u8; RAW_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PASSPHRASE_CHARS);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in raw {
        acc = (acc << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize]);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize]);
    }
    out
}

/// `None` if the padding bits are not zero (a typo in the last character).
fn decode_base32(values: &[u8]) -> Option<[u8; RAW_LEN]> {
    let mut raw = [0u8; RAW_LEN];
    let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
    for v in values {
        acc = ((acc << 5) | u32::from(*v)) & 0xffff;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            *raw.get_mut(n)? = (acc >> bits) as u8;
            n += 1;
        }
    }
    (n == RAW_LEN && acc & ((1 << bits) - 1) == 0).then_some(raw)
}

/// The key a proof is made with: `blake3::derive_key` of the secret. For credentials this is also
/// the verifier the process server stores, so the credential itself is never on its disk.
pub fn proof_key(secret: &[u8]) -> [u8; 32] {
    blake3::derive_key(PROOF_CONTEXT, secret)
}

/// Proof of knowing `secret` (a passphrase secret or an agent credential) for a server `nonce`:
/// `blake3::keyed_hash(proof_key(secret), nonce)`.
pub fn prove(secret: &[u8], nonce: &Nonce) -> Proof {
    prove_with_key(&proof_key(secret), nonce)
}

/// [`prove`] from an already derived key.
pub fn prove_with_key(key: &[u8; 32], nonce: &Nonce) -> Proof {
    *blake3::keyed_hash(key, nonce).as_bytes()
}

/// Whether `proof` is [`prove`]`(secret, nonce)`, compared in constant time.
pub fn verify(secret: &[u8], nonce: &Nonce, proof: &Proof) -> bool {
    verify_with_key(&proof_key(secret), nonce, proof)
}

/// [`verify`] from an already derived key (the registry's stored verifier).
pub fn verify_with_key(key: &[u8; 32], nonce: &Nonce, proof: &Proof) -> bool {
    // blake3::Hash's equality is constant-time.
    blake3::keyed_hash(key, nonce) == blake3::Hash::from_bytes(*proof)
}

/// A fresh random nonce (one per connection, sent in `HelloAck`).
pub fn new_nonce() -> Result<Nonce, getrandom::Error> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Passphrase {
        Passphrase {
            secret: *b"0123456789abcdef",
            fingerprint: Fingerprint([0xA5; 32]),
        }
    }

    #[test]
    fn display_parse_round_trip() {
        for _ in 0..50 {
            let p = Passphrase::generate(Fingerprint(new_nonce().unwrap())).unwrap();
            let s = p.to_string();
            assert!(s.starts_with("FERRY1-"), "{s}");
            assert_eq!(s.len(), PREFIX.len() + 84 + 13, "{s}");
            assert_eq!(s.parse::<Passphrase>().unwrap(), p);
            // Lower case, spaces instead of dashes, a trailing newline: still fine.
            let loose = s.to_lowercase().replace('-', " ") + "\n";
            let loose = format!("ferry1-{}", &loose[PREFIX.len()..]);
            assert_eq!(loose.parse::<Passphrase>().unwrap(), p);
        }
    }

    #[test]
    fn golden_string() {
        let s = sample().to_string();
        assert_eq!(s.parse::<Passphrase>().unwrap(), sample());
        // "0123…" = 0x30 0x31 … → bits 00110 00000 11000 10011 … → 6 0 R K …
        assert_eq!(
            s,
            "FERRY1-60RK4C-SM6MV3-EE1SC5-H66S35-CTJTB9-D5MPJT-B9D5MP-JTB9D5-MPJTB9-D5MPJT-B9D5MP-\
             JTB9D5-MPJTA9-HZX4JG"
        );
    }

    #[test]
    fn every_single_character_typo_is_detected() {
        let s = sample().to_string();
        let mut missed = 0;
        for (i, c) in s.char_indices().skip(PREFIX.len()) {
            if c == '-' {
                continue;
            }
            for &r in ALPHABET.iter() {
                if r as char == c {
                    continue;
                }
                let mut t = s.clone();
                t.replace_range(i..i + 1, &(r as char).to_string());
                match t.parse::<Passphrase>() {
                    Err(PassphraseError::Checksum) => {}
                    Ok(_) => missed += 1,
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
        assert_eq!(missed, 0);
    }

    #[test]
    fn swaps_drops_and_junk_are_detected() {
        let s = sample().to_string();
        let body: Vec<char> = s.chars().collect();
        for i in PREFIX.len()..body.len() - 1 {
            if body[i] == body[i + 1] || body[i] == '-' || body[i + 1] == '-' {
                continue;
            }
            let mut t = body.clone();
            t.swap(i, i + 1);
            let t: String = t.into_iter().collect();
            assert_eq!(t.parse::<Passphrase>(), Err(PassphraseError::Checksum));
        }
        let dropped = format!("{}{}", &s[..10], &s[11..]);
        assert!(matches!(
            dropped.parse::<Passphrase>(),
            Err(PassphraseError::Length {
                found: 83,
                expected: 84
            })
        ));
        let junk = format!("{}U{}", &s[..10], &s[11..]);
        assert!(matches!(
            junk.parse::<Passphrase>(),
            Err(PassphraseError::Character { ch: 'U', pos: 10 })
        ));
        assert_eq!(
            s[PREFIX.len()..].parse::<Passphrase>(),
            Err(PassphraseError::Prefix)
        );
        assert_eq!("".parse::<Passphrase>(), Err(PassphraseError::Prefix));
        assert_eq!(
            "FÉRRY1-xx".parse::<Passphrase>(),
            Err(PassphraseError::Prefix)
        );
        let e = dropped.parse::<Passphrase>().unwrap_err().to_string();
        assert!(e.contains("83 characters") && e.contains("84"), "{e}");
    }

    #[test]
    fn saved_in_the_state_dir() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fp = Fingerprint([1; 32]);
        let a = Passphrase::load_or_generate(dir.path(), fp).unwrap();
        let path = dir.path().join(PASSPHRASE_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Passphrase::load_or_generate(dir.path(), fp).unwrap(), a);
        assert_eq!(Passphrase::read_file(&path).unwrap(), a);
        // A new identity: a new passphrase pinning it.
        let b = Passphrase::load_or_generate(dir.path(), Fingerprint([2; 32])).unwrap();
        assert_eq!(b.fingerprint, Fingerprint([2; 32]));
        assert_ne!(b.secret, a.secret);
        let c = Passphrase::rotate(dir.path(), b.fingerprint).unwrap();
        assert_ne!(c.secret, b.secret);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Passphrase::load_or_generate(dir.path(), c.fingerprint).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let e = Passphrase::read_file(&dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn proofs() {
        let p = sample();
        let nonce = [7u8; 32];
        let proof = p.prove(&nonce);
        assert!(p.verify(&nonce, &proof));
        assert!(!p.verify(&[8u8; 32], &proof), "another nonce");
        let other = Passphrase {
            secret: *b"0123456789abcdeg",
            ..p.clone()
        };
        assert!(!p.verify(&nonce, &other.prove(&nonce)), "wrong passphrase");
        let mut bad = proof;
        bad[31] ^= 1;
        assert!(!p.verify(&nonce, &bad));
        assert_eq!(prove_with_key(&proof_key(&p.secret), &nonce), proof);
        assert!(format!("{p:?}").contains("redacted"));
        assert!(!format!("{p:?}").contains("48, 49"));
    }
}
