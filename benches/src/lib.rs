//! Ferry's benchmarks and the deterministic data they run on.
//!
//! Job: generate the *mixed* data set every benchmark uses — 64 KiB chunks that are, in roughly equal
//! shares, random (incompressible), text-like (words from a small vocabulary, compressible), all-zero,
//! and exact copies of earlier chunks (dedupe hits) — and rewrite a deterministic fraction of an
//! image's chunks for incremental runs. The criterion benches (`benches/pipeline.rs`), the image tool
//! (`ferry-mkimage`, used by `benches/e2e.sh`) and `docs/BENCHMARKS.md` all describe the same bytes.
//!
//! Invariants:
//! - Chunk `i` of a data set depends only on `(seed, i)`, never on the machine, the thread count or the
//!   order chunks are generated in; same seed, same bytes, everywhere.
//! - A repeat chunk is a byte-exact copy of an earlier random or text chunk, so it dedupes by digest.
//!
//! Must not: use the OS random generator (results must be reproducible) or touch Ferry's stores.
//!
//! Also here, for the bins: [`disk_hash`], the blake3 of a disk image kept up to date chunk by
//! chunk (what `ferry-simagents` puts in its tags).

pub mod disk_hash;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Chunk size of the data sets: Ferry's change-tracking unit.
pub const CHUNK: usize = ferry_format::CHUNK_SIZE;

/// The seed every benchmark uses unless told otherwise.
pub const DEFAULT_SEED: u64 = 0x5eed_f3e7_2024;

/// What a chunk of the mixed data set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Random,
    Text,
    Zero,
    /// A copy of an earlier random or text chunk.
    Repeat,
}

/// SplitMix64: tiny, fast, good enough for benchmark data (not for anything secret).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A value in `0..n` (`n > 0`; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `out` with pseudo-random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut words = out.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// The SplitMix64 finalizer: a good 64-bit mixing function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An independent stream for `(seed, stream, index)`.
fn stream(seed: u64, stream: u64, index: u64) -> SplitMix64 {
    SplitMix64::new(mix(seed
        ^ mix(stream.wrapping_add(1))
        ^ mix(index.wrapping_mul(0xd6e8_feb8_6659_fd93))))
}

const KIND_STREAM: u64 = 1;
const CONTENT_STREAM: u64 = 2;
const REWRITE_PICK_STREAM: u64 = 3;
const REWRITE_DATA_STREAM: u64 = 4;

/// The kind chunk `i` was drawn as (before repeats are resolved to their source).
pub fn kind_of(seed: u64, i: u64) -> Kind {
    if i == 0 {
        return Kind::Random;
    }
    match stream(seed, KIND_STREAM, i).below(4) {
        0 => Kind::Random,
        1 => Kind::Text,
        2 => Kind::Zero,
        _ => Kind::Repeat,
    }
}

/// The chunk whose content chunk `i` holds: itself, or for a repeat the earlier random or text chunk
/// it copies. Each step goes to a smaller index, so this terminates.
pub fn source_of(seed: u64, i: u64) -> u64 {
    let mut at = i;
    let mut rng = stream(seed, KIND_STREAM, i);
    loop {
        match kind_of(seed, at) {
            Kind::Repeat => at = rng.below(at),
            // A repeat never copies a zero chunk (that would just be another zero chunk); draw again
            // from the chunks before the repeat.
            Kind::Zero if at != i => at = rng.below(i),
            _ => return at,
        }
    }
}

const WORDS: [&str; 64] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "block", "disk", "replica",
    "segment", "journal", "cache", "point", "store", "chunk", "digest", "kernel", "page", "write",
    "error", "info", "debug",
];

fn fill_text(rng: &mut SplitMix64, out: &mut [u8]) {
    let mut at = 0;
    let mut on_line = 0;
    while at < out.len() {
        let r = rng.next_u64();
        let w = WORDS[(r & 63) as usize].as_bytes();
        on_line += 1;
        let sep: &[u8] = if on_line >= 8 + (r >> 8) % 8 {
            on_line = 0;
            b"\n"
        } else {
            b" "
        };
        for &b in w.iter().chain(sep) {
            if at == out.len() {
                break;
            }
            out[at] = b;
            at += 1;
        }
    }
}

/// Writes chunk `i` of the mixed data set with `seed` into `out` (at most [`CHUNK`] bytes).
pub fn fill_chunk(seed: u64, i: u64, out: &mut [u8]) {
    let src = source_of(seed, i);
    let mut rng = stream(seed, CONTENT_STREAM, src);
    match kind_of(seed, src) {
        Kind::Zero => out.fill(0),
        Kind::Text => fill_text(&mut rng, out),
        Kind::Random | Kind::Repeat => rng.fill(out),
    }
}

/// Fills `buf` (whose first byte is chunk `first`) with the mixed data set, on all cores.
pub fn fill_mixed(seed: u64, first: u64, buf: &mut [u8]) {
    let chunks = buf.len().div_ceil(CHUNK);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks.max(1));
    let per = chunks.div_ceil(threads) * CHUNK;
    std::thread::scope(|s| {
        for (t, part) in buf.chunks_mut(per.max(CHUNK)).enumerate() {
            s.spawn(move || {
                for (j, c) in part.chunks_mut(CHUNK).enumerate() {
                    fill_chunk(seed, first + ((t * per / CHUNK) + j) as u64, c);
                }
            });
        }
    });
}

/// The mixed data set of `bytes` bytes, in memory.
pub fn mixed_dataset(seed: u64, bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; bytes];
    fill_mixed(seed, 0, &mut v);
    v
}

