//! The fixed 16-byte frame header and the message type codes.

use crate::WireError;

/// First 4 bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FWIR";
/// The wire version this Ferry speaks (the only one it reads).
pub const WIRE_VERSION: u8 = 5;
/// The version of `Hello` and `HelloAck` frames (and of a `Refused` sent before a version is
/// agreed): always 1, so that any Ferry can read them and say "upgrade".
pub const HELLO_VERSION: u8 = 1;
/// Length of the frame header.
pub const HEADER_LEN: usize = 16;
/// Largest `Write` data: 4 MiB.
pub const MAX_DATA: usize = 4 << 20;
/// Largest payload: a full `Write` plus room for its fields (4 MiB + 4 KiB).
pub const MAX_PAYLOAD: u32 = (MAX_DATA + 4096) as u32;

/// Byte layout of the header; the static assertion below keeps [`HEADER_LEN`] honest.
#[repr(C)]
struct RawHeader {
    _magic: [u8; 4],
    _version: u8,
    _ty: u8,
    _flags: [u8; 2],
    _len: [u8; 4],
    _checksum: [u8; 4],
}
const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);
const _: () = assert!(std::mem::align_of::<RawHeader>() == 1);

/// First 4 bytes of the unkeyed blake3 hash of the header's first 12 bytes.
pub fn header_checksum(first12: &[u8]) -> [u8; 4] {
    let h = blake3::hash(first12);
    let mut c = [0u8; 4];
    c.copy_from_slice(&h.as_bytes()[..4]);
    c
}

macro_rules! msg_types {
    ($($(#[$doc:meta])* $name:ident = $code:literal,)*) => {
        /// Message type codes (header byte 5).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum MsgType {
            $($(#[$doc])* $name = $code,)*
        }

        impl MsgType {
            /// Every type, in code order.
            pub const ALL: &'static [MsgType] = &[$(MsgType::$name,)*];

            /// The type with this code, if there is one.
            pub fn from_code(code: u8) -> Option<Self> {
                match code {
                    $($code => Some(MsgType::$name),)*
                    _ => None,
                }
            }

            /// The type's name, as messages and docs spell it.
            pub fn name(self) -> &'static str {
                match self {
                    $(MsgType::$name => stringify!($name),)*
                }
            }
        }
    };
}

msg_types! {
    /// agent → PS: first frame of every connection.
    Hello = 1,
    /// PS → agent: the chosen version and a fresh nonce.
    HelloAck = 2,
    /// agent → PS: first registration, proving the passphrase.
    Register = 3,
    /// PS → agent: the new agent id and credential.
    Registered = 4,
    /// agent → PS: authentication with a credential.
    Auth = 5,
    /// PS → agent: authenticated; initial credits and resume points.
    Welcome = 6,
    /// PS → agent: refusal, then the PS closes.
    Refused = 7,
    /// agent → PS: the VM and its protected disks.
    Inventory = 8,
    /// PS → agent: what the process server holds of the VM's disks (answers Inventory).
    Holding = 9,
    /// agent → PS (record): a run starts.
    Begin = 16,
    /// agent → PS (record): changed data.
    Write = 17,
    /// agent → PS (record): a zero range.
    Zero = 18,
    /// agent → PS (record): a discarded range.
    Discard = 19,
    /// agent → PS (record): a consistent cut.
    Tag = 20,
    /// PS → agent: every record up to `seq` is durable.
    Ack = 32,
    /// PS → agent: more send credit, in bytes.
    Credit = 33,
    /// PS → agent: make a recovery point now.
    CutRequest = 34,
    /// agent → PS: the outcome of a requested cut.
    CutDone = 35,
    /// PS → agent: the tag of a run became a point in the store (its id).
    Point = 36,
    /// PS → agent: the replication policy's cut intervals for the VM (version 4).
    Policy = 37,
    /// PS → agent: cut over now (`ferry failover --shutdown-source`); sent only to an agent
    /// that announced `allow_remote_cutover` (a `REMOTE_CUTOVER` notice). The outcome comes back
    /// as a `CUTOVER` or `CUTOVER_FAILED` notice.
    CutoverRequest = 38,
    /// agent → PS: something the operator should know (a cut and its freeze time, a cut
    /// abandoned, a hook failure, a resync); not a record (version 4).
    Notice = 40,
    /// either way: liveness probe.
    Ping = 48,
    /// either way: answer to a ping.
    Pong = 49,
}

impl MsgType {
    /// Records carry a sequence number, consume credit and are acknowledged.
    pub fn is_record(self) -> bool {
        matches!(
            self,
            MsgType::Begin | MsgType::Write | MsgType::Zero | MsgType::Discard | MsgType::Tag
        )
    }
}

/// A decoded, checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u8,
    pub ty: MsgType,
    pub flags: u16,
    pub len: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.version;
        b[5] = self.ty as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        let c = header_checksum(&b[..12]);
        b[12..16].copy_from_slice(&c);
        b
    }

    /// Checks, in order: magic, version (must be `version`), checksum, flags, payload length,
    /// type. The version comes before the checksum so that a newer peer is told "upgrade", not
    /// "corrupt"; the length is checked before anything is allocated for the payload. `frame` is
    /// the frame's number on the connection, for messages.
    pub fn decode(b: &[u8; HEADER_LEN], version: u8, frame: u64) -> Result<Self, WireError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(WireError::Magic {
                frame,
                found: magic,
            });
        }
        if b[4] != version {
            return Err(WireError::Version {
                frame,
                found: b[4],
                supported: version,
            });
        }
        if header_checksum(&b[..12]) != b[12..16] {
            return Err(WireError::HeaderChecksum { frame });
        }
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags != 0 {
            return Err(WireError::Flags { frame, flags });
        }
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if len > MAX_PAYLOAD {
            return Err(WireError::Oversized {
                frame,
                len,
                max: MAX_PAYLOAD,
            });
        }
        let ty = MsgType::from_code(b[5]).ok_or(WireError::UnknownType { frame, ty: b[5] })?;
        Ok(FrameHeader {
            version,
            ty,
            flags,
            len,
        })
    }
}

