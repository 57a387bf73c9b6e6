//! Cache log records: what the process side made durable before it counted data as shipped.
//!
//! A cache file is a 64-byte file header followed by records. Each record is a 24-byte header (with
//! its own checksum) and an AES-256-GCM sealed payload whose nonce is the record's sequence number
//! and whose AAD is the record header. See `docs/FORMAT.md`.

use ferry_crypto::{Digest, KeyId, Sealer, TAG_LEN};

use crate::codec::{Put, Reader};
use crate::segment::{decode_tag, encode_tag, PointTag};
use crate::{header_checksum, FormatError};

pub const CACHE_MAGIC: [u8; 8] = *b"FERRYCAC";
pub const CACHE_VERSION: u16 = 1;
pub const CACHE_HEADER_LEN: usize = 64;
pub const RECORD_MAGIC: [u8; 4] = *b"FCR1";
pub const RECORD_HEADER_LEN: usize = 24;
/// Largest payload a record may carry (a chunk plus names, with room to spare).
pub const MAX_PAYLOAD: u32 = 4 << 20;
const WHAT: &str = "cache file";

/// The header of one cache file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheFileHeader {
    pub key_id: KeyId,
    pub salt: [u8; 16],
    pub first_seq: u64,
}

impl CacheFileHeader {
    pub fn encode(&self) -> [u8; CACHE_HEADER_LEN] {
        let mut b = Vec::with_capacity(CACHE_HEADER_LEN);
        b.put_bytes(&CACHE_MAGIC);
        b.put_u16(CACHE_VERSION);
        b.put_u16(CACHE_HEADER_LEN as u16);
        b.put_u32(0);
        b.put_bytes(&self.key_id.0);
        b.put_bytes(&self.salt);
        b.put_u64(self.first_seq);
        b.put_u64(0);
        let c = header_checksum(&b);
        b.put_bytes(&c);
        b.try_into().expect("64 bytes")
    }

    pub fn decode(bytes: &[u8], key: KeyId) -> Result<Self, FormatError> {
        let mut r = crate::open_header(bytes, WHAT, &CACHE_MAGIC, CACHE_VERSION, CACHE_HEADER_LEN)?;
        let key_id = KeyId(r.array()?);
        if key_id != key {
            return Err(FormatError::WrongKey {
                what: WHAT,
                offset: 16,
                found: key_id.to_string(),
                expected: key.to_string(),
            });
        }
        Ok(CacheFileHeader {
            key_id,
            salt: r.array()?,
            first_seq: r.u64()?,
        })
    }
}

/// One cached entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheEntry {
    /// A run of `vm` starts; its disks and their sizes.
    Begin {
        vm: String,
        run: [u8; 16],
        time_ns: u64,
        disks: Vec<(String, u64)>,
    },
    /// Changed chunk data.
    Write {
        vm: String,
        disk: String,
        offset: u64,
        digest: Digest,
        data: Vec<u8>,
    },
    /// A zero range.
    Zero {
        vm: String,
        disk: String,
        offset: u64,
        len: u64,
    },
    /// A consistent cut of `vm`.
    Tag { vm: String, tag: PointTag },
}

impl CacheEntry {
    fn kind(&self) -> u8 {
        match self {
            CacheEntry::Begin { .. } => 1,
            CacheEntry::Write { .. } => 2,
            CacheEntry::Zero { .. } => 3,
            CacheEntry::Tag { .. } => 4,
        }
    }
}

fn record_header(kind: u8, seq: u64, payload_len: u32) -> [u8; RECORD_HEADER_LEN] {
    let mut b = Vec::with_capacity(RECORD_HEADER_LEN);
    b.put_bytes(&RECORD_MAGIC);
    b.put_u8(kind);
    b.put_u8(0);
    b.put_u16(0);
    b.put_u64(seq);
    b.put_u32(payload_len);
    let c = header_checksum(&b);
    b.put_bytes(&c[..4]);
    b.try_into().expect("24 bytes")
}

/// Encodes and seals one record, appending it to `out`.
pub fn encode_record(sealer: &Sealer, seq: u64, e: &CacheEntry, out: &mut Vec<u8>) {
    let mut p = Vec::with_capacity(match e {
        CacheEntry::Write { data, .. } => data.len() + 96,
        _ => 128,
    });
    match e {
        CacheEntry::Begin {
            vm,
            run,
            time_ns,
            disks,
        } => {
            p.put_str(vm);
            p.put_bytes(run);
            p.put_u64(*time_ns);
            p.put_u16(disks.len() as u16);
            for (n, s) in disks {
                p.put_str(n);
                p.put_u64(*s);
            }
        }
        CacheEntry::Write {
            vm,
            disk,
            offset,
            digest,
            data,
        } => {
            p.put_str(vm);
            p.put_str(disk);
            p.put_u64(*offset);
            p.put_bytes(digest);
            p.put_bytes(data);
        }
        CacheEntry::Zero {
            vm,
            disk,
            offset,
            len,
        } => {
            p.put_str(vm);
            p.put_str(disk);
            p.put_u64(*offset);
            p.put_u64(*len);
        }
        CacheEntry::Tag { vm, tag } => {
            p.put_str(vm);
            encode_tag(&mut p, tag);
        }
    }
    let hdr = record_header(e.kind(), seq, (p.len() + TAG_LEN) as u32);
    sealer.seal(seq, &hdr[..20], &mut p);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&p);
}

