//! Segments: sealed, immutable journal objects, one sequence per disk (`journal/VM/DISK/SEQ.seg`).
//!
//! Layout: a 64-byte header, then sealed chunk blobs back to back, then the sealed index. The index
//! lists the disk's records in order (begin, write, zero, tag); a write either points at a blob of this
//! segment or references a blob of an earlier segment (dedupe). See `docs/FORMAT.md`.

use ferry_crypto::{Digest, KeyId, MasterKey, Sealer, TAG_LEN};

use crate::codec::{Put, Reader};
use crate::{header_checksum, FormatError};

pub const SEGMENT_MAGIC: [u8; 8] = *b"FERRYSEG";
pub const SEGMENT_VERSION: u16 = 1;
pub const SEGMENT_HEADER_LEN: usize = 64;
/// The authenticated prefix of the header: everything but `index_offset` and the checksum.
const AAD_LEN: usize = 48;
const _: () = assert!(AAD_LEN + 8 + 8 == SEGMENT_HEADER_LEN);
const WHAT: &str = "segment";

/// How a stored chunk is encoded before encryption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Where a chunk's sealed bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// Store-relative path of the segment holding the blob.
    pub segment: String,
    /// Byte offset of the sealed blob in that segment.
    pub offset: u64,
    /// Length of the sealed blob (stored bytes + 16-byte tag).
    pub sealed_len: u32,
    /// Blob number inside the segment (selects the nonce).
    pub blob: u32,
    pub codec: Codec,
    /// Length of the chunk once decoded.
    pub raw_len: u32,
}

/// Kind of a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointKind {
    Crash = 1,
    App = 2,
}

impl PointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
        }
    }
}

/// The state of one disk at a cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskCut {
    pub name: String,
    pub size: u64,
    /// Plain (unkeyed) blake3 of the whole disk at the cut: `b3sum` of a restore matches it.
    pub blake3: [u8; 32],
}

/// A consistent cut of all disks of a VM. Applying every record of a run up to its tag yields the
/// point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointTag {
    pub run: [u8; 16],
    pub time_ns: u64,
    pub kind: PointKind,
    pub disks: Vec<DiskCut>,
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A new run starts: changes applied since the last tag and not tagged are void. `size` is the
    /// disk's size in bytes.
    Begin {
        run: [u8; 16],
        time_ns: u64,
        size: u64,
    },
    /// `len` bytes at `offset` are the chunk with `digest`, stored at `loc`.
    Write {
        offset: u64,
        len: u32,
        digest: Digest,
        loc: ChunkLoc,
    },
    /// `len` bytes at `offset` are zero.
    Zero { offset: u64, len: u64 },
    /// A consistent cut.
    Tag(PointTag),
}

/// The decoded fixed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub key_id: KeyId,
    pub salt: [u8; 16],
    pub seq: u64,
    pub index_offset: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = Vec::with_capacity(SEGMENT_HEADER_LEN);
        b.put_bytes(&SEGMENT_MAGIC);
        b.put_u16(SEGMENT_VERSION);
        b.put_u16(SEGMENT_HEADER_LEN as u16);
        b.put_u32(0);
        b.put_bytes(&self.key_id.0);
        b.put_bytes(&self.salt);
        b.put_u64(self.seq);
        b.put_u64(self.index_offset);
        let c = header_checksum(&b);
        b.put_bytes(&c);
        b.try_into().expect("header is 64 bytes")
    }

    /// Decodes and checks the header; with `key`, also checks the key id.
    pub fn decode(bytes: &[u8], key: Option<KeyId>) -> Result<Self, FormatError> {
        let mut r = crate::open_header(
            bytes,
            WHAT,
            &SEGMENT_MAGIC,
            SEGMENT_VERSION,
            SEGMENT_HEADER_LEN,
        )?;
        let key_id = KeyId(r.array()?);
        let salt = r.array()?;
        let seq = r.u64()?;
        let index_offset = r.u64()?;
        if let Some(k) = key {
            if k != key_id {
                return Err(FormatError::WrongKey {
                    what: WHAT,
                    offset: 16,
                    found: key_id.to_string(),
                    expected: k.to_string(),
                });
            }
        }
        if index_offset < SEGMENT_HEADER_LEN as u64 {
            return Err(FormatError::Corrupt {
                what: WHAT,
                offset: 48,
                detail: format!("index offset {index_offset} inside the header"),
            });
        }
        Ok(SegmentHeader {
            key_id,
            salt,
            seq,
            index_offset,
        })
    }

    fn aad(&self) -> [u8; AAD_LEN] {
        let mut a = [0u8; AAD_LEN];
        a.copy_from_slice(&self.encode()[..AAD_LEN]);
        a
    }
}

