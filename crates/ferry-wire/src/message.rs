//! Messages and their payload encodings (little-endian; strings are `u16`-length-prefixed UTF-8,
//! as in `ferry-format`'s codec). Byte layouts: `docs/WIRE.md`.

use ferry_format::codec::{Put, Reader};
use ferry_format::segment::{decode_tag, encode_tag, PointTag};

use crate::fields::{
    check_count, check_name, check_range, malformed, put_disks, put_name, put_text, unencodable,
    Fields,
};
use crate::frame::{FrameHeader, MsgType, HEADER_LEN, HELLO_VERSION, MAX_DATA, MAX_PAYLOAD};
use crate::registry::AgentId;
use crate::WireError;

/// A 32-byte proof: `blake3::keyed_hash` of a nonce (see [`crate::prove`]).
pub type Proof = [u8; 32];
/// An agent's Ed25519 public key.
pub type PublicKey = [u8; 32];
/// An Ed25519 signature.
pub type Signature = [u8; 64];
/// A 32-byte server nonce, fresh for every connection.
pub type Nonce = [u8; 32];
/// A run id: one per run of records that ends in a tag (a point).
pub type RunId = [u8; 16];
/// "No run": a disk the process server holds nothing of, or no run open.
pub const NO_RUN: RunId = [0; 16];

/// A protected disk as the agent announces it in `Inventory`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvDisk {
    /// The name the agent suggests for a disk the process server has not seen (the device or
    /// image name, for display).
    pub name: String,
    pub size: u64,
    /// The disk's stable identity (WWN, serial, by-id name, or file identity; see docs/AGENT.md).
    pub id: String,
}

/// What the process server holds of one disk of an `Inventory` (same order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldDisk {
    /// The replica the disk's records go to (its name in records, tags and the store).
    pub replica: String,
    /// The run of the last tag that includes this disk and that the process server holds
    /// durably (cached or committed); [`NO_RUN`] if none: the replica is empty.
    pub last_run: RunId,
    /// The sequence number of the last committed point holding the disk (0: none yet).
    pub point_seq: u64,
}

/// Longest name (disk, VM, hostname, point id, software string), in bytes.
pub const MAX_NAME: usize = 255;
/// Longest free text (refusal and cut error messages), in bytes.
pub const MAX_TEXT: usize = 1024;
/// Most disks in one list (inventory, begin, tag, resume).
pub const MAX_DISKS: usize = 256;
/// Largest disk a run may announce: 8 TiB less 1 MiB, so that the disk as a fixed VHD (its bytes
/// and a 512-byte footer) fits the largest Azure page blob (8 TiB).
pub const MAX_DISK_SIZE: u64 = (8 << 40) - (1 << 20);

/// Kinds of [`Message::Notice`].
pub mod notice {
    /// A point was cut: `freeze_us` is the freeze window, `text` the point kind (`crash`|`app`).
    pub const CUT: u8 = 1;
    /// A cut was abandoned (no point); `text` says why.
    pub const CUT_ABANDONED: u8 = 2;
    /// A hook failed (the point was downgraded or the hook's post step failed); `text` says which.
    pub const HOOK_FAILED: u8 = 3;
    /// A resync started: every chunk of a disk is read and compared; `text` says why.
    pub const RESYNC: u8 = 4;
    /// The agent's cut intervals now: `text` is `CRASH_MS APP_MS|off SOURCE` (source `agent` or
    /// `server`); sent at each connection and when they change.
    pub const INTERVALS: u8 = 5;
    /// Chunks still to read, every 10 s while there are any: `text` is `LEFT TOTAL` (chunks of all
    /// disks), for the initial sync's or a resync's progress.
    pub const PROGRESS: u8 = 6;
    /// `ferry-agent cutover` made the source's final point: `text` is its id (the process server
    /// named it when it acknowledged it). The source's filesystems are read-only until a rollback.
    pub const CUTOVER: u8 = 7;
    /// `ferry-agent cutover --rollback`: the source is writable again; `text` says so.
    pub const CUTOVER_ROLLBACK: u8 = 8;
    /// The agent accepts a [`crate::Message::CutoverRequest`] (its `allow_remote_cutover`);
    /// sent at each connection by an agent that does.
    pub const REMOTE_CUTOVER: u8 = 9;
    /// A cutover the process server asked for failed (or is not allowed); `text` says why.
    pub const CUTOVER_FAILED: u8 = 10;
    /// The highest kind this version knows.
    pub const MAX: u8 = CUTOVER_FAILED;