/// Shares of a data set by kind, in chunks: `[random, text, zero, repeat]`.
pub fn census(seed: u64, chunks: u64) -> [u64; 4] {
    let mut n = [0u64; 4];
    for i in 0..chunks {
        n[kind_of(seed, i) as usize] += 1;
    }
    n
}

/// Writes a mixed image of `bytes` bytes to `path` (replacing it) and syncs it, so that writeback
/// does not run into the measurements that follow.
pub fn write_image(path: &Path, seed: u64, bytes: u64) -> io::Result<()> {
    const BATCH: usize = 64 << 20;
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; BATCH];
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(BATCH as u64) as usize;
        fill_mixed(seed, done / CHUNK as u64, &mut buf[..n]);
        f.write_all(&buf[..n])?;
        done += n as u64;
    }
    f.sync_all()
}

/// Picks `count` distinct chunk indexes in `0..chunks` for rewrite round `round` (sorted).
pub fn rewrite_picks(seed: u64, round: u64, chunks: u64, count: u64) -> Vec<u64> {
    let count = count.min(chunks);
    // Floyd's algorithm: `count` distinct values without materializing 0..chunks.
    let mut rng = stream(seed, REWRITE_PICK_STREAM, round);
    let mut picked = std::collections::BTreeSet::new();
    for j in chunks - count..chunks {
        let t = rng.below(j + 1);
        if !picked.insert(t) {
            picked.insert(j);
        }
    }
    picked.into_iter().collect()
}

/// Overwrites `fraction` of the image's whole chunks with fresh random content (deterministic per
/// `(seed, round)`, different each round), syncs, and returns the indexes of the chunks written.
pub fn rewrite_chunks(path: &Path, seed: u64, round: u64, fraction: f64) -> io::Result<Vec<u64>> {
    rewrite_with(path, seed, round, fraction, |i, buf| {
        stream(seed ^ mix(round), REWRITE_DATA_STREAM, i).fill(buf)
    })
}

/// Undoes [`rewrite_chunks`] of the same `(seed, round, fraction)` on an image made by
/// [`write_image`] with `seed`: puts the original mixed content back into the rewritten chunks.
pub fn restore_chunks(path: &Path, seed: u64, round: u64, fraction: f64) -> io::Result<Vec<u64>> {
    rewrite_with(path, seed, round, fraction, |i, buf| {
        fill_chunk(seed, i, buf)
    })
}

fn rewrite_with(
    path: &Path,
    seed: u64,
    round: u64,
    fraction: f64,
    content: impl Fn(u64, &mut [u8]),
) -> io::Result<Vec<u64>> {
    let f = OpenOptions::new().write(true).open(path)?;
    let chunks = f.metadata()?.len() / CHUNK as u64;
    let count = (chunks as f64 * fraction).round() as u64;
    let picks = rewrite_picks(seed, round, chunks, count);
    let mut buf = vec![0u8; CHUNK];
    for &i in &picks {
        content(i, &mut buf);
        f.write_all_at(&buf, i * CHUNK as u64)?;
    }
    f.sync_all()?;
    Ok(picks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_independent_of_split() {
        let a = mixed_dataset(9, 64 * CHUNK);
        let mut b = vec![0u8; 32 * CHUNK];
        fill_mixed(9, 32, &mut b);
        assert_eq!(&a[32 * CHUNK..], &b[..]);
        assert_eq!(a, mixed_dataset(9, 64 * CHUNK));
        assert_ne!(a, mixed_dataset(10, 64 * CHUNK));
    }

    #[test]
    fn repeats_copy_earlier_nonzero_chunks() {
        let n = 512u64;
        let a = mixed_dataset(3, n as usize * CHUNK);
        let chunk = |i: u64| &a[i as usize * CHUNK..(i as usize + 1) * CHUNK];
        let mut repeats = 0;
        for i in 0..n {
            if kind_of(3, i) == Kind::Repeat {
                repeats += 1;
                let s = source_of(3, i);
                assert!(s < i && matches!(kind_of(3, s), Kind::Random | Kind::Text));
                assert_eq!(chunk(i), chunk(s));
            }
        }
        assert!(repeats > n / 8, "{repeats}");
        let shares = census(3, n);
        assert!(shares.iter().all(|&k| k > n / 6 && k < n / 3), "{shares:?}");
    }

    #[test]
    fn restore_undoes_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        write_image(&p, 5, 100 * CHUNK as u64).unwrap();
        let orig = std::fs::read(&p).unwrap();
        let picks = rewrite_chunks(&p, 5, 2, 0.1).unwrap();
        assert_eq!(picks.len(), 10);
        let changed = std::fs::read(&p).unwrap();
        for i in 0..100 {
            let r = i * CHUNK..(i + 1) * CHUNK;
            assert_eq!(
                orig[r.clone()] != changed[r],
                picks.contains(&(i as u64)),
                "chunk {i}"
            );
        }
        assert_eq!(restore_chunks(&p, 5, 2, 0.1).unwrap(), picks);
        assert_eq!(std::fs::read(&p).unwrap(), orig);
    }

    #[test]
    fn rewrite_picks_are_distinct_and_vary_by_round() {
        let a = rewrite_picks(1, 1, 1000, 50);
        assert_eq!(a.len(), 50);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && *a.last().unwrap() < 1000);
        assert_ne!(a, rewrite_picks(1, 2, 1000, 50));
        assert_eq!(rewrite_picks(1, 1, 10, 50).len(), 10);
    }
}
