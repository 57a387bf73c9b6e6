//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Every binary format in `ferry-format` checks a header checksum (and the sealed ones an AES-GCM
//! tag) before it trusts any field, so random bytes almost never get past the first check. Each
//! target therefore feeds the parser three ways: the raw input; the input with a *repaired* header
//! (magic, version, length and checksum forced, so random bytes reach the field decoders); and, for
//! the sealed formats, the input sealed under the fixed fuzz key, so random bytes reach the plaintext
//! decoders behind the tag. A parser must return `Ok` or `Err` for all three, never panic.

use ferry_crypto::MasterKey;
use ferry_format::header_checksum;

/// The fixed key every target uses.
pub fn fuzz_key() -> MasterKey {
    MasterKey::from_bytes(&[7u8; 32], "fuzz")
}

/// A copy of `data`, padded with zeros to at least `header_len` bytes, carrying `magic`, `version`
/// (u16 LE at 8) and `header_len` (u16 LE at 10), then each of `patches` (offset, bytes), and
/// finally a valid 8-byte header checksum at `sum_at` over the bytes before it.
pub fn repaired_header(
    data: &[u8],
    magic: &[u8; 8],
    version: u16,
    header_len: usize,
    sum_at: usize,
    patches: &[(usize, &[u8])],
) -> Vec<u8> {
    let mut v = data.to_vec();
    if v.len() < header_len {
        v.resize(header_len, 0);
    }
    v[..8].copy_from_slice(magic);
    v[8..10].copy_from_slice(&version.to_le_bytes());
    v[10..12].copy_from_slice(&(header_len as u16).to_le_bytes());
    for (at, bytes) in patches {
        v[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    let sum = header_checksum(&v[..sum_at]);
    v[sum_at..sum_at + 8].copy_from_slice(&sum);
    v
}

/// Splits a little-endian u16 length and then that many bytes (or all that is left) off `data`.
pub fn take_chunk(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    data[2..].split_at(n)
}
