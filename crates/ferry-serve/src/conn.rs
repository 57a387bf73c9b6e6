//! One agent connection: hello, registration or authentication, then records under credit. Records
//! are turned into cache entries here and handed to the group committer; a writer task sends the
//! acks it reports and the credit they free.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_crypto::{is_zero, MasterKey};
use ferry_format::cache::CacheEntry;
use ferry_format::CHUNK_SIZE;
use ferry_wire::{
    negotiate, new_nonce, refuse, AsyncFrameReader, AsyncFrameWriter, AuthError, Credits, Message,
    WireError, WIRE_VERSION,
};
use tokio::io::{split, AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::{mpsc, watch};

use crate::board::AckTrack;
use crate::commit::{Append, Durable};
use crate::Shared;

/// Why a connection ended early: the refusal sent to the agent.
struct Refusal {
    code: u16,
    message: String,
    /// The stream broke (I/O, truncated): nothing to refuse, the agent reconnects.
    dropped: bool,
}

fn refusal(code: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
        dropped: false,
    }
}

impl From<WireError> for Refusal {
    fn from(e: WireError) -> Self {
        let dropped = !e.is_permanent();
        Refusal {
            dropped,
            ..refusal(refuse::PROTOCOL, e.to_string())
        }
    }
}

type Writer<S> = AsyncFrameWriter<WriteHalf<S>>;

async fn send_refusal<S: AsyncWrite>(w: &mut Writer<S>, r: &Refusal) {
    let m = Message::Refused {
        code: r.code,
        message: r.message.chars().take(ferry_wire::MAX_TEXT / 4).collect(),
    };
    let _ = w.send(&m).await;
    let _ = w.flush().await;
}

/// Serves one TLS stream until the agent leaves or is refused. Never panics on input.
/// `pre_auth` is held until the peer has authenticated; the handshake must end by `deadline`.
pub async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(
    shared: Arc<Shared>,
    stream: S,
    peer: String,
    pre_auth: crate::limits::PreAuthSlot,
    (deadline, binding): (tokio::time::Instant, ferry_wire::Binding),
) {
    let (rd, wr) = split(stream);
    let mut r = AsyncFrameReader::new(rd);
    r.set_max_payload(crate::limits::PRE_AUTH_MAX_PAYLOAD);
    let mut w = AsyncFrameWriter::new(wr);
    let shook = tokio::time::timeout_at(deadline, handshake(&shared, &mut r, &mut w, &binding))
        .await
        .unwrap_or_else(|_| {
            Err(Refusal {
                dropped: true,
                ..refusal(
                    refuse::PROTOCOL,
                    format!(
                        "no authentication within {:?} of connecting",
                        crate::limits::HANDSHAKE_DEADLINE
                    ),
                )
            })
        });
    drop(pre_auth);
    let (agent, grant, _slot) = match shook {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(why) if why.dropped => {
            if shared.gate.noisy.allow().is_some() {
                tracing::info!(%peer, reason = %why.message, "connection dropped during the handshake");
            }
            return;
        }
        Err(why) => {
            if let Some(held) = shared.gate.noisy.allow() {
                tracing::warn!(%peer, code = why.code, reason = %why.message, held_back = held, "refused agent connection");
            }
            send_refusal(&mut w, &why).await;
            return;
        }
    };
    r.set_max_payload(ferry_wire::MAX_PAYLOAD);
    tracing::info!(%peer, agent = %agent, "agent authenticated");
    let (tx, durable_rx) = watch::channel(Durable::default());
    let conn = Arc::new(tx);
    let credits = Arc::new(Mutex::new(Credits::new(grant)));
    let track: Track = Arc::new(Mutex::new(None));
    let (refuse_tx, refuse_rx) = mpsc::channel::<Refusal>(1);
    let (point_tx, point_rx) = mpsc::unbounded_channel();
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(
        shared.clone(),
        w,
        durable_rx,
        (credits.clone(), grant),
        refuse_rx,
        track.clone(),
        (point_rx, ctl_rx),
    ));
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let mut owner = VmOwner {
        shared: &shared,
        agent: agent.clone(),
        peer: peer.clone(),
        id,
        vm: None,
        track,
        points: point_tx,
        ctl: ctl_tx,
    };
    // The writer ends on its own when the agent stops reading (a write blocked for
    // SEND_WITHIN) or its socket fails: then the reader stops too.
    let mut writer = writer;
    let mut writer_done = false;
    let result = tokio::select! {
        r = read_loop(&mut owner, &mut r, &conn, &credits) => r,
        _ = &mut writer => {
            writer_done = true;
            Err(Refusal {
                dropped: true,
                ..refusal(refuse::PROTOCOL, "the agent does not read what the server sends")
            })
        }
    };
    drop(owner);
    match result {
        Ok(()) => tracing::info!(%peer, agent = %agent, "agent disconnected"),
        Err(why) if why.dropped => {
            tracing::info!(%peer, agent = %agent, reason = %why.message, "agent connection dropped");
        }
        Err(why) => {
            tracing::warn!(%peer, agent = %agent, code = why.code, reason = %why.message, "refused agent connection");
            let _ = refuse_tx.send(why).await;
        }
    }
    drop(refuse_tx);
    drop(conn);
    if !writer_done
        && tokio::time::timeout(SEND_WITHIN, &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
    shared.credit_holders.fetch_sub(1, Ordering::Relaxed);
}

/// Least credit a connection holds: four of ferry-agent's records (64 KiB writes), so 1,000
/// agents hold at most 256 MiB; a larger record (the wire allows 4 MiB) waits until the
/// connection's share grows (fewer connections holding credit).
pub const MIN_SHARE: u64 = 256 << 10;

/// The credit one connection may hold now: an equal share of [`crate::MAX_INFLIGHT`] among the
/// connections holding credit, between [`MIN_SHARE`] and the per-connection window. Bytes in flight
/// (received, not yet durable) across all connections stay near the pool whatever the number of
/// agents.
pub fn fair_share(shared: &Shared) -> u64 {
    let n = shared.credit_holders.load(Ordering::Relaxed).max(1);
    (crate::MAX_INFLIGHT / n).clamp(MIN_SHARE, shared.window.max(MIN_SHARE))
}

