//! What one peer may cost the process server before and after it authenticates.
//!
//! Job: cap the connections that have not authenticated yet (all of them, and per source address),
//! how long such a connection may take (TLS and the Hello/Register/Auth exchange together), how
//! large its frames may be, and, once authenticated, how many connections one agent may hold, how
//! long a connection may stay silent and how long it may take to name its VM. Excess connections
//! are closed at once, without a TLS handshake (they cost a socket for microseconds), and logged
//! at a bounded rate.
//!
//! Memory: an unauthenticated connection holds at most one [`PRE_AUTH_MAX_PAYLOAD`] frame plus
//! its TLS buffers (tens of KiB), so the pre-auth phase is bounded by [`MAX_PRE_AUTH`] of them;
//! an authenticated connection holds at most its credit (see `conn::fair_share`), and an agent at
//! most [`MAX_CONNS_PER_AGENT`] connections.
//!
//! Must not: delay a registered agent that stays within its limits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest frame payload before authentication: `Hello`, `Register` and `Auth` need a few hundred
/// bytes (a 255-byte name at most).
pub const PRE_AUTH_MAX_PAYLOAD: u32 = 4096;
/// TLS handshake, `Hello` and `Register`/`Auth`, all within this long from the accept.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(15);
/// Connections not yet authenticated, at once, from everywhere.
pub const MAX_PRE_AUTH: usize = 512;
/// ... and from one source address (agents behind one NAT share it; they retry with backoff).
pub const MAX_PRE_AUTH_PER_ADDR: usize = 32;
/// Authenticated connections one agent may hold at once: one per VM (at most
/// `control::MAX_VMS_PER_AGENT`) and a few reconnects overlapping the connections they replace.
pub const MAX_CONNS_PER_AGENT: usize = crate::control::MAX_VMS_PER_AGENT + 8;
/// An authenticated connection must send its `Inventory` within this long.
pub const INVENTORY_DEADLINE: Duration = Duration::from_secs(30);
/// A connection that sends no frame for this long is closed (the server pings every
/// [`PING_EVERY`], and agents answer, so a live agent is never idle this long).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the server pings an authenticated connection.
pub const PING_EVERY: Duration = Duration::from_secs(30);

/// What one source is for the per-address cap: an IPv4 address, or an IPv6 address's /64 (one
/// host usually holds a whole /64; an IPv4-mapped address counts as its IPv4 address).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Counts connections against the limits; shared by the accept loop and the connections.
#[derive(Default)]
pub(crate) struct Gate {
    pre: Mutex<(usize, HashMap<IpAddr, usize>)>,
    agents: Mutex<HashMap<String, usize>>,
    /// Refusals of the pre-auth phase are logged at most this often (a flood must not become a
    /// disk-filling log).
    pub noisy: LogLimit,
}

/// Held by a connection until it authenticates (or ends).
pub(crate) struct PreAuthSlot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        let mut g = self.gate.pre.lock().expect("gate lock");
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// Held by an authenticated connection of an agent until it ends.
pub(crate) struct AgentSlot {
    gate: Arc<Gate>,
    agent: String,
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        let mut g = self.gate.agents.lock().expect("gate lock");
        if let Some(n) = g.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.agent);
            }
        }
    }
}

/// Why a connection was turned away by the gate.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Full {
    All,
    Addr,
}

impl Gate {
    /// A pre-auth slot for a connection from `ip`, unless the limits are reached.
    pub fn pre_auth(self: &Arc<Self>, ip: IpAddr) -> Result<PreAuthSlot, Full> {
        let ip = source_key(ip);
        let mut g = self.pre.lock().expect("gate lock");
        if g.0 >= MAX_PRE_AUTH {
            return Err(Full::All);
        }
        let n = g.1.entry(ip).or_default();
        if *n >= MAX_PRE_AUTH_PER_ADDR {
            return Err(Full::Addr);
        }
        *n += 1;
        g.0 += 1;
        Ok(PreAuthSlot {
            gate: self.clone(),
            ip,
        })
    }

