//! The errors of `ferry-wire`'s boundary. Each message says what failed and, where there is one,
//! what to do next.

use std::io;
use std::path::PathBuf;

/// Errors reading or writing frames. After any error but [`WireError::Io`] from a write, the
/// connection is out of step and must be closed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// connection {op} failed: {source}
    #[error("connection {op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// frame {frame}: bad magic {found:02x?} (expected "FWIR")
    #[error(
        "frame {frame}: bad magic {found:02x?} (expected \"FWIR\"): the peer does not speak the Ferry \
         wire protocol, or the stream lost its framing"
    )]
    Magic { frame: u64, found: [u8; 4] },
    /// frame {frame}: wire version {found} is not supported (this side speaks version {supported})
    #[error(
        "frame {frame}: wire version {found} is not supported (this side speaks version {supported}); \
         upgrade the older of agent and process server"
    )]
    Version {
        frame: u64,
        found: u8,
        supported: u8,
    },
    /// frame {frame}: header checksum mismatch
    #[error("frame {frame}: header checksum mismatch: the stream is corrupt")]
    HeaderChecksum { frame: u64 },
    /// frame {frame}: truncated frame
    #[error(
        "frame {frame}: truncated frame: the connection closed inside the {part} after {got} of \
         {expected} bytes"
    )]
    Truncated {
        frame: u64,
        part: &'static str,
        got: u64,
        expected: u64,
    },
    /// frame {frame}: oversized frame
    #[error(
        "frame {frame}: oversized frame: payload length {len} exceeds the limit of {max} bytes"
    )]
    Oversized { frame: u64, len: u32, max: u32 },
    /// frame {frame}: unknown message type {ty}
    #[error("frame {frame}: unknown message type {ty}")]
    UnknownType { frame: u64, ty: u8 },
    /// frame {frame}: unknown flags
    #[error("frame {frame}: unknown flags {flags:#06x} (this wire version defines none)")]
    Flags { frame: u64, flags: u16 },
    /// frame {frame}: {ty} payload has {extra} trailing bytes
    #[error("frame {frame}: {ty} payload has {extra} trailing bytes")]
    Trailing {
        frame: u64,
        ty: &'static str,
        extra: usize,
    },
    /// frame {frame}: malformed {ty} payload: {detail}
    #[error("frame {frame}: malformed {ty} payload: {detail}")]
    Malformed {
        frame: u64,
        ty: &'static str,
        detail: String,
    },
    /// frame {frame}: {ty} sequence number {found} out of order after {last}
    #[error(
        "frame {frame}: {ty} sequence number {found} out of order after {last} (record sequence \
         numbers must strictly increase, acks must not go backwards)"
    )]
    Sequence {
        frame: u64,
        ty: &'static str,
        found: u64,
        last: u64,
    },
    /// cannot send {ty}: {detail}
    #[error("cannot send {ty}: {detail} (a bug in the sender: nothing was written)")]
    Unencodable { ty: &'static str, detail: String },
    /// an earlier error left this stream out of step
    #[error("an earlier error left this stream out of step: close the connection and reconnect")]
    Poisoned,
}

impl WireError {
    /// True when reconnecting cannot help: the peer (or this side) broke the protocol. I/O errors
    /// and truncation (a dropped connection) are transient: the agent reconnects and resumes from
    /// the last acknowledged sequence numbers.
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            WireError::Io { .. } | WireError::Truncated { .. } | WireError::Poisoned
        )
    }
}

/// Errors of the appliance's TLS identity and the TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// {op} {path}: {source}
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// {path} is readable by group or others
    #[error(
        "{path} is readable by group or others (mode {mode:o}); it holds the appliance's private \
         key: chmod 600 it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// {path} is not a usable PEM {what}
    #[error("{path} does not hold a usable PEM {what}: {detail}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    /// generating the self-signed certificate failed
    #[error("cannot generate the appliance's self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
}

/// Errors parsing a registration passphrase. Each names the typo as well as it can.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PassphraseError {
    /// the passphrase does not start with FERRY1-
    #[error("not a Ferry passphrase: it must start with \"FERRY1-\" (copy it again from `ferry serve`'s output)")]
    Prefix,
    /// character {ch:?} at position {pos} is not a passphrase character
    #[error("character {ch:?} at position {pos} is not a passphrase character: check for a typo")]
    Character { ch: char, pos: usize },
    /// the passphrase has {found} characters, expected {expected}
    #[error(
        "the passphrase has {found} characters (not counting dashes and spaces), expected {expected}: \
         a character is missing or doubled"
    )]
    Length { found: usize, expected: usize },
    /// the passphrase checksum does not match
    #[error("the passphrase's checksum does not match: there is a typo in it; copy it again")]
    Checksum,
    /// the random generator failed
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
    /// cannot read or write the passphrase file
    #[error("passphrase file {path}: {detail}")]
    Io { path: String, detail: String },
}

/// Errors of the agent registry file.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// cannot {op} {path}: {source}
    #[error("cannot {op} the agent registry {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// {path} is readable by group or others
    #[error(
        "the agent registry {path} is readable by group or others (mode {mode:o}); its verifiers let \
         anyone who reads them authenticate as an agent: chmod 600 it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// {path} is not a valid registry
    #[error("the agent registry {path} is corrupt: {detail}; restore it from a backup")]
    Corrupt { path: PathBuf, detail: String },
    /// unsupported registry version
    #[error(
        "the agent registry {path} has version {found}, this Ferry reads version {supported}; \
         upgrade Ferry"
    )]
    Version {
        path: PathBuf,
        found: u64,
        supported: u16,
    },
    /// hostname is not acceptable
    #[error("hostname {hostname:?} is not acceptable: {detail}")]
    Hostname { hostname: String, detail: String },
    /// the random generator failed
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
}

/// Why an agent's proof was refused. Deliberately coarse on the wire (see `Refused` codes); the
/// process server logs the detail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// agent {0} is not registered (never, or revoked)
    #[error("agent {0} is not registered (it never was, or it was revoked): register it again")]
    UnknownAgent(String),
    /// the proof does not match
    #[error("the proof from agent {0} does not match its credential")]
    BadProof(String),
}
