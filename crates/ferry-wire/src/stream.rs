//! Frame readers and writers over blocking streams, and the state they share with the async ones.

use std::io::{self, Read, Write};

use crate::frame::{FrameHeader, HEADER_LEN, HELLO_VERSION, WIRE_VERSION};
use crate::message::{frame_version, header_for, Message};
use crate::WireError;

/// Payloads up to this size are read into a buffer of exactly their size (a ferry-agent Write is
/// 64 KiB and its fields).
pub const EXACT_UP_TO: usize = 128 * 1024 + 4096;
/// How much larger than a frame a kept buffer may be before it is replaced by one of the frame's
/// size.
const SLACK: usize = 4096;

/// Sequence-number order of one direction of a connection: records strictly increase, acks never
/// go backwards.
#[derive(Debug, Default)]
pub(crate) struct SeqOrder {
    last_record: Option<u64>,
    last_ack: Option<u64>,
}

impl SeqOrder {
    /// Checks `m` against the stream so far and, if it is in order, records it.
    fn admit(&mut self, m: &Message, frame: u64) -> Result<(), WireError> {
        let err = |found, last| WireError::Sequence {
            frame,
            ty: m.ty().name(),
            found,
            last,
        };
        if let Some(seq) = m.seq() {
            match self.last_record {
                Some(last) if seq <= last => return Err(err(seq, last)),
                _ => self.last_record = Some(seq),
            }
        } else if let Message::Ack { seq } = m {
            match self.last_ack {
                Some(last) if *seq < last => return Err(err(*seq, last)),
                _ => self.last_ack = Some(*seq),
            }
        }
        Ok(())
    }
}

/// The I/O-free half of a frame reader, shared by [`FrameReader`] and the async reader.
#[derive(Debug)]
pub(crate) struct ReadState {
    version: u8,
    frames: u64,
    order: SeqOrder,
    pub(crate) buf: Vec<u8>,
    poisoned: bool,
    /// Largest payload accepted (at most [`crate::frame::MAX_PAYLOAD`]).
    max_payload: u32,
}

impl ReadState {
    /// Room for a payload of `len` bytes before it is read, exactly, up to [`EXACT_UP_TO`]: a
    /// Write's buffer moves on into the cache, so it should be the data's size, not the doubling
    /// growth of `read_to_end` (128 KiB for a 64 KiB Write). A larger announced frame grows as its
    /// bytes arrive: a peer that announces 4 MiB and sends nothing pins nothing.
    pub(crate) fn reserve(&mut self, len: u32) {
        let want = (len as usize).min(EXACT_UP_TO);
        // A buffer grown by an earlier, larger frame (kept: only Writes take theirs) would move
        // its whole capacity into the cache with the next Write.
        if self.buf.capacity() > want + SLACK {
            self.buf = Vec::new();
        }
        self.buf.reserve_exact(want);
    }

    pub(crate) fn new() -> Self {
        ReadState {
            version: HELLO_VERSION,
            frames: 0,
            order: SeqOrder::default(),
            buf: Vec::new(),
            poisoned: false,
            max_payload: crate::frame::MAX_PAYLOAD,
        }
    }

    pub(crate) fn set_max_payload(&mut self, max: u32) {
        self.max_payload = max.min(crate::frame::MAX_PAYLOAD);
    }

    pub(crate) fn set_version(&mut self, version: u8) -> bool {
        let ok = settable(version);
        if ok {
            self.version = version;
        }
        ok
    }

    pub(crate) fn start(&self) -> Result<(), WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        Ok(())
    }

    pub(crate) fn fail<T>(&mut self, e: WireError) -> Result<T, WireError> {
        self.poisoned = true;
        Err(e)
    }

    /// After a header read of `got` bytes: `None` at a clean end of stream, else the checked
    /// header.
    pub(crate) fn header(
        &mut self,
        h: &[u8; HEADER_LEN],
        got: usize,
    ) -> Result<Option<FrameHeader>, WireError> {
        match got {
            0 => Ok(None),
            HEADER_LEN => match FrameHeader::decode(h, self.version, self.frames) {
                Ok(hdr) if hdr.len > self.max_payload => self.fail(WireError::Oversized {
                    frame: self.frames,
                    len: hdr.len,
                    max: self.max_payload,
                }),
                Ok(hdr) => Ok(Some(hdr)),
                Err(e) => self.fail(e),
            },
            _ => self.fail(WireError::Truncated {
                frame: self.frames,
                part: "header",
                got: got as u64,
                expected: HEADER_LEN as u64,
            }),
        }
    }

    /// After the payload of `hdr` was read into `buf`.
    pub(crate) fn finish(&mut self, hdr: FrameHeader) -> Result<Message, WireError> {
        if self.buf.len() < hdr.len as usize {
            let got = self.buf.len() as u64;
            return self.fail(WireError::Truncated {
                frame: self.frames,
                part: "payload",
                got,
                expected: hdr.len as u64,
            });
        }
        let m = match Message::decode(hdr.ty, &mut self.buf, self.frames) {
            Ok(m) => m,
            Err(e) => return self.fail(e),
        };
        if let Err(e) = self.order.admit(&m, self.frames) {
            return self.fail(e);
        }
        self.frames += 1;
        Ok(m)
    }

    pub(crate) fn io(&mut self, op: &'static str, e: io::Error) -> WireError {
        self.poisoned = true;
        WireError::Io { op, source: e }
    }
}