/// Hello, then Register (answered and closed: `Ok(None)`) or Auth (Welcome sent: the agent id and
/// the credit it was granted; the connection then counts in `credit_holders`).
async fn handshake<R: AsyncRead + Unpin, S: AsyncWrite>(
    shared: &Shared,
    r: &mut AsyncFrameReader<R>,
    w: &mut Writer<S>,
    binding: &ferry_wire::Binding,
) -> Result<Option<(String, u64, crate::limits::AgentSlot)>, Refusal> {
    let first = r.read().await?;
    let Some(Message::Hello {
        min_version,
        max_version,
        software,
    }) = first
    else {
        return Err(refusal(refuse::PROTOCOL, "expected Hello first"));
    };
    let Some(version) = negotiate(min_version, max_version) else {
        return Err(refusal(
            refuse::VERSION,
            format!(
                "agent speaks wire versions {min_version}..={max_version}, this process server {WIRE_VERSION}; upgrade the older side"
            ),
        ));
    };
    let nonce = new_nonce().map_err(|e| refusal(refuse::INTERNAL, e.to_string()))?;
    w.send(&Message::HelloAck { version, nonce }).await?;
    w.flush().await?;
    r.set_version(version);
    w.set_version(version);
    let second = r.read().await?;
    match second {
        Some(Message::Register {
            proof,
            hostname,
            public_key,
        }) => {
            let (good, fingerprint) = {
                let p = shared.passphrase.lock().expect("passphrase lock");
                (p.verify(&nonce, &proof), p.fingerprint)
            };
            // Under the control lock, on the registry as on disk (an operator's revocation made
            // meanwhile is kept), then the server's copy is that one. Not the passphrase: perhaps a
            // one-time enrollment token, burnt, the agent registered and given the token's VM in
            // that same lock hold (checked without the lock first: a stranger's wrong proof never
            // queues behind it).
            let token_may_match =
                !good && shared.control.token_may_match(&nonce, &proof, fingerprint);
            if !good && !token_may_match {
                return Err(refusal(
                    refuse::BAD_PASSPHRASE,
                    "wrong registration passphrase (or an enrollment token already used or expired); get the current one with `ferry passphrase show`, or a new token with `ferry agents token`, on the process server",
                ));
            }
            let reg = tokio::task::block_in_place(|| -> Result<_, crate::control::ControlError> {
                let _l = shared.control.lock()?;
                let vm = if good {
                    None
                } else {
                    match shared
                        .control
                        .use_token_locked(&nonce, &proof, fingerprint)?
                    {
                        Some(vm) => Some(vm),
                        None => return Ok(None), // used or expired meanwhile
                    }
                };
                let mut fresh = shared.control.registry()?;
                let id = fresh.register_with(&hostname, public_key, vm.as_deref())?;
                if let Some(vm) = &vm {
                    shared.control.give_vm_locked(vm, &id.to_string())?;
                }
                *shared.registry.lock().expect("registry lock") = fresh;
                Ok(Some((id, vm)))
            });
            let (agent_id, token_vm) = match reg {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err(refusal(
                        refuse::BAD_PASSPHRASE,
                        "the enrollment token was used or expired a moment ago; get a new one with `ferry agents token` on the process server",
                    ))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot register the agent");
                    return Err(refusal(
                        refuse::INTERNAL,
                        "cannot save the agent registry; see the process server log",
                    ));
                }
            };
            tracing::info!(agent = %agent_id, %hostname, %software, "agent registered");
            shared.events.record(
                crate::events::Event::new(
                    "agent",
                    token_vm.as_deref(),
                    format!("agent {agent_id} registered (host {hostname}, {software})"),
                )
                .with(serde_json::json!({"agent": agent_id.to_string(), "hostname": hostname, "token": token_vm.is_some()})),
            );
            if let Some(vm) = token_vm {
                tracing::info!(agent = %agent_id, vm = %vm, "enrollment token used: the VM now belongs to this agent");
            }
            w.send(&Message::Registered { agent_id }).await?;
            w.flush().await?;
            Ok(None)
        }
        Some(Message::Auth {
            agent_id,
            public_key,
            signature,
            legacy,
        }) => {
            let verdict = shared.registry.lock().expect("registry lock").verify(
                &agent_id,
                (&public_key, &signature, &legacy),
                &nonce,
                binding,
            );
            let verdict = match verdict {
                Ok(v) => v,
                Err(e) => {
                    let code = match e {
                        AuthError::UnknownAgent(_) => refuse::UNKNOWN_AGENT,
                        AuthError::BadProof(_) => refuse::BAD_CREDENTIAL,
                    };
                    return Err(refusal(
                        code,
                        format!("{e}; register the agent again (ferry-agent register)"),
                    ));
                }
            };
            if let ferry_wire::Verified::MoveToKey(key) = verdict {
                // An agent registered before keys: from now on the registry keeps only its key.
                // Under the control lock, on the registry as on disk (a revocation made meanwhile
                // is kept: then the agent is refused).
                // Only once: if another Auth moved the agent meanwhile, this one must have used
                // that key (two holders of the old credential cannot both move it).
                let moved = tokio::task::block_in_place(
                    || -> Result<Option<bool>, crate::control::ControlError> {
                        let _l = shared.control.lock()?;
                        let mut fresh = shared.control.registry()?;
                        let Some((_, rec)) = fresh.agents().find(|(id, _)| **id == agent_id) else {
                            return Ok(None);
                        };
                        if let Some(k) = rec.key {
                            return Ok(Some(k == key));
                        }
                        fresh.move_to_key(&agent_id, key)?;
                        *shared.registry.lock().expect("registry lock") = fresh;
                        Ok(Some(true))
                    },
                );
                match moved {
                    Ok(Some(true)) => {
                        tracing::info!(agent = %agent_id, "agent moved from its credential to a key: the server keeps only its public key now")
                    }
                    Ok(Some(false)) => {
                        return Err(refusal(
                            refuse::BAD_CREDENTIAL,
                            format!("agent {agent_id} already moved to another key; register the agent again (ferry-agent register)"),
                        ))
                    }
                    Ok(None) => {
                        return Err(refusal(
                            refuse::UNKNOWN_AGENT,
                            "this agent was revoked; register it again (ferry-agent register)",
                        ))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record the agent's key");
                        return Err(refusal(
                            refuse::INTERNAL,
                            "cannot save the agent registry; see the process server log",
                        ));
                    }
                }
            }
            let Some(slot) = shared.gate.agent(&agent_id.to_string()) else {
                return Err(refusal(
                    refuse::BUSY,
                    format!(
                        "this agent already holds {} connections, the most one agent may; retry later",
                        crate::limits::MAX_CONNS_PER_AGENT
                    ),
                ));
            };
            // The connection holds credit from now on: its share of the pool, none while the
            // server is busy or the cache is above its high watermark, and none while a throttle
            // applies (the VM is not known yet: the writer grants paced credit after the
            // Inventory).
            shared.credit_holders.fetch_add(1, Ordering::Relaxed);
            let used = shared.cache.used_bytes();
            let busy = shared.inflight.load(Ordering::Relaxed) > crate::MAX_INFLIGHT
                || used >= shared.high_watermark
                || used >= shared.lag_limit.current()
                || shared.pacer.any();
            let grant = if busy { 0 } else { fair_share(shared) };
            if let Err(e) = w
                .send(&Message::Welcome {
                    credits: grant,
                    resume: vec![],
                })
                .await
            {
                shared.credit_holders.fetch_sub(1, Ordering::Relaxed);
                return Err(e.into());
            }
            if let Err(e) = w.flush().await {
                shared.credit_holders.fetch_sub(1, Ordering::Relaxed);
                return Err(e.into());
            }
            Ok(Some((agent_id.to_string(), grant, slot)))
        }
        Some(m) => Err(refusal(
            refuse::PROTOCOL,
            format!("expected Register or Auth, got {}", m.ty().name()),
        )),
        None => Ok(None),
    }
}

/// Reads Inventory, then records, until the agent closes the stream.
/// Which connection replicates a VM: one at a time, or two agents' runs would interleave in the
/// cache. A newer connection of the same agent replaces the older one (a reconnect after the old
/// TCP connection died silently); another agent is refused as busy.
pub(crate) struct VmSlot {
    agent: String,
    conn: u64,
    pub(crate) cancel: watch::Sender<Option<Kill>>,
    /// Messages for the agent (sent in order by the connection's writer).
    pub(crate) ctl: mpsc::UnboundedSender<Message>,
    /// The agent said it allows a cutover asked by the server (its `allow_remote_cutover`).
    pub(crate) remote_cutover: bool,
    /// When the connection claimed the VM (its notices follow within moments).
    pub(crate) claimed: std::time::Instant,
}

