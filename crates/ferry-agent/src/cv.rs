//! Chunk chaining values: the agent's record of what each 64 KiB chunk of a disk holds.
//!
//! Each chunk is hashed as a BLAKE3 *subtree* at its own offset (`blake3::hazmat`): the 32-byte
//! chaining value (CV) changes exactly when the chunk's content does, so it is what the agent
//! compares to find real changes, and — because BLAKE3 is a tree — the CVs of all chunks merge into
//! the plain `blake3` of the whole disk (what `b3sum` prints) without reading the disk again. That
//! is how a cut gets its whole-disk digest from the chunks it never re-read.
//!
//! Invariants: chunk `i` covers bytes `[i * CHUNK, min((i + 1) * CHUNK, size))`; [`root`] equals
//! `blake3::hash` of the whole disk when every CV is the CV of the chunk's current content.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Bytes per chunk.
pub const CHUNK: u64 = 64 * 1024;

// A chunk's CV is its wire digest (`ferry_wire::write_digest`): the same chunk size.
const _: () = assert!(CHUNK == ferry_wire::DIGEST_CHUNK);

/// A chunk's chaining value.
pub type Cv = ChainingValue;

/// A CV no chunk has: "unknown, read it and send it".
pub const UNKNOWN: Cv = [0xff; 32];

/// The CV of chunk `index` holding `data` (the whole chunk; shorter only for the disk's last one).
pub fn chunk_cv(index: u64, data: &[u8]) -> Cv {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * CHUNK);
    h.update(data);
    h.finalize_non_root()
}

/// The plain BLAKE3 of a disk of `size` bytes (more than one chunk) from its chunk CVs; `cv(i)`
/// gives chunk `i`'s. `None` if any CV is [`UNKNOWN`].
pub fn root(size: u64, cv: &dyn Fn(u64) -> Cv) -> Option<[u8; 32]> {
    fn sub(first: u64, len: u64, cv: &dyn Fn(u64) -> Cv) -> Option<Cv> {
        if len <= CHUNK {
            let c = cv(first);
            return (c != UNKNOWN).then_some(c);
        }
        let left = left_subtree_len(len);
        let l = sub(first, left, cv)?;
        let r = sub(first + left / CHUNK, len - left, cv)?;
        Some(merge_subtrees_non_root(&l, &r, Mode::Hash))
    }
    assert!(
        size > CHUNK,
        "a one-chunk disk's digest is the plain hash of its data"
    );
    let left = left_subtree_len(size);
    let l = sub(0, left, cv)?;
    let r = sub(left / CHUNK, size - left, cv)?;
    Some(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_cvs_merge_into_the_plain_hash() {
        for size in [
            CHUNK + 1,
            2 * CHUNK,
            3 * CHUNK + 4097,
            17 * CHUNK,
            64 * CHUNK - 1,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let cvs: Vec<Cv> = data
                .chunks(CHUNK as usize)
                .enumerate()
                .map(|(i, c)| chunk_cv(i as u64, c))
                .collect();
            let r = root(size, &|i| cvs[i as usize]).unwrap();
            assert_eq!(r, *blake3::hash(&data).as_bytes(), "size {size}");
            assert_eq!(
                root(size, &|i| if i == 1 { UNKNOWN } else { cvs[i as usize] }),
                None
            );
        }
    }

    #[test]
    fn a_chunk_cv_is_its_wire_digest() {
        // The agent sends a changed chunk with the CV it compared (ship.rs, `Rec::Write::cv`):
        // the process server recomputes it with `write_digest`, so the two must agree, for a
        // whole chunk and for a disk's shorter last one.
        let full: Vec<u8> = (0..CHUNK as usize).map(|i| (i % 251) as u8).collect();
        for i in [0u64, 1, 7, 1 << 20] {
            assert_eq!(
                chunk_cv(i, &full),
                ferry_wire::write_digest(i * CHUNK, &full)
            );
            assert_eq!(
                chunk_cv(i, &full[..1000]),
                ferry_wire::write_digest(i * CHUNK, &full[..1000])
            );
        }
    }

    #[test]
    fn the_same_bytes_at_another_offset_have_another_cv() {
        let d = vec![7u8; CHUNK as usize];
        assert_ne!(chunk_cv(0, &d), chunk_cv(1, &d));
        assert_eq!(chunk_cv(3, &d), chunk_cv(3, &d));
    }
}
