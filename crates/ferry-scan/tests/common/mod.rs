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
