//! Cache recovery (`ferry_cache::Cache::open`) over a cache directory made from the input: one or
//! two cache files (`SEQ.log`) and optionally a `consumed` file, in a fresh directory; then every
//! durable record is read back with `Cache::reader`. Open must return `Ok` or a clean `Err`, never
//! panic, and reading what it kept must not panic either.
//!
//! The files are either raw input bytes (optionally behind a valid file header, so random bytes
//! reach the record scan) or well formed: records sealed under the fuzz key as the writer writes
//! them, with optional damage (a torn tail on the last file, a flipped byte, a wrong first sequence,
//! undecodable payloads). When nothing but a torn tail was done to a well-formed cache, recovery
//! must succeed and the reader must return exactly the records from `consumed` up to the tear.
#![no_main]

use std::path::{Path, PathBuf};

use ferry_cache::{Cache, CacheConfig, Next};
use ferry_crypto::{MasterKey, Sealer, TAG_LEN};
use ferry_format::cache::{
    encode_record, CacheEntry, CacheFileHeader, RECORD_HEADER_LEN, RECORD_MAGIC,
};
use ferry_format::header_checksum;
use ferry_fuzz::{fuzz_key, take_chunk};
use libfuzzer_sys::fuzz_target;

const SALTS: [[u8; 16]; 2] = [[1; 16], [2; 16]];

fn dir() -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("ferry-fuzz-cache-{}", std::process::id()))
}

fn name(first_seq: u64) -> String {
    format!("{first_seq:016}.log")
}

/// An entry made from `k` and `b`.
fn entry(k: u8, b: &[u8]) -> CacheEntry {
    let vm = "vm".to_string();
    let disk = "sda".to_string();
    match k % 3 {
        0 => CacheEntry::Write {
            vm,
            disk,
            offset: u64::from(k) << 16,
            digest: *blake3::hash(b).as_bytes(),
            data: if b.is_empty() { vec![k] } else { b.to_vec() },
        },
        1 => CacheEntry::Zero {
            vm,
            disk,
            offset: u64::from(k) << 16,
            len: b.len() as u64,
        },
        _ => CacheEntry::Begin {
            vm,
            run: [k; 16],
            time_ns: b.len() as u64,
            disks: vec![(disk, b.len() as u64 * 4096)],
        },
    }
}

/// A record whose payload is `plain` as is (kind `kind`), sealed properly: it reaches the entry
/// decoder, which may refuse it.
fn raw_record(sealer: &Sealer, seq: u64, kind: u8, plain: &[u8], out: &mut Vec<u8>) {
    let mut hdr = Vec::with_capacity(RECORD_HEADER_LEN);
    hdr.extend_from_slice(&RECORD_MAGIC);
    hdr.push(kind);
    hdr.push(0);
    hdr.extend_from_slice(&0u16.to_le_bytes());
    hdr.extend_from_slice(&seq.to_le_bytes());
    hdr.extend_from_slice(&((plain.len() + TAG_LEN) as u32).to_le_bytes());
    let c = header_checksum(&hdr);
    hdr.extend_from_slice(&c[..4]);
    let mut p = plain.to_vec();
    sealer.seal(seq, &hdr[..20], &mut p);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&p);
}

fn header(key: &MasterKey, salt: [u8; 16], first_seq: u64) -> Vec<u8> {
    CacheFileHeader {
        key_id: key.id(),
        salt,
        first_seq,
    }
    .encode()
    .to_vec()
}

struct Layout {
    /// (first seq of the name, bytes)
    files: Vec<(u64, Vec<u8>)>,
    consumed: Option<Vec<u8>>,
    /// What the reader must return (from `consumed`), when the cache is well formed.
    expect: Option<Vec<(u64, CacheEntry)>>,
}

/// Raw files: flags bit 1 two files, bit 2 consumed file, bit 3 valid headers in front.
fn raw(key: &MasterKey, flags: u8, b: u8, data: &[u8]) -> Layout {
    let (f1, rest) = take_chunk(data);
    let (f2, rest) = take_chunk(rest);
    let (consumed, _) = take_chunk(rest);
    let first = [
        1 + u64::from(b & 3),
        1 + u64::from(b & 3) + u64::from(b >> 2),
    ];
    let mut files = Vec::new();
    for (i, bytes) in [f1, f2].into_iter().enumerate() {
        if i == 1 && (flags & 2 == 0 || first[1] == first[0]) {
            break;
        }
        let mut v = if flags & 8 != 0 {
            header(key, SALTS[i], first[i])
        } else {
            Vec::new()
        };
        v.extend_from_slice(bytes);
        files.push((first[i], v));
    }
    Layout {
        files,
        consumed: (flags & 4 != 0).then(|| consumed.to_vec()),
        expect: None,
    }
}