/// The AAD that binds a blob to its segment and position.
pub fn blob_aad(prefix: &[u8; AAD_LEN], blob: u32) -> [u8; AAD_LEN + 4] {
    let mut a = [0u8; AAD_LEN + 4];
    a[..AAD_LEN].copy_from_slice(prefix);
    a[AAD_LEN..].copy_from_slice(&blob.to_le_bytes());
    a
}

/// Decrypted index of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentIndex {
    pub vm: String,
    pub disk: String,
    pub seq: u64,
    pub records: Vec<Record>,
}

/// Everything a worker needs to seal blobs for one segment (cheap to share across threads).
pub struct BlobSealer {
    sealer: Sealer,
    prefix: [u8; AAD_LEN],
}

impl BlobSealer {
    /// Compresses nothing: seals already-encoded `data` as blob number `blob`, returning sealed bytes.
    pub fn seal(&self, blob: u32, mut data: Vec<u8>) -> Vec<u8> {
        // Room for exactly the tag: a full 64 KiB chunk grown by doubling would hold 128 KiB
        // while its segment waits (and a compressed one keeps zstd's bound) — twice the
        // process server's memory for open segments.
        data.reserve_exact(ferry_crypto::TAG_LEN);
        self.sealer
            .seal(blob as u64 + 1, &blob_aad(&self.prefix, blob), &mut data);
        if data.capacity() > data.len() + 1024 {
            data.shrink_to_fit();
        }
        data
    }
}

/// Builds a segment in memory. Blobs are appended in blob order; records in journal order.
pub struct SegmentBuilder {
    header: SegmentHeader,
    path: String,
    vm: String,
    disk: String,
    buf: Vec<u8>,
    blobs: u32,
    records: Vec<Record>,
    sealer: std::sync::Arc<BlobSealer>,
}

impl SegmentBuilder {
    pub fn new(
        key: &MasterKey,
        salt: [u8; 16],
        vm: &str,
        disk: &str,
        seq: u64,
        path: String,
    ) -> Self {
        let header = SegmentHeader {
            key_id: key.id(),
            salt,
            seq,
            index_offset: 0,
        };
        let sealer = std::sync::Arc::new(BlobSealer {
            sealer: key.segment_sealer(&salt),
            prefix: header.aad(),
        });
        // Just the header: a process server holds one builder per disk being replicated, and
        // the blobs arrive at [`Self::reserve`]'s size when the segment is finished.
        let buf = vec![0u8; SEGMENT_HEADER_LEN];
        SegmentBuilder {
            header,
            path,
            vm: vm.to_owned(),
            disk: disk.to_owned(),
            buf,
            blobs: 0,
            records: Vec::new(),
            sealer,
        }
    }