    /// The kind's name, as events and docs spell it.
    pub fn name(kind: u8) -> &'static str {
        match kind {
            CUT => "cut",
            CUT_ABANDONED => "cut_abandoned",
            HOOK_FAILED => "hook",
            RESYNC => "resync",
            INTERVALS => "intervals",
            PROGRESS => "progress",
            CUTOVER => "cutover",
            CUTOVER_ROLLBACK => "cutover_rollback",
            REMOTE_CUTOVER => "remote_cutover",
            CUTOVER_FAILED => "cutover_failed",
            _ => "unknown",
        }
    }
}

/// [`Message::Policy`]: leave the agent's own interval.
pub const POLICY_OWN: u64 = 0;
/// [`Message::Policy`]: no app-consistent points on a schedule.
pub const POLICY_OFF: u64 = u64::MAX;

/// Refusal codes carried by [`Message::Refused`].
pub mod refuse {
    /// No wire version in common (the message names both ranges).
    pub const VERSION: u16 = 1;
    /// The registration proof does not match the appliance's passphrase.
    pub const BAD_PASSPHRASE: u16 = 2;
    /// The agent id is not registered: never registered, or revoked.
    pub const UNKNOWN_AGENT: u16 = 3;
    /// The credential proof does not match.
    pub const BAD_CREDENTIAL: u16 = 4;
    /// The peer broke the protocol (wrong message for the state, credit overrun, …).
    pub const PROTOCOL: u16 = 5;
    /// The process server cannot take the agent now; retry later.
    pub const BUSY: u16 = 6;
    /// The process server failed internally; see its log.
    pub const INTERNAL: u16 = 7;
    /// The run builds on a state of a disk the process server does not hold (its bases differ
    /// from the server's last runs): the agent resyncs against the `Holding` of a new connection.
    pub const STALE_BASE: u16 = 8;
    /// The VM belongs to another agent (persistently, whether or not it is connected): an
    /// operator moves it (`ferry vms move VM --to AGENT`). Permanent.
    pub const NOT_OWNER: u16 = 9;
    /// The VM is quarantined on the process server (its stored data failed to apply); retried
    /// until the operator releases it (`ferry vms release`).
    pub const QUARANTINED: u16 = 10;
    /// The VM's migration was completed (`ferry complete-migration`): its replication ended for
    /// good and this agent is retired for it. Permanent.
    pub const RETIRED: u16 = 11;
}

/// One protocol message. Records ([`MsgType::is_record`]) carry `seq`, a per-connection-stream
/// sequence number that strictly increases; acks are cumulative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        min_version: u8,
        max_version: u8,
        software: String,
    },
    HelloAck {
        version: u8,
        nonce: Nonce,
    },
    /// The passphrase (or token) proof, and the Ed25519 public key the agent made for itself
    /// (its private key never leaves the agent).
    Register {
        proof: Proof,
        hostname: String,
        public_key: PublicKey,
    },
    Registered {
        agent_id: AgentId,
    },
    /// The agent's signature over the server's nonce and this TLS session
    /// ([`crate::agentkey`]); `public_key` is the agent's key (the registered one, or, once, the
    /// key an agent registered before keys existed moves to, then with `legacy` its old
    /// credential's proof over the nonce; all zeros otherwise).
    Auth {
        agent_id: AgentId,
        public_key: PublicKey,
        signature: Signature,
        legacy: Proof,
    },
    Welcome {
        credits: u64,
        /// Per disk: the last sequence number the process server holds durably.
        resume: Vec<(String, u64)>,
    },
    Refused {
        code: u16,
        message: String,
    },
    Inventory {
        vm: String,
        disks: Vec<InvDisk>,
    },
    /// The answer to `Inventory`: the process server's store, the VM's open run (a `Begin` held
    /// without its `Tag`; [`NO_RUN`] if none) and, per inventory disk, what it holds.
    Holding {
        store: String,
        open: RunId,
        disks: Vec<HeldDisk>,
    },
    /// `bases[i]` is the run `disks[i]`'s records build on: the last run of that disk the agent
    /// knows the process server holds ([`NO_RUN`]: none). The server refuses a run whose bases
    /// differ from what it holds.
    Begin {
        seq: u64,
        run: RunId,
        time_ns: u64,
        disks: Vec<(String, u64)>,
        bases: Vec<RunId>,
    },
    /// `digest` is [`write_digest`] of `offset` and `data`; the reader checks it.
    Write {
        seq: u64,
        disk: String,
        offset: u64,
        digest: [u8; 32],
        data: Vec<u8>,
    },
    Zero {
        seq: u64,
        disk: String,
        offset: u64,
        len: u64,
    },
    Discard {
        seq: u64,
        disk: String,
        offset: u64,
        len: u64,
    },
    Tag {
        seq: u64,
        tag: PointTag,
    },
    Ack {
        seq: u64,
    },
    Credit {
        bytes: u64,
    },
    CutRequest {
        app: bool,
    },
    /// `Ok(point id)` or `Err(why the cut failed)`.
    CutDone {
        result: Result<String, String>,
    },
    /// The tag of run `run` (sent by this agent) is now point `id` in the store.
    Point {
        run: RunId,
        id: String,
    },
    Ping {
        token: u64,
    },
    Pong {
        token: u64,
    },
    /// Cut intervals in milliseconds; [`POLICY_OWN`]: the agent's own (its config);
    /// `app_every_ms` [`POLICY_OFF`]: no scheduled app-consistent points.
    Policy {
        crash_every_ms: u64,
        app_every_ms: u64,
    },
    /// The process server asks the agent to cut over (no payload).
    CutoverRequest,
    /// `kind` from [`notice`]; `freeze_us` for a cut, else 0.
    Notice {
        kind: u8,
        freeze_us: u64,
        text: String,
    },
}