/// The I/O-free half of a frame writer.
#[derive(Debug)]
pub(crate) struct WriteState {
    version: u8,
    order: SeqOrder,
    frames: u64,
    pub(crate) buf: Vec<u8>,
}

impl WriteState {
    pub(crate) fn new() -> Self {
        WriteState {
            version: HELLO_VERSION,
            order: SeqOrder::default(),
            frames: 0,
            buf: Vec::new(),
        }
    }

    pub(crate) fn set_version(&mut self, version: u8) -> bool {
        let ok = settable(version);
        if ok {
            self.version = version;
        }
        ok
    }

    /// Encodes `m`: afterwards `buf` holds header and payload, except a `Write`'s data, returned
    /// to be written after it. Nothing is recorded unless `m` is valid and in order.
    pub(crate) fn prepare<'m>(&mut self, m: &'m Message) -> Result<&'m [u8], WireError> {
        self.buf.clear();
        self.buf.resize(HEADER_LEN, 0);
        let tail = m.encode_payload(&mut self.buf)?;
        let len = self.buf.len() - HEADER_LEN + tail.len();
        let hdr = header_for(m.ty(), frame_version(m.ty(), self.version), len)?;
        self.order
            .admit(m, self.frames)
            .map_err(|e| WireError::Unencodable {
                ty: m.ty().name(),
                detail: e.to_string(),
            })?;
        self.buf[..HEADER_LEN].copy_from_slice(&hdr);
        self.frames += 1;
        Ok(tail)
    }
}

/// Sets the version after `Hello`/`HelloAck` (both start at [`HELLO_VERSION`]). Only versions this
/// Ferry speaks are accepted.
fn settable(version: u8) -> bool {
    version == WIRE_VERSION
}

/// Reads frames from a blocking stream (a TLS stream, a socket, a byte slice).
///
/// Never allocates more for a payload than the peer actually sent (and never more than
/// [`crate::MAX_PAYLOAD`]), never panics, and after any error refuses to read on
/// ([`WireError::Poisoned`]): the caller closes the connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    state: ReadState,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            state: ReadState::new(),
        }
    }

    /// Switches to a negotiated version. Returns false (and changes nothing) for a version this
    /// Ferry does not speak.
    pub fn set_version(&mut self, version: u8) -> bool {
        self.state.set_version(version)
    }

    /// Frames read so far.
    pub fn frames(&self) -> u64 {
        self.state.frames
    }

    /// The next message, or `None` when the peer closed the stream at a frame boundary.
    pub fn read(&mut self) -> Result<Option<Message>, WireError> {
        self.state.start()?;
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut self.inner, &mut h).map_err(|e| self.state.io("read", e))?;
        let Some(hdr) = self.state.header(&h, got)? else {
            return Ok(None);
        };
        self.state.buf.clear();
        self.state.reserve(hdr.len);
        // `take` + `read_to_end` grows the buffer (past `reserve`) only as bytes arrive.
        (&mut self.inner)
            .take(hdr.len as u64)
            .read_to_end(&mut self.state.buf)
            .map_err(|e| self.state.io("read", e))?;
        self.state.finish(hdr).map(Some)
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes frames to a blocking stream. Refuses (writing nothing) a message a reader would refuse
/// and records sent out of order. Does not flush: call [`FrameWriter::flush`] when a batch is out.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    state: WriteState,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            state: WriteState::new(),
        }
    }

    /// See [`FrameReader::set_version`].
    pub fn set_version(&mut self, version: u8) -> bool {
        self.state.set_version(version)
    }

    /// Sends one message; returns the bytes written (a record's credit cost).
    pub fn send(&mut self, m: &Message) -> Result<usize, WireError> {
        let tail = self.state.prepare(m)?;
        let io = |e| WireError::Io {
            op: "write",
            source: e,
        };
        self.inner.write_all(&self.state.buf).map_err(io)?;
        if !tail.is_empty() {
            self.inner.write_all(tail).map_err(io)?;
        }
        Ok(self.state.buf.len() + tail.len())
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush().map_err(|e| WireError::Io {
            op: "flush",
            source: e,
        })
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
    pub fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer kept from a larger frame is not what a small Write's data moves out in.
    #[test]
    fn a_small_frame_after_a_large_one_gets_a_buffer_of_its_size() {
        let mut st = ReadState::new();
        for (before, len) in [(4 << 20, 4096u32), (132 * 1024, 4096), (200_000, 65_600)] {
            st.buf = Vec::with_capacity(before);
            st.reserve(len);
            assert!(st.buf.capacity() >= len as usize);
            assert!(
                st.buf.capacity() <= len as usize + SLACK,
                "{before} then {len}: capacity {}",
                st.buf.capacity()
            );
        }
        // A buffer already about the right size is kept (no allocation per frame).
        st.buf = Vec::with_capacity(65_600);
        let at = st.buf.as_ptr();
        st.reserve(65_000);
        assert_eq!(st.buf.as_ptr(), at);
    }
}