    /// The store-relative path this segment will be written to.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn seq(&self) -> u64 {
        self.header.seq
    }

    pub fn sealer(&self) -> std::sync::Arc<BlobSealer> {
        self.sealer.clone()
    }

    /// Reserves the next blob number (the caller seals with it, then calls [`Self::push_blob`] in the
    /// same order).
    pub fn reserve_blob(&mut self) -> u32 {
        let b = self.blobs;
        self.blobs += 1;
        b
    }

    /// Appends a sealed blob and returns its location.
    pub fn push_blob(&mut self, blob: u32, sealed: &[u8], codec: Codec, raw_len: u32) -> ChunkLoc {
        let loc = ChunkLoc {
            segment: self.path.clone(),
            offset: self.buf.len() as u64,
            sealed_len: sealed.len() as u32,
            blob,
            codec,
            raw_len,
        };
        self.buf.extend_from_slice(sealed);
        loc
    }

    /// Makes room for `bytes` more of blobs (one allocation for a finished segment's data).
    pub fn reserve(&mut self, bytes: usize) {
        self.buf.reserve(bytes);
    }

    pub fn push_record(&mut self, r: Record) {
        self.records.push(r);
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Approximate size so far.
    pub fn len(&self) -> usize {
        self.buf.len() + self.records.len() * 96
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Seals the index and returns the complete segment bytes and the records.
    pub fn finish(mut self) -> (Vec<u8>, Vec<Record>) {
        let mut idx = Vec::with_capacity(self.records.len() * 100 + 64);
        idx.put_str(&self.vm);
        idx.put_str(&self.disk);
        idx.put_u64(self.header.seq);
        idx.put_u32(self.records.len() as u32);
        for r in &self.records {
            encode_record(&mut idx, r);
        }
        let mut aad = self.header.aad().to_vec();
        aad.extend_from_slice(b"index");
        self.sealer.sealer.seal(0, &aad, &mut idx);
        self.header.index_offset = self.buf.len() as u64;
        self.buf[..SEGMENT_HEADER_LEN].copy_from_slice(&self.header.encode());
        self.buf.extend_from_slice(&idx);
        (self.buf, self.records)
    }
}

fn encode_record(b: &mut Vec<u8>, r: &Record) {
    match r {
        Record::Begin { run, time_ns, size } => {
            b.put_u8(1);
            b.put_bytes(run);
            b.put_u64(*time_ns);
            b.put_u64(*size);
        }
        Record::Write {
            offset,
            len,
            digest,
            loc,
        } => {
            b.put_u8(2);
            b.put_u64(*offset);
            b.put_u32(*len);
            b.put_bytes(digest);
            b.put_str(&loc.segment);
            b.put_u64(loc.offset);
            b.put_u32(loc.sealed_len);
            b.put_u32(loc.blob);
            b.put_u8(loc.codec as u8);
            b.put_u32(loc.raw_len);
        }
        Record::Zero { offset, len } => {
            b.put_u8(3);
            b.put_u64(*offset);
            b.put_u64(*len);
        }
        Record::Tag(t) => {
            b.put_u8(4);
            encode_tag(b, t);
        }
    }
}

/// Encodes a point tag (shared with the cache record format).
pub fn encode_tag(b: &mut Vec<u8>, t: &PointTag) {
    b.put_bytes(&t.run);
    b.put_u64(t.time_ns);
    b.put_u8(t.kind as u8);
    b.put_u16(t.disks.len() as u16);
    for d in &t.disks {
        b.put_str(&d.name);
        b.put_u64(d.size);
        b.put_bytes(&d.blake3);
    }
}

/// Decodes a point tag (shared with the cache record format).
pub fn decode_tag(r: &mut Reader<'_>) -> Result<PointTag, FormatError> {
    let run = r.array()?;
    let time_ns = r.u64()?;
    let at = r.offset();
    let kind = match r.u8()? {
        1 => PointKind::Crash,
        2 => PointKind::App,
        k => return Err(r.corrupt_at(at, format!("unknown point kind {k}"))),
    };
    let n = r.u16()?;
    let mut disks = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        disks.push(DiskCut {
            name: r.string()?,
            size: r.u64()?,
            blake3: r.array()?,
        });
    }
    Ok(PointTag {
        run,
        time_ns,
        kind,
        disks,
    })
}

fn decode_record(r: &mut Reader<'_>) -> Result<Record, FormatError> {
    let at = r.offset();
    Ok(match r.u8()? {
        1 => Record::Begin {
            run: r.array()?,
            time_ns: r.u64()?,
            size: r.u64()?,
        },
        2 => {
            let offset = r.u64()?;
            let len = r.u32()?;
            let digest = r.array()?;
            let segment = r.string()?;
            let loc_offset = r.u64()?;
            let sealed_len = r.u32()?;
            let blob = r.u32()?;
            let cat = r.offset();
            let codec =
                Codec::from_u8(r.u8()?).ok_or_else(|| r.corrupt_at(cat, "unknown chunk codec"))?;
            let raw_len = r.u32()?;
            if sealed_len < TAG_LEN as u32 || len == 0 || len as usize > crate::CHUNK_SIZE {
                return Err(r.corrupt_at(at, "write record with impossible lengths"));
            }
            Record::Write {
                offset,
                len,
                digest,
                loc: ChunkLoc {
                    segment,
                    offset: loc_offset,
                    sealed_len,
                    blob,
                    codec,
                    raw_len,
                },
            }
        }
        3 => Record::Zero {
            offset: r.u64()?,
            len: r.u64()?,
        },
        4 => Record::Tag(decode_tag(r)?),
        k => return Err(r.corrupt_at(at, format!("unknown record kind {k}"))),
    })
}

/// Decrypts and decodes the index of a segment. `file` is the whole segment file.
pub fn open_index(
    header: &SegmentHeader,
    key: &MasterKey,
    file: &[u8],
) -> Result<SegmentIndex, FormatError> {
    let start = header.index_offset;
    if start as usize > file.len() {
        return Err(FormatError::Truncated {
            what: WHAT,
            offset: file.len() as u64,
        });
    }
    open_index_tail(header, key, &file[start as usize..])
}

