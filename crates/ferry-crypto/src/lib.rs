//! Keys and cryptography for Ferry.
//!
//! Job: load (or create, mode 0600) the 32-byte master key file, derive the purpose keys from it with
//! `blake3::derive_key`, seal and open data with AES-256-GCM, and compute the *keyed* chunk digests
//! used for change detection and dedupe.
//!
//! Invariants:
//! - Every sealed object names the key it was sealed with by a [`KeyId`] (8 bytes derived from the
//!   master key), so a wrong key is reported as such, not as "corrupt data".
//! - Nonces are never reused under one key: every segment and cache file derives its own subkey from a
//!   random 16-byte salt, and nonces inside it are counters.
//! - Chunk digests are keyed with a key derived from the master key, so a digest stored next to
//!   ciphertext reveals nothing about the plaintext to someone without the key.
//!
//! Must not: log or print key material, or write a key file that other users can read.

use std::fs;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::aead;

/// Size of a chunk digest.
pub const DIGEST_LEN: usize = 32;
/// Size of an AES-GCM tag appended to every sealed message.
pub const TAG_LEN: usize = 16;
/// Size of a salt that picks a per-object subkey.
pub const SALT_LEN: usize = 16;

/// Derivation contexts. Changing any of these strings changes every key: never do it.
const CTX_KEY_ID: &str = "ferry 2026-11 key id v1";
const CTX_DIGEST: &str = "ferry 2026-11 chunk digest v1";
const CTX_SEGMENT: &str = "ferry 2026-11 segment encryption v1";
const CTX_CACHE: &str = "ferry 2026-11 cache encryption v1";

/// A keyed chunk digest. All zeros is reserved for "an all-zero chunk" and is never produced by the
/// hash of data (the probability is 2^-256).
pub type Digest = [u8; DIGEST_LEN];

/// The digest that stands for an all-zero chunk (and for a page a replica never received).
pub const ZERO_DIGEST: Digest = [0u8; DIGEST_LEN];

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// cannot read key file {path}: {source}; pass the key the store was created with (--key-file)
    #[error("cannot read key file {path}: {source}; pass the key the store was created with (--key-file)")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    /// key file {path} is {len} bytes; a Ferry key file holds exactly 32 bytes (or 64 hex digits)
    #[error("key file {path} is {len} bytes; a Ferry key file holds exactly 32 bytes (or 64 hex digits)")]
    BadKeyLength { path: PathBuf, len: usize },
    /// cannot create key file {path}: {source}
    #[error("cannot create key file {path}: {source}")]
    CreateKey {
        path: PathBuf,
        source: std::io::Error,
    },
    /// key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`
    #[error("key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {}`", path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
    /// authentication failed: the data was modified or sealed with another key
    #[error("authentication failed: the data was modified or sealed with another key")]
    Open,
    /// the operating system random generator failed: {0}
    #[error("the operating system random generator failed: {0}")]
    Random(String),
}

/// Identifies a master key without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct KeyId(pub [u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The master key and everything derived from it.
#[derive(Clone)]
pub struct MasterKey {
    id: KeyId,
    digest_key: [u8; 32],
    segment_key: [u8; 32],
    cache_key: [u8; 32],
    path: PathBuf,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Fills `buf` from the operating system's random generator.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::getrandom(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// A random 16-byte salt.
pub fn random_salt() -> Result<[u8; SALT_LEN], CryptoError> {
    let mut s = [0u8; SALT_LEN];
    random_bytes(&mut s)?;
    Ok(s)
}

impl MasterKey {
    /// Builds the key set from 32 secret bytes. `path` is only used in messages.
    pub fn from_bytes(secret: &[u8; 32], path: impl Into<PathBuf>) -> Self {
        let idk = blake3::derive_key(CTX_KEY_ID, secret);
        let mut id = [0u8; 8];
        id.copy_from_slice(&idk[..8]);
        MasterKey {
            id: KeyId(id),
            digest_key: blake3::derive_key(CTX_DIGEST, secret),
            segment_key: blake3::derive_key(CTX_SEGMENT, secret),
            cache_key: blake3::derive_key(CTX_CACHE, secret),
            path: path.into(),
        }
    }

    /// Loads the key file: 32 raw bytes, or 64 hex digits (surrounding whitespace allowed).
    pub fn load(path: &Path) -> Result<Self, CryptoError> {
        let meta = fs::metadata(path).map_err(|source| CryptoError::ReadKey {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CryptoError::KeyPermissions {
                path: path.to_owned(),
                mode,
            });
        }
        let raw = fs::read(path).map_err(|source| CryptoError::ReadKey {
            path: path.to_owned(),
            source,
        })?;
        let secret = parse_key(&raw).ok_or(CryptoError::BadKeyLength {
            path: path.to_owned(),
            len: raw.len(),
        })?;
        Ok(Self::from_bytes(&secret, path))
    }

    /// Creates a new random key file with mode 0600 (refusing to overwrite one) and loads it.
    pub fn create(path: &Path) -> Result<Self, CryptoError> {
        let err = |source| CryptoError::CreateKey {
            path: path.to_owned(),
            source,
        };
        let mut secret = [0u8; 32];
        random_bytes(&mut secret)?;
        // 0600 from creation, never replacing an existing key; file and directory synced (a
        // failed directory sync is a failed creation: the key might not survive a power cut).
        let mut text = hex::encode(secret).into_bytes();
        text.push(b'\n');
        ferry_durable::create_private(path, &text).map_err(err)?;
        Ok(Self::from_bytes(&secret, path))
    }

