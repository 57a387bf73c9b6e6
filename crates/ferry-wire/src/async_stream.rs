//! The same readers and writers over tokio streams (the process server serves many agents on one
//! runtime). Behaviour and errors are those of [`crate::FrameReader`] and [`crate::FrameWriter`].

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::HEADER_LEN;
use crate::stream::{ReadState, WriteState};
use crate::{Message, WireError};

/// Reads frames from a tokio stream. Cancel-safety: none; drop the reader with the connection.
#[derive(Debug)]
pub struct AsyncFrameReader<R> {
    inner: R,
    state: ReadState,
}

impl<R: AsyncRead + Unpin> AsyncFrameReader<R> {
    pub fn new(inner: R) -> Self {
        AsyncFrameReader {
            inner,
            state: ReadState::new(),
        }
    }

    /// See [`crate::FrameReader::set_version`].
    pub fn set_version(&mut self, version: u8) -> bool {
        self.state.set_version(version)
    }

    /// Refuses (as [`WireError::Oversized`]) any frame whose payload is larger than `max` bytes,
    /// before reading it; at most [`crate::frame::MAX_PAYLOAD`]. The process server keeps it small
    /// until the peer has authenticated.
    pub fn set_max_payload(&mut self, max: u32) {
        self.state.set_max_payload(max);
    }

    /// The next message, or `None` when the peer closed the stream at a frame boundary.
    pub async fn read(&mut self) -> Result<Option<Message>, WireError> {
        self.state.start()?;
        let mut h = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.inner.read(&mut h[got..]).await {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.state.io("read", e)),
            }
        }
        let Some(hdr) = self.state.header(&h, got)? else {
            return Ok(None);
        };
        self.state.buf.clear();
        self.state.reserve(hdr.len);
        let r = (&mut self.inner)
            .take(hdr.len as u64)
            .read_to_end(&mut self.state.buf)
            .await;
        r.map_err(|e| self.state.io("read", e))?;
        self.state.finish(hdr).map(Some)
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes frames to a tokio stream.
#[derive(Debug)]
pub struct AsyncFrameWriter<W> {
    inner: W,
    state: WriteState,
}

impl<W: AsyncWrite + Unpin> AsyncFrameWriter<W> {
    pub fn new(inner: W) -> Self {
        AsyncFrameWriter {
            inner,
            state: WriteState::new(),
        }
    }

    /// See [`crate::FrameReader::set_version`].
    pub fn set_version(&mut self, version: u8) -> bool {
        self.state.set_version(version)
    }

    /// Sends one message; returns the bytes written.
    pub async fn send(&mut self, m: &Message) -> Result<usize, WireError> {
        let tail = self.state.prepare(m)?;
        let io = |e| WireError::Io {
            op: "write",
            source: e,
        };
        self.inner.write_all(&self.state.buf).await.map_err(io)?;
        if !tail.is_empty() {
            self.inner.write_all(tail).await.map_err(io)?;
        }
        Ok(self.state.buf.len() + tail.len())
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush().await.map_err(|e| WireError::Io {
            op: "flush",
            source: e,
        })
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
    pub fn into_inner(self) -> W {
        self.inner
    }
}
