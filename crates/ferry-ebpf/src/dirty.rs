//! What one drain found for one disk.

use std::ops::Range;

use crate::ResyncReason;

/// The chunks one drain found written, and whether the disk needs a resync.
///
/// Held as the non-zero words of the drained bitmap (chunk `64 * w + b` is bit `b` of word `w`),
/// so its memory is bounded by the disk, not by how many writes happened: at most 16 bytes per
/// 4 MiB of disk (32 MiB for a fully dirty 8 TiB disk), and nothing for a clean one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// (word index, bits), ascending by word index, bits never zero.
    words: Vec<(u64, u64)>,
    /// Set when the tracker may have missed writes since the previous drain of this disk; then
    /// the chunks are not the whole story and the disk must be resynced (scanned).
    pub resync: Vec<ResyncReason>,
}

impl DirtySet {
    /// `words` ascending by index; bits of chunks at or past `chunks` are dropped.
    pub(crate) fn new(mut words: Vec<(u64, u64)>, chunks: u64, resync: Vec<ResyncReason>) -> Self {
        for (w, bits) in &mut words {
            let first = *w * 64;
            if first + 64 > chunks {
                *bits &= if first >= chunks {
                    0
                } else {
                    u64::MAX >> (64 - (chunks - first))
                };
            }
        }
        words.retain(|&(_, bits)| bits != 0);
        DirtySet { words, resync }
    }

    /// True when the caller must resync the disk before it trusts the tracker again.
    pub fn needs_resync(&self) -> bool {
        !self.resync.is_empty()
    }

    /// Indexes of the written 64 KiB chunks ([`crate::CHUNK_SIZE`]), ascending, no duplicates.
    pub fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().flat_map(|&(w, bits)| {
            let mut rest = bits;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let b = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                Some(w * 64 + b)
            })
        })
    }

    /// The chunks as ascending runs of consecutive indexes (what a reader coalesces into I/Os).
    pub fn runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for c in self.chunks() {
            match runs.last_mut() {
                Some(r) if r.end == c => r.end = c + 1,
                _ => runs.push(c..c + 1),
            }
        }
        runs
    }

    /// Number of chunks.
    pub fn len(&self) -> u64 {
        self.words
            .iter()
            .map(|&(_, bits)| u64::from(bits.count_ones()))
            .sum()
    }

    /// True when no chunk was written.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// True when chunk `chunk` was written.
    pub fn contains(&self, chunk: u64) -> bool {
        let w = chunk / 64;
        self.words
            .binary_search_by_key(&w, |&(i, _)| i)
            .is_ok_and(|i| self.words[i].1 >> (chunk % 64) & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(chunks: &[u64], limit: u64) -> DirtySet {
        let mut words: Vec<(u64, u64)> = Vec::new();
        for &c in chunks {
            match words.last_mut() {
                Some((w, bits)) if *w == c / 64 => *bits |= 1 << (c % 64),
                _ => words.push((c / 64, 1 << (c % 64))),
            }
        }
        DirtySet::new(words, limit, Vec::new())
    }

    #[test]
    fn chunks_runs_len_contains() {
        let s = set(&[1, 2, 3, 63, 64, 65, 200], 1000);
        assert_eq!(
            s.chunks().collect::<Vec<_>>(),
            vec![1, 2, 3, 63, 64, 65, 200]
        );
        assert_eq!(s.runs(), vec![1..4, 63..66, 200..201]);
        assert_eq!(s.len(), 7);
        assert!(s.contains(64) && s.contains(200) && !s.contains(4) && !s.contains(9999));
        assert!(!s.is_empty());
        let empty = DirtySet::default();
        assert!(empty.is_empty() && empty.runs().is_empty());
        assert_eq!(empty.len(), 0);
    }

    #[test]
    fn bits_past_the_disk_are_dropped() {
        let s = DirtySet::new(vec![(0, u64::MAX), (1, u64::MAX)], 70, Vec::new());
        assert_eq!(s.len(), 70);
        assert_eq!(s.runs(), vec![0..70]);
        let s = DirtySet::new(vec![(0, 1), (2, u64::MAX)], 128, Vec::new());
        assert_eq!(s.chunks().collect::<Vec<_>>(), vec![0]);
    }
}