/// Why a connection's VM slot was taken from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kill {
    /// A newer connection of the same agent took the VM (the agent is already on it).
    Replaced,
    /// The operator revoked the agent (`ferry agents revoke`).
    Revoked,
    /// The operator moved the VM to another agent (`ferry vms move`).
    Moved,
    /// The VM's stored data failed to apply: it is quarantined until the operator releases it.
    Quarantined,
    /// The VM's migration was completed (`ferry complete-migration`): it is never replicated again.
    Retired,
}

impl Kill {
    fn refusal(self, vm: &str) -> Refusal {
        match self {
            Kill::Replaced => Refusal {
                dropped: true,
                ..refusal(
                    refuse::PROTOCOL,
                    "replaced by a newer connection of the same agent",
                )
            },
            Kill::Revoked => refusal(
                refuse::UNKNOWN_AGENT,
                "this agent was revoked on the process server; to replicate again, register it again (ferry-agent register) with a passphrase from the operator",
            ),
            Kill::Moved => refusal(
                refuse::NOT_OWNER,
                format!("VM '{vm}' was moved to another agent by the operator (ferry vms move); this agent no longer replicates it"),
            ),
            Kill::Retired => refusal(
                refuse::RETIRED,
                format!("VM '{vm}' was migrated and its replication ended (ferry complete-migration on the process server): this agent no longer protects it; stop it (systemctl disable --now ferry-agent) or, to protect the machine again as a new VM, give it another name (--vm)"),
            ),
            Kill::Quarantined => refusal(
                refuse::QUARANTINED,
                format!("VM '{vm}' is quarantined on the process server: data it sent cannot be applied; it is retried until the operator fixes the cause and runs `ferry vms release {vm}` (the process server's log and `ferry status` say why)"),
            ),
        }
    }
}

/// Applies the operator's changes to the control files (see [`crate::control`]) to the running
/// server: reloads the registry (under the control lock, so a registration stored meanwhile is
/// never undone) and the VM owners whenever either file changes (and once at start: a change made
/// while the server was starting counts), and on every tick closes the connections of agents no
/// longer registered and of VMs whose owner is another agent. Runs until `finished` or the server
/// is gone.
pub(crate) fn watch_control(
    shared: &std::sync::Weak<Shared>,
    finished: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let mut seen = None;
    let mut owners = std::collections::BTreeMap::new();
    let (mut reg_failing, mut own_failing) = (false, false);
    while !finished.load(Ordering::Relaxed) {
        // Gone once the server stops: nothing left to watch.
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Some(shared.control.generation());
        if now != seen {
            let reg = (|| -> Result<(), crate::control::ControlError> {
                let _l = shared.control.lock()?;
                let r = shared.control.registry()?;
                *shared.registry.lock().expect("registry lock") = r;
                Ok(())
            })();
            let own = shared.control.owners();
            let pass_path = shared.control.passphrase_path();
            let pass = ferry_wire::Passphrase::read_file(&pass_path);
            let pass_ok = pass.is_ok();
            match pass {
                Ok(p) => {
                    let mut cur = shared.passphrase.lock().expect("passphrase lock");
                    if p.fingerprint != cur.fingerprint {
                        tracing::error!(file = %pass_path.display(), "the passphrase file pins another certificate; keeping the passphrase in use");
                    } else if p != *cur {
                        tracing::info!("registration passphrase replaced (ferry passphrase rotate): new agents need the new one");
                        *cur = p;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the registration passphrase; keeping the one in use")
                }
            }
            if reg.is_ok() && own.is_ok() && pass_ok {
                seen = now; // else tried again next tick
            }
            match reg {
                Ok(()) => reg_failing = false,
                Err(e) if !reg_failing => {
                    tracing::error!(error = %e, "cannot read the agent registry; keeping the one read last (a revocation waits until it can be read)");
                    reg_failing = true;
                }
                Err(_) => {}
            }
            match own {
                Ok(o) => {
                    owners = o;
                    own_failing = false;
                }
                Err(e) if !own_failing => {
                    tracing::error!(error = %e, "cannot read the VM owners; keeping the ones read last");
                    own_failing = true;
                }
                Err(_) => {}
            }
        }
        // Every tick, not only after a change: a claim may have slipped in since.
        let known: std::collections::HashSet<String> = shared
            .registry
            .lock()
            .expect("registry lock")
            .agents()
            .map(|(id, _)| id.to_string())
            .collect();
        // VMs whose migration was completed (or an unreadable record: refused until it reads).
        let retired = ferry_apply::lifecycle::retired_set(&shared.store_root);
        // Cutovers the operator asked for (`ferry failover --shutdown-source`): sent to the
        // VM's agent if it is connected and allows it; refused at once if it does not; left for
        // a later tick while it is not connected (the command gives up on its own).
        for vm in ferry_apply::lifecycle::remote::requested(&shared.store_root) {
            let allowed = shared
                .vms
                .lock()
                .expect("vms lock")
                .get(&vm)
                // A connection a moment old may not have said it allows it yet.
                .filter(|slot| {
                    slot.remote_cutover || slot.claimed.elapsed() > Duration::from_secs(5)
                })
                .map(|slot| (slot.remote_cutover, slot.ctl.clone()));
            match allowed {
                // Recorded as sent first: a request is never sent twice.
                Some((true, ctl)) => {
                    match ferry_apply::lifecycle::remote::sent(&shared.store_root, &vm) {
                        Err(e) => {
                            tracing::error!(vm, error = %e, "cannot record that the cutover is asked; trying again")
                        }
                        Ok(()) if ctl.send(Message::CutoverRequest).is_ok() => {
                            tracing::warn!(
                            vm,
                            "asked the VM's agent to cut over (ferry failover --shutdown-source)"
                        );
                            shared.events.record(crate::events::Event::new(
                            "cutover",
                            Some(&vm),
                            "asked the source's agent to cut over (ferry failover --shutdown-source)",
                        ));
                        }
                        Ok(()) => {
                            let _ = ferry_apply::lifecycle::remote::failed(
                            &shared.store_root,
                            &vm,
                            "the agent's connection closed before the request could be sent; try again",
                        );
                        }
                    }
                }
                Some((false, _)) => {
                    let why = "the VM's agent does not allow a cutover from the process server: set allow_remote_cutover = true in its /etc/ferry/agent.toml (and restart it), or run `ferry-agent cutover` on the machine";
                    let _ = ferry_apply::lifecycle::remote::failed(&shared.store_root, &vm, why);
                    shared.events.record(crate::events::Event::new(
                        "cutover",
                        Some(&vm),
                        format!("cutover asked of the source refused: {why}"),
                    ));
                }
                None => {}
            }
        }
        let mut vms = shared.vms.lock().expect("vms lock");
        vms.retain(|vm, slot| {
            let kill = if !known.contains(&slot.agent) {
                Kill::Revoked
            } else if owners
                .get(vm)
                .is_some_and(|o: &crate::control::Owner| o.agent != slot.agent)
            {
                Kill::Moved
            } else if shared.quarantine.contains(vm) {
                Kill::Quarantined
            } else if retired.contains(vm) {
                Kill::Retired
            } else {
                return true;
            };
            tracing::warn!(vm = %vm, agent = %slot.agent, why = ?kill, "closing the VM's connection: it may no longer replicate");
            let _ = slot.cancel.send(Some(kill));
            false
        });
        drop(vms);
        drop(shared);
        std::thread::sleep(crate::control::WATCH_EVERY);
    }
}

struct VmOwner<'a> {
    shared: &'a Shared,
    agent: String,
    peer: String,
    id: u64,
    vm: Option<String>,
    /// The status board's view of this connection's unacknowledged records (set at the claim).
    track: Track,
    /// Points made from this connection's tags go to its writer.
    points: crate::board::PointNotify,
    /// Other messages for the agent (the `Holding`), sent by the writer in order.
    ctl: mpsc::UnboundedSender<Message>,
}

