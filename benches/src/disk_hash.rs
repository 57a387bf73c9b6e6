//! The blake3 of a disk image, kept up to date as its 64 KiB chunks are rewritten, without holding
//! the image: each chunk is a whole subtree of the BLAKE3 tree (a power of two of 1 KiB BLAKE3
//! chunks at an aligned offset), so the image's hash is the merge of the chunks' chaining values.
//! `ferry-simagents` uses it to put the exact blake3 of the disk it wrote into its `Tag`, which
//! `ferry restore --verify` then checks (the same scheme as `ferry-scan`, at 64 KiB instead of
//! 4 MiB).

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::CHUNK;

/// The chaining value of chunk `index` (64 KiB at `index * CHUNK`) holding `data`.
pub fn chunk_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * CHUNK as u64);
    h.update(data);
    h.finalize_non_root()
}

/// The chaining values of every chunk of an all-zero disk of `len` bytes (they differ by offset,
/// so there is one per chunk; the same for every disk of that size).
pub fn zero_cvs(len: u64) -> Vec<ChainingValue> {
    let zeros = vec![0u8; CHUNK];
    (0..len.div_ceil(CHUNK as u64))
        .map(|c| chunk_cv(c, &zeros))
        .collect()
}

/// The blake3 (`b3sum`) of a disk of `len` bytes — a multiple of [`CHUNK`], at least two chunks —
/// from its chunks' chaining values.
pub fn root(cvs: &[ChainingValue], len: u64) -> [u8; 32] {
    let chunk = CHUNK as u64;
    assert!(len.is_multiple_of(chunk) && len >= 2 * chunk && cvs.len() as u64 * chunk == len);
    fn sub(cvs: &[ChainingValue], len: u64) -> ChainingValue {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let left = left_subtree_len(len);
        let n = (left / CHUNK as u64) as usize;
        merge_subtrees_non_root(
            &sub(&cvs[..n], left),
            &sub(&cvs[n..], len - left),
            Mode::Hash,
        )
    }
    let left = left_subtree_len(len);
    let n = (left / CHUNK as u64) as usize;
    *merge_subtrees_root(
        &sub(&cvs[..n], left),
        &sub(&cvs[n..], len - left),
        Mode::Hash,
    )
    .as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix64;

    #[test]
    fn merged_chunk_cvs_are_the_blake3_of_the_disk() {
        for chunks in [2usize, 5, 64, 67] {
            let len = (chunks * CHUNK) as u64;
            let mut disk = vec![0u8; len as usize];
            let mut cvs = zero_cvs(len);
            assert_eq!(root(&cvs, len), *blake3::hash(&disk).as_bytes());
            let mut rng = SplitMix64::new(chunks as u64);
            for c in [chunks - 1, 0, chunks / 2, chunks - 1] {
                let piece = &mut disk[c * CHUNK..(c + 1) * CHUNK];
                rng.fill(piece);
                cvs[c] = chunk_cv(c as u64, piece);
            }
            assert_eq!(
                root(&cvs, len),
                *blake3::hash(&disk).as_bytes(),
                "{chunks} chunks"
            );
        }
    }
}