    /// The key's public identifier.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Where the key was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A keyed digest of chunk data. Never returns [`ZERO_DIGEST`] in practice.
    pub fn digest(&self, data: &[u8]) -> Digest {
        *blake3::keyed_hash(&self.digest_key, data).as_bytes()
    }

    /// The sealer of one segment, chosen by the segment's random salt.
    pub fn segment_sealer(&self, salt: &[u8; SALT_LEN]) -> Sealer {
        Sealer::new(&self.segment_key, salt)
    }

    /// The sealer of one cache file, chosen by the file's random salt.
    pub fn cache_sealer(&self, salt: &[u8; SALT_LEN]) -> Sealer {
        Sealer::new(&self.cache_key, salt)
    }
}

fn parse_key(raw: &[u8]) -> Option<[u8; 32]> {
    if raw.len() == 32 {
        let mut k = [0u8; 32];
        k.copy_from_slice(raw);
        return Some(k);
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

/// AES-256-GCM under one per-object subkey. Nonces are 96-bit counters supplied by the caller; the
/// caller guarantees each counter is used once per subkey (object formats use entry indexes).
pub struct Sealer {
    key: aead::LessSafeKey,
}

impl Sealer {
    fn new(purpose_key: &[u8; 32], salt: &[u8; SALT_LEN]) -> Self {
        let sub = blake3::keyed_hash(purpose_key, salt);
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, sub.as_bytes())
            .expect("32-byte key is valid for AES-256-GCM");
        Sealer {
            key: aead::LessSafeKey::new(unbound),
        }
    }

    fn nonce(counter: u64) -> aead::Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_le_bytes());
        aead::Nonce::assume_unique_for_key(n)
    }

    /// Encrypts `buf` in place and appends the 16-byte tag. `aad` is authenticated, not encrypted.
    pub fn seal(&self, counter: u64, aad: &[u8], buf: &mut Vec<u8>) {
        let tag = self
            .key
            .seal_in_place_separate_tag(Self::nonce(counter), aead::Aad::from(aad), buf)
            .expect("AES-GCM seal cannot fail for inputs under 64 GiB");
        buf.extend_from_slice(tag.as_ref());
    }

    /// Decrypts `buf` (ciphertext followed by tag) in place and returns the plaintext length.
    pub fn open(&self, counter: u64, aad: &[u8], buf: &mut [u8]) -> Result<usize, CryptoError> {
        let plain = self
            .key
            .open_in_place(Self::nonce(counter), aead::Aad::from(aad), buf)
            .map_err(|_| CryptoError::Open)?;
        Ok(plain.len())
    }
}

/// True if every byte of `data` is zero (vectorizes well).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: every bit pattern is a valid u128, and align_to keeps the slices in bounds.
        unsafe { data.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0)
        && body.iter().fold(0u128, |acc, &w| acc | w) == 0
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = MasterKey::from_bytes(&[7u8; 32], "test");
        let s = k.segment_sealer(&[1u8; 16]);
        let mut buf = b"hello world".to_vec();
        s.seal(3, b"aad", &mut buf);
        let mut t = buf.clone();
        let n = s.open(3, b"aad", &mut t).unwrap();
        assert_eq!(&t[..n], b"hello world");
        let mut t = buf.clone();
        t[0] ^= 1;
        assert!(s.open(3, b"aad", &mut t).is_err());
        let mut t = buf.clone();
        assert!(s.open(4, b"aad", &mut t).is_err(), "wrong counter");
        let other = MasterKey::from_bytes(&[8u8; 32], "other").segment_sealer(&[1u8; 16]);
        let mut t = buf;
        assert!(other.open(3, b"aad", &mut t).is_err(), "wrong key");
    }

    #[test]
    fn key_file_created_private_and_reloads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k/master.key");
        let a = MasterKey::create(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = MasterKey::load(&p).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.digest(b"x"), b.digest(b"x"));
        assert!(MasterKey::create(&p).is_err(), "never overwrites a key");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MasterKey::load(&p),
            Err(CryptoError::KeyPermissions { .. })
        ));
    }

    #[test]
    fn golden_key_id_digest_and_seals() {
        // Golden vectors: these must never change, or existing stores become unreadable. Computed
        // independently (Python `blake3` derive_key/keyed hash and `cryptography`'s AESGCM) from
        // the derivation in docs/FORMAT.md: secret = 32 zero bytes, salt = 00..0f, counter 7
        // (nonce = 4 zero bytes + counter little-endian), aad "aad", plaintext "ferry golden".
        let k = MasterKey::from_bytes(&[0u8; 32], "zero");
        assert_eq!(k.id().to_string(), "14dd275e0ece7d11");
        assert_eq!(
            hex::encode(k.digest(&[0u8; 10])),
            "3c154e2e26e9053a249cc4f51a7ab303de25fccf20a990b2d2a0ef96a984f3db"
        );
        let salt: [u8; 16] = std::array::from_fn(|i| i as u8);
        for (sealer, want) in [
            (
                k.segment_sealer(&salt),
                "431098eca26c303a3632e65e2558aa472dfc07a91dd4672e63118011",
            ),
            (
                k.cache_sealer(&salt),
                "9eb31d304ca96e288e5a3fa6a184bfe23bf55aad16f232760393aff8",
            ),
        ] {
            let mut buf = b"ferry golden".to_vec();
            sealer.seal(7, b"aad", &mut buf);
            assert_eq!(hex::encode(&buf), want);
            let n = sealer.open(7, b"aad", &mut buf).unwrap();
            assert_eq!(&buf[..n], b"ferry golden");
        }
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 65536 + 3];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[65537] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[5..]));
        assert!(is_zero(&[]));
    }
}