/// Shared by the reader (records received) and the writer (acks sent).
type Track = Arc<Mutex<Option<AckTrack>>>;

impl VmOwner<'_> {
    fn claim(&mut self, vm: &str) -> Result<watch::Receiver<Option<Kill>>, Refusal> {
        let registered = self
            .shared
            .registry
            .lock()
            .expect("registry lock")
            .agents()
            .any(|(id, _)| id.to_string() == self.agent);
        if !registered {
            return Err(Kill::Revoked.refusal(vm));
        }
        // Persistent ownership first: the first agent to claim a VM owns it, whether or not it
        // is connected. The refusal names nothing of the owner.
        // A file lock and fsyncs: off the async workers' hands.
        let claimed = tokio::task::block_in_place(|| self.shared.control.claim(vm, &self.agent));
        match claimed {
            Ok(crate::control::Claim::Revoked) => return Err(Kill::Revoked.refusal(vm)),
            Ok(crate::control::Claim::TooMany) => {
                return Err(refusal(
                    refuse::PROTOCOL,
                    format!("this agent already replicates {} VMs, the most one agent may; the operator can move VMs away (ferry vms move)", crate::control::MAX_VMS_PER_AGENT),
                ))
            }
            Ok(crate::control::Claim::Restricted) => {
                return Err(refusal(
                    refuse::NOT_OWNER,
                    format!("this agent was enrolled with a token for one VM and may replicate only that one; have the operator move VM '{vm}' to it (ferry vms move {vm} --to {}) or enroll this machine with the passphrase", self.agent),
                ))
            }
            Ok(crate::control::Claim::Owned) => {}
            Ok(crate::control::Claim::New) => {
                tracing::info!(vm, agent = %self.agent, "the VM now belongs to this agent");
            }
            Ok(crate::control::Claim::NotOwner) => {
                tracing::warn!(vm, agent = %self.agent, peer = %self.peer, "refused: the VM belongs to another agent");
                return Err(refusal(
                    refuse::NOT_OWNER,
                    format!("VM name '{vm}' belongs to another agent; give each machine its own --vm name, or have the operator move it to this agent (ferry vms move {vm} --to {})", self.agent),
                ));
            }
            Err(e) => {
                tracing::error!(vm, error = %e, "cannot record the VM's owner");
                return Err(refusal(
                    refuse::INTERNAL,
                    "cannot record the VM's owner; see the process server log",
                ));
            }
        }
        if self.shared.quarantine.contains(vm) {
            return Err(Kill::Quarantined.refusal(vm));
        }
        match tokio::task::block_in_place(|| {
            ferry_apply::lifecycle::is_retired(&self.shared.store_root, vm)
        }) {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(vm, agent = %self.agent, "refused: the VM's migration was completed");
                return Err(Kill::Retired.refusal(vm));
            }
            Err(e) => {
                // Retried by the agent: nothing is decided on a record that cannot be read.
                tracing::error!(vm, error = %e, "cannot read the VM's lifecycle record; its agent is asked to retry until it can be read");
                return Err(refusal(
                    refuse::INTERNAL,
                    "the process server cannot read this VM's lifecycle record; retrying (see its log)",
                ));
            }
        }
        let mut vms = self.shared.vms.lock().expect("vms lock");
        if let Some(slot) = vms.get(vm) {
            if slot.agent == self.agent {
                tracing::info!(vm, agent = %self.agent, "a newer connection of the agent replaces the older one");
                let _ = slot.cancel.send(Some(Kill::Replaced));
            } else {
                // This agent owns the VM now (a move): the former owner's connection goes.
                tracing::warn!(vm, agent = %slot.agent, "closing the former owner's connection: the VM was moved");
                let _ = slot.cancel.send(Some(Kill::Moved));
            }
        }
        let (tx, rx) = watch::channel(None);
        vms.insert(
            vm.to_string(),
            VmSlot {
                agent: self.agent.clone(),
                conn: self.id,
                cancel: tx,
                ctl: self.ctl.clone(),
                remote_cutover: false,
                claimed: std::time::Instant::now(),
            },
        );
        self.vm = Some(vm.to_string());
        drop(vms);
        let counters =
            self.shared
                .board
                .connected(vm, &self.agent, &self.peer, self.id, self.points.clone());
        *self.track.lock().expect("track lock") = Some(AckTrack::new(vm, counters));
        self.shared.events.record(
            crate::events::Event::new(
                "agent",
                Some(vm),
                format!("agent connected from {}", self.peer),
            )
            .with(serde_json::json!({"agent": self.agent, "peer": self.peer, "connected": true})),
        );
        Ok(rx)
    }
}