/// Bytes of the chunks a [`write_digest`] of one chunk covers (ferry-agent's change-tracking unit).
pub const DIGEST_CHUNK: u64 = 64 << 10;

/// The digest a `Write` carries for `data` at `offset` (version 5): for one chunk-aligned 64 KiB
/// chunk (or a shorter one at a chunk's start, a disk's last), the BLAKE3 chaining value of that
/// chunk as a subtree at its offset — what the agent computes anyway to find changes and to merge
/// into the whole-disk digest, so it hashes each chunk once; for any other shape the plain
/// `blake3` of `data`. Either way a receiver recomputes it from the bytes it got.
pub fn write_digest(offset: u64, data: &[u8]) -> [u8; 32] {
    use blake3::hazmat::HasherExt;
    if offset.is_multiple_of(DIGEST_CHUNK) && !data.is_empty() && data.len() as u64 <= DIGEST_CHUNK
    {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(offset);
        h.update(data);
        return h.finalize_non_root();
    }
    *blake3::hash(data).as_bytes()
}

impl Message {
    /// A `Write` with its digest computed ([`write_digest`]).
    pub fn write(seq: u64, disk: impl Into<String>, offset: u64, data: Vec<u8>) -> Message {
        Message::Write {
            seq,
            disk: disk.into(),
            offset,
            digest: write_digest(offset, &data),
            data,
        }
    }

    pub fn ty(&self) -> MsgType {
        match self {
            Message::Hello { .. } => MsgType::Hello,
            Message::HelloAck { .. } => MsgType::HelloAck,
            Message::Register { .. } => MsgType::Register,
            Message::Registered { .. } => MsgType::Registered,
            Message::Auth { .. } => MsgType::Auth,
            Message::Welcome { .. } => MsgType::Welcome,
            Message::Refused { .. } => MsgType::Refused,
            Message::Inventory { .. } => MsgType::Inventory,
            Message::Holding { .. } => MsgType::Holding,
            Message::Begin { .. } => MsgType::Begin,
            Message::Write { .. } => MsgType::Write,
            Message::Zero { .. } => MsgType::Zero,
            Message::Discard { .. } => MsgType::Discard,
            Message::Tag { .. } => MsgType::Tag,
            Message::Ack { .. } => MsgType::Ack,
            Message::Credit { .. } => MsgType::Credit,
            Message::CutRequest { .. } => MsgType::CutRequest,
            Message::CutDone { .. } => MsgType::CutDone,
            Message::Point { .. } => MsgType::Point,
            Message::Policy { .. } => MsgType::Policy,
            Message::CutoverRequest => MsgType::CutoverRequest,
            Message::Notice { .. } => MsgType::Notice,
            Message::Ping { .. } => MsgType::Ping,
            Message::Pong { .. } => MsgType::Pong,
        }
    }

