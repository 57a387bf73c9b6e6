//! Ferry's on-disk and in-store formats, described byte by byte in `docs/FORMAT.md`.
//!
//! Job: encode and decode segments ([`segment`]), cache records ([`cache`]), page-map deltas
//! ([`delta`]), per-VM manifests ([`manifest`]) and fixed-VHD footers ([`vhd`]).
//!
//! Invariants:
//! - Every binary format starts with an 8-byte magic and a version, and has a fixed-size header whose
//!   own checksum is verified before any field is trusted. Header sizes are checked by static
//!   assertions.
//! - Readers refuse unknown versions with [`FormatError::Version`] and never panic on any input (each
//!   parser has a cargo-fuzz target in `fuzz/`); errors carry the byte offset of the problem so callers
//!   can name file and offset.
//!
//! Must not: do I/O. Callers read bytes and hand them in, so the same parsers serve files, blobs and
//! network frames.

pub mod agent;
pub mod cache;
pub mod codec;
pub mod delta;
pub mod manifest;
pub mod marker;
pub mod segment;
pub mod vhd;

/// Size of a replication chunk: the unit of change detection, dedupe and the replica page map.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Errors from decoding. The message is the doc comment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// not a {what} (bad magic at offset {offset})
    #[error("not a {what} (bad magic at offset {offset})")]
    Magic { what: &'static str, offset: u64 },
    /// {what} version {found} is not supported (this Ferry reads version {supported}); upgrade Ferry
    #[error("{what} version {found} is not supported (this Ferry reads version {supported}); upgrade Ferry")]
    Version {
        what: &'static str,
        found: u16,
        supported: u16,
    },
    /// {what} header checksum mismatch at offset {offset}: the file is corrupt
    #[error("{what} header checksum mismatch at offset {offset}: the file is corrupt")]
    HeaderChecksum { what: &'static str, offset: u64 },
    /// {what} is truncated at offset {offset}
    #[error("{what} is truncated at offset {offset}")]
    Truncated { what: &'static str, offset: u64 },
    /// {what} is corrupt at offset {offset}: {detail}
    #[error("{what} is corrupt at offset {offset}: {detail}")]
    Corrupt {
        what: &'static str,
        offset: u64,
        detail: String,
    },
    /// {what} at offset {offset} was sealed with key {found}, not with this key ({expected}); pass the right --key-file
    #[error("{what} at offset {offset} was sealed with key {found}, but the key in use is {expected}; pass the key the store was created with (--key-file)")]
    WrongKey {
        what: &'static str,
        offset: u64,
        found: String,
        expected: String,
    },
    /// {what} at offset {offset} failed authentication: modified or corrupt data
    #[error("{what} at offset {offset} failed authentication (AES-GCM): the data was modified or is corrupt")]
    Auth { what: &'static str, offset: u64 },
}

impl FormatError {
    /// The byte offset the error refers to, where there is one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            FormatError::Magic { offset, .. }
            | FormatError::HeaderChecksum { offset, .. }
            | FormatError::Truncated { offset, .. }
            | FormatError::Corrupt { offset, .. }
            | FormatError::WrongKey { offset, .. }
            | FormatError::Auth { offset, .. } => Some(*offset),
            FormatError::Version { .. } => None,
        }
    }
}

/// An 8-byte header checksum: the first 8 bytes of blake3 over the bytes it protects.
pub fn header_checksum(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

/// Opens a fixed-size header: checks magic, version, the declared header length, and the 8-byte
/// checksum in the header's last 8 bytes (in that order, so an unknown version says "upgrade" rather
/// than "corrupt"). Returns a reader positioned just after the common prefix (magic, version,
/// length, flags).
pub(crate) fn open_header<'a>(
    bytes: &'a [u8],
    what: &'static str,
    magic: &[u8; 8],
    version: u16,
    len: usize,
) -> Result<codec::Reader<'a>, FormatError> {
    let mut r = codec::Reader::new(bytes, 0, what);
    if r.array::<8>()? != *magic {
        return Err(FormatError::Magic { what, offset: 0 });
    }
    let found = r.u16()?;
    if found != version {
        return Err(FormatError::Version {
            what,
            found,
            supported: version,
        });
    }
    let declared = r.u16()?;
    let _flags = r.u32()?;
    if declared as usize != len || bytes.len() < len {
        return Err(FormatError::Truncated {
            what,
            offset: bytes.len() as u64,
        });
    }
    if header_checksum(&bytes[..len - 8]) != bytes[len - 8..len] {
        return Err(FormatError::HeaderChecksum { what, offset: 0 });
    }
    Ok(r)
}