impl Drop for VmOwner<'_> {
    fn drop(&mut self) {
        if let Some(vm) = &self.vm {
            let mut vms = self.shared.vms.lock().expect("vms lock");
            if vms.get(vm).is_some_and(|s| s.conn == self.id) {
                vms.remove(vm);
            }
            drop(vms);
            self.shared.board.disconnected(vm, self.id);
            self.shared.events.record(
                crate::events::Event::new("agent", Some(vm), "agent disconnected").with(
                    serde_json::json!({"agent": self.agent, "peer": self.peer, "connected": false}),
                ),
            );
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    owner: &mut VmOwner<'_>,
    r: &mut AsyncFrameReader<R>,
    conn: &Arc<watch::Sender<Durable>>,
    credits: &Mutex<Credits>,
) -> Result<(), Refusal> {
    let shared = owner.shared;
    let mut vm: Option<String> = None;
    // The replicas this connection's inventory named, with the sizes it gave: a run may only
    // announce those (a Begin naming another disk would make a replica nothing identifies).
    let mut inventoried: std::collections::HashMap<String, u64> = Default::default();
    let (_never, mut cancel) = watch::channel(None::<Kill>);
    let inventory_by = tokio::time::Instant::now() + crate::limits::INVENTORY_DEADLINE;
    loop {
        // Silent for too long (the writer pings; agents answer), or no Inventory in time.
        let wait_until = match vm {
            Some(_) => tokio::time::Instant::now() + crate::limits::IDLE_TIMEOUT,
            None => inventory_by,
        };
        let m = tokio::select! {
            // A cancelled connection stops at once, whatever its socket still holds.
            biased;
            _ = cancel.changed() => {
                let kill = (*cancel.borrow()).unwrap_or(Kill::Replaced);
                return Err(kill.refusal(vm.as_deref().unwrap_or("")));
            }
            m = tokio::time::timeout_at(wait_until, r.read()) => match m {
                Ok(m) => m?,
                Err(_) if vm.is_none() => {
                    return Err(refusal(
                        refuse::PROTOCOL,
                        format!("no Inventory within {:?} of authenticating", crate::limits::INVENTORY_DEADLINE),
                    ))
                }
                Err(_) => {
                    return Err(Refusal {
                        dropped: true,
                        ..refusal(
                            refuse::PROTOCOL,
                            format!("no frame in {:?}: the agent is gone", crate::limits::IDLE_TIMEOUT),
                        )
                    })
                }
            },
        };
        let Some(m) = m else { break };
        if let Some(seq) = m.seq() {
            let cost = m.frame_len()? as u64;
            if !credits.lock().expect("credits lock").try_take(cost) {
                return Err(refusal(refuse::PROTOCOL, "credit overrun"));
            }
            let Some(vm) = vm.clone() else {
                return Err(refusal(refuse::PROTOCOL, "a record before Inventory"));
            };
            if let Message::Begin { disks, .. } = &m {
                for (d, size) in disks {
                    match inventoried.get(d) {
                        None => {
                            return Err(refusal(
                                refuse::PROTOCOL,
                                format!("the run announces disk '{d}', which this connection's inventory did not name"),
                            ))
                        }
                        Some(s) if s != size => {
                            return Err(refusal(
                                refuse::PROTOCOL,
                                format!("the run announces disk '{d}' of {size} bytes; the inventory said {s} bytes"),
                            ))
                        }
                        Some(_) => {}
                    }
                }
            }
            check_record(shared, &vm, &m)?;
            // The keyed digests before the lock: they depend on nothing shared.
            let prepared = prepare(&shared.key, vm.clone(), &m);
            // Ownership, the run's state and the hand-over to the committer under one lock: once
            // a newer connection claims the VM, nothing of this one reaches the cache.
            let vms = shared.vms.lock().expect("vms lock");
            if vms.get(&vm).is_none_or(|slot| slot.conn != owner.id) {
                // Taken from this connection: say why (replaced, revoked, moved).
                let kill = (*cancel.borrow()).unwrap_or(Kill::Replaced);
                return Err(kill.refusal(&vm));
            }
            // Once a VM is quarantined nothing more of it reaches the committer: what a release
            // waits for (a barrier through the committer) is then everything there is.
            if shared.quarantine.contains(&vm) {
                return Err(Kill::Quarantined.refusal(&vm));
            }
            shared
                .held
                .record(&vm, &m)
                .map_err(|(code, why)| refusal(code, why))?;
            if let Some(t) = owner.track.lock().expect("track lock").as_mut() {
                t.received(&shared.board, seq, &m);
            }
            let a = Append {
                conn: conn.clone(),
                seq,
                cost,
                entries: prepared.finish(m),
            };
            shared.inflight.fetch_add(cost, Ordering::Relaxed);
            let sent = shared.commits.send(a);
            drop(vms);
            if sent.is_err() {
                return Err(refusal(
                    refuse::INTERNAL,
                    "the cache is closed (server stopping or failed)",
                ));
            }
            continue;
        }
        match m {
            Message::Inventory { vm: v, disks } => {
                if let Err(e) = ferry_job::validate_name("VM", &v) {
                    return Err(refusal(refuse::PROTOCOL, e.to_string()));
                }
                for d in &disks {
                    if let Err(e) = ferry_job::validate_name("disk", &d.name) {
                        return Err(refusal(refuse::PROTOCOL, e.to_string()));
                    }
                }
                match &vm {
                    Some(old) => {
                        return Err(refusal(
                            refuse::PROTOCOL,
                            format!("a second Inventory (VM '{v}') on a connection for '{old}'"),
                        ))
                    }
                    None => cancel = owner.claim(&v)?,
                }
                // Everything received for this VM before (on an older connection) is durable
                // before the Holding says what is held: a barrier through the committer (FIFO).
                commit_barrier(shared).await?;
                let (open, held) = shared
                    .held
                    .inventory(&v, &disks)
                    .map_err(|(code, why)| refusal(code, why))?;
                tracing::info!(vm = %v, disks = disks.len(), open = open != ferry_wire::NO_RUN, "inventory");
                inventoried = held
                    .iter()
                    .zip(&disks)
                    .map(|(h, d)| (h.replica.clone(), d.size))
                    .collect();
                let _ = owner.ctl.send(Message::Holding {
                    store: shared.held.store_id().to_owned(),
                    open,
                    disks: held,
                });
                // The policy's cut intervals for the VM (the agent's own where it sets none).
                let (crash_every_ms, app_every_ms) = shared.policy_of(&v).wire();
                let _ = owner.ctl.send(Message::Policy {
                    crash_every_ms,
                    app_every_ms,
                });
                vm = Some(v);
            }
            Message::Notice {
                kind,
                freeze_us,
                text,
            } => {
                // Before the Inventory there is no VM to tell about: ignored.
                if let Some(vm) = &vm {
                    notice(shared, vm, kind, freeze_us, &text);
                }
            }
            Message::Ping { .. } | Message::Pong { .. } | Message::CutDone { .. } => {}
            m => {
                return Err(refusal(
                    refuse::PROTOCOL,
                    format!("unexpected {} from an agent", m.ty().name()),
                ))
            }
        }
    }
    Ok(())
}

/// Events an agent's notices may make per VM: a burst of [`NOTICE_BURST`], then one every
/// [`NOTICE_EVERY`]; the rest are counted and said with the next one (an agent cannot flood the
/// event log and rotate the history away).
const NOTICE_BURST: f64 = 10.0;
const NOTICE_EVERY: Duration = Duration::from_secs(10);

/// Whether `vm` may record a notice event now, and how many were held back before it.
fn notice_allowed(shared: &Shared, vm: &str) -> Option<u64> {
    let mut m = shared.notice_budget.lock().expect("notice budget lock");
    let now = std::time::Instant::now();
    let b = m.entry(vm.to_owned()).or_insert((NOTICE_BURST, now, 0));
    b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() / NOTICE_EVERY.as_secs_f64())
        .min(NOTICE_BURST);
    b.1 = now;
    if b.0 >= 1.0 {
        b.0 -= 1.0;
        Some(std::mem::take(&mut b.2))
    } else {
        b.2 += 1;
        None
    }
}

/// An event from what an agent said, rate-limited per VM.
fn notice_event(shared: &Shared, kind: &str, vm: &str, text: String) {
    if let Some(held) = notice_allowed(shared, vm) {
        let text = if held > 0 {
            format!("{text} ({held} earlier notice(s) of this VM not recorded: too many)")
        } else {
            text
        };
        shared
            .events
            .record(crate::events::Event::new(kind, Some(vm), text));
    }
}

