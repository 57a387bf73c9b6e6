//! `ferry agents …` and `ferry vms …`: who may replicate what, on the process server's state
//! directory (`ferry_serve::control`). They work whether or not `ferry serve` runs; a running server
//! applies a change within a second (a revoked agent's connections are closed, a moved VM's former
//! owner is disconnected).

use std::path::{Path, PathBuf};

use ferry_job::JobError;
use ferry_serve::control::{Control, ControlError};
use ferry_serve::events::Event;
use serde_json::json;

use crate::server::{resolve_state_dir, ConfigArg};

fn err(e: ControlError) -> JobError {
    match e {
        ControlError::Usage(m) => JobError::Usage(m),
        other => JobError::Usage(other.to_string()),
    }
}

/// Records what the operator did in the server's event log (`ferry events`); a failure to record
/// is a warning, not a failure of the command.
pub(crate) fn operator_event(dir: &Path, e: Event) {
    if let Err(err) = ferry_serve::events::append(dir, &e) {
        errln!(
            "warning: cannot record the event in {}: {err}",
            ferry_serve::events::path(dir).display()
        );
    }
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// The server's status file, if any (connections, peers).
fn status(dir: &Path) -> Option<ferry_serve::status::StatusFile> {
    ferry_serve::status::read_status(&dir.join(ferry_serve::status::STATUS_FILE)).ok()
}

/// The state directory the operator means (it must exist) and its control files.
fn open_state(
    state_dir: Option<PathBuf>,
    config: &ConfigArg,
) -> Result<(PathBuf, Control), JobError> {
    let dir = resolve_state_dir(state_dir, config)?;
    no_state(&dir)?;
    let c = Control::new(&dir);
    Ok((dir, c))
}

/// The state directory the operator means, which must exist.
pub(crate) fn existing_state_dir(
    state_dir: Option<PathBuf>,
    config: &ConfigArg,
) -> Result<PathBuf, JobError> {
    let dir = resolve_state_dir(state_dir, config)?;
    no_state(&dir)?;
    Ok(dir)
}

fn no_state(dir: &Path) -> Result<(), JobError> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(JobError::Usage(format!(
        "{} is not a process server state directory (it does not exist); give the one `ferry serve` uses (--state-dir, or state_dir in the config file)",
        dir.display()
    )))
}

/// `ferry agents list`.
pub(crate) fn agents_list(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    as_json: bool,
) -> Result<(), JobError> {
    let (dir, c) = open_state(state_dir, &config)?;
    let reg = c.registry().map_err(err)?;
    let owners = c.owners().map_err(err)?;
    let st = status(&dir);
    let mut out = Vec::new();
    for (id, rec) in reg.agents() {
        let id = id.to_string();
        let vms: Vec<&String> = owners
            .iter()
            .filter(|(_, o)| o.agent == id)
            .map(|(vm, _)| vm)
            .collect();
        let conns: Vec<&ferry_serve::status::VmStatus> = st
            .iter()
            .filter(|s| s.running)
            .flat_map(|s| s.vms.iter())
            .filter(|v| v.agent.as_deref() == Some(id.as_str()))
            .collect();
        let connected = conns.iter().any(|v| v.connected);
        let address = conns.iter().find_map(|v| v.peer.clone());
        let last_connected = conns.iter().filter_map(|v| v.since.clone()).max();
        out.push(json!({
            "id": id,
            "hostname": rec.hostname,
            "registered": rfc3339(rec.registered),
            "auth": rec.auth_kind(),
            "only_vm": rec.only_vm,
            "vms": vms,
            "connected": connected,
            "address": address,
            "last_connected": last_connected,
        }));
    }
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    if out.is_empty() {
        outln!("no agents registered (ferry-agent register, with the passphrase from `ferry passphrase show`)");
        return Ok(());
    }
    for a in &out {
        let vms: Vec<&str> = a["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        outln!(
            "{}  {}  registered {}  VMs: {}  {}",
            a["id"].as_str().unwrap_or(""),
            a["hostname"].as_str().unwrap_or(""),
            a["registered"].as_str().unwrap_or(""),
            if vms.is_empty() {
                "none".to_string()
            } else {
                vms.join(", ")
            },
            match (a["connected"].as_bool(), a["address"].as_str()) {
                (Some(true), Some(p)) => format!("connected from {p}"),
                (Some(true), None) => "connected".to_string(),
                _ => "not connected".to_string(),
            }
        );
        if let Some(vm) = a["only_vm"].as_str() {
            outln!("    enrolled with a token for VM {vm}: claims no other VM name");
        }
        if a["auth"] == "legacy credential" {
            outln!("    auth: legacy credential (registered before agent keys; moves to a key at its next connection)");
        }
    }
    Ok(())
}

/// `ferry agents revoke ID`.
pub(crate) fn agents_revoke(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    id: &str,
) -> Result<(), JobError> {
    let (dir, c) = open_state(state_dir, &config)?;
    if !c.revoke(id).map_err(err)? {
        return Err(JobError::Usage(format!(
            "no registered agent {id}; `ferry agents list` shows them"
        )));
    }
    let vms: Vec<String> = c
        .owners()
        .map_err(err)?
        .into_iter()
        .filter(|(_, o)| o.agent == id)
        .map(|(vm, _)| vm)
        .collect();
    operator_event(
        &dir,
        Event::new("agent", None, format!("operator revoked agent {id}"))
            .with(json!({"agent": id, "revoked": true, "vms": vms})),
    );
    outln!(
        "revoked agent {id}: it can no longer connect, and a running ferry serve closes its connections within a second."
    );
    if !vms.is_empty() {
        outln!(
            "its VMs ({}) keep their points and stay reserved; give them to the rebuilt machine's agent with: ferry vms move VM --to AGENT",
            vms.join(", ")
        );
    }
    Ok(())
}