    /// The sequence number of a record; `None` for other messages.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Message::Begin { seq, .. }
            | Message::Write { seq, .. }
            | Message::Zero { seq, .. }
            | Message::Discard { seq, .. }
            | Message::Tag { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// Bytes this message occupies on the wire, header included: what a record costs in credit.
    pub fn frame_len(&self) -> Result<usize, WireError> {
        let mut fixed = Vec::new();
        let tail = self.encode_payload(&mut fixed)?;
        Ok(HEADER_LEN + fixed.len() + tail.len())
    }

    /// The whole frame in one buffer (tests, golden vectors, small control messages).
    pub fn encode_frame(&self, version: u8) -> Result<Vec<u8>, WireError> {
        let mut payload = Vec::new();
        let tail = self.encode_payload(&mut payload)?;
        payload.extend_from_slice(tail);
        let mut out = header_for(self.ty(), version, payload.len())?.to_vec();
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Appends the payload to `out`, except a `Write`'s data, which is returned so the writer can
    /// send it without copying. Refuses what a reader would refuse (too-long names, too many disks,
    /// empty or oversized data), so a frame that was sent is a frame that can be read.
    pub fn encode_payload<'m>(&'m self, out: &mut Vec<u8>) -> Result<&'m [u8], WireError> {
        let ty = self.ty();
        match self {
            Message::Hello {
                min_version,
                max_version,
                software,
            } => {
                out.put_u8(*min_version);
                out.put_u8(*max_version);
                put_text(out, ty, "software", software, MAX_NAME)?;
            }
            Message::HelloAck { version, nonce } => {
                out.put_u8(*version);
                out.put_bytes(nonce);
            }
            Message::Register {
                proof,
                hostname,
                public_key,
            } => {
                out.put_bytes(proof);
                put_name(out, ty, "hostname", hostname)?;
                out.put_bytes(public_key);
            }
            Message::Registered { agent_id } => {
                out.put_bytes(&agent_id.0);
            }
            Message::Auth {
                agent_id,
                public_key,
                signature,
                legacy,
            } => {
                out.put_bytes(&agent_id.0);
                out.put_bytes(public_key);
                out.put_bytes(signature);
                out.put_bytes(legacy);
            }
            Message::Welcome { credits, resume } => {
                out.put_u64(*credits);
                put_disks(out, ty, resume)?;
            }
            Message::Refused { code, message } => {
                out.put_u16(*code);
                put_text(out, ty, "message", message, MAX_TEXT)?;
            }
            Message::Inventory { vm, disks } => {
                put_name(out, ty, "vm", vm)?;
                check_count(ty, disks.len()).map_err(|d| unencodable(ty, d))?;
                out.put_u16(disks.len() as u16);
                for d in disks {
                    put_name(out, ty, "disk", &d.name)?;
                    out.put_u64(d.size);
                    put_id(out, ty, &d.id)?;
                }
            }
            Message::Holding { store, open, disks } => {
                put_name(out, ty, "store", store)?;
                out.put_bytes(open);
                check_count(ty, disks.len()).map_err(|d| unencodable(ty, d))?;
                out.put_u16(disks.len() as u16);
                for d in disks {
                    put_name(out, ty, "replica", &d.replica)?;
                    out.put_bytes(&d.last_run);
                    out.put_u64(d.point_seq);
                }
            }
            Message::Begin {
                seq,
                run,
                time_ns,
                disks,
                bases,
            } => {
                if bases.len() != disks.len() {
                    return Err(unencodable(
                        ty,
                        format!("{} bases for {} disks", bases.len(), disks.len()),
                    ));
                }
                out.put_u64(*seq);
                out.put_bytes(run);
                out.put_u64(*time_ns);
                put_disks(out, ty, disks)?;
                for b in bases {
                    out.put_bytes(b);
                }
            }
            Message::Write {
                seq,
                disk,
                offset,
                digest,
                data,
            } => {
                if data.is_empty() || data.len() > MAX_DATA {
                    return Err(unencodable(
                        ty,
                        format!("data of {} bytes (1 to {MAX_DATA} allowed)", data.len()),
                    ));
                }
                check_range(ty, *offset, data.len() as u64).map_err(|d| unencodable(ty, d))?;
                out.put_u64(*seq);
                put_name(out, ty, "disk", disk)?;
                out.put_u64(*offset);
                out.put_bytes(digest);
                return Ok(data);
            }
            Message::Zero {
                seq,
                disk,
                offset,
                len,
            }
            | Message::Discard {
                seq,
                disk,
                offset,
                len,
            } => {
                check_range(ty, *offset, *len).map_err(|d| unencodable(ty, d))?;
                out.put_u64(*seq);
                put_name(out, ty, "disk", disk)?;
                out.put_u64(*offset);
                out.put_u64(*len);
            }
            Message::Tag { seq, tag } => {
                check_count(ty, tag.disks.len()).map_err(|d| unencodable(ty, d))?;
                for d in &tag.disks {
                    check_name("disk", &d.name).map_err(|e| unencodable(ty, e))?;
                }
                out.put_u64(*seq);
                encode_tag(out, tag);
            }
            Message::Ack { seq } => out.put_u64(*seq),
            Message::Credit { bytes } => out.put_u64(*bytes),
            Message::CutRequest { app } => out.put_u8(u8::from(*app)),
            Message::CutDone { result } => match result {
                Ok(point) => {
                    out.put_u8(0);
                    put_name(out, ty, "point id", point)?;
                }
                Err(why) => {
                    out.put_u8(1);
                    put_text(out, ty, "error", why, MAX_TEXT)?;
                }
            },
            Message::Point { run, id } => {
                out.put_bytes(run);
                put_name(out, ty, "point id", id)?;
            }
            Message::Ping { token } | Message::Pong { token } => out.put_u64(*token),
            Message::Policy {
                crash_every_ms,
                app_every_ms,
            } => {
                out.put_u64(*crash_every_ms);
                out.put_u64(*app_every_ms);
            }
            Message::CutoverRequest => {}
            Message::Notice {
                kind,
                freeze_us,
                text,
            } => {
                out.put_u8(*kind);
                out.put_u64(*freeze_us);
                put_text(out, ty, "text", text, MAX_TEXT)?;
            }
        }
        Ok(&[])
    }

