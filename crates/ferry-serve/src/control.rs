//! Who may replicate what: the agent registry (`agents.json`) and VM ownership
//! (`vm-owners.json`), both in the server's state directory, changed by the running `ferry serve`
//! (registrations, first claims) and by the operator's commands (`ferry agents revoke`, `ferry vms
//! move`), which work whether or not the server runs.
//!
//! - Every read-modify-write of either file holds `control.lock` (an exclusive `flock`) and
//!   re-reads the file first, so the server and a command never lose each other's change.
//! - Writes are atomic and durable (`ferry-durable`, mode 0600).
//! - A running server notices a change within [`WATCH_EVERY`] (it watches both files' identity:
//!   every write is a rename, so a new inode) and acts on it: a revoked agent's connections are
//!   closed with "unknown agent", a moved VM's connection of its former owner with "not owner".
//! - A VM belongs to the first agent that claims it, persistently: another agent is refused
//!   whether or not the owner is connected, and the refusal names nothing of the owner.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_wire::AgentRegistry;
use serde::{Deserialize, Serialize};

/// VM ownership, in the state directory.
pub const OWNERS_FILE: &str = "vm-owners.json";
/// Held (exclusively) around every read-modify-write of the registry or the owners.
pub const CONTROL_LOCK: &str = "control.lock";
/// The most VMs one agent may own (a guest claiming names without end would fill the owners file
/// and the store's namespace).
pub const MAX_VMS_PER_AGENT: usize = 64;
/// How often a running server looks for changes made by the operator's commands.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

const FORMAT: &str = "ferry-vm-owners";
const VERSION: u32 = 1;

/// Errors of the control files.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}; it is written only by Ferry: restore it from a backup, or move it aside to start with no owners (each VM then belongs to the first agent that connects for it)")]
    Damaged { path: PathBuf, why: String },
    #[error(transparent)]
    Registry(#[from] ferry_wire::RegistryError),
    #[error("{0}")]
    Usage(String),
}

/// The owner of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    /// The agent id (hex).
    pub agent: String,
    /// Seconds since the Unix epoch when it became the owner.
    pub since: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnersFile {
    format: String,
    version: u32,
    vms: BTreeMap<String, Owner>,
}

/// Parses `vm-owners.json`.
pub fn parse_owners(bytes: &[u8]) -> Result<BTreeMap<String, Owner>, String> {
    let f: OwnersFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if f.format != FORMAT {
        return Err(format!("not a VM owners file (format {:?})", f.format));
    }
    if f.version != VERSION {
        return Err(format!(
            "VM owners file version {} (this Ferry reads version {VERSION}); upgrade Ferry",
            f.version
        ));
    }
    for (vm, o) in &f.vms {
        if o.agent.len() != 32 || !o.agent.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("VM {vm:?}: owner {:?} is not an agent id", o.agent));
        }
    }
    Ok(f.vms)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The state directory's control files.
#[derive(Clone, Debug)]
pub struct Control {
    dir: PathBuf,
}

/// An exclusive `flock` on `control.lock`, released on drop.
pub struct ControlLock {
    _f: File,
}

/// A file's inode, size, modification and change times (every write is a rename: a new inode;
/// inode numbers are reused, so the rest too).
pub type FileStamp = (u64, u64, i64, i64, i64, i64);

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The VM was already this agent's.
    Owned,
    /// The VM had no owner: it is this agent's now (durable on return).
    New,
    /// Another agent owns it.
    NotOwner,
    /// The agent is not (any more) registered.
    Revoked,
    /// The agent owns [`MAX_VMS_PER_AGENT`] VMs already.
    TooMany,
    /// The agent was enrolled with a token for another VM: it may claim no other name.
    Restricted,
}