/// Like [`open_index`], given only the file's bytes from `header.index_offset` to its end (so a
/// reader need not load the chunk data to learn a segment's records).
pub fn open_index_tail(
    header: &SegmentHeader,
    key: &MasterKey,
    tail: &[u8],
) -> Result<SegmentIndex, FormatError> {
    let start = header.index_offset;
    if tail.len() < TAG_LEN {
        return Err(FormatError::Truncated {
            what: WHAT,
            offset: start + tail.len() as u64,
        });
    }
    let mut idx = tail.to_vec();
    let mut aad = header.aad().to_vec();
    aad.extend_from_slice(b"index");
    let n = key
        .segment_sealer(&header.salt)
        .open(0, &aad, &mut idx)
        .map_err(|_| FormatError::Auth {
            what: "segment index",
            offset: start,
        })?;
    let mut r = Reader::new(&idx[..n], start, "segment index");
    let vm = r.string()?;
    let disk = r.string()?;
    let seq = r.u64()?;
    if seq != header.seq {
        return Err(r.corrupt("index sequence differs from the header's"));
    }
    let count = r.u32()?;
    let mut records = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let rec = decode_record(&mut r)?;
        if let Record::Write { loc, .. } = &rec {
            // Blobs of this segment must lie inside its body.
            if loc.segment.is_empty() {
                return Err(r.corrupt("write record without a segment"));
            }
        }
        records.push(rec);
    }
    if !r.is_empty() {
        return Err(r.corrupt("trailing bytes after the last record"));
    }
    Ok(SegmentIndex {
        vm,
        disk,
        seq,
        records,
    })
}

/// Decrypts and decodes one blob: `sealed` are the bytes at `loc.offset`, `header` the header of the
/// segment holding it. Returns the chunk's plaintext.
pub fn open_blob(
    header: &SegmentHeader,
    key: &MasterKey,
    loc: &ChunkLoc,
    mut sealed: Vec<u8>,
) -> Result<Vec<u8>, FormatError> {
    let prefix = header.aad();
    let n = key
        .segment_sealer(&header.salt)
        .open(
            loc.blob as u64 + 1,
            &blob_aad(&prefix, loc.blob),
            &mut sealed,
        )
        .map_err(|_| FormatError::Auth {
            what: "segment chunk",
            offset: loc.offset,
        })?;
    sealed.truncate(n);
    let data = match loc.codec {
        Codec::Raw => sealed,
        Codec::Zstd => {
            // Found by the `segment` fuzz target: trusting `raw_len` for the allocation (up to
            // 4 GiB) or letting a frame decode without bound aborts the process. A chunk is at
            // most CHUNK_SIZE, and decoding stops one byte past `raw_len` (caught below).
            if loc.raw_len as usize > crate::CHUNK_SIZE {
                return Err(FormatError::Corrupt {
                    what: "segment chunk",
                    offset: loc.offset,
                    detail: format!("raw length {} exceeds the chunk size", loc.raw_len),
                });
            }
            use std::io::Read;
            let mut out = Vec::with_capacity(loc.raw_len as usize);
            zstd::stream::read::Decoder::new(&sealed[..])
                .and_then(|d| d.take(loc.raw_len as u64 + 1).read_to_end(&mut out))
                .map_err(|e| FormatError::Corrupt {
                    what: "segment chunk",
                    offset: loc.offset,
                    detail: format!("zstd: {e}"),
                })?;
            out
        }
    };
    if data.len() != loc.raw_len as usize {
        return Err(FormatError::Corrupt {
            what: "segment chunk",
            offset: loc.offset,
            detail: format!("decoded {} bytes, expected {}", data.len(), loc.raw_len),
        });
    }
    Ok(data)
}