/// What an agent reported: metrics, the status board, and the event log.
fn notice(shared: &Shared, vm: &str, kind: u8, freeze_us: u64, text: &str) {
    use ferry_wire::notice;
    // Agent text reaches terminals (`ferry events`, `ferry status`): no control characters.
    let text = &crate::events::printable(text);
    match kind {
        notice::CUT if freeze_us > 0 => {
            // The kind is one of two words; anything else an agent sends is not a label.
            let kind = if text == "app" { "app" } else { "crash" };
            metrics::histogram!(crate::metrics::CUT_FREEZE_SECONDS, "kind" => kind)
                .record(freeze_us as f64 / 1e6);
        }
        notice::INTERVALS => {
            let mut w = text.split_whitespace();
            let crash = w.next().and_then(|c| c.parse::<u64>().ok());
            let app = w.next().map(|a| a.parse::<u64>().ok());
            let from = w.next().unwrap_or("agent");
            if let (Some(crash), Some(app)) = (crash, app) {
                shared.board.intervals(
                    vm,
                    Duration::from_millis(crash),
                    app.map(Duration::from_millis),
                    from,
                );
            }
        }
        notice::PROGRESS => {
            let mut w = text.split_whitespace().map(|x| x.parse::<u64>().ok());
            if let (Some(Some(left)), Some(Some(total))) = (w.next(), w.next()) {
                shared.board.progress(vm, left.min(total), total);
            }
        }
        notice::RESYNC => {
            shared.board.resync(vm, Some(text.to_owned()));
            notice_event(shared, "resync", vm, format!("resync: {text}"));
        }
        notice::CUT_ABANDONED => {
            shared.board.abandoned(vm, text);
            notice_event(shared, "cut", vm, text.to_owned());
        }
        notice::HOOK_FAILED => notice_event(shared, "hook", vm, text.to_owned()),
        notice::REMOTE_CUTOVER => {
            if let Some(slot) = shared.vms.lock().expect("vms lock").get_mut(vm) {
                slot.remote_cutover = true;
            }
        }
        notice::CUTOVER_FAILED => {
            let root = shared.store_root.clone();
            let why = text.to_owned();
            // Only the answer to a request: an agent cannot make up outcomes nobody asked for.
            if tokio::task::block_in_place(|| {
                ferry_apply::lifecycle::remote::pending(&root, vm)
                    && ferry_apply::lifecycle::remote::failed(&root, vm, &why).is_ok()
            }) {
                shared.events.record(crate::events::Event::new(
                    "cutover",
                    Some(vm),
                    format!("the cutover asked of the source failed: {why}"),
                ));
            }
        }
        notice::CUTOVER | notice::CUTOVER_ROLLBACK => {
            // Not rate-limited: rare, and a repeated cutover notice records nothing.
            let (kind, text) = (kind, text.to_owned());
            if let Some(e) = tokio::task::block_in_place(|| cutover_notice(shared, vm, kind, &text))
            {
                shared.events.record(e);
            }
        }
        _ => {}
    }
}

/// `ferry-agent cutover` (or its rollback) on the VM's source: the VM's lifecycle record says
/// which point is `final` (only a point the store lists), held against retention, or goes again.
/// The agent sends the cutover at every connection until it is rolled back: recording the same
/// point again changes nothing and says nothing. Returns the event, if any.
fn cutover_notice(shared: &Shared, vm: &str, kind: u8, text: &str) -> Option<crate::events::Event> {
    use ferry_apply::lifecycle::{self, Lifecycle};
    let root = &shared.store_root;
    let ev = |msg: String| Some(crate::events::Event::new("cutover", Some(vm), msg));
    const HOLD: &str = "cutover-final";
    let seq_of = |id: &str| id.split('-').next()?.parse::<u64>().ok();
    let release = |id: Option<&str>| {
        if let Some(seq) = id.and_then(seq_of) {
            if let Err(e) = ferry_store::readers::release_hold(root, vm, seq, HOLD) {
                tracing::warn!(vm, error = %e, "cannot release the final point's hold");
            }
        }
    };
    if kind == ferry_wire::notice::CUTOVER_ROLLBACK {
        let r = lifecycle::update(root, vm, |cur| match cur {
            Some(l) if l.state == lifecycle::CUT_OVER => {
                let p = l.final_point.clone();
                Ok((None, (true, p)))
            }
            // Failed over already: the record stays, the final point's hold goes (the disks
            // exist; retention may take it).
            Some(l) => {
                let p = l.final_point.clone();
                Ok((Some(l), (false, p)))
            }
            None => Ok((None, (false, None))),
        });
        return match r {
            Ok((true, p)) => {
                release(p.as_deref());
                ev("cutover rolled back: the source is writable and replicates again".into())
            }
            Ok((false, p)) => {
                release(p.as_deref());
                ev("the source rolled a cutover back; the VM is not cut over here (failed over already, or never recorded)".into())
            }
            Err(e) => {
                tracing::error!(vm, error = %e, "cannot record the cutover's rollback");
                ev(format!(
                    "cutover rolled back on the source, but not recorded here: {e}"
                ))
            }
        };
    }
    let point = ferry_store::load_manifest_at(root, vm)
        .ok()
        .flatten()
        .and_then(|m| m.points.into_iter().find(|p| p.id == text));
    let Some(point) = point else {
        tracing::warn!(
            vm,
            point = text,
            "a cutover notice names a point the store does not list; ignored"
        );
        return ev(format!(
            "cutover notice ignored: point {text} is not in the store"
        ));
    };
    // Held first: retention must not take the final point while the record names it.
    if let Err(e) =
        ferry_store::readers::hold_point(root, vm, point.seq, HOLD, "the cutover's final point")
    {
        tracing::error!(vm, error = %e, "cannot hold the cutover's final point");
        return ev(format!(
            "cutover final point {text} not recorded: cannot hold it: {e}"
        ));
    }
    // (changed, the final point it replaced)
    let r = lifecycle::update(root, vm, |cur| match cur {
        Some(l) if l.state == lifecycle::CUT_OVER && l.final_point.as_deref() == Some(text) => {
            Ok((Some(l), (false, None)))
        }
        Some(l) if l.state != lifecycle::CUT_OVER => Err(format!("the VM is {} already", l.state)),
        cur => {
            let mut l = cur.unwrap_or_else(|| Lifecycle::new(vm, lifecycle::CUT_OVER));
            let before = l.final_point.replace(text.to_owned());
            Ok((Some(l), (true, before)))
        }
    });
    match r {
        Ok((changed, before)) => {
            // A cutover asked by `ferry failover --shutdown-source` is answered.
            ferry_apply::lifecycle::remote::done(root, vm);
            if before.as_deref() != Some(text) {
                release(before.as_deref());
            }
            if !changed {
                return None;
            }
            ev(format!(
                "cutover: the source's writes are blocked; final point {text} (fail over with: ferry failover --vm {vm} --point final)"
            ))
        }
        Err(e) => {
            // Not recorded: not held either (unless the record names it already).
            let named = lifecycle::load(root, vm)
                .ok()
                .flatten()
                .is_some_and(|l| l.final_point.as_deref() == Some(text));
            if named {
                // The agent repeats the cutover at each connection: nothing new to say.
                return None;
            }
            release(Some(text));
            tracing::warn!(vm, error = %e, "cutover notice not recorded");
            ev(format!("cutover notice for point {text} not recorded: {e}"))
        }
    }
}

