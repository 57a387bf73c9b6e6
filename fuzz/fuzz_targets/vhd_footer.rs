//! Fixed-VHD footers.
#![no_main]

use ferry_format::vhd::{decode, COOKIE, FOOTER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // 1. Raw bytes.
    let _ = decode(data);

    // 2. Repaired footer: cookie, version 1.0 and a valid checksum (one's complement of the byte sum,
    //    the checksum field itself excluded), so random bytes reach the field checks.
    let mut f = data.to_vec();
    if f.len() < FOOTER_LEN {
        f.resize(FOOTER_LEN, 0);
    }
    f[0..8].copy_from_slice(COOKIE);
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let sum = f[..FOOTER_LEN]
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |a, (_, b)| a.wrapping_add(*b as u32));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    let _ = decode(&f);
});