/// `ferry vms list`.
pub(crate) fn vms_list(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    as_json: bool,
) -> Result<(), JobError> {
    let (dir, c) = open_state(state_dir, &config)?;
    let reg = c.registry().map_err(err)?;
    let owners = c.owners().map_err(err)?;
    let st = status(&dir);
    let out: Vec<serde_json::Value> = owners
        .iter()
        .map(|(vm, o)| {
            let host = reg
                .agents()
                .find(|(id, _)| id.to_string() == o.agent)
                .map(|(_, r)| r.hostname.clone());
            let quarantine = st
                .as_ref()
                .and_then(|s| s.vms.iter().find(|v| v.vm == *vm))
                .and_then(|v| v.quarantine.clone());
            json!({
                "vm": vm,
                "owner": o.agent,
                "owner_hostname": host,
                "owner_revoked": host.is_none(),
                "since": rfc3339(o.since),
                "quarantine": quarantine,
            })
        })
        .collect();
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    if out.is_empty() {
        outln!("no VM has an owner yet (a VM belongs to the first agent that replicates it)");
    }
    for v in &out {
        outln!(
            "{}  owner {} ({})  since {}",
            v["vm"].as_str().unwrap_or(""),
            v["owner"].as_str().unwrap_or(""),
            v["owner_hostname"]
                .as_str()
                .unwrap_or("revoked: move this VM to another agent"),
            v["since"].as_str().unwrap_or("")
        );
        if let Some(q) = v["quarantine"].as_str() {
            outln!(
                "    QUARANTINED: {q}\n    fix the cause, then: ferry vms release {}",
                v["vm"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `ferry vms release VM`.
pub(crate) fn vms_release(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    vm: &str,
    store: Option<ferry_job::StoreLocation>,
) -> Result<(), JobError> {
    ferry_job::validate_name("VM", vm)?;
    let (dir, _) = open_state(state_dir, &config)?;
    let store = match store {
        Some(s) => s,
        None => {
            let st = status(&dir).ok_or_else(|| {
                JobError::Usage(format!(
                    "no status file in {}: name the server's store with --store",
                    dir.display()
                ))
            })?;
            ferry_job::StoreLocation::parse(&st.store)?
        }
    };
    let root = store.local_dir();
    ferry_apply::quarantine::request_release(&root, vm).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            JobError::Usage(format!("{e} (store {store})"))
        } else {
            JobError::Usage(format!(
                "cannot ask for the release in {}: {e}",
                ferry_apply::quarantine::dir(&root).display()
            ))
        }
    })?;
    operator_event(
        &dir,
        Event::new(
            "quarantine",
            Some(vm),
            "operator asked for the release from quarantine",
        ),
    );
    outln!("release of VM {vm} requested: the process server releases it once its cache holds nothing more of the VM (within seconds; at its next start if it is not running). `ferry status` shows it replicating again; its agent resyncs what its newest point does not hold.");
    Ok(())
}

/// `ferry vms move VM --to AGENT`.
pub(crate) fn vms_move(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    vm: &str,
    to: &str,
) -> Result<(), JobError> {
    let (dir, c) = open_state(state_dir, &config)?;
    let prev = c.move_vm(vm, to).map_err(err)?;
    if prev.as_ref().is_none_or(|p| p.agent != to) {
        operator_event(
            &dir,
            Event::new(
                "agent",
                Some(vm),
                format!("operator moved VM {vm} to agent {to}"),
            )
            .with(json!({"agent": to, "from": prev.as_ref().map(|p| p.agent.clone())})),
        );
    }
    match prev {
        Some(p) if p.agent == to => outln!("VM {vm} already belongs to agent {to}"),
        Some(p) => outln!(
            "VM {vm} now belongs to agent {to} (was {}); a running ferry serve disconnects the former owner within a second",
            p.agent
        ),
        None => outln!("VM {vm} now belongs to agent {to}"),
    }
    Ok(())
}

/// `ferry passphrase rotate`.
pub(crate) fn passphrase_rotate(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
) -> Result<(), JobError> {
    let dir = resolve_state_dir(state_dir, &config)?;
    no_state(&dir)?;
    let p = ferry_serve::rotate_passphrase(&dir).map_err(|e| JobError::Usage(e.to_string()))?;
    operator_event(
        &dir,
        Event::new(
            "agent",
            None,
            "operator rotated the registration passphrase",
        ),
    );
    outln!("{p}");
    errln!("the old passphrase no longer registers agents; registered agents are not affected (a running ferry serve uses the new one within a second)");
    Ok(())
}

/// `ferry agents token --vm VM --expires D`.
pub(crate) fn agents_token(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    vm: &str,
    expires: std::time::Duration,
) -> Result<(), JobError> {
    ferry_job::validate_name("VM", vm)?;
    let dir = resolve_state_dir(state_dir, &config)?;
    no_state(&dir)?;
    let (token, until) = ferry_serve::enrollment_token(&dir, vm, expires)
        .map_err(|e| JobError::Usage(e.to_string()))?;
    operator_event(
        &dir,
        Event::new(
            "agent",
            Some(vm),
            format!(
                "operator made an enrollment token for VM {vm}, valid until {}",
                humantime::format_rfc3339_seconds(until)
            ),
        ),
    );
    outln!("{token}");
    errln!(
        "one-time token for VM {vm}, valid until {}: on the machine, ferry-agent register --server HOST:PORT --passphrase-file FILE_WITH_THE_TOKEN",
        humantime::format_rfc3339_seconds(until)
    );
    Ok(())
}