/// Waits until every record handed to the committer so far is durable.
/// Blocks until everything handed to the committer before the call is durable (for threads off
/// the runtime: the drain loop's releases). False if the committer is gone.
pub(crate) fn commit_barrier_blocking(shared: &Shared) -> bool {
    let (tx, rx) = watch::channel(Durable::default());
    let barrier = Append {
        conn: Arc::new(tx),
        seq: 1,
        cost: 0,
        entries: Vec::new(),
    };
    if shared.commits.send(barrier).is_err() {
        return false;
    }
    let t = std::time::Instant::now();
    while rx.borrow().seq < 1 {
        if rx.has_changed().is_err() || t.elapsed() > Duration::from_secs(60) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

async fn commit_barrier(shared: &Shared) -> Result<(), Refusal> {
    let (tx, mut rx) = watch::channel(Durable::default());
    let barrier = Append {
        conn: Arc::new(tx),
        seq: 1,
        cost: 0,
        entries: Vec::new(),
    };
    if shared.commits.send(barrier).is_err() {
        return Err(refusal(
            refuse::INTERNAL,
            "the cache is closed (server stopping or failed)",
        ));
    }
    while rx.borrow_and_update().seq < 1 {
        if rx.changed().await.is_err() {
            return Err(refusal(
                refuse::INTERNAL,
                "the cache could not be synced; see the process server log",
            ));
        }
    }
    Ok(())
}

/// Refuses a `Begin` the pipeline could not apply: a bad disk name, or a disk whose size differs
/// from its replica's (resizes are not followed yet). The run's own checks (bases, records inside
/// the open run, ranges, the tag) are [`crate::held::Held::record`]'s.
fn check_record(shared: &Shared, vm: &str, m: &Message) -> Result<(), Refusal> {
    let Message::Begin { disks, .. } = m else {
        return Ok(());
    };
    let manifest = ferry_store::load_manifest_at(&shared.store_root, vm).map_err(|e| {
        tracing::error!(error = %e, vm, "cannot read the manifest");
        refusal(
            refuse::INTERNAL,
            "cannot read the VM's manifest; see the process server log",
        )
    })?;
    for (d, size) in disks {
        ferry_job::validate_name("disk", d)
            .map_err(|e| refusal(refuse::PROTOCOL, e.to_string()))?;
        if let Some(was) = manifest.as_ref().and_then(|m| m.disks.get(d)?.known_size()) {
            if was != *size {
                return Err(refusal(
                    refuse::PROTOCOL,
                    crate::held::resize_message(vm, d, was, *size),
                ));
            }
            continue;
        }
        // No point holds the disk yet, but a replica may exist (a run that never got its tag):
        // its page count is what the applier will hold the run to.
        let dir = shared.store_root.join("replicas").join(vm).join(d);
        if dir.join("current.map").exists() {
            let pages = tokio::task::block_in_place(|| {
                ferry_store::Replica::open_readonly(&dir).map(|r| r.pages())
            })
            .map_err(|e| {
                tracing::error!(error = %e, vm, disk = %d, "cannot read the replica");
                refusal(
                    refuse::INTERNAL,
                    "cannot read the disk's replica; see the process server log",
                )
            })?;
            if pages != ferry_store::replica::pages_for(*size) {
                return Err(refusal(
                    refuse::PROTOCOL,
                    format!(
                        "disk '{d}' of VM '{vm}' is {size} bytes, but its replica (from a run that never became a point) was made for another size; resizes are not followed yet — protect the machine under a new --vm name or the disk as a new disk"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A record as cache entries; Writes split at 64 KiB boundaries, keyed-digested, zero pieces as
/// zero ranges.
/// A record's cache entries, built before the VM lock (the keyed digests depend on nothing
/// shared). A Write that is one piece (inside one chunk, not zero: what ferry-agent sends) gives its
/// buffer to its entry instead of a copy; [`Prepared::finish`] moves it once the checks under the
/// lock, which read the message, are done.
struct Prepared<'a> {
    entries: Vec<CacheEntry>,
    /// `entries` is one Write whose data is still in the message.
    moves: bool,
    /// For the copying path, should `finish` get another message than `prepare` did.
    key: &'a MasterKey,
    vm: String,
}

impl Prepared<'_> {
    /// The entries, given the message they were prepared from. Never panics (it runs under the
    /// VM lock): a message that does not match what was prepared is cut and copied afresh.
    fn finish(mut self, m: Message) -> Vec<CacheEntry> {
        if !self.moves {
            return self.entries;
        }
        match (self.entries.as_mut_slice(), m) {
            ([CacheEntry::Write { data, .. }], Message::Write { data: whole, .. }) => {
                *data = whole;
                self.entries
            }
            (_, other) => {
                debug_assert!(
                    false,
                    "prepared from a one-piece Write, finished with {other:?}"
                );
                to_entries(self.key, self.vm, &other)
            }
        }
    }
}

fn prepare<'a>(key: &'a MasterKey, vm: String, m: &Message) -> Prepared<'a> {
    if let Message::Write {
        disk, offset, data, ..
    } = m
    {
        let room = CHUNK_SIZE - (offset % CHUNK_SIZE as u64) as usize;
        if data.len() <= room && !is_zero(data) {
            return Prepared {
                entries: vec![CacheEntry::Write {
                    vm: vm.clone(),
                    disk: disk.clone(),
                    offset: *offset,
                    digest: key.digest(data),
                    data: Vec::new(),
                }],
                moves: true,
                key,
                vm,
            };
        }
    }
    Prepared {
        entries: to_entries(key, vm.clone(), m),
        moves: false,
        key,
        vm,
    }
}

/// A record's cache entries, each piece of a Write (cut at chunk boundaries) copied.
fn to_entries(key: &MasterKey, vm: String, m: &Message) -> Vec<CacheEntry> {
    match m {
        Message::Begin {
            run,
            time_ns,
            disks,
            ..
        } => vec![CacheEntry::Begin {
            vm,
            run: *run,
            time_ns: *time_ns,
            disks: disks.clone(),
        }],
        Message::Write {
            disk, offset, data, ..
        } => {
            let mut out = Vec::new();
            let mut pos = 0usize;
            while pos < data.len() {
                let off = offset + pos as u64;
                let room = CHUNK_SIZE - (off % CHUNK_SIZE as u64) as usize;
                let piece = &data[pos..(pos + room).min(data.len())];
                out.push(if is_zero(piece) {
                    CacheEntry::Zero {
                        vm: vm.clone(),
                        disk: disk.clone(),
                        offset: off,
                        len: piece.len() as u64,
                    }
                } else {
                    CacheEntry::Write {
                        vm: vm.clone(),
                        disk: disk.clone(),
                        offset: off,
                        digest: key.digest(piece),
                        data: piece.to_vec(),
                    }
                });
                pos += piece.len();
            }
            out
        }
        Message::Zero {
            disk, offset, len, ..
        }
        | Message::Discard {
            disk, offset, len, ..
        } => vec![CacheEntry::Zero {
            vm,
            disk: disk.clone(),
            offset: *offset,
            len: *len,
        }],
        Message::Tag { tag, .. } => vec![CacheEntry::Tag {
            vm,
            tag: tag.clone(),
        }],
        _ => Vec::new(),
    }
}

/// Sends acks as records become durable, credit as acks free it (while the cache is under its
/// high watermark), and a refusal if the reader hits one.
/// How long one write to an agent may block (its socket buffer full because it does not read)
/// before the connection is given up.
const SEND_WITHIN: Duration = Duration::from_secs(30);

/// Whether a write finished, and without error, within [`SEND_WITHIN`].
async fn within<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> bool {
    matches!(tokio::time::timeout(SEND_WITHIN, f).await, Ok(Ok(_)))
}

async fn write_loop<S: AsyncWrite>(
    shared: Arc<Shared>,
    mut w: Writer<S>,
    mut durable: watch::Receiver<Durable>,
    // The connection's credit mirror and what its Welcome granted.
    (credits, initial_grant): (Arc<Mutex<Credits>>, u64),
    mut refusals: mpsc::Receiver<Refusal>,
    track: Track,
    (mut points, mut ctl): (
        mpsc::UnboundedReceiver<([u8; 16], String)>,
        mpsc::UnboundedReceiver<Message>,
    ),
) {
    // After the ack is sent: the status board's per-disk seqs and per-VM bytes.
    let note = |seq: u64| {
        if let Some(t) = track.lock().expect("track lock").as_mut() {
            t.acked(seq);
        }
    };
    let mut acked = Durable::default();
    // Credit granted so far; `granted - acked.bytes` is what the agent may still have in flight
    // or unused, and is kept at the connection's fair share.
    let mut granted = initial_grant;
    let mut paused = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + crate::limits::PING_EVERY,
        crate::limits::PING_EVERY,
    );
    let mut pings = 0u64;
    // The connection's VM, once its Inventory claimed it.
    let mut vm: Option<String> = None;
    loop {
        tokio::select! {
            _ = ping.tick() => {
                // Keeps a quiet agent's connection alive (its Pong is a frame: see IDLE_TIMEOUT)
                // and finds a dead one.
                pings += 1;
                if !within(w.send(&Message::Ping { token: pings })).await || !within(w.flush()).await {
                    return;
                }
            }
            r = refusals.recv() => {
                if let Some(why) = r {
                    let _ = tokio::time::timeout(SEND_WITHIN, send_refusal(&mut w, &why)).await;
                }
                let _ = within(w.flush()).await;
                return;
            }
            c = durable.changed() => {
                if c.is_err() {
                    // The connection's reader is gone; finish with what is durable.
                    let d = *durable.borrow();
                    if d.seq > acked.seq {
                        let _ = within(w.send(&Message::Ack { seq: d.seq })).await;
                        let _ = within(w.flush()).await;
                        note(d.seq);
                    }
                    // Wait for a possible refusal, then close.
                    if let Some(why) = refusals.recv().await {
                        let _ = tokio::time::timeout(SEND_WITHIN, send_refusal(&mut w, &why)).await;
                    }
                    let _ = within(w.flush()).await;
                    return;
                }
                let d = *durable.borrow_and_update();
                if d.seq > acked.seq && !within(w.send(&Message::Ack { seq: d.seq })).await {
                    return;
                }
                if d.seq > acked.seq {
                    note(d.seq);
                }
                acked = d;
            }
            Some((run, id)) = points.recv() => {
                if !within(w.send(&Message::Point { run, id })).await {
                    return;
                }
            }
            Some(m) = ctl.recv() => {
                if !within(w.send(&m)).await {
                    return;
                }
            }
            _ = tick.tick() => {}
        }
        // Backpressure: above the high watermark, stop granting until under the low one.
        let used = shared.cache.used_bytes();
        if paused && used <= shared.low_watermark {
            paused = false;
            shared.board.paused(false);
            tracing::info!(used, "cache below its low watermark: granting credit again");
        } else if !paused && used >= shared.high_watermark {
            paused = true;
            shared.board.paused(true);
            tracing::info!(
                used,
                "cache above its high watermark: pausing credit (backpressure)"
            );
        }
        // The drain behind by more than [`crate::DRAIN_LAG`]: nothing more until it catches up.
        let busy = shared.inflight.load(Ordering::Relaxed) > crate::MAX_INFLIGHT
            || used >= shared.lag_limit.current();
        let held = granted.saturating_sub(acked.bytes);
        let mut share = fair_share(&shared);
        if vm.is_none() {
            vm = track
                .lock()
                .expect("track lock")
                .as_ref()
                .map(|t| t.vm().to_owned());
        }
        // Throttled: at most a quarter second of the VM's rate outstanding, granted as its
        // bucket fills ([`crate::pacer`]). Before the Inventory names the VM, nothing while any
        // throttle applies.
        let paced = match &vm {
            Some(vm) if shared.pacer.limited(vm) => {
                share = share.min(shared.pacer.window(vm));
                Some(vm.as_str())
            }
            Some(_) => None,
            None if shared.pacer.any() => {
                share = 0;
                None
            }
            None => None,
        };
        if held < share && !paused && !busy {
            let more = match paced {
                Some(vm) => shared.pacer.take(vm, share - held),
                None => share - held,
            };
            if more > 0 {
                credits.lock().expect("credits lock").grant(more);
                if !within(w.send(&Message::Credit { bytes: more })).await {
                    return;
                }
                granted += more;
            }
        }
        if !within(w.flush()).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_cut_at_chunk_boundaries_and_zero_pieces_become_ranges() {
        let key = MasterKey::from_bytes(&[1; 32], std::path::Path::new("test"));
        let c = CHUNK_SIZE as u64;
        // 4 KiB before a boundary, a whole zero chunk, then 8 KiB of data.
        let mut data = vec![7u8; 4096];
        data.extend(vec![0u8; CHUNK_SIZE]);
        data.extend(vec![9u8; 8192]);
        let m = Message::write(1, "sda", c - 4096, data);
        let e = to_entries(&key, "vm".into(), &m);
        assert_eq!(e.len(), 3);
        match &e[0] {
            CacheEntry::Write {
                offset,
                digest,
                data,
                ..
            } => {
                assert_eq!((*offset, data.len()), (c - 4096, 4096));
                assert_eq!(*digest, key.digest(&[7u8; 4096]));
            }
            x => panic!("{x:?}"),
        }
        assert!(matches!(&e[1], CacheEntry::Zero { offset, len, .. } if *offset == c && *len == c));
        assert!(
            matches!(&e[2], CacheEntry::Write { offset, data, .. } if *offset == 2 * c && data.len() == 8192)
        );
        // Prepared the same way: copied, the message keeps its buffer.
        let p = prepare(&key, "vm".into(), &m);
        assert!(!p.moves);
        assert_eq!(p.finish(m), e);
    }

    #[test]
    fn a_one_piece_write_moves_its_buffer_into_its_entry() {
        let key = MasterKey::from_bytes(&[1; 32], std::path::Path::new("test"));
        let c = CHUNK_SIZE as u64;
        for (offset, len) in [
            (3 * c, CHUNK_SIZE),
            (3 * c + 512, 4096),
            (4 * c - 4096, 4096),
        ] {
            let data = vec![5u8; len];
            let at = data.as_ptr();
            let m = Message::write(1, "sda", offset, data);
            let want = to_entries(&key, "vm".into(), &m);
            let p = prepare(&key, "vm".into(), &m);
            assert!(p.moves, "{offset} {len}");
            let e = p.finish(m);
            assert_eq!(e, want);
            match &e[..] {
                [CacheEntry::Write { data, .. }] => assert_eq!(data.as_ptr(), at, "copied"),
                x => panic!("{x:?}"),
            }
        }
        // Across a boundary or zero: pieces, as before.
        for (offset, data) in [(c - 512, vec![5u8; 1024]), (c, vec![0u8; 4096])] {
            let m = Message::write(1, "sda", offset, data);
            assert!(!prepare(&key, "vm".into(), &m).moves);
        }
    }
}