/// Well-formed files from records described by the input, then damaged as the flags say: bit 1 two
/// files, bit 2 consumed file, bit 3 a wrong first sequence in the second header, bit 4 flip a byte,
/// bit 5 sequence numbers near `u64::MAX`. Input: split (u8), first (u8), consumed (u8), cut (u8),
/// flip offset (u16), then records: kind (u8) + u16 length + bytes; kind >= 0xf0 is a raw payload.
fn sealed(key: &MasterKey, flags: u8, data: &[u8]) -> Layout {
    let [split, first, consumed, cut, f0, f1, rest @ ..] = data else {
        return Layout {
            files: Vec::new(),
            consumed: None,
            expect: None,
        };
    };
    let mut rest = rest;
    let mut records = Vec::new();
    while let Some((&k, tail)) = rest.split_first() {
        let (b, tail) = take_chunk(tail);
        rest = tail;
        records.push((k, b));
    }
    let n = records.len() as u64;
    let first_seq = if flags & 32 != 0 {
        u64::MAX - u64::from(*first & 7)
    } else {
        1 + u64::from(*first & 3)
    };
    let two = flags & 2 != 0 && n >= 2;
    let split = if two {
        1 + u64::from(*split) % (n - 1)
    } else {
        n
    };
    let mut well_formed = flags & (8 | 16) == 0 && first_seq.checked_add(n).is_some();
    let mut files: Vec<(u64, Vec<u8>, Vec<usize>)> = Vec::new();
    let mut entries = Vec::new();
    for (i, (k, b)) in records.into_iter().enumerate() {
        let seq = first_seq.wrapping_add(i as u64);
        let fi = usize::from(two && i as u64 >= split);
        if files.len() == fi {
            let mut hdr_first = seq;
            if fi == 1 && flags & 8 != 0 {
                hdr_first = hdr_first.wrapping_add(1);
            }
            files.push((seq, header(key, SALTS[fi], hdr_first), Vec::new()));
        }
        let sealer = key.cache_sealer(&SALTS[fi]);
        let f = &mut files[fi];
        if k >= 0xf0 {
            raw_record(&sealer, seq, k & 7, b, &mut f.1);
            well_formed = false;
        } else {
            let e = entry(k, b);
            encode_record(&sealer, seq, &e, &mut f.1);
            entries.push((seq, e));
        }
        f.2.push(f.1.len());
    }
    // Recovery starts at the consumed file's value, or at 1 without one.
    let consumed_seq = if flags & 4 != 0 {
        first_seq.saturating_add(u64::from(*consumed) % (n + 2))
    } else {
        1
    };
    // A torn tail on the last file: the records that end before the tear survive.
    let mut kept = entries.len();
    if let Some(last) = files.last_mut() {
        let len = last.1.len().saturating_sub(usize::from(*cut));
        last.1.truncate(len);
        let torn = last.2.iter().filter(|&&end| end > len).count();
        kept -= torn.min(kept);
    }
    if flags & 16 != 0 {
        if let Some(f) = files.first_mut() {
            if !f.1.is_empty() {
                let at = usize::from(u16::from_le_bytes([*f0, *f1])) % f.1.len();
                f.1[at] ^= 0x5a;
            }
        }
    }
    let expect = well_formed.then(|| {
        entries
            .into_iter()
            .take(kept)
            .filter(|(seq, _)| *seq >= consumed_seq)
            .collect()
    });
    Layout {
        files: files.into_iter().map(|(s, b, _)| (s, b)).collect(),
        consumed: (flags & 4 != 0).then(|| format!("{consumed_seq}\n").into_bytes()),
        // Recovery starting before the first record is not a state the cache makes.
        expect: if consumed_seq >= first_seq {
            expect
        } else {
            None
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, b, rest @ ..] = data else {
        return;
    };
    let key = fuzz_key();
    let layout = if flags & 1 == 0 {
        raw(&key, *flags, *b, rest)
    } else {
        sealed(&key, *flags, rest)
    };
    let d = dir();
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for (first, bytes) in &layout.files {
        std::fs::write(d.join(name(*first)), bytes).unwrap();
    }
    if let Some(c) = &layout.consumed {
        std::fs::write(d.join("consumed"), c).unwrap();
    }
    let cfg = CacheConfig {
        dir: d.clone(),
        quota: 2 << 20,
        file_size: 1 << 20,
    };
    let opened = Cache::open(cfg, key);
    if layout.expect.is_some() {
        if let Err(e) = &opened {
            panic!("a well-formed cache does not open: {e}");
        }
    }
    if let Ok((cache, _recovery)) = opened {
        let _ = (cache.used_bytes(), cache.backlog());
        let mut r = cache.reader();
        let mut got = Vec::new();
        let mut failed = None;
        for _ in 0..100_000 {
            match r.next(false) {
                Ok(Next::Record(seq, e)) => got.push((seq, e)),
                Ok(Next::Idle) | Ok(Next::Closed) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(want) = &layout.expect {
            if let Some(e) = failed {
                panic!("reading a well-formed cache failed: {e}");
            }
            assert!(
                &got == want,
                "read back {} records, expected {}",
                got.len(),
                want.len()
            );
        }
        cache.close();
    }
    let _ = std::fs::remove_dir_all(&d);
});