/// The version both sides speak, given the agent's `[min, max]` range: the highest version in
/// both ranges, if any.
pub fn negotiate(min: u8, max: u8) -> Option<u8> {
    (min..=max).rev().find(|v| *v == WIRE_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for t in MsgType::ALL {
            assert_eq!(MsgType::from_code(*t as u8), Some(*t));
        }
        let mut codes: Vec<u8> = MsgType::ALL.iter().map(|t| *t as u8).collect();
        codes.dedup();
        assert_eq!(codes.len(), MsgType::ALL.len());
        assert_eq!(MsgType::from_code(0), None);
        assert_eq!(MsgType::from_code(255), None);
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(1, 3), None);
        assert_eq!(negotiate(1, 9), Some(5));
        assert_eq!(negotiate(5, 5), Some(5));
        assert_eq!(negotiate(4, 4), None);
        assert_eq!(negotiate(6, 9), None);
        assert_eq!(negotiate(4, 1), None);
        assert_eq!(negotiate(0, 0), None);
    }

    #[test]
    fn header_checks_in_order() {
        let h = FrameHeader {
            version: 1,
            ty: MsgType::Ping,
            flags: 0,
            len: 8,
        };
        let b = h.encode();
        assert_eq!(FrameHeader::decode(&b, 1, 0).unwrap(), h);
        // A newer peer is told to upgrade even though the checksum also differs.
        let mut v = b;
        v[4] = 2;
        let e = FrameHeader::decode(&v, 1, 3).unwrap_err();
        assert!(
            e.to_string().contains("version 2") && e.to_string().contains("version 1"),
            "{e}"
        );
        // An oversized length with a valid checksum is refused before any allocation.
        let big = FrameHeader {
            len: MAX_PAYLOAD + 1,
            ..h
        }
        .encode();
        assert!(matches!(
            FrameHeader::decode(&big, 1, 0),
            Err(WireError::Oversized { .. })
        ));
        let mut unknown = b;
        unknown[5] = 99;
        let c = header_checksum(&unknown[..12]);
        unknown[12..].copy_from_slice(&c);
        assert!(matches!(
            FrameHeader::decode(&unknown, 1, 0),
            Err(WireError::UnknownType { ty: 99, .. })
        ));
        let mut flags = b;
        flags[6] = 1;
        let c = header_checksum(&flags[..12]);
        flags[12..].copy_from_slice(&c);
        assert!(matches!(
            FrameHeader::decode(&flags, 1, 0),
            Err(WireError::Flags { flags: 1, .. })
        ));
    }
}