    /// Decodes a payload of type `ty`. A `Write` takes `payload`'s buffer for its data (no copy);
    /// other types leave it for reuse. `frame` numbers the frame in errors.
    pub fn decode(ty: MsgType, payload: &mut Vec<u8>, frame: u64) -> Result<Message, WireError> {
        let mut f = Fields {
            r: Reader::new(payload, 0, "wire payload"),
            ty,
            frame,
        };
        let m = match ty {
            MsgType::Hello => Message::Hello {
                min_version: f.u8()?,
                max_version: f.u8()?,
                software: f.text("software", MAX_NAME)?,
            },
            MsgType::HelloAck => Message::HelloAck {
                version: f.u8()?,
                nonce: f.array()?,
            },
            MsgType::Register => Message::Register {
                proof: f.array()?,
                hostname: f.name("hostname")?,
                public_key: f.array()?,
            },
            MsgType::Registered => Message::Registered {
                agent_id: AgentId(f.array()?),
            },
            MsgType::Auth => Message::Auth {
                agent_id: AgentId(f.array()?),
                public_key: f.array()?,
                signature: f.array()?,
                legacy: f.array()?,
            },
            MsgType::Welcome => Message::Welcome {
                credits: f.u64()?,
                resume: f.disks()?,
            },
            MsgType::Refused => Message::Refused {
                code: f.u16()?,
                message: f.text("message", MAX_TEXT)?,
            },
            MsgType::Inventory => {
                let vm = f.name("vm")?;
                let n = f.count()?;
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    disks.push(InvDisk {
                        name: f.name("disk")?,
                        size: f.u64()?,
                        id: f.text("disk id", MAX_NAME)?,
                    });
                    let id = &disks.last().expect("pushed").id;
                    check_id(id).map_err(|d| f.malformed(d))?;
                }
                Message::Inventory { vm, disks }
            }
            MsgType::Holding => {
                let store = f.name("store")?;
                let open = f.array()?;
                let n = f.count()?;
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    disks.push(HeldDisk {
                        replica: f.name("replica")?,
                        last_run: f.array()?,
                        point_seq: f.u64()?,
                    });
                }
                Message::Holding { store, open, disks }
            }
            MsgType::Begin => {
                let (seq, run, time_ns, disks) = (f.u64()?, f.array()?, f.u64()?, f.disks()?);
                let mut bases = Vec::with_capacity(disks.len());
                for _ in 0..disks.len() {
                    bases.push(f.array()?);
                }
                Message::Begin {
                    seq,
                    run,
                    time_ns,
                    disks,
                    bases,
                }
            }
            MsgType::Write => {
                let seq = f.u64()?;
                let disk = f.name("disk")?;
                let offset = f.u64()?;
                let digest: [u8; 32] = f.array()?;
                let n = f.r.remaining();
                if n == 0 || n > MAX_DATA {
                    return Err(f.malformed(format!("data of {n} bytes (1 to {MAX_DATA} allowed)")));
                }
                check_range(ty, offset, n as u64).map_err(|d| f.malformed(d))?;
                let start = payload.len() - n;
                if write_digest(offset, &payload[start..]) != digest {
                    return Err(malformed(
                        ty,
                        frame,
                        "data does not match its digest".into(),
                    ));
                }
                // Shift the data to the front of the buffer and take it: no second 4 MiB buffer.
                payload.drain(..start);
                return Ok(Message::Write {
                    seq,
                    disk,
                    offset,
                    digest,
                    data: std::mem::take(payload),
                });
            }
            MsgType::Zero | MsgType::Discard => {
                let (seq, disk, offset, len) = (f.u64()?, f.name("disk")?, f.u64()?, f.u64()?);
                check_range(ty, offset, len).map_err(|d| f.malformed(d))?;
                if ty == MsgType::Zero {
                    Message::Zero {
                        seq,
                        disk,
                        offset,
                        len,
                    }
                } else {
                    Message::Discard {
                        seq,
                        disk,
                        offset,
                        len,
                    }
                }
            }
            MsgType::Tag => {
                let seq = f.u64()?;
                let tag = decode_tag(&mut f.r).map_err(|e| f.format(e))?;
                check_count(ty, tag.disks.len()).map_err(|d| f.malformed(d))?;
                for d in &tag.disks {
                    check_name("disk", &d.name).map_err(|e| f.malformed(e))?;
                }
                Message::Tag { seq, tag }
            }
            MsgType::Ack => Message::Ack { seq: f.u64()? },
            MsgType::Credit => Message::Credit { bytes: f.u64()? },
            MsgType::CutRequest => Message::CutRequest {
                app: match f.u8()? {
                    0 => false,
                    1 => true,
                    b => return Err(f.malformed(format!("app flag {b} is neither 0 nor 1"))),
                },
            },
            MsgType::CutDone => Message::CutDone {
                result: match f.u8()? {
                    0 => Ok(f.name("point id")?),
                    1 => Err(f.text("error", MAX_TEXT)?),
                    b => return Err(f.malformed(format!("status {b} is neither 0 nor 1"))),
                },
            },
            MsgType::Point => Message::Point {
                run: f.array()?,
                id: f.name("point id")?,
            },
            MsgType::Ping => Message::Ping { token: f.u64()? },
            MsgType::Pong => Message::Pong { token: f.u64()? },
            MsgType::Policy => Message::Policy {
                crash_every_ms: f.u64()?,
                app_every_ms: f.u64()?,
            },
            MsgType::CutoverRequest => Message::CutoverRequest,
            MsgType::Notice => Message::Notice {
                kind: match f.u8()? {
                    k @ 1..=notice::MAX => k,
                    k => return Err(f.malformed(format!("notice kind {k} is unknown"))),
                },
                freeze_us: f.u64()?,
                text: f.text("text", MAX_TEXT)?,
            },
        };
        let extra = f.r.remaining();
        if extra != 0 {
            return Err(WireError::Trailing {
                frame,
                ty: ty.name(),
                extra,
            });
        }
        Ok(m)
    }
}

