//! Credit-based flow control. The process server grants credit in bytes (`Welcome.credits`, then
//! `Credit` messages, which add up); every record costs its whole frame length
//! ([`crate::Message::frame_len`], what [`crate::FrameWriter::send`] returns). The agent sends a
//! record only if its credit covers it; the server grants only while its cache is under the high
//! watermark, so a full cache turns into a paused agent (its dirty bits kept), never into lost data.
//! Both sides keep a `Credits`: the agent to know what it may send, the server to catch an agent
//! that overruns its grant (a protocol error).

use crate::frame::{HEADER_LEN, MAX_PAYLOAD};

/// The largest frame: whenever the server grants credit, it tops the agent up to at least this,
/// so any record can always be sent eventually.
pub const MAX_FRAME: u64 = HEADER_LEN as u64 + MAX_PAYLOAD as u64;

/// A credit balance in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credits {
    available: u64,
}

impl Credits {
    pub fn new(available: u64) -> Self {
        Credits { available }
    }

    pub fn available(&self) -> u64 {
        self.available
    }

    /// Adds a grant (saturating).
    pub fn grant(&mut self, bytes: u64) {
        self.available = self.available.saturating_add(bytes);
    }

    /// Takes `cost` if the balance covers it; otherwise changes nothing and returns false.
    #[must_use]
    pub fn try_take(&mut self, cost: u64) -> bool {
        match self.available.checked_sub(cost) {
            Some(rest) => {
                self.available = rest;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_add_and_costs_take() {
        let mut c = Credits::new(100);
        assert!(c.try_take(60));
        assert!(!c.try_take(41));
        assert_eq!(c.available(), 40);
        c.grant(u64::MAX);
        assert_eq!(c.available(), u64::MAX);
        assert!(c.try_take(u64::MAX));
        assert_eq!(c.available(), 0);
        assert_eq!(MAX_FRAME, 16 + (4 << 20) + 4096);
    }
}