/// Result of decoding at one position.
#[derive(Debug)]
pub enum Decoded {
    /// A whole record: its sequence number, entry and encoded length.
    Record(u64, CacheEntry, usize),
    /// The buffer ends inside a record (a torn tail, or simply not written yet).
    Incomplete,
}

/// Decodes the record at the start of `buf` (`base` is its file offset, for errors).
pub fn decode_record(sealer: &Sealer, buf: &[u8], base: u64) -> Result<Decoded, FormatError> {
    if buf.len() < RECORD_HEADER_LEN {
        return Ok(Decoded::Incomplete);
    }
    let what = "cache record";
    let hdr = &buf[..RECORD_HEADER_LEN];
    if hdr[..4] != RECORD_MAGIC {
        return Err(FormatError::Magic { what, offset: base });
    }
    if header_checksum(&hdr[..20])[..4] != hdr[20..24] {
        return Err(FormatError::HeaderChecksum { what, offset: base });
    }
    let mut r = Reader::new(&hdr[4..20], base + 4, what);
    let kind = r.u8()?;
    let _ = r.u8()?;
    let _ = r.u16()?;
    let seq = r.u64()?;
    let plen = r.u32()?;
    if !(TAG_LEN as u32..=MAX_PAYLOAD).contains(&plen) {
        return Err(FormatError::Corrupt {
            what,
            offset: base,
            detail: format!("payload length {plen} out of range"),
        });
    }
    let total = RECORD_HEADER_LEN + plen as usize;
    if buf.len() < total {
        return Ok(Decoded::Incomplete);
    }
    let mut p = buf[RECORD_HEADER_LEN..total].to_vec();
    let n = sealer
        .open(seq, &hdr[..20], &mut p)
        .map_err(|_| FormatError::Auth { what, offset: base })?;
    let pbase = base + RECORD_HEADER_LEN as u64;
    let mut r = Reader::new(&p[..n], pbase, what);
    let e = match kind {
        1 => {
            let vm = r.string()?;
            let run = r.array()?;
            let time_ns = r.u64()?;
            let count = r.u16()?;
            let mut disks = Vec::new();
            for _ in 0..count {
                disks.push((r.string()?, r.u64()?));
            }
            CacheEntry::Begin {
                vm,
                run,
                time_ns,
                disks,
            }
        }
        2 => {
            let vm = r.string()?;
            let disk = r.string()?;
            let offset = r.u64()?;
            let digest = r.array()?;
            let rest = r.remaining();
            if rest == 0 || rest > crate::CHUNK_SIZE {
                return Err(r.corrupt(format!("write of {rest} bytes")));
            }
            let data = r.bytes(rest)?.to_vec();
            CacheEntry::Write {
                vm,
                disk,
                offset,
                digest,
                data,
            }
        }
        3 => CacheEntry::Zero {
            vm: r.string()?,
            disk: r.string()?,
            offset: r.u64()?,
            len: r.u64()?,
        },
        4 => CacheEntry::Tag {
            vm: r.string()?,
            tag: decode_tag(&mut r)?,
        },
        k => {
            return Err(FormatError::Corrupt {
                what,
                offset: base + 4,
                detail: format!("unknown record kind {k}"),
            })
        }
    };
    if !r.is_empty() {
        return Err(r.corrupt("trailing bytes in record"));
    }
    Ok(Decoded::Record(seq, e, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{DiskCut, PointKind};
    use ferry_crypto::MasterKey;

    #[test]
    fn round_trip_torn_and_tampered() {
        let k = MasterKey::from_bytes(&[2u8; 32], "k");
        let s = k.cache_sealer(&[5u8; 16]);
        let entries = vec![
            CacheEntry::Begin {
                vm: "vm".into(),
                run: [7; 16],
                time_ns: 1,
                disks: vec![("a".into(), 100)],
            },
            CacheEntry::Write {
                vm: "vm".into(),
                disk: "a".into(),
                offset: 0,
                digest: [1; 32],
                data: vec![9; 100],
            },
            CacheEntry::Zero {
                vm: "vm".into(),
                disk: "a".into(),
                offset: 65536,
                len: 65536,
            },
            CacheEntry::Tag {
                vm: "vm".into(),
                tag: PointTag {
                    run: [7; 16],
                    time_ns: 2,
                    kind: PointKind::Crash,
                    disks: vec![DiskCut {
                        name: "a".into(),
                        size: 100,
                        blake3: [3; 32],
                    }],
                },
            },
        ];
        let mut buf = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            encode_record(&s, i as u64 + 10, e, &mut buf);
        }
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < buf.len() {
            match decode_record(&s, &buf[pos..], pos as u64).unwrap() {
                Decoded::Record(seq, e, n) => {
                    assert_eq!(seq, got.len() as u64 + 10);
                    got.push(e);
                    pos += n;
                }
                Decoded::Incomplete => panic!("incomplete"),
            }
        }
        assert_eq!(got, entries);
        // Every truncation of the last record reads as incomplete, never as a record.
        let Decoded::Record(_, _, first) = decode_record(&s, &buf, 0).unwrap() else {
            panic!()
        };
        for n in 0..first {
            assert!(matches!(
                decode_record(&s, &buf[..n], 0),
                Ok(Decoded::Incomplete) | Err(_)
            ));
        }
        for i in 0..first {
            let mut b = buf.clone();
            b[i] ^= 1;
            assert!(
                !matches!(decode_record(&s, &b, 0), Ok(Decoded::Record(..))),
                "flip at {i}"
            );
        }
    }
}
