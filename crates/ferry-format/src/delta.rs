//! Page maps and page-map deltas of a local replica.
//!
//! A replica's page map holds one 32-byte keyed digest per 64 KiB page ([`ferry_crypto::ZERO_DIGEST`]
//! for a zero page). `current.map` is the map at the newest point: a 64-byte header then the digests.
//! A delta (`undo/N.delta`, `redo/N.delta`) is a 32-byte header, sorted `(page, digest)` entries, and a
//! blake3 trailer over the entries. See `docs/FORMAT.md`.

use ferry_crypto::Digest;

use crate::codec::Put;
use crate::{header_checksum, FormatError};

pub const MAP_MAGIC: [u8; 8] = *b"FERRYMAP";
pub const MAP_VERSION: u16 = 1;
pub const MAP_HEADER_LEN: usize = 64;
pub const DELTA_MAGIC: [u8; 8] = *b"FERRYDLT";
pub const DELTA_VERSION: u16 = 1;
pub const DELTA_HEADER_LEN: usize = 32;
pub const DELTA_ENTRY_LEN: usize = 40;
pub const DELTA_TRAILER_LEN: usize = 32;

/// Header of a page map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapHeader {
    /// Number of pages (digests) in the map.
    pub pages: u64,
    /// The point sequence number the map reflects.
    pub generation: u64,
}

impl MapHeader {
    pub fn encode(&self) -> [u8; MAP_HEADER_LEN] {
        let mut b = Vec::with_capacity(MAP_HEADER_LEN);
        b.put_bytes(&MAP_MAGIC);
        b.put_u16(MAP_VERSION);
        b.put_u16(MAP_HEADER_LEN as u16);
        b.put_u32(0);
        b.put_u64(self.pages);
        b.put_u64(self.generation);
        b.resize(56, 0);
        let c = header_checksum(&b);
        b.put_bytes(&c);
        b.try_into().expect("64 bytes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = crate::open_header(bytes, "page map", &MAP_MAGIC, MAP_VERSION, MAP_HEADER_LEN)?;
        Ok(MapHeader {
            pages: r.u64()?,
            generation: r.u64()?,
        })
    }
}

/// Header of a delta file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaHeader {
    pub count: u64,
}

impl DeltaHeader {
    pub fn encode(&self) -> [u8; DELTA_HEADER_LEN] {
        let mut b = Vec::with_capacity(DELTA_HEADER_LEN);
        b.put_bytes(&DELTA_MAGIC);
        b.put_u16(DELTA_VERSION);
        b.put_u16(DELTA_HEADER_LEN as u16);
        b.put_u32(0);
        b.put_u64(self.count);
        let c = header_checksum(&b);
        b.put_bytes(&c);
        b.try_into().expect("32 bytes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = crate::open_header(
            bytes,
            "page delta",
            &DELTA_MAGIC,
            DELTA_VERSION,
            DELTA_HEADER_LEN,
        )?;
        Ok(DeltaHeader { count: r.u64()? })
    }
}

/// Encodes one delta entry.
pub fn encode_entry(page: u64, digest: &Digest) -> [u8; DELTA_ENTRY_LEN] {
    let mut e = [0u8; DELTA_ENTRY_LEN];
    e[..8].copy_from_slice(&page.to_le_bytes());
    e[8..].copy_from_slice(digest);
    e
}

/// Decodes one delta entry.
pub fn decode_entry(e: &[u8; DELTA_ENTRY_LEN]) -> (u64, Digest) {
    let mut page = [0u8; 8];
    page.copy_from_slice(&e[..8]);
    let mut d = [0u8; 32];
    d.copy_from_slice(&e[8..]);
    (u64::from_le_bytes(page), d)
}

/// Parses a whole delta held in memory, checking order and trailer (used by tests and fuzzing; the
/// store streams large deltas with the same checks).
pub fn parse_delta(bytes: &[u8]) -> Result<Vec<(u64, Digest)>, FormatError> {
    let what = "page delta";
    let h = DeltaHeader::decode(bytes)?;
    let body = h
        .count
        .checked_mul(DELTA_ENTRY_LEN as u64)
        .filter(|b| {
            b.checked_add((DELTA_HEADER_LEN + DELTA_TRAILER_LEN) as u64) == Some(bytes.len() as u64)
        })
        .ok_or(FormatError::Truncated {
            what,
            offset: bytes.len() as u64,
        })? as usize;
    let entries = &bytes[DELTA_HEADER_LEN..DELTA_HEADER_LEN + body];
    if blake3::hash(entries).as_bytes()[..] != bytes[DELTA_HEADER_LEN + body..] {
        return Err(FormatError::Corrupt {
            what,
            offset: (DELTA_HEADER_LEN + body) as u64,
            detail: "entry checksum mismatch".into(),
        });
    }
    let mut out = Vec::with_capacity(h.count as usize);
    let mut last = None;
    for (i, e) in entries.chunks_exact(DELTA_ENTRY_LEN).enumerate() {
        let (p, d) = decode_entry(e.try_into().expect("40 bytes"));
        if last.is_some_and(|l| p <= l) {
            return Err(FormatError::Corrupt {
                what,
                offset: (DELTA_HEADER_LEN + i * DELTA_ENTRY_LEN) as u64,
                detail: "pages out of order".into(),
            });
        }
        last = Some(p);
        out.push((p, d));
    }
    Ok(out)
}

/// Encodes a whole delta (entries must be sorted and unique).
pub fn encode_delta(entries: &[(u64, Digest)]) -> Vec<u8> {
    let mut out = DeltaHeader {
        count: entries.len() as u64,
    }
    .encode()
    .to_vec();
    let mut h = blake3::Hasher::new();
    for (p, d) in entries {
        let e = encode_entry(*p, d);
        h.update(&e);
        out.extend_from_slice(&e);
    }
    out.extend_from_slice(h.finalize().as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_round_trip_and_checks() {
        let e = vec![(1u64, [1u8; 32]), (5, [0; 32]), (9, [7; 32])];
        let b = encode_delta(&e);
        assert_eq!(parse_delta(&b).unwrap(), e);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 2;
            assert!(parse_delta(&c).is_err(), "flip at {i}");
        }
        let bad = encode_delta(&[(3, [1; 32]), (2, [1; 32])]);
        assert!(parse_delta(&bad).is_err());
    }

    #[test]
    fn huge_count_is_an_error_not_an_overflow() {
        // Found by the `delta` fuzz target: count * 40 fits in a u64, but adding the header and
        // trailer lengths overflowed.
        let b = DeltaHeader {
            count: u64::MAX / DELTA_ENTRY_LEN as u64,
        }
        .encode();
        let mut d = b.to_vec();
        d.extend_from_slice(blake3::hash(&[]).as_bytes());
        assert!(matches!(
            parse_delta(&d),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn map_header_round_trip() {
        let h = MapHeader {
            pages: 17,
            generation: 4,
        };
        assert_eq!(MapHeader::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[20] ^= 1;
        assert!(MapHeader::decode(&b).is_err());
    }
}
