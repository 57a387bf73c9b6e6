//! From a list of chunk indexes to the extents to read, and from a read extent back to chunks.
//!
//! Pure arithmetic: no I/O here, so the coalescing rules are tested on their own.

use crate::{CHUNK_SIZE, MAX_EXTENT};

/// Chunks per extent at most.
const MAX_CHUNKS: u64 = MAX_EXTENT / CHUNK_SIZE;
const _: () = assert!(MAX_CHUNKS * CHUNK_SIZE == MAX_EXTENT && MAX_CHUNKS >= 1);

/// The sink as the engines see it: errors already turned into text.
pub(crate) type Sink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), String> + 'a;

/// A run of consecutive chunks read with one I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    /// Index of the first chunk.
    pub(crate) first: u64,
    /// Number of chunks, 1..=MAX_CHUNKS.
    pub(crate) count: u64,
    /// Byte offset of the first chunk.
    pub(crate) offset: u64,
    /// Bytes handed to the sink: `count` chunks, cut at the end of the disk.
    pub(crate) len: u64,
}

impl Extent {
    /// Bytes to ask an `O_DIRECT` read for: `len` rounded up to whole `block`s (a power of two).
    /// The result never exceeds MAX_EXTENT, a multiple of every block size the reader accepts.
    pub(crate) fn direct_len(&self, block: u64) -> u64 {
        self.len.next_multiple_of(block)
    }
}

/// Checks what `read_chunks` promises its caller to check: ascending, distinct, on the disk.
pub(crate) fn validate(chunks: &[u64], size: u64) -> Result<(), String> {
    let count = size.div_ceil(CHUNK_SIZE);
    if let Some(&last) = chunks.last() {
        if last >= count {
            return Err(format!(
                "chunk {last} is past the end of the disk ({size} bytes, {count} chunks)"
            ));
        }
    }
    match chunks.windows(2).position(|w| w[0] >= w[1]) {
        Some(i) => Err(format!(
            "chunk {} at position {} does not come after chunk {}",
            chunks[i + 1],
            i + 1,
            chunks[i]
        )),
        None => Ok(()),
    }
}

/// The extents of a validated chunk list, in ascending order.
pub(crate) struct Extents<'a> {
    rest: &'a [u64],
    size: u64,
}

impl<'a> Extents<'a> {
    pub(crate) fn new(chunks: &'a [u64], size: u64) -> Extents<'a> {
        Extents { rest: chunks, size }
    }
}

impl Iterator for Extents<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        let first = *self.rest.first()?;
        let mut count = 1;
        while count < MAX_CHUNKS && self.rest.get(count as usize).copied() == Some(first + count) {
            count += 1;
        }
        self.rest = &self.rest[count as usize..];
        let offset = first * CHUNK_SIZE;
        let len = (count * CHUNK_SIZE).min(self.size.saturating_sub(offset));
        Some(Extent {
            first,
            count,
            offset,
            len,
        })
    }
}

/// Hands the chunks of `ext`, read into `data` (at least `ext.len` bytes), to the sink in order.
pub(crate) fn deliver(
    ext: &Extent,
    data: &[u8],
    sink: &mut Sink<'_>,
) -> Result<(), crate::ReadError> {
    let data = &data[..ext.len as usize];
    for (i, chunk) in data.chunks(CHUNK_SIZE as usize).enumerate() {
        sink(ext.first + i as u64, chunk).map_err(crate::ReadError::Sink)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extents(chunks: &[u64], size: u64) -> Vec<(u64, u64, u64)> {
        Extents::new(chunks, size)
            .map(|e| {
                assert_eq!(e.offset, e.first * CHUNK_SIZE);
                (e.first, e.count, e.len)
            })
            .collect()
    }

    #[test]
    fn consecutive_chunks_coalesce_up_to_one_mib() {
        let c = CHUNK_SIZE;
        let chunks: Vec<u64> = (0..40).chain([50]).chain(52..55).collect();
        assert_eq!(
            extents(&chunks, 100 * c),
            vec![
                (0, 16, MAX_EXTENT),
                (16, 16, MAX_EXTENT),
                (32, 8, 8 * c),
                (50, 1, c),
                (52, 3, 3 * c)
            ]
        );
    }

    #[test]
    fn the_last_chunk_is_cut_at_the_disk_size() {
        let size = 3 * CHUNK_SIZE + 100;
        assert_eq!(extents(&[2, 3], size), vec![(2, 2, CHUNK_SIZE + 100)]);
        let ext = Extents::new(&[3], size).next().expect("one extent");
        assert_eq!(ext.direct_len(512), 512);
        assert_eq!(ext.direct_len(4096), 4096);
        let whole = Extents::new(&[1], size).next().expect("one extent");
        assert_eq!(whole.direct_len(4096), CHUNK_SIZE);
    }

    #[test]
    fn validation_names_the_offending_chunk() {
        let size = 10 * CHUNK_SIZE;
        assert!(validate(&[], 0).is_ok());
        assert!(validate(&[0, 1, 9], size).is_ok());
        assert!(validate(&[0, 10], size)
            .unwrap_err()
            .contains("chunk 10 is past the end"));
        assert!(validate(&[0], 0).is_err());
        assert!(validate(&[3, 3], size)
            .unwrap_err()
            .contains("chunk 3 at position 1"));
        assert!(validate(&[4, 2], size).is_err());
        assert!(validate(&[10], size + 1).is_ok());
    }

    #[test]
    fn deliver_splits_into_chunks_and_stops_at_a_sink_error() {
        let ext = Extent {
            first: 7,
            count: 3,
            offset: 7 * CHUNK_SIZE,
            len: 2 * CHUNK_SIZE + 5,
        };
        let data = vec![1u8; 3 * CHUNK_SIZE as usize];
        let mut seen = Vec::new();
        deliver(&ext, &data, &mut |i, d| {
            seen.push((i, d.len()));
            Ok(())
        })
        .expect("deliver");
        let c = CHUNK_SIZE as usize;
        assert_eq!(seen, vec![(7, c), (8, c), (9, 5)]);
        let mut calls = 0;
        let err = deliver(&ext, &data, &mut |_, _| {
            calls += 1;
            Err("full".to_owned())
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(matches!(err, crate::ReadError::Sink(m) if m == "full"));
    }
}