/// Parses and checks a whole segment file: header, index, and that every blob it holds decrypts and
/// lies inside the body. Used by `ferry check` and the fuzz target.
pub fn verify(key: &MasterKey, path: &str, file: &[u8]) -> Result<SegmentIndex, FormatError> {
    if file.len() < SEGMENT_HEADER_LEN {
        return Err(FormatError::Truncated {
            what: WHAT,
            offset: file.len() as u64,
        });
    }
    let header = SegmentHeader::decode(&file[..SEGMENT_HEADER_LEN], Some(key.id()))?;
    let index = open_index(&header, key, file)?;
    for rec in &index.records {
        if let Record::Write { loc, .. } = rec {
            if loc.segment != path {
                continue;
            }
            let end = loc.offset.checked_add(loc.sealed_len as u64);
            match end {
                Some(e) if loc.offset >= SEGMENT_HEADER_LEN as u64 && e <= header.index_offset => {
                    let sealed = file[loc.offset as usize..e as usize].to_vec();
                    open_blob(&header, key, loc, sealed)?;
                }
                _ => {
                    return Err(FormatError::Corrupt {
                        what: WHAT,
                        offset: loc.offset,
                        detail: "chunk outside the segment body".into(),
                    })
                }
            }
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_bytes(&[9u8; 32], "k")
    }

    fn build() -> (Vec<u8>, Vec<Record>) {
        let k = key();
        let path = "journal/vm/d0/0000000000000001.seg".to_string();
        let mut b = SegmentBuilder::new(&k, [3u8; 16], "vm", "d0", 1, path);
        b.push_record(Record::Begin {
            run: [1; 16],
            time_ns: 5,
            size: 65546,
        });
        let n = b.reserve_blob();
        let sealed = b.sealer().seal(n, b"chunk data".to_vec());
        let loc = b.push_blob(n, &sealed, Codec::Raw, 10);
        b.push_record(Record::Write {
            offset: 65536,
            len: 10,
            digest: k.digest(b"chunk data"),
            loc,
        });
        b.push_record(Record::Zero {
            offset: 0,
            len: 65536,
        });
        b.push_record(Record::Tag(PointTag {
            run: [1; 16],
            time_ns: 6,
            kind: PointKind::App,
            disks: vec![DiskCut {
                name: "d0".into(),
                size: 65546,
                blake3: [4; 32],
            }],
        }));
        b.finish()
    }

    #[test]
    fn round_trip() {
        let (file, records) = build();
        let k = key();
        let idx = verify(&k, "journal/vm/d0/0000000000000001.seg", &file).unwrap();
        assert_eq!(idx.records, records);
        assert_eq!(idx.vm, "vm");
        let Record::Write { loc, .. } = &records[1] else {
            panic!()
        };
        let h = SegmentHeader::decode(&file[..64], None).unwrap();
        let s = file[loc.offset as usize..(loc.offset + loc.sealed_len as u64) as usize].to_vec();
        assert_eq!(open_blob(&h, &k, loc, s).unwrap(), b"chunk data");
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let (file, _) = build();
        let k = key();
        for i in 0..file.len() {
            let mut f = file.clone();
            f[i] ^= 0x40;
            // Flipping reserved flag bits is caught by the header checksum; every byte is covered.
            assert!(
                verify(&k, "journal/vm/d0/0000000000000001.seg", &f).is_err(),
                "flip at {i} not detected"
            );
        }
    }

    #[test]
    fn wrong_key_and_version() {
        let (mut file, _) = build();
        let other = MasterKey::from_bytes(&[1u8; 32], "o");
        assert!(matches!(
            verify(&other, "x", &file),
            Err(FormatError::WrongKey { .. })
        ));
        file[8] = 2;
        let c = header_checksum(&file[..56]);
        file[56..64].copy_from_slice(&c);
        assert!(matches!(
            verify(&key(), "x", &file),
            Err(FormatError::Version { found: 2, .. })
        ));
    }

    #[test]
    fn zstd_blob_is_bounded_by_raw_len() {
        let k = key();
        let chunk = vec![5u8; 1000];
        let z = zstd::bulk::compress(&chunk, 3).unwrap();
        let mut b = SegmentBuilder::new(&k, [3u8; 16], "vm", "d0", 1, "p".into());
        let n = b.reserve_blob();
        let sealed = b.sealer().seal(n, z);
        let loc = b.push_blob(n, &sealed, Codec::Zstd, chunk.len() as u32);
        let (file, _) = b.finish();
        let h = SegmentHeader::decode(&file[..64], None).unwrap();
        let open = |raw_len: u32| {
            let l = ChunkLoc {
                raw_len,
                ..loc.clone()
            };
            open_blob(&h, &k, &l, sealed.clone())
        };
        assert_eq!(open(1000).unwrap(), chunk);
        // Found by the `segment` fuzz target: a huge raw_len must not be trusted for allocation,
        // and a frame that decodes to more than raw_len is corrupt.
        assert!(matches!(open(u32::MAX), Err(FormatError::Corrupt { .. })));
        assert!(matches!(open(999), Err(FormatError::Corrupt { .. })));
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let (file, _) = build();
        for n in 0..file.len() {
            assert!(verify(&key(), "journal/vm/d0/0000000000000001.seg", &file[..n]).is_err());
        }
    }
}
