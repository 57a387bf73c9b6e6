//! The 512-byte fixed-VHD footer that makes a raw image an Azure-attachable disk.
//!
//! Azure page-blob disks are "fixed VHD": the raw image, its size a multiple of 1 MiB, followed by
//! this footer. All fields are big-endian (Microsoft VHD specification, "Hard Disk Footer Format").

use crate::FormatError;

pub const FOOTER_LEN: usize = 512;
pub const COOKIE: &[u8; 8] = b"conectix";
/// Disk type 2 = fixed hard disk.
pub const DISK_TYPE_FIXED: u32 = 2;
/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the VHD epoch.
const VHD_EPOCH: u64 = 946_684_800;
const MIB: u64 = 1 << 20;

/// The virtual size of the replica of a disk of `size` bytes: rounded up to 1 MiB, as Azure requires.
pub fn vhd_size(size: u64) -> u64 {
    size.div_ceil(MIB) * MIB
}

/// Decoded footer fields Ferry cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub current_size: u64,
    pub original_size: u64,
    pub disk_type: u32,
    pub unique_id: [u8; 16],
    pub timestamp: u32,
    pub geometry: (u16, u8, u8),
}

/// CHS geometry as the VHD specification computes it.
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let mut total = size / 512;
    if total > 65535 * 16 * 255 {
        total = 65535 * 16 * 255;
    }
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

fn checksum(f: &[u8; FOOTER_LEN]) -> u32 {
    let sum: u32 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, b)| *b as u32)
        .fold(0u32, |a, b| a.wrapping_add(b));
    !sum
}

/// The footer's creator application (see [`encode`]).
pub const CREATOR_APP: &[u8; 4] = b"win ";

/// Builds the footer of a fixed VHD whose data part is `vhd_size` bytes (a multiple of 1 MiB).
pub fn encode(vhd_size: u64, unique_id: [u8; 16], unix_secs: u64) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[0..8].copy_from_slice(COOKIE);
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
    let ts = unix_secs.saturating_sub(VHD_EPOCH).min(u32::MAX as u64) as u32;
    f[24..28].copy_from_slice(&ts.to_be_bytes());
    // Creator app: readers that do not know the creator size the disk from its CHS geometry, which
    // for most sizes is smaller than the disk (QEMU 7.2 sees 8 KiB less of 2 GiB). "win " (Hyper-V)
    // is the creator every common reader (QEMU, Hyper-V, Azure, VirtualBox) sizes by current_size.
    f[28..32].copy_from_slice(CREATOR_APP);
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&vhd_size.to_be_bytes());
    f[48..56].copy_from_slice(&vhd_size.to_be_bytes());
    let (c, h, s) = geometry(vhd_size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&DISK_TYPE_FIXED.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    let c = checksum(&f);
    f[64..68].copy_from_slice(&c.to_be_bytes());
    f
}

/// Parses and validates a fixed-VHD footer.
pub fn decode(bytes: &[u8]) -> Result<Footer, FormatError> {
    let what = "VHD footer";
    let f: &[u8; FOOTER_LEN] = bytes
        .get(..FOOTER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(FormatError::Truncated {
            what,
            offset: bytes.len() as u64,
        })?;
    if &f[0..8] != COOKIE {
        return Err(FormatError::Magic { what, offset: 0 });
    }
    let be32 = |o: usize| u32::from_be_bytes(f[o..o + 4].try_into().expect("4 bytes"));
    let be64 = |o: usize| u64::from_be_bytes(f[o..o + 8].try_into().expect("8 bytes"));
    let version = be32(12);
    if version != 0x0001_0000 {
        return Err(FormatError::Version {
            what,
            found: (version >> 16) as u16,
            supported: 1,
        });
    }
    if be32(64) != checksum(f) {
        return Err(FormatError::HeaderChecksum { what, offset: 64 });
    }
    let disk_type = be32(60);
    if disk_type != DISK_TYPE_FIXED {
        return Err(FormatError::Corrupt {
            what,
            offset: 60,
            detail: format!("disk type {disk_type}, Ferry writes only fixed (2)"),
        });
    }
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&f[68..84]);
    Ok(Footer {
        current_size: be64(48),
        original_size: be64(40),
        disk_type,
        unique_id,
        timestamp: be32(24),
        geometry: (u16::from_be_bytes([f[56], f[57]]), f[58], f[59]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checksum() {
        let f = encode(64 << 20, [1; 16], 1_800_000_000);
        let d = decode(&f).unwrap();
        assert_eq!(d.current_size, 64 << 20);
        assert_eq!(d.disk_type, 2);
        let mut g = f;
        g[100] ^= 1;
        assert!(decode(&g).is_err());
    }

    /// QEMU's vpc driver (7.2, Debian 12's) uses current_size only for these creators; for any other
    /// it multiplies out the CHS geometry, which for 2 GiB is 8 KiB short.
    #[test]
    fn creator_app_makes_qemu_use_the_full_size() {
        const SIZED_BY_CURRENT_SIZE: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];
        let f = encode(2 << 30, [7; 16], 1_800_000_000);
        assert!(SIZED_BY_CURRENT_SIZE.contains(&&f[28..32].try_into().unwrap()));
        let (c, h, s) = geometry(2 << 30);
        assert_eq!(c as u64 * h as u64 * s as u64 * 512, (2 << 30) - 8192);
    }

    /// Golden bytes of a footer: any change to the encoding shows here.
    #[test]
    fn golden_footer() {
        let f = encode(2 << 30, [7; 16], 1_800_000_000);
        // Everything after the unique id (offset 84) is reserved and zero.
        let golden = format!("{GOLDEN_HEAD}{}", "0".repeat(2 * (FOOTER_LEN - 84)));
        assert_eq!(hex::encode(f), golden);
        let d = decode(&f).unwrap();
        assert_eq!((d.current_size, d.disk_type), (2 << 30, 2));
    }
    // cookie "conectix", features 2, version 1.0, data offset none, time, creator "win " 1.0
    // "Wi2k", original and current size 2 GiB, CHS 4161/16/63, type fixed, checksum, unique id.
    const GOLDEN_HEAD: &str =
        "636f6e65637469780000000200010000ffffffffffffffff32dc8e8077696e2000010000\
5769326b00000000800000000000000080000000\
1041103f00000002ffffedad07070707070707070707070707070707";

    #[test]
    fn geometry_matches_spec_examples() {
        // 64 MiB: qemu-img and Hyper-V agree on 963/8/17 for this size.
        assert_eq!(geometry(64 << 20), (963, 8, 17));
        assert_eq!(vhd_size(1), MIB);
        assert_eq!(vhd_size(MIB), MIB);
        assert_eq!(vhd_size(MIB + 1), 2 * MIB);
    }
}