/// A disk id is 1 to 255 bytes of printable UTF-8 (no control characters).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_NAME || id.chars().any(char::is_control) {
        return Err(format!(
            "disk id {id:?} is empty, longer than {MAX_NAME} bytes or holds a control character"
        ));
    }
    Ok(())
}

fn put_id(out: &mut Vec<u8>, ty: MsgType, id: &str) -> Result<(), WireError> {
    check_id(id).map_err(|d| unencodable(ty, d))?;
    out.put_str(id);
    Ok(())
}

/// The header of a frame of type `ty` carrying `payload_len` bytes.
pub(crate) fn header_for(
    ty: MsgType,
    version: u8,
    payload_len: usize,
) -> Result<[u8; HEADER_LEN], WireError> {
    if payload_len > MAX_PAYLOAD as usize {
        return Err(unencodable(
            ty,
            format!("payload of {payload_len} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    Ok(FrameHeader {
        version,
        ty,
        flags: 0,
        len: payload_len as u32,
    }
    .encode())
}

/// The version a frame of type `ty` is sent with: `Hello` and `HelloAck` always go in version-1
/// frames (every Ferry can read them); everything else in the negotiated version.
pub(crate) fn frame_version(ty: MsgType, negotiated: u8) -> u8 {
    match ty {
        MsgType::Hello | MsgType::HelloAck => HELLO_VERSION,
        _ => negotiated,
    }
}