impl Control {
    pub fn new(state_dir: &Path) -> Control {
        Control {
            dir: state_dir.to_owned(),
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn registry_path(&self) -> PathBuf {
        self.dir.join(crate::REGISTRY_FILE)
    }

    pub fn owners_path(&self) -> PathBuf {
        self.dir.join(OWNERS_FILE)
    }

    pub fn passphrase_path(&self) -> PathBuf {
        self.dir.join(ferry_wire::PASSPHRASE_FILE)
    }

    /// Takes `control.lock` (waits for another holder: they hold it for one small file write).
    pub fn lock(&self) -> Result<ControlLock, ControlError> {
        let p = self.dir.join(CONTROL_LOCK);
        let io = |source| ControlError::Io {
            path: p.clone(),
            source,
        };
        ferry_durable::create_dir_durable(&self.dir).map_err(io)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&p)
            .map_err(io)?;
        ferry_durable::adopt_owner(&f, &self.dir).map_err(io)?;
        // SAFETY: flock on a valid, owned file descriptor has no memory-safety preconditions.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(ControlLock { _f: f })
    }

    /// The registry as on disk.
    pub fn registry(&self) -> Result<AgentRegistry, ControlError> {
        Ok(AgentRegistry::load(&self.registry_path())?)
    }

    /// The VM owners as on disk (none if the file does not exist).
    pub fn owners(&self) -> Result<BTreeMap<String, Owner>, ControlError> {
        let p = self.owners_path();
        match std::fs::read(&p) {
            Ok(b) => parse_owners(&b).map_err(|why| ControlError::Damaged { path: p, why }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(ControlError::Io { path: p, source }),
        }
    }

    /// Writes the owners (the caller holds `control.lock`).
    pub(crate) fn save_owners_locked(
        &self,
        vms: &BTreeMap<String, Owner>,
    ) -> Result<(), ControlError> {
        self.save_owners(vms)
    }

    fn save_owners(&self, vms: &BTreeMap<String, Owner>) -> Result<(), ControlError> {
        let p = self.owners_path();
        let f = OwnersFile {
            format: FORMAT.into(),
            version: VERSION,
            vms: vms.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&f).expect("owners serialize");
        bytes.push(b'\n');
        ferry_durable::write_private(&p, &bytes).map_err(|source| ControlError::Io {
            path: p.clone(),
            source,
        })
    }

    /// Claims `vm` for `agent`: the first agent to claim a VM owns it from then on. An agent no
    /// longer in the registry on disk (revoked a moment ago) claims nothing.
    pub fn claim(&self, vm: &str, agent: &str) -> Result<Claim, ControlError> {
        let _l = self.lock()?;
        let reg = self.registry()?;
        let Some((_, rec)) = reg.agents().find(|(id, _)| id.to_string() == agent) else {
            return Ok(Claim::Revoked);
        };
        let mut vms = self.owners()?;
        let me = agent.to_string();
        match vms.get(vm) {
            Some(o) if o.agent == me => Ok(Claim::Owned),
            Some(_) => Ok(Claim::NotOwner),
            None if rec.only_vm.as_deref().is_some_and(|only| only != vm) => Ok(Claim::Restricted),
            None if vms.values().filter(|o| o.agent == me).count() >= MAX_VMS_PER_AGENT => {
                Ok(Claim::TooMany)
            }
            None => {
                vms.insert(
                    vm.to_owned(),
                    Owner {
                        agent: me,
                        since: now(),
                    },
                );
                self.save_owners(&vms)?;
                Ok(Claim::New)
            }
        }
    }

    /// Gives `vm` to `to` (a registered agent): the operator's `ferry vms move`. Returns the
    /// previous owner. The VM's points, replicas and disk identities stay as they are.
    pub fn move_vm(&self, vm: &str, to: &str) -> Result<Option<Owner>, ControlError> {
        let _l = self.lock()?;
        let reg = self.registry()?;
        let Some((id, _)) = reg.agents().find(|(id, _)| id.to_string() == to) else {
            return Err(ControlError::Usage(format!(
                "no registered agent {to}; `ferry agents list` shows them"
            )));
        };
        let mut vms = self.owners()?;
        let prev = vms.insert(
            vm.to_owned(),
            Owner {
                agent: id.to_string(),
                since: now(),
            },
        );
        self.save_owners(&vms)?;
        Ok(prev)
    }

    /// Removes `id` from the registry (its VMs keep their owner entry and their points; move
    /// them to a new agent). Returns whether it was registered.
    pub fn revoke(&self, id: &str) -> Result<bool, ControlError> {
        let _l = self.lock()?;
        let mut reg = self.registry()?;
        let Some(agent) = reg.agents().map(|(a, _)| *a).find(|a| a.to_string() == id) else {
            return Ok(false);
        };
        Ok(reg.revoke(&agent)?.is_some())
    }

    /// Identity of the two control files as they are now: changes when either is rewritten.
    pub fn generation(&self) -> [Option<FileStamp>; 3] {
        let id = |p: PathBuf| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.ino(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
            })
        };
        [
            id(self.registry_path()),
            id(self.owners_path()),
            id(self.passphrase_path()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claim_owns_a_vm_and_a_move_gives_it_to_a_registered_agent() {
        let d = tempfile::tempdir().unwrap();
        let c = Control::new(d.path());
        let mut reg = c.registry().unwrap();
        let a = reg.register("a", [1; 32]).unwrap();
        let b = reg.register("b", [2; 32]).unwrap();
        assert_eq!(c.claim("web01", &a.to_string()).unwrap(), Claim::New);
        assert_eq!(c.claim("web01", &a.to_string()).unwrap(), Claim::Owned);
        assert_eq!(c.claim("web01", &b.to_string()).unwrap(), Claim::NotOwner);
        // Persistent: another Control (a restarted server) sees the same.
        let c2 = Control::new(d.path());
        assert_eq!(c2.claim("web01", &b.to_string()).unwrap(), Claim::NotOwner);
        let e = c2.move_vm("web01", "00112233445566778899aabbccddeeff");
        assert!(matches!(e, Err(ControlError::Usage(_))), "{e:?}");
        let prev = c2.move_vm("web01", &b.to_string()).unwrap();
        assert_eq!(prev.map(|o| o.agent), Some(a.to_string()));
        assert_eq!(c.claim("web01", &b.to_string()).unwrap(), Claim::Owned);
        assert_eq!(c.claim("web01", &a.to_string()).unwrap(), Claim::NotOwner);
        assert!(c.revoke(&a.to_string()).unwrap());
        assert!(!c.revoke(&a.to_string()).unwrap());
        // A cap on VMs per agent.
        for i in 0..MAX_VMS_PER_AGENT - 1 {
            assert_eq!(
                c.claim(&format!("vm{i}"), &b.to_string()).unwrap(),
                Claim::New
            );
        }
        assert_eq!(
            c.claim("one-too-many", &b.to_string()).unwrap(),
            Claim::TooMany
        );
        assert_eq!(c.claim("web01", &b.to_string()).unwrap(), Claim::Owned);
        // Revoked: it claims nothing any more.
        assert_eq!(c.claim("web09", &a.to_string()).unwrap(), Claim::Revoked);
        assert!(!c.owners().unwrap().contains_key("web09"));
        assert!(c.registry().unwrap().agents().all(|(id, _)| *id != a));
        // A damaged file is an error naming it, never "no owners".
        std::fs::write(c.owners_path(), b"{}").unwrap();
        let e = c.claim("web02", &b.to_string()).unwrap_err().to_string();
        assert!(e.contains(OWNERS_FILE), "{e}");
    }
}