    /// A connection slot of `agent`, unless it holds [`MAX_CONNS_PER_AGENT`] already.
    pub fn agent(self: &Arc<Self>, agent: &str) -> Option<AgentSlot> {
        let mut g = self.agents.lock().expect("gate lock");
        let n = g.entry(agent.to_owned()).or_default();
        if *n >= MAX_CONNS_PER_AGENT {
            return None;
        }
        *n += 1;
        Some(AgentSlot {
            gate: self.clone(),
            agent: agent.to_owned(),
        })
    }

    /// Connections not yet authenticated.
    #[cfg(test)]
    pub fn pre_auth_count(&self) -> usize {
        self.pre.lock().expect("gate lock").0
    }
}

/// Lets through at most [`LogLimit::PER_WINDOW`] events per [`LogLimit::WINDOW`]; says how many
/// it held back when the next window opens.
pub(crate) struct LogLimit {
    state: Mutex<(Instant, u32, u64)>,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit {
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }
}

impl LogLimit {
    const WINDOW: Duration = Duration::from_secs(10);
    const PER_WINDOW: u32 = 20;

    /// Whether to log this event; `Some(n)`: yes, and `n` earlier ones were held back.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().expect("log limit lock");
        if s.0.elapsed() >= Self::WINDOW {
            let held = s.2;
            *s = (Instant::now(), 1, 0);
            return Some(held);
        }
        if s.1 < Self::PER_WINDOW {
            s.1 += 1;
            Some(0)
        } else {
            s.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_auth_slots_are_capped_per_address_and_in_all_and_given_back() {
        let g = Arc::new(Gate::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut held: Vec<PreAuthSlot> = (0..MAX_PRE_AUTH_PER_ADDR)
            .map(|_| g.pre_auth(a).unwrap())
            .collect();
        assert_eq!(g.pre_auth(a).err(), Some(Full::Addr));
        held.pop();
        assert!(g.pre_auth(a).is_ok(), "a slot given back is free again");
        let mut i = 0u32;
        while g.pre_auth_count() < MAX_PRE_AUTH {
            i += 1;
            let ip = IpAddr::from([10, 1, (i >> 8) as u8, i as u8]);
            held.push(g.pre_auth(ip).unwrap());
        }
        assert_eq!(
            g.pre_auth("10.9.9.9".parse().unwrap()).err(),
            Some(Full::All)
        );
        held.clear();
        assert_eq!(g.pre_auth_count(), 0);
    }

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64() {
        let g = Arc::new(Gate::default());
        let _held: Vec<PreAuthSlot> = (0..MAX_PRE_AUTH_PER_ADDR as u16)
            .map(|i| {
                g.pre_auth(IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, 0, i + 1]))
                    .unwrap()
            })
            .collect();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(g.pre_auth(same_64).err(), Some(Full::Addr));
        assert!(g.pre_auth("2001:db8:1:3::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn an_agent_holds_a_bounded_number_of_connections() {
        let g = Arc::new(Gate::default());
        let slots: Vec<AgentSlot> = (0..MAX_CONNS_PER_AGENT)
            .map(|_| g.agent("a1").unwrap())
            .collect();
        assert!(g.agent("a1").is_none());
        assert!(g.agent("a2").is_some(), "another agent is not affected");
        drop(slots);
        assert!(g.agent("a1").is_some());
    }

    #[test]
    fn the_log_limit_holds_back_a_flood_and_says_so() {
        let l = LogLimit::default();
        let passed = (0..100).filter(|_| l.allow().is_some()).count();
        assert_eq!(passed, LogLimit::PER_WINDOW as usize);
        l.state.lock().unwrap().0 -= LogLimit::WINDOW;
        assert_eq!(l.allow(), Some(100 - LogLimit::PER_WINDOW as u64));
    }
}
