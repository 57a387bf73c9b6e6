//! Helpers shared by the scan's integration tests (each test file is its own binary: the sparse
//! test counts the whole process's reads).

/// `len` bytes of xorshift noise from `seed` (incompressible, different per seed).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The scan blocks (`BLOCK_SIZE`) that `regions` (offset, bytes) touch: what a sparse scan must
/// read, and no more.
#[allow(dead_code)] // not every test binary uses it
pub fn data_blocks(regions: &[(u64, Vec<u8>)]) -> std::collections::BTreeSet<u64> {
    let block = ferry_scan::BLOCK_SIZE as u64;
    let mut blocks = std::collections::BTreeSet::new();
    for (off, data) in regions {
        for b in off / block..=(off + data.len() as u64 - 1) / block {
            blocks.insert(b);
        }
    }
    blocks
}
