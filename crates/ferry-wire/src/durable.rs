//! Private files (TLS identity, agent registry) are written with `ferry-durable`'s
//! [`write_private`]: `0600` from the start, temp → fsync → rename → fsync dir.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub use ferry_durable::write_private;

/// The permission bits of `path` if group or others may access it.
pub(crate) fn loose_mode(path: &Path) -> io::Result<Option<u32>> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}
