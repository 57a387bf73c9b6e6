//! Page-blob range rules (512-byte alignment, 4 MiB per Put Page) and the coalescing used by
//! `put_pages_many`. Pure functions, unit-tested without a service.

use crate::error::{AzureError, Result};

/// Page size: every page-blob offset and length is a multiple of this.
pub const PAGE: u64 = 512;
/// Largest body of one Put Page request.
pub const MAX_PUT_PAGES: u64 = 4 * 1024 * 1024;

/// Check that `[offset, offset + len)` is page-aligned and non-empty.
pub(crate) fn check_aligned(op: &'static str, blob: &str, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Err(AzureError::invalid(op, blob, "empty range"));
    }
    if !offset.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(AzureError::invalid(
            op,
            blob,
            format!(
                "range at offset {offset} length {len} is not 512-byte aligned (page blobs \
                 take whole 512-byte pages; pad or read-modify-write first)"
            ),
        ));
    }
    if offset.checked_add(len).is_none() {
        return Err(AzureError::invalid(op, blob, "range end overflows u64"));
    }
    Ok(())
}

/// Validate `ranges`, sort them, and merge neighbours into runs of at most `max` bytes (input
/// ranges larger than `max` are split). Overlapping ranges are refused: with parallel uploads
/// their order would be undefined.
pub(crate) fn coalesce(
    op: &'static str,
    blob: &str,
    mut ranges: Vec<(u64, Vec<u8>)>,
    max: u64,
) -> Result<Vec<(u64, Vec<u8>)>> {
    debug_assert!(max >= PAGE && max.is_multiple_of(PAGE));
    for (off, data) in &ranges {
        check_aligned(op, blob, *off, data.len() as u64)?;
    }
    ranges.sort_by_key(|(off, _)| *off);
    for w in ranges.windows(2) {
        let (a_off, a) = &w[0];
        let (b_off, _) = &w[1];
        if a_off + a.len() as u64 > *b_off {
            return Err(AzureError::invalid(
                op,
                blob,
                format!(
                    "ranges overlap: [{a_off}, {}) and one starting at {b_off}",
                    a_off + a.len() as u64
                ),
            ));
        }
    }
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (off, data) in ranges {
        let mut off = off;
        let mut rest: &[u8] = &data;
        while !rest.is_empty() {
            let can_extend = out
                .last()
                .is_some_and(|(o, d)| o + d.len() as u64 == off && (d.len() as u64) < max);
            if can_extend {
                if let Some((_, d)) = out.last_mut() {
                    let room = (max - d.len() as u64) as usize;
                    let take = room.min(rest.len());
                    d.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    off += take as u64;
                }
            } else {
                let take = (max as usize).min(rest.len());
                let mut d = Vec::with_capacity(take);
                d.extend_from_slice(&rest[..take]);
                out.push((off, d));
                rest = &rest[take..];
                off += take as u64;
            }
        }
    }
    Ok(out)
}

/// Merge touching `(offset, len)` ranges (services may return them split).
pub(crate) fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (off, len) in ranges {
        match out.last_mut() {
            Some((o, l)) if *o + *l >= off => {
                *l = (*l).max(off + len - *o);
            }
            _ => out.push((off, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: usize, b: u8) -> Vec<u8> {
        vec![b; n * PAGE as usize]
    }

    #[test]
    fn rejects_unaligned_and_empty() {
        for (off, len) in [(1u64, 512usize), (0, 100), (512, 513)] {
            let e = coalesce(
                "put_pages_many",
                "b",
                vec![(off, vec![0; len])],
                MAX_PUT_PAGES,
            )
            .expect_err("unaligned");
            assert!(e.to_string().contains("not 512-byte aligned"), "{e}");
            assert!(e.is_permanent());
        }
        assert!(coalesce("p", "b", vec![(0, vec![])], MAX_PUT_PAGES).is_err());
    }

    #[test]
    fn rejects_overlap() {
        let e = coalesce(
            "p",
            "b",
            vec![(512, page(2, 1)), (0, page(2, 2))],
            MAX_PUT_PAGES,
        )
        .expect_err("overlap");
        assert!(e.to_string().contains("overlap"), "{e}");
    }

    #[test]
    fn merges_adjacent_keeps_gaps_and_caps_size() {
        let max = 4 * PAGE;
        let input = vec![
            (2 * PAGE, page(1, 3)),
            (0, page(2, 1)),
            (3 * PAGE, page(3, 4)), // 0..6 pages contiguous: split at 4
            (10 * PAGE, page(1, 9)),
        ];
        let out = coalesce("p", "b", input, max).expect("ok");
        let shape: Vec<(u64, usize)> = out.iter().map(|(o, d)| (*o, d.len())).collect();
        assert_eq!(shape, vec![(0, 2048), (4 * PAGE, 1024), (10 * PAGE, 512)]);
        let mut want0 = page(2, 1);
        want0.extend(page(1, 3));
        want0.extend(page(1, 4));
        assert_eq!(out[0].1, want0);
        assert_eq!(out[1].1, page(2, 4));
    }

    #[test]
    fn splits_large_input() {
        let out = coalesce("p", "b", vec![(0, page(9, 7))], 4 * PAGE).expect("ok");
        let shape: Vec<(u64, usize)> = out.iter().map(|(o, d)| (*o, d.len())).collect();
        assert_eq!(shape, vec![(0, 2048), (2048, 2048), (4096, 512)]);
    }

    #[test]
    fn merge_ranges_joins_touching() {
        assert_eq!(
            merge_ranges(vec![(1024, 512), (0, 512), (512, 512), (4096, 512)]),
            vec![(0, 1536), (4096, 512)]
        );
        assert_eq!(merge_ranges(vec![]), vec![]);
    }
}
