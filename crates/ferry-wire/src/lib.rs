//! Ferry's wire protocol between a mobility agent and its process server, described byte by byte
//! in `docs/WIRE.md`.
//!
//! Job: frame and unframe messages ([`FrameReader`], [`FrameWriter`], and [`AsyncFrameReader`],
//! [`AsyncFrameWriter`] on tokio); set up TLS 1.3 pinned to the appliance's self-signed certificate
//! ([`ServerIdentity`], [`client_config`]); carry registration ([`Passphrase`], [`prove`],
//! [`verify`]) and agent credentials ([`AgentRegistry`]); account flow-control credit
//! ([`Credits`]).
//!
//! Invariants:
//! - Every frame is a 16-byte header (magic `FWIR`, version, type, flags, payload length, header
//!   checksum; size checked by a static assertion) and a payload. Readers check magic, then
//!   version (naming both versions), then the checksum, then flags, length and type, before they
//!   trust or allocate anything; a payload must decode exactly, with no trailing bytes.
//! - Bytes from the network never cause a panic or an allocation beyond what the peer actually
//!   sent, capped at [`MAX_PAYLOAD`] per frame (fuzzed: `fuzz/fuzz_targets/wire_frame.rs`).
//! - Record sequence numbers strictly increase on a stream and acks never go backwards; readers and
//!   writers both enforce it. A writer refuses any message a reader would refuse, so what is sent
//!   can be read.
//! - Only TLS 1.3 is offered or accepted, on rustls' ring provider; the server is accepted only by
//!   the SHA-256 fingerprint of its certificate. Secrets are compared in constant time and the
//!   registry stores credential verifiers, never credentials; secret files are `0600` from birth
//!   and written durably.
//!
//! Must not: decide policy. When to ack (after the cache's fdatasync), how much credit to grant
//! (cache watermarks), and what to do with a record belong to the process server; when to send,
//! to the agent. This crate does no blocking I/O of its own beyond the streams it is handed and its
//! two small state files.

pub mod agentkey;
mod async_stream;
mod durable;
pub use durable::write_private;
mod error;
mod fields;
mod flow;
mod frame;
mod message;
mod passphrase;
pub mod rate;
mod registry;
mod stream;
mod tls;

pub use agentkey::{AgentKey, Binding};
pub use async_stream::{AsyncFrameReader, AsyncFrameWriter};
pub use error::{AuthError, PassphraseError, RegistryError, TlsError, WireError};
pub use fields::check_name;
pub use flow::{Credits, MAX_FRAME};
pub use frame::{
    header_checksum, negotiate, FrameHeader, MsgType, HEADER_LEN, HELLO_VERSION, MAGIC, MAX_DATA,
    MAX_PAYLOAD, WIRE_VERSION,
};
pub use message::{
    check_id, notice, refuse, write_digest, HeldDisk, InvDisk, Message, Nonce, Proof, PublicKey,
    RunId, Signature, DIGEST_CHUNK, MAX_DISKS, MAX_DISK_SIZE, MAX_NAME, MAX_TEXT, NO_RUN,
    POLICY_OFF, POLICY_OWN,
};
pub use passphrase::{
    new_nonce, proof_key, prove, prove_with_key, verify, verify_with_key, Passphrase,
    PASSPHRASE_CHARS, PASSPHRASE_FILE,
};
pub use registry::{AgentId, AgentRecord, AgentRegistry, Credential, Verified};
pub use stream::{FrameReader, FrameWriter};
pub use tls::{
    client_config, provider, server_name, Fingerprint, ServerIdentity, IDENTITY_FILE, SERVER_NAME,
};

/// The point-tag types `Tag` messages carry, shared with the cache and segment formats.
pub use ferry_format::segment::{DiskCut, PointKind, PointTag};
