//! The dedupe index: keyed chunk digest → where the chunk's sealed bytes live.
//!
//! Entries are added only after the segment they point into is durable, so the index never names a
//! chunk that does not exist. Losing entries is harmless (a chunk is stored again).

use std::path::Path;

use ferry_crypto::Digest;
use ferry_format::codec::{Put, Reader};
use ferry_format::segment::{ChunkLoc, Codec};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::StoreError;

const CHUNKS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("chunks");

/// The dedupe index of a store.
pub struct ChunkIndex {
    db: Database,
}

fn idx_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Index(e.to_string())
}

pub(crate) fn encode_loc(l: &ChunkLoc) -> Vec<u8> {
    let mut b = Vec::with_capacity(l.segment.len() + 24);
    b.put_str(&l.segment);
    b.put_u64(l.offset);
    b.put_u32(l.sealed_len);
    b.put_u32(l.blob);
    b.put_u8(l.codec as u8);
    b.put_u32(l.raw_len);
    b
}

pub(crate) fn decode_loc(b: &[u8]) -> Result<ChunkLoc, StoreError> {
    let mut r = Reader::new(b, 0, "index entry");
    let f = |e: ferry_format::FormatError| StoreError::Index(e.to_string());
    let segment = r.string().map_err(f)?;
    let offset = r.u64().map_err(f)?;
    let sealed_len = r.u32().map_err(f)?;
    let blob = r.u32().map_err(f)?;
    let codec = match r.u8().map_err(f)? {
        0 => Codec::Raw,
        1 => Codec::Zstd,
        c => {
            return Err(StoreError::Index(format!(
                "unknown codec {c} in index entry"
            )))
        }
    };
    let raw_len = r.u32().map_err(f)?;
    Ok(ChunkLoc {
        segment,
        offset,
        sealed_len,
        blob,
        codec,
        raw_len,
    })
}

impl ChunkIndex {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| {
            StoreError::Index(format!(
                "cannot open dedupe index {}: {e}; is another ferry process using this store?",
                path.display()
            ))
        })?;
        let w = db.begin_write().map_err(idx_err)?;
        w.open_table(CHUNKS).map_err(idx_err)?;
        w.commit().map_err(idx_err)?;
        Ok(ChunkIndex { db })
    }

    /// Looks up many digests in one read transaction.
    pub fn lookup_many(&self, digests: &[Digest]) -> Result<Vec<Option<ChunkLoc>>, StoreError> {
        let r = self.db.begin_read().map_err(idx_err)?;
        let t = r.open_table(CHUNKS).map_err(idx_err)?;
        digests
            .iter()
            .map(|d| match t.get(d).map_err(idx_err)? {
                Some(v) => Ok(Some(decode_loc(v.value())?)),
                None => Ok(None),
            })
            .collect()
    }

    pub fn lookup(&self, d: &Digest) -> Result<Option<ChunkLoc>, StoreError> {
        Ok(self.lookup_many(std::slice::from_ref(d))?.pop().flatten())
    }

    /// Adds entries in one durable transaction. Existing entries are kept (first copy wins).
    pub fn insert_many(&self, entries: &[(Digest, ChunkLoc)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let w = self.db.begin_write().map_err(idx_err)?;
        {
            let mut t = w.open_table(CHUNKS).map_err(idx_err)?;
            for (d, l) in entries {
                if t.get(d).map_err(idx_err)?.is_none() {
                    t.insert(d, encode_loc(l).as_slice()).map_err(idx_err)?;
                }
            }
        }
        w.commit().map_err(idx_err)
    }

    /// Removes the entries of `digests` that point into segment `segment` (entries pointing at another
    /// copy stay). Called before a segment is deleted, so no new reference can name it.
    pub fn remove_for_segment(&self, segment: &str, digests: &[Digest]) -> Result<u64, StoreError> {
        let w = self.db.begin_write().map_err(idx_err)?;
        let mut n = 0;
        {
            let mut t = w.open_table(CHUNKS).map_err(idx_err)?;
            for d in digests {
                let here = match t.get(d).map_err(idx_err)? {
                    Some(v) => decode_loc(v.value())?.segment == segment,
                    None => false,
                };
                if here {
                    t.remove(d).map_err(idx_err)?;
                    n += 1;
                }
            }
        }
        w.commit().map_err(idx_err)?;
        Ok(n)
    }

    /// Number of distinct chunks indexed.
    pub fn len(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(idx_err)?;
        let t = r.open_table(CHUNKS).map_err(idx_err)?;
        t.len().map_err(idx_err)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}
