//! `ferry failover --test`: bring every disk of a VM up at one recovery point, beside running
//! replication, and take it all away again with `--cleanup`; `ferry failover list` shows what
//! exists and what existed.
//!
//! - Each test failover has a record, `STORE/failovers/ID.json` (durable), written **before**
//!   anything is made and naming every file it will make (under a lock: two at once for one VM
//!   cannot both start).
//! - Its disks go into a new directory `--to/VM-ID`, made mode 0700 by the failover itself: no one
//!   can plant a file or a link where they are written. A cleanup removes only the files named in
//!   the record, in that directory, and the directory if nothing else is in it; it first checks
//!   the record is one a failover of this id writes (names, paths, the directory's owner), since
//!   the store's owner could edit it.
//! - A test failover that fails removes what it made, hold included.
//! - Its point is held against retention (`STORE/pins/VM.SEQ.ID.hold`, durable) from before it is
//!   read until the cleanup: the server's retention keeps it (and what it needs) however long the
//!   test lasts.
//! - Disks are restored with the same code as `ferry restore` (exact, page map read without the
//!   writer's lock), as fixed VHDs (`--format vhd`, bootable as they are on Hyper-V, Azure or
//!   QEMU's `vpc` driver) or raw images.
//! - One test failover per VM at a time (as the incumbent's): clean up the last one first.
//! - A cleaned-up record stays, marked `cleaned`, as the audit trail `list` shows.

use std::path::{Path, PathBuf};

use ferry_job::{JobError, PointSelector, RestoreRequest, StoreLocation};
use serde::{Deserialize, Serialize};
use serde_json::json;

const FORMAT: &str = "ferry-failover";
const VERSION: u32 = 1;

/// One failover's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Record {
    format: String,
    version: u32,
    pub id: String,
    /// `test` (this version makes only test failovers).
    pub kind: String,
    pub vm: String,
    pub point: String,
    pub point_seq: u64,
    pub point_time: String,
    pub point_kind: String,
    pub created: String,
    /// `creating` until every disk is written, then `ready`; `cleaned` after the cleanup.
    pub state: String,
    /// The directory the disks are in, and whether this failover created it.
    pub dir: PathBuf,
    pub dir_created: bool,
    pub disks: Vec<DiskOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleaned: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiskOut {
    pub disk: String,
    pub path: PathBuf,
    pub size: u64,
    pub blake3: String,
    /// Whether the file was written whole (false: the failover stopped while writing it).
    pub written: bool,
}

fn records_dir(root: &Path) -> PathBuf {
    root.join("failovers")
}

fn record_path(root: &Path, id: &str) -> PathBuf {
    records_dir(root).join(format!("{id}.json"))
}

fn save(root: &Path, r: &Record) -> Result<(), JobError> {
    let p = record_path(root, &r.id);
    let bytes = serde_json::to_vec_pretty(r).expect("record serializes");
    ferry_durable::write_private(&p, &bytes)
        .map_err(|e| JobError::Usage(format!("cannot write {}: {e}", p.display())))
}

/// Every record of the store, oldest first. A damaged one is an error naming it.
pub(crate) fn records(root: &Path) -> Result<Vec<Record>, JobError> {
    let dir = records_dir(root);
    let it = match std::fs::read_dir(&dir) {
        Ok(it) => it,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(JobError::Usage(format!(
                "cannot list {}: {e}",
                dir.display()
            )))
        }
    };
    let mut out = Vec::new();
    for e in it {
        let e = e.map_err(|e| JobError::Usage(format!("cannot list {}: {e}", dir.display())))?;
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let b = std::fs::read(&p)
            .map_err(|e| JobError::Usage(format!("cannot read {}: {e}", p.display())))?;
        let r: Record = serde_json::from_slice(&b).map_err(|e| {
            JobError::Usage(format!(
                "{}: {e}; it is written only by Ferry: restore it from a backup, or move it aside (its files and its hold then stay until removed by hand)",
                p.display()
            ))
        })?;
        if r.format != FORMAT || r.version != VERSION {
            return Err(JobError::Usage(format!(
                "{}: not a failover record of this Ferry (format {:?} version {})",
                p.display(),
                r.format,
                r.version
            )));
        }
        out.push(r);
    }
    out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    Ok(out)
}

fn local_root(store: &StoreLocation) -> Result<PathBuf, JobError> {
    match store {
        StoreLocation::Local(p) => Ok(std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        StoreLocation::Azure { .. } => Err(JobError::Usage(
            "test failover of an azure:// store is not in this version; restore each disk with `ferry restore --store azure://… --out azure://…/NAME.vhd` (a server-side copy)".into(),
        )),
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Disk file extension for the format.
fn ext(raw: bool) -> &'static str {
    if raw {
        "img"
    } else {
        "vhd"
    }
}

/// What `ferry failover --test` was asked.
pub(crate) struct TestArgs {
    pub store: StoreLocation,
    pub key_file: PathBuf,
    pub vm: String,
    pub point: PointSelector,
    pub to: Option<PathBuf>,
    pub raw: bool,
    pub verify: bool,
    pub threads: usize,
    pub json: bool,
    /// A real failover (the VM's permanent disks), not a test.
    pub real: bool,
    /// The process server's state directory, for its event log (if there is one).
    pub state_dir: Option<PathBuf>,
    /// `--shutdown-source`: ask the VM's agent (through the running server) to cut over first,
    /// waiting this long for its final point.
    pub shutdown_source: Option<std::time::Duration>,
}

/// Held around "no open failover of this VM? then write its record": two at once cannot both
/// start.
struct RecordsLock(#[allow(dead_code)] std::fs::File);

fn lock_records(root: &Path) -> Result<RecordsLock, JobError> {
    use std::os::unix::io::AsRawFd;
    let dir = records_dir(root);
    ferry_durable::create_dir_durable(&dir)
        .map_err(|e| JobError::Usage(format!("cannot create {}: {e}", dir.display())))?;
    let p = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(|e| JobError::Usage(format!("cannot open {}: {e}", p.display())))?;
    // SAFETY: flock on a valid, owned file descriptor has no memory-safety preconditions.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(JobError::Usage(format!(
            "cannot lock {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(RecordsLock(f))
}

/// Asks the VM's agent, through the running process server, to cut over, and waits for the final
/// point (see `ferry_apply::lifecycle::remote`).
fn shutdown_source(
    root: &Path,
    vm: &str,
    wait: std::time::Duration,
) -> Result<ferry_apply::lifecycle::Lifecycle, JobError> {
    use ferry_apply::lifecycle::{self, remote};
    remote::request(root, vm, wait)
        .map_err(|e| JobError::Usage(format!("cannot ask for the cutover: {e}")))?;
    errln!(
        "asked {vm}'s agent to cut over (through the process server); waiting for its final point…"
    );
    let until = std::time::Instant::now() + wait;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if let Some(why) = remote::failure(root, vm) {
            remote::done(root, vm);
            return Err(JobError::Usage(format!(
                "the source did not cut over: {why}; nothing was failed over"
            )));
        }
        // Answered: the server removed the request when it recorded the final point.
        if !remote::pending(root, vm) {
            match lifecycle::load(root, vm) {
                Ok(Some(l)) if l.final_point.is_some() => return Ok(l),
                Err(e) => return Err(JobError::Usage(e.to_string())),
                _ => {
                    return Err(JobError::Usage(
                        "the cutover request was withdrawn (by another command?); nothing was failed over".into(),
                    ))
                }
            }
        }
        if std::time::Instant::now() >= until {
            let sent = remote::asked(root, vm);
            remote::withdraw(root, vm);
            return Err(JobError::Usage(if sent {
                format!(
                    "the source's agent was asked to cut over but did not report a final point within {}s: it may still be cutting over (`ferry-agent status` on the source says; `ferry-agent cutover --rollback` undoes it). Nothing was failed over; once it reports, `ferry failover --vm {vm} --point final` fails over",
                    wait.as_secs()
                )
            } else {
                format!(
                    "the source was not asked to cut over within {}s: is `ferry serve` running, and the VM's agent connected (`ferry status` says)? Nothing was failed over; the request is withdrawn",
                    wait.as_secs()
                )
            }));
        }
    }
}

/// The point a failover takes: `--point` (`final` being the point `ferry-agent cutover` made on
/// the source, from the VM's lifecycle record), or `final` after `--shutdown-source`.
fn selector(
    a: &TestArgs,
    life: Option<&ferry_apply::lifecycle::Lifecycle>,
    unknown_here: &str,
) -> Result<PointSelector, JobError> {
    let asked = if a.shutdown_source.is_some() {
        PointSelector::Id("final".into())
    } else {
        a.point.clone()
    };
    match &asked {
        PointSelector::Id(f) if f == "final" => match life.and_then(|l| l.final_point.clone()) {
            Some(id) => Ok(PointSelector::Id(id)),
            None => Err(JobError::Usage(format!(
                "VM {} has no final point{unknown_here}: run `ferry-agent cutover` on the source first (a planned failover), or fail over to --point latest (the newest point the server committed: an unplanned failover loses what the source wrote after it)",
                a.vm
            ))),
        },
        p => Ok(p.clone()),
    }
}

/// Whether the process that made failover `id` (`KIND-SEQ-PID[xN]-TIME`) still runs.
fn maker_alive(id: &str) -> bool {
    let pid = id
        .split('-')
        .nth(2)
        .and_then(|p| p.split('x').next())
        .and_then(|p| p.parse::<i32>().ok());
    match pid {
        Some(p) if p > 0 => {
            // SAFETY: kill(pid, 0) only checks that the process exists.
            let exists = unsafe { libc::kill(p, 0) == 0 }
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            // A pid reused after a reboot is some other program: only a `ferry` counts.
            exists
                && std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .map_or(true, |c| c.trim() == "ferry")
        }
        _ => true,
    }
}

fn id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The directory a failover writes into: new, under `--to`, named by VM and id (a test), or by
/// the VM alone (a real failover: the VM's permanent disks).
fn dir_name(vm: &str, id: &str) -> String {
    if id.starts_with("failover-") {
        vm.to_owned()
    } else {
        format!("{vm}-{id}")
    }
}

/// Records an event in the process server's log when there is a server state here (best
/// effort: a failover does not need a server).
pub(crate) fn event(state_dir: &Option<PathBuf>, e: ferry_serve::events::Event) {
    let dir = state_dir
        .clone()
        .unwrap_or_else(|| ferry_job::default_state_root().join("server"));
    if dir.join(ferry_serve::status::STATUS_FILE).exists() || state_dir.is_some() {
        crate::admin::operator_event(&dir, e);
    }
}

fn disk_file(vm: &str, disk: &str, raw: bool) -> String {
    format!("{vm}-{disk}.{}", ext(raw))
}

/// `ferry failover [--test] --vm VM`.
pub(crate) fn test(a: TestArgs) -> Result<(), JobError> {
    let rec = failover_vm(&a)?;
    print_made(&a, &rec)
}

/// Makes one VM's failover (or test failover) and returns its record (ready).
pub(crate) fn failover_vm(a: &TestArgs) -> Result<Record, JobError> {
    if matches!(a.store, StoreLocation::Azure { .. }) {
        return azure::test(a);
    }
    let root = local_root(&a.store)?;
    ferry_job::validate_name("VM", &a.vm)?;
    let kind = if a.real { "failover" } else { "test" };
    let what = if a.real { "failover" } else { "test failover" };
    let lifecycle =
        ferry_apply::lifecycle::load(&root, &a.vm).map_err(|e| JobError::Usage(e.to_string()))?;
    if a.real {
        if let Some(l) = lifecycle
            .as_ref()
            .filter(|l| l.state != ferry_apply::lifecycle::CUT_OVER)
        {
            return Err(JobError::Usage(format!(
                "VM {} was failed over already ({}, since {}{}); `ferry failover list --store {}` shows its disks",
                a.vm,
                l.state,
                l.since,
                l.failover.as_deref().map(|f| format!(", failover {f}")).unwrap_or_default(),
                root.display()
            )));
        }
    } else if lifecycle.as_ref().is_some_and(|l| l.retired()) {
        return Err(JobError::Usage(format!(
            "VM {}'s migration was completed: its points are gone",
            a.vm
        )));
    }
    let parent = match &a.to {
        Some(d) => {
            let s = d.to_str().ok_or_else(|| {
                JobError::Usage(format!("--to {}: use a path in UTF-8", d.display()))
            })?;
            if s.starts_with("azure://") {
                return Err(JobError::Usage(
                    "--to azure://…: test failover into Azure is not in this version; give a local directory".into(),
                ));
            }
            d.clone()
        }
        None => std::env::current_dir()
            .map_err(|e| JobError::Usage(format!("cannot read the current directory: {e}")))?,
    };
    let parent = std::path::absolute(&parent).unwrap_or(parent);
    if !parent.is_dir() {
        return Err(JobError::Usage(format!(
            "--to {}: not a directory; give an existing directory (the failover makes its own directory in it)",
            parent.display()
        )));
    }
    // `--shutdown-source`: the source cuts over first (asked through the server), then the
    // failover takes its final point.
    let mut lifecycle = lifecycle;
    if let Some(wait) = a.shutdown_source {
        if !a.real {
            return Err(JobError::Usage(
                "--shutdown-source is for a real failover (without --test)".into(),
            ));
        }
        // What would make the failover fail is checked before the source is shut down.
        let target = parent.join(&a.vm);
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(JobError::Usage(format!(
                "{} exists already: the failover writes the VM's disks into a new directory of that name; move it away, or give another --to (the source was not asked to cut over)",
                target.display()
            )));
        }
        if let Some(open) = records(&root)?.into_iter().find(|r| {
            r.vm == a.vm && r.kind == "failover" && r.state != "cleaned" && r.state != "failed"
        }) {
            return Err(JobError::Usage(format!(
                "VM {} has a failover already ({}, {}); the source was not asked to cut over",
                a.vm, open.id, open.state
            )));
        }
        // Asked every time: a final point recorded earlier may be from a cutover since rolled
        // back (an agent already cut over answers with its final point at once).
        lifecycle = Some(shutdown_source(&root, &a.vm, wait)?);
    }
    let selector = selector(a, lifecycle.as_ref(), "")?;
    let store = ferry_job::open_recovery(&a.store, Some(&a.key_file))?;
    let (vm, point) = ferry_job::resolve_point(store.as_ref(), Some(&a.vm), &selector)?;
    drop(store);
    for d in &point.disks {
        ferry_job::validate_name("disk", &d.name)?;
    }
    // Unique: the pid and a counter (a plan makes several in one process within a second).
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!(
        "{kind}-{}-{}{}-{}",
        point.seq,
        std::process::id(),
        if n == 0 {
            String::new()
        } else {
            format!("x{n}")
        },
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .replace([':', '-'], "")
            .trim_end_matches('Z')
    );
    let dir = parent.join(dir_name(&vm, &id));
    if a.real && std::fs::symlink_metadata(&dir).is_ok() {
        return Err(JobError::Usage(format!(
            "{} exists already: the failover writes the VM's disks into a new directory of that name; move it away, or give another --to",
            dir.display()
        )));
    }
    let disks: Vec<DiskOut> = point
        .disks
        .iter()
        .map(|d| DiskOut {
            disk: d.name.clone(),
            path: dir.join(disk_file(&vm, &d.name, a.raw)),
            size: d.size,
            blake3: d.blake3.clone(),
            written: false,
        })
        .collect();
    let mut rec = Record {
        format: FORMAT.into(),
        version: VERSION,
        id: id.clone(),
        kind: kind.into(),
        vm: vm.clone(),
        point: point.id.clone(),
        point_seq: point.seq,
        point_time: point.time.clone(),
        point_kind: point.kind.clone(),
        created: now_rfc3339(),
        state: "creating".into(),
        dir: dir.clone(),
        // Set once the failover has made it: a rollback removes nothing from a directory that
        // was there before.
        dir_created: false,
        disks,
        cleaned: None,
    };
    {
        let _lock = lock_records(&root)?;
        if let Some(open) = records(&root)?
            .into_iter()
            .find(|r| r.vm == vm && r.kind == kind && r.state != "cleaned" && r.state != "failed")
        {
            if a.real && open.state == "creating" && !maker_alive(&open.id) {
                // A failover killed while it wrote (Ctrl-C, a crash, a power cut): what it made
                // goes, and this one starts over.
                let mut stale = open.clone();
                remove_made(&root, &mut stale, "failed").map_err(|e| {
                    JobError::Usage(format!(
                        "VM {vm} has an unfinished failover {} whose process is gone, and removing what it made failed: {e}",
                        stale.id
                    ))
                })?;
                errln!(
                    "note: failover {} of {vm} was interrupted; what it had made is removed",
                    stale.id
                );
            } else if a.real {
                return Err(JobError::Usage(format!(
                    "VM {vm} has a failover already ({}, at point {}, in {}, {})",
                    open.id,
                    open.point,
                    open.dir.display(),
                    open.state
                )));
            } else {
                return Err(JobError::Usage(format!(
                    "VM {vm} has a test failover already ({}, at point {}, in {}); remove it first: ferry failover --test --cleanup --vm {vm} --store {}",
                    open.id,
                    open.point,
                    open.dir.display(),
                    root.display()
                )));
            }
        }
        if record_path(&root, &id).exists() {
            return Err(JobError::Usage(format!(
                "a failover record {id} exists already; try again in a second"
            )));
        }
        // The record first (what a cleanup must remove), then the hold, then the disks.
        save(&root, &rec)?;
    }
    match make(a, &root, &mut rec) {
        Ok(()) => {}
        Err(e) => {
            // Nothing half-made stays behind: a failed test failover removes what it made.
            return Err(match remove_made(&root, &mut rec, "failed") {
                Ok(_) => JobError::Usage(format!(
                    "{what} of {vm} failed, and what it had made is removed: {e}"
                )),
                Err(c) => JobError::Usage(format!(
                    "{what} of {vm} failed ({e}), and removing what it made failed too ({c}): remove {} by hand, and {}",
                    rec.dir.display(),
                    ferry_store::readers::hold_path(&root, &vm, rec.point_seq, &rec.id).display()
                )),
            });
        }
    }
    if a.real {
        // The server stops expecting the agent; `final` stays known.
        // Re-read under the lock: the record may have changed while the disks were written.
        let r = ferry_apply::lifecycle::update(&root, &vm, |cur| match cur {
            Some(l) if l.state != ferry_apply::lifecycle::CUT_OVER => Err(format!(
                "the VM became {} while its disks were written",
                l.state
            )),
            cur => {
                let mut l = cur.unwrap_or_else(|| {
                    ferry_apply::lifecycle::Lifecycle::new(&vm, ferry_apply::lifecycle::FAILED_OVER)
                });
                l.failover = Some(id.clone());
                if l.state != ferry_apply::lifecycle::FAILED_OVER {
                    l.enter(ferry_apply::lifecycle::FAILED_OVER);
                }
                Ok((Some(l), ()))
            }
        });
        if let Err(e) = r {
            return Err(JobError::Usage(format!(
                "the disks are written in {}, but the VM's lifecycle record is not: {e}",
                rec.dir.display()
            )));
        }
        // The disks exist now, outside the store: the point need not be held any longer
        // (retention goes on for a source that still replicates).
        ferry_store::readers::release_hold(&root, &vm, rec.point_seq, &rec.id)
            .map_err(|e| JobError::Usage(format!("cannot release the point's hold: {e}")))?;
    }
    event(
        &a.state_dir,
        ferry_serve::events::Event::new(
            "failover",
            Some(&vm),
            format!(
                "{what} {id} at point {} ({}) into {}",
                point.id,
                point.kind,
                rec.dir.display()
            ),
        )
        .with(describe(&rec)),
    );
    Ok(rec)
}

/// Each disk of a failover and where it is, then a blank line.
fn print_disks(rec: &Record) {
    for d in &rec.disks {
        outln!(
            "  {:<10} {}  ({})",
            d.disk,
            d.path.display(),
            crate::units::human(d.size)
        );
    }
    outln!();
}

/// What `ferry failover [--test]` prints about the failover it made.
fn print_made(a: &TestArgs, rec: &Record) -> Result<(), JobError> {
    if matches!(a.store, StoreLocation::Azure { .. }) {
        let cmds = azure::az_commands(&a.store, rec);
        if a.json {
            let mut d = describe(rec);
            d["qemu"] = serde_json::Value::Null;
            d["az"] = json!(cmds);
            outln!("{}", serde_json::to_string_pretty(&d).expect("json"));
            return Ok(());
        }
        outln!(
            "{} {}: VM {} at point {} ({}, {}): page blobs, copied server-side in {}",
            if a.real { "failover" } else { "test failover" },
            rec.id,
            rec.vm,
            rec.point,
            rec.point_kind,
            rec.point_time,
            a.store
        );
        print_disks(rec);
        if a.real {
            outln!("These are the VM's disks now. Make managed disks and the VM of them:");
        } else {
            outln!("Make managed disks and a test VM of them (an isolated network: it is a copy of production):");
        }
        for c in &cmds {
            outln!("  {c}");
        }
        if a.real {
            outln!(
                "When the migration is confirmed: ferry complete-migration --vm {} --store {}. To bring the site back later: export the VM's managed disks into the container, then ferry failback --vm {} --from azure://…/DISK.vhd --to DEVICE (docs/OPERATIONS.md, Failback from Azure)",
                rec.vm,
                a.store,
                rec.vm
            );
        } else {
            outln!(
                "When done (delete the VM and disks first): ferry failover --test --cleanup --vm {} --store {}",
                rec.vm,
                a.store
            );
        }
        return Ok(());
    }
    let root = local_root(&a.store)?;
    let (id, vm) = (&rec.id, &rec.vm);
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&describe(rec)).expect("json")
        );
        return Ok(());
    }
    if a.real {
        outln!(
            "failover {id}: VM {vm} at point {} ({}, {}); these are its disks now",
            rec.point,
            rec.point_kind,
            rec.point_time
        );
    } else {
        outln!(
            "test failover {id}: VM {vm} at point {} ({}, {}), held against retention until cleanup",
            rec.point,
            rec.point_kind,
            rec.point_time
        );
    }
    print_disks(rec);
    outln!("Boot it with QEMU (BIOS guests; the boot disk first: reorder if needed; add -enable-kvm where available):");
    outln!("  {}", qemu_command(rec, a.raw));
    if !a.raw {
        outln!("Or attach the .vhd files to a Hyper-V or Azure VM (fixed VHDs, as they are).");
    }
    if a.real {
        outln!("The process server no longer expects the source's agent (no RPO alarm for {vm}).");
        outln!(
            "Once the VM runs from these disks: ferry complete-migration --vm {vm} --store {} (ends replication, removes its points; keeps these disks)",
            root.display()
        );
    } else {
        outln!(
            "When done: ferry failover --test --cleanup --vm {vm} --store {}",
            root.display()
        );
    }
    Ok(())
}

/// The making half of a test failover, after its record: hold, check the point is still there,
/// a new private directory, each disk.
fn make(a: &TestArgs, root: &Path, rec: &mut Record) -> Result<(), JobError> {
    let (vm, id) = (rec.vm.clone(), rec.id.clone());
    let why = if rec.kind == "test" {
        "test failover"
    } else {
        "failover (until complete-migration)"
    };
    ferry_store::readers::hold_point(root, &vm, rec.point_seq, &id, why)
        .map_err(|e| JobError::Usage(format!("cannot hold the point: {e}")))?;
    // Pruned between the choice and the hold? Then it is gone for good: say so, make nothing.
    let store = ferry_job::open_recovery(&a.store, Some(&a.key_file))?;
    ferry_job::resolve_point(
        store.as_ref(),
        Some(&vm),
        &PointSelector::Id(rec.point.clone()),
    )?;
    drop(store);
    // New, 0700, ours: no one can plant a file or a link where the disks go.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&rec.dir)
            .map_err(|e| JobError::Usage(format!("cannot create {}: {e}", rec.dir.display())))?;
        if let Some(p) = rec.dir.parent() {
            ferry_durable::fsync_dir(p)
                .map_err(|e| JobError::Usage(format!("cannot sync {}: {e}", p.display())))?;
        }
        rec.dir_created = true;
        save(root, rec)?;
    }
    let progress = crate::progress::Bars::new();
    for i in 0..rec.disks.len() {
        let d = rec.disks[i].clone();
        let req = RestoreRequest {
            store: a.store.clone(),
            key_file: a.key_file.clone(),
            vm: Some(vm.clone()),
            disk: Some(d.disk.clone()),
            point: PointSelector::Id(rec.point.clone()),
            out: d.path.to_str().expect("checked UTF-8").to_owned(),
            verify: a.verify,
            force: false,
            threads: a.threads,
        };
        ferry_job::restore_point(&req, &progress)?;
        ferry_durable::fsync_dir(&rec.dir)
            .map_err(|e| JobError::Usage(format!("cannot sync {}: {e}", rec.dir.display())))?;
        rec.disks[i].written = true;
        save(root, rec)?;
    }
    rec.state = "ready".into();
    save(root, rec)
}

fn qemu_command(r: &Record, raw: bool) -> String {
    let mut c = String::from("qemu-system-x86_64 -m 2048 -smp 2 -nographic");
    for d in &r.disks {
        c.push_str(&format!(
            " -drive file={},format={},if=virtio",
            // QEMU's option syntax doubles a comma in a value.
            shell_quote(&d.path.display().to_string().replace(',', ",,")),
            if raw { "raw" } else { "vpc" }
        ));
    }
    c
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A failover's record as `--json` and `list --json` show it.
pub(crate) fn describe_pub(r: &Record) -> serde_json::Value {
    describe(r)
}

fn describe(r: &Record) -> serde_json::Value {
    json!({
        "id": r.id,
        "kind": r.kind,
        "vm": r.vm,
        "point": r.point,
        "point_kind": r.point_kind,
        "point_time": r.point_time,
        "state": r.state,
        "created": r.created,
        "cleaned": r.cleaned,
        "dir": r.dir,
        "disks": r.disks.iter().map(|d| json!({
            "disk": d.disk, "path": d.path, "size": d.size, "blake3": d.blake3, "written": d.written,
        })).collect::<Vec<_>>(),
        "qemu": (r.state == "ready").then(|| qemu_command(r, r.disks.first().is_some_and(|d| d.path.extension().is_some_and(|x| x == "img")))),
    })
}

/// Checks a record before its cleanup deletes anything by it (records live in the store, which
/// the service user may write): every name valid, the directory the one a failover of this id
/// makes, each file the one it writes there, the directory ours and no link.
fn check_record(r: &Record) -> Result<(), JobError> {
    let bad = |why: String| {
        JobError::Usage(format!(
            "failover record {} is not one Ferry wrote ({why}); nothing removed: check it, then remove its files by hand",
            r.id
        ))
    };
    if !id_ok(&r.id) || !r.id.starts_with(&format!("{}-", r.kind)) {
        return Err(bad("its id".into()));
    }
    ferry_job::validate_name("VM", &r.vm).map_err(|e| bad(e.to_string()))?;
    if !r.dir.is_absolute()
        || r.dir.file_name() != Some(std::ffi::OsStr::new(&dir_name(&r.vm, &r.id)))
    {
        return Err(bad(format!("its directory {}", r.dir.display())));
    }
    for d in &r.disks {
        ferry_job::validate_name("disk", &d.disk).map_err(|e| bad(e.to_string()))?;
        let ok = [false, true]
            .iter()
            .any(|raw| d.path == r.dir.join(disk_file(&r.vm, &d.disk, *raw)));
        if !ok {
            return Err(bad(format!("its file {}", d.path.display())));
        }
    }
    match std::fs::symlink_metadata(&r.dir) {
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if !m.file_type().is_dir() || (m.uid() != me && me != 0) {
                return Err(bad(format!(
                    "{} is not a directory of this user",
                    r.dir.display()
                )));
            }
            if me == 0 && m.uid() != 0 {
                return Err(bad(format!(
                    "{} is not root's, and root runs this cleanup",
                    r.dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(format!("{}: {e}", r.dir.display()))),
    }
    Ok(())
}

/// Removes what a failover made (its files, its directory if empty, then its hold) and saves its
/// record as `state` (`cleaned`, or `failed` after a failed start). Returns the files removed and
/// whether the directory went.
fn remove_made(
    root: &Path,
    rec: &mut Record,
    state: &str,
) -> Result<(Vec<PathBuf>, bool), JobError> {
    check_record(rec)?;
    let mut removed = Vec::new();
    // A directory the failover did not make holds nothing of its making.
    let disks = if rec.dir_created { &rec.disks[..] } else { &[] };
    for d in disks {
        match std::fs::symlink_metadata(&d.path) {
            Ok(m) if m.file_type().is_file() => {
                std::fs::remove_file(&d.path).map_err(|e| {
                    JobError::Usage(format!("cannot remove {}: {e}", d.path.display()))
                })?;
                removed.push(d.path.clone());
            }
            Ok(_) => {
                return Err(JobError::Usage(format!(
                    "{} is not the file the test failover wrote (not a regular file); move it away and run the cleanup again",
                    d.path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(JobError::Usage(format!(
                    "cannot check {}: {e}",
                    d.path.display()
                )))
            }
        }
    }
    let mut dir_removed = false;
    if rec.dir_created && rec.dir.exists() {
        ferry_durable::fsync_dir(&rec.dir)
            .map_err(|e| JobError::Usage(format!("cannot sync {}: {e}", rec.dir.display())))?;
        match std::fs::remove_dir(&rec.dir) {
            Ok(()) => dir_removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {}
            Err(e) => {
                return Err(JobError::Usage(format!(
                    "cannot remove {}: {e}",
                    rec.dir.display()
                )))
            }
        }
        if let Some(p) = rec.dir.parent() {
            ferry_durable::fsync_dir(p)
                .map_err(|e| JobError::Usage(format!("cannot sync {}: {e}", p.display())))?;
        }
    }
    ferry_store::readers::release_hold(root, &rec.vm, rec.point_seq, &rec.id)
        .map_err(|e| JobError::Usage(format!("cannot release the point's hold: {e}")))?;
    rec.state = state.into();
    rec.cleaned = Some(now_rfc3339());
    save(root, rec)?;
    Ok((removed, dir_removed))
}

/// `ferry failover --test --cleanup --vm VM`: removes exactly what the VM's test failover made
/// (its disk files in the directory it made, that directory when nothing else is in it), then its
/// hold; keeps the record as `cleaned`.
pub(crate) fn cleanup(store: &StoreLocation, vm: &str, json_out: bool) -> Result<(), JobError> {
    let (rec, removed, dir_removed) = cleanup_vm(store, vm)?;
    if json_out {
        outln!(
            "{}",
            json!({"id": rec.id, "vm": rec.vm, "removed": removed, "dir_removed": dir_removed, "point_released": rec.point})
        );
    } else {
        outln!(
            "test failover {} of {} cleaned up: removed {} file(s){}; point {} is no longer held",
            rec.id,
            rec.vm,
            removed.len(),
            if dir_removed {
                format!(" and {}", rec.dir.display())
            } else if rec.dir.exists() {
                format!(" ({} kept: it holds other files)", rec.dir.display())
            } else {
                String::new()
            },
            rec.point
        );
    }
    Ok(())
}

/// Whether the VM has a test failover to clean up.
pub(crate) fn has_open_test(store: &StoreLocation, vm: &str) -> Result<bool, JobError> {
    if matches!(store, StoreLocation::Azure { .. }) {
        return azure::has_open_test(store, vm);
    }
    let root = local_root(store)?;
    Ok(records(&root)?
        .iter()
        .any(|r| r.vm == vm && r.kind == "test" && r.state != "cleaned" && r.state != "failed"))
}

/// Cleans up the VM's test failover: its record, the files removed, whether its directory went.
pub(crate) fn cleanup_vm(
    store: &StoreLocation,
    vm: &str,
) -> Result<(Record, Vec<PathBuf>, bool), JobError> {
    if matches!(store, StoreLocation::Azure { .. }) {
        return azure::cleanup(store, vm);
    }
    let root = local_root(store)?;
    let Some(mut rec) = records(&root)?
        .into_iter()
        .find(|r| r.vm == vm && r.kind == "test" && r.state != "cleaned" && r.state != "failed")
    else {
        return Err(JobError::Usage(format!(
            "VM {vm} has no test failover to clean up (`ferry failover list --store {}` shows them)",
            root.display()
        )));
    };
    let (removed, dir_removed) = remove_made(&root, &mut rec, "cleaned")?;
    Ok((rec, removed, dir_removed))
}

/// One record as `ferry failover list` shows it.
fn list_line(r: &Record) -> String {
    format!(
        "{}  {:<5} {:<12} point {} ({})  {}  {}",
        r.created,
        r.kind,
        r.vm,
        r.point,
        r.point_kind,
        r.state,
        r.dir.display()
    )
}

/// `ferry failover list`.
pub(crate) fn list(store: &StoreLocation, json_out: bool) -> Result<(), JobError> {
    if matches!(store, StoreLocation::Azure { .. }) {
        let all = azure::all(store)?;
        if json_out {
            outln!(
                "{}",
                serde_json::to_string_pretty(
                    &all.iter()
                        .map(|r| {
                            let mut d = describe(r);
                            d["qemu"] = serde_json::Value::Null;
                            d
                        })
                        .collect::<Vec<_>>()
                )
                .expect("json")
            );
        } else if all.is_empty() {
            outln!("no test failovers yet (ferry failover --test --vm VM makes one)");
        }
        if !json_out {
            for r in &all {
                outln!("{}", list_line(r));
            }
        }
        return Ok(());
    }
    let root = local_root(store)?;
    let all = records(&root)?;
    let lifecycle = ferry_apply::lifecycle::list(&root).map_err(|e| {
        JobError::Usage(format!(
            "cannot list {}: {e}",
            ferry_apply::lifecycle::dir(&root).display()
        ))
    })?;
    if json_out {
        let out: Vec<serde_json::Value> = all
            .iter()
            .map(|r| {
                let mut d = describe(r);
                d["vm_lifecycle"] = match lifecycle.get(&r.vm) {
                    Some(Ok(l)) => serde_json::to_value(l).expect("json"),
                    Some(Err(e)) => json!({"error": e}),
                    None => serde_json::Value::Null,
                };
                d
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    if all.is_empty() && lifecycle.is_empty() {
        outln!("no failovers yet (ferry failover --test --vm VM makes one)");
        return Ok(());
    }
    for r in &all {
        outln!("{}", list_line(r));
    }
    for (vm, l) in &lifecycle {
        match l {
            Ok(l) => {
                let mut line = format!("VM {vm}: {} since {}", l.state, l.since);
                if let Some(p) = &l.final_point {
                    line.push_str(&format!(", final point {p}"));
                }
                if let Some(f) = &l.failover {
                    line.push_str(&format!(", failover {f}"));
                }
                if let Some(r) = &l.removed {
                    line.push_str(&format!(
                        "; removed {} point(s), {} replica(s), {} segment(s)",
                        r.points,
                        r.disks.len(),
                        r.segments
                    ));
                }
                outln!("{line}");
            }
            Err(e) => outln!("VM {vm}: lifecycle record unreadable: {e}"),
        }
    }
    Ok(())
}

/// What `ferry complete-migration` was asked.
pub(crate) struct CompleteArgs {
    pub store: StoreLocation,
    pub key_file: PathBuf,
    pub vm: String,
    pub force: bool,
    pub json: bool,
    pub state_dir: Option<PathBuf>,
    /// How long to wait for a running server to remove the data.
    pub wait: std::time::Duration,
}

/// `ferry complete-migration --vm VM`: ends the VM's replication for good (see
/// `ferry_apply::lifecycle`): its agent is refused from the moment the request is durable, and
/// its points, replicas, holds and the journal segments only it needs are removed by whoever
/// holds the store (the running server, or this command when none runs). The failed-over disks
/// and the records stay.
pub(crate) fn complete_migration(a: CompleteArgs) -> Result<(), JobError> {
    use ferry_apply::lifecycle::{self, Lifecycle};
    let azure = matches!(a.store, StoreLocation::Azure { .. });
    // An Azure store: the lifecycle lives in the process server's staging directory (it must
    // refuse the VM's agent), the data in the container and there.
    let root = match &a.store {
        StoreLocation::Local(_) => local_root(&a.store)?,
        StoreLocation::Azure { .. } => {
            let d = a.store.local_dir();
            if !d.is_dir() {
                return azure::complete_offline(&a);
            }
            d
        }
    };
    ferry_job::validate_name("VM", &a.vm)?;
    let vm = a.vm.clone();
    let state = lifecycle::load(&root, &vm).map_err(|e| JobError::Usage(e.to_string()))?;
    let mut l = match state {
        Some(l) if l.state == lifecycle::RETIRED => {
            return report(&a, &l, "was completed already");
        }
        Some(l) if l.state == lifecycle::RETIRING => l,
        other => {
            let known = ferry_store::list_vms_at(&root)?.contains(&vm)
                || root.join("journal").join(&vm).is_dir()
                || (azure
                    && ferry_job::azure::load_manifest(&azure::blobs(&a.store)?, &vm)
                        .map_err(|e| JobError::Azure(e.to_string()))?
                        .is_some());
            if !known && other.is_none() {
                return Err(JobError::Usage(format!(
                    "store {} has no VM '{vm}' (ferry points list --store {} shows them)",
                    a.store, a.store
                )));
            }
            // An Azure store's failover may have been made on another machine: its record in the
            // container counts too.
            let failed_over = other
                .as_ref()
                .is_some_and(|l| l.state == lifecycle::FAILED_OVER)
                || (azure
                    && azure::all(&a.store)?
                        .iter()
                        .any(|r| r.vm == vm && r.kind == "failover" && r.state == "ready"));
            if !failed_over && !a.force {
                return Err(JobError::Usage(format!(
                    "VM {vm} has not been failed over{}: complete-migration deletes every point of it. Fail over first (ferry failover --vm {vm} --store {}), or give --force to end its replication and delete its points anyway",
                    if other.is_some() { " (it is cut over: run ferry failover --vm VM --point final)" } else { "" },
                    a.store
                )));
            }
            let tests = if azure {
                azure::all(&a.store)?
            } else {
                records(&root)?
            };
            if let Some(t) = tests.into_iter().find(|r| {
                r.vm == vm && r.kind == "test" && r.state != "cleaned" && r.state != "failed"
            }) {
                return Err(JobError::Usage(format!(
                    "VM {vm} has a test failover ({}, in {}): clean it up first (ferry failover --test --cleanup --vm {vm} --store {})",
                    t.id,
                    t.dir.display(),
                    a.store
                )));
            }
            let mut l = other
                .clone()
                .unwrap_or_else(|| Lifecycle::new(&vm, lifecycle::RETIRING));
            l.forced = !failed_over;
            if l.state != lifecycle::RETIRING {
                l.enter(lifecycle::RETIRING);
            }
            // From here on the server refuses the VM's agent.
            let new = l.clone();
            lifecycle::update(&root, &vm, |cur| {
                if cur != other {
                    return Err("the VM's lifecycle record changed meanwhile (a cutover, a failover?): run the command again".into());
                }
                Ok((Some(new), ()))
            })
            .map_err(JobError::Usage)?;
            event(
                &a.state_dir,
                ferry_serve::events::Event::new(
                    "migration",
                    Some(&vm),
                    format!(
                        "operator completed the migration{}: replication ends, the agent is refused",
                        if l.forced { " (forced, no failover)" } else { "" }
                    ),
                ),
            );
            l
        }
    };
    // Whoever holds the store removes the data: this command when it can take the lock, else
    // the server that holds it (its drain loop, once the VM's last records are applied).
    if let Some(lock) = ferry_store::readers::try_lock(&root.join(".lock"))? {
        let store = ferry_job::open_store(&root, &a.key_file, false)?;
        if azure {
            // The container's data first (manifest, page blobs with their snapshots, segments,
            // pins): the staging store's retire records the VM retired, so it comes last.
            let r = ferry_job::azure::remove_vm(&azure::blobs(&a.store)?, &vm)?;
            errln!(
                "deleted from {}: {vm}'s manifest ({} point(s)), {} replica page blob(s) with their snapshots ({}), {} other blob(s)",
                a.store,
                r.points,
                r.replicas,
                crate::units::human(r.replica_bytes),
                r.other
            );
        }
        lifecycle::retire(&store, &vm)?;
        drop(lock);
    } else {
        errln!("the process server holds the store: it removes {vm}'s data once it has applied the VM's last records…");
        let until = std::time::Instant::now() + a.wait;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            match lifecycle::load(&root, &vm) {
                Ok(Some(x)) if x.state == lifecycle::RETIRED => break,
                Ok(_) if std::time::Instant::now() < until => {}
                Ok(_) => {
                    return Err(JobError::Usage(format!(
                        "the process server has not removed {vm}'s data within {}s (it does so once its cache has drained the VM's last records; its log says why it cannot): the agent is refused already; `ferry failover list --store {}` shows when it is done",
                        a.wait.as_secs(),
                        a.store
                    )))
                }
                Err(e) => return Err(JobError::Usage(e.to_string())),
            }
        }
    }
    l = lifecycle::load(&root, &vm)
        .map_err(|e| JobError::Usage(e.to_string()))?
        .unwrap_or(l);
    report(&a, &l, "is completed")
}

fn report(
    a: &CompleteArgs,
    l: &ferry_apply::lifecycle::Lifecycle,
    how: &str,
) -> Result<(), JobError> {
    let removed = l.removed.clone().unwrap_or_default();
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "vm": l.vm, "state": l.state, "since": l.since, "failover": l.failover,
                "final_point": l.final_point, "forced": l.forced, "removed": removed,
                "history": l.history,
            }))
            .expect("json")
        );
        return Ok(());
    }
    outln!(
        "migration of {} {how} ({}): replication ended; its agent is refused from now on",
        l.vm,
        l.since
    );
    outln!(
        "  removed: {} point(s), {} disk replica(s) ({}), {} journal segment(s) ({}), {} hold(s)",
        removed.points,
        removed.disks.len(),
        crate::units::human(removed.replica_bytes),
        removed.segments,
        crate::units::human(removed.segment_bytes),
        removed.holds
    );
    if removed.segments_kept > 0 {
        outln!(
            "  kept: {} segment(s) other VMs' data uses (deduplicated chunks); retention removes them with that data",
            removed.segments_kept
        );
    }
    if let Some(f) = &l.failover {
        outln!("  the failed-over disks stay (failover {f}; ferry failover list shows where)");
    }
    outln!("  on the source machine, if it still runs: systemctl disable --now ferry-agent");
    Ok(())
}

/// Test failovers of an Azure store: each disk of the point becomes a new page blob in the
/// store's container, by server-side copy of the point's snapshot (no data through this
/// machine), under `PREFIX/VM-ID/` (`--to azure://ACCOUNT/CONTAINER/PREFIX`, default prefix
/// `test-failover`); the record is the blob `failovers/ID.json`. The copies stand alone: the
/// point is pinned only while they are made. `--cleanup` deletes exactly the blobs the record
/// names. The output gives the `az` commands that make managed disks and a VM of them.
pub(crate) mod azure {
    use super::*;

    /// The default blob prefix of test failovers.
    pub const DEFAULT_PREFIX: &str = "test-failover";
    /// The default blob prefix of (real) failovers: `failover/VM/VM-DISK.vhd`.
    pub const REAL_PREFIX: &str = "failover";

    fn az(e: impl std::fmt::Display) -> JobError {
        JobError::Azure(e.to_string())
    }

    fn record_blob(id: &str) -> String {
        format!("failovers/{id}.json")
    }

    fn put(blobs: &ferry_azure::AzureBlobs, r: &Record) -> Result<(), JobError> {
        blobs
            .put_block_blob(
                &record_blob(&r.id),
                serde_json::to_vec_pretty(r).expect("record serializes"),
            )
            .map_err(az)
    }

    /// Every test failover record of the container.
    pub(crate) fn records(blobs: &ferry_azure::AzureBlobs) -> Result<Vec<Record>, JobError> {
        let mut out = Vec::new();
        for (name, _) in blobs.list("failovers/").map_err(az)? {
            if !name.ends_with(".json") {
                continue;
            }
            let Some(b) = blobs.get_blob(&name).map_err(az)? else {
                continue;
            };
            // One bad blob must not stop every VM's test failovers: it is skipped and said.
            match serde_json::from_slice::<Record>(&b) {
                Ok(r) if name == record_blob(&r.id) => out.push(r),
                Ok(_) => errln!("warning: blob {name} names another failover id: ignored"),
                Err(e) => errln!(
                    "warning: blob {name}: {e}; it is written only by Ferry: ignored (delete it if it is not Ferry's)"
                ),
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    fn open(store: &StoreLocation) -> Result<(ferry_azure::AzureBlobs, String, String), JobError> {
        match store {
            StoreLocation::Azure {
                url,
                account,
                container,
            } => Ok((
                ferry_job::azure::connect(url)?,
                account.clone(),
                container.clone(),
            )),
            StoreLocation::Local(_) => unreachable!("an Azure store"),
        }
    }

    /// The blob paths a test failover of `vm` with `id` under `prefix` writes.
    fn blob_dir(prefix: &str, vm: &str, id: &str) -> String {
        format!("{prefix}/{}", dir_name(vm, id))
    }

    /// Checks a record before its cleanup deletes blobs by it: every name valid, every blob the
    /// one a test failover of this id writes.
    fn check(r: &Record) -> Result<(), JobError> {
        let bad = |why: String| {
            JobError::Usage(format!(
                "failover record {} is not one Ferry wrote ({why}); nothing deleted",
                r.id
            ))
        };
        let kind_ok = match r.kind.as_str() {
            "test" => r.id.starts_with("test-"),
            "failover" => r.id.starts_with("failover-"),
            _ => false,
        };
        if !kind_ok || !id_ok(&r.id) {
            return Err(bad("its id or kind".into()));
        }
        ferry_job::validate_name("VM", &r.vm).map_err(|e| bad(e.to_string()))?;
        let dir = r.dir.to_str().unwrap_or("");
        let Some(prefix) = dir.strip_suffix(&format!("/{}", dir_name(&r.vm, &r.id))) else {
            return Err(bad(format!("its prefix {dir}")));
        };
        if prefix.is_empty()
            || prefix
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad(format!("its prefix {prefix}")));
        }
        for d in &r.disks {
            ferry_job::validate_name("disk", &d.disk).map_err(|e| bad(e.to_string()))?;
            if d.path.to_str() != Some(&format!("{dir}/{}", disk_file(&r.vm, &d.disk, false))) {
                return Err(bad(format!("its blob {}", d.path.display())));
            }
        }
        Ok(())
    }

    /// Deletes what the record's failover made (`only`: the disks whose copy it started) and
    /// marks it `state`.
    fn remove(
        blobs: &ferry_azure::AzureBlobs,
        r: &mut Record,
        state: &str,
        only: Option<&[bool]>,
    ) -> Result<Vec<PathBuf>, JobError> {
        check(r)?;
        let mut removed = Vec::new();
        for (i, d) in r.disks.iter().enumerate() {
            if only.is_some_and(|o| !o[i]) {
                continue;
            }
            let name = d.path.to_str().expect("checked");
            if blobs.blob_size(name).map_err(az)?.is_some() {
                blobs.delete_blob(name).map_err(az)?;
                removed.push(d.path.clone());
            }
        }
        r.state = state.into();
        r.cleaned = Some(now_rfc3339());
        put(blobs, r)?;
        Ok(removed)
    }

    /// `ferry failover [--test] --vm VM --store azure://…`.
    pub(crate) fn test(a: &TestArgs) -> Result<Record, JobError> {
        use ferry_apply::lifecycle;
        if a.raw {
            return Err(JobError::Usage(
                "--format raw: an Azure failover makes page blobs (fixed VHDs, what managed disks are made of)".into(),
            ));
        }
        ferry_job::validate_name("VM", &a.vm)?;
        let (kind, what) = if a.real {
            ("failover", "failover")
        } else {
            ("test", "test failover")
        };
        // The process server of an Azure store keeps the VMs' lifecycle (cutover, final point,
        // failed over) in its staging directory: present where it runs (the appliance).
        let lroot = a.store.local_dir();
        let here = lroot.is_dir();
        let mut life = if here {
            lifecycle::load(&lroot, &a.vm).map_err(|e| JobError::Usage(e.to_string()))?
        } else {
            None
        };
        if life.as_ref().is_some_and(|l| l.retired()) {
            return Err(JobError::Usage(format!(
                "VM {}'s migration was completed: its points are gone",
                a.vm
            )));
        }
        let (blobs, account, container) = open(&a.store)?;
        if a.real {
            if let Some(l) = life.as_ref().filter(|l| l.state != lifecycle::CUT_OVER) {
                return Err(JobError::Usage(format!(
                    "VM {} was failed over already ({}, since {}); `ferry failover list --store {}` shows its disks",
                    a.vm, l.state, l.since, a.store
                )));
            }
            no_open_failover(&blobs, &a.vm)?;
        }
        let prefix = match &a.to {
            None if a.real => REAL_PREFIX.to_string(),
            None => DEFAULT_PREFIX.to_string(),
            Some(t) => {
                let t = t.to_str().unwrap_or("");
                let rest = t.strip_prefix("azure://").ok_or_else(|| {
                    JobError::Usage(format!(
                        "--to {t}: for an azure:// store give azure://{account}/{container}/PREFIX (the test failover's blobs go under it)"
                    ))
                })?;
                let mut it = rest.splitn(3, '/');
                let (acc, con, p) = (
                    it.next().unwrap_or(""),
                    it.next().unwrap_or(""),
                    it.next().unwrap_or(""),
                );
                let p = p.trim_matches('/');
                if acc != account || con != container {
                    return Err(JobError::Usage(format!(
                        "--to {t}: the blobs are server-side copies in the store's own container: azure://{account}/{container}/PREFIX"
                    )));
                }
                const RESERVED: [&str; 8] = [
                    "failover",
                    "pins",
                    "journal",
                    "manifests",
                    "replicas",
                    "failovers",
                    "lifecycle",
                    "segments",
                ];
                let first = p.split('/').next().unwrap_or("");
                if p.is_empty()
                    || p.split('/')
                        .any(|c| ferry_job::validate_name("prefix", c).is_err())
                    || (RESERVED.contains(&first) && !(a.real && first == REAL_PREFIX))
                {
                    return Err(JobError::Usage(format!(
                        "--to {t}: PREFIX must be names of A-Z a-z 0-9 . _ - separated by /, not starting with one of Ferry's own (failover, pins, journal, manifests, replicas, failovers, lifecycle, segments)"
                    )));
                }
                p.to_string()
            }
        };
        if a.real {
            // What would make the failover fail is checked before the source is shut down.
            let dir = format!("{prefix}/{}/", a.vm);
            if let Some((b, _)) = blobs.list(&dir).map_err(az)?.into_iter().next() {
                return Err(JobError::Usage(format!(
                    "blob {b} exists already: a failover writes the VM's disks under {dir}; delete them or give another --to azure://{account}/{container}/PREFIX{}",
                    if a.shutdown_source.is_some() { " (the source was not asked to cut over)" } else { "" }
                )));
            }
        }
        // One real failover of a VM at a time, across machines: a claim blob made with
        // If-None-Match, removed when this one ends.
        let _claim = if a.real {
            let c = Claim::take(&blobs, &a.vm)?;
            // Looked at again under the claim: one may have finished just before it.
            no_open_failover(&blobs, &a.vm)?;
            Some(c)
        } else {
            None
        };
        if let Some(wait) = a.shutdown_source {
            if !a.real {
                return Err(JobError::Usage(
                    "--shutdown-source is for a real failover (without --test)".into(),
                ));
            }
            if !here {
                return Err(JobError::Usage(format!(
                    "--shutdown-source asks the source through the process server: run it on the appliance (no process server state for {} in {})",
                    a.store,
                    lroot.display()
                )));
            }
            life = Some(shutdown_source(&lroot, &a.vm, wait)?);
        }
        let selector = selector(
            a,
            life.as_ref(),
            if here {
                ""
            } else {
                " known here (the process server records it; run this on the appliance, or give the point's id, which ferry-agent cutover printed)"
            },
        )?;
        let store = ferry_job::open_recovery(&a.store, None)?;
        let (vm, point) = ferry_job::resolve_point(store.as_ref(), Some(&a.vm), &selector)?;
        drop(store);
        if let Some(open) = records(&blobs)?.into_iter().find(|r| {
            !a.real && r.vm == vm && r.kind == "test" && r.state != "cleaned" && r.state != "failed"
        }) {
            return Err(JobError::Usage(format!(
                "VM {vm} has a test failover already ({}, in {}); remove it first: ferry failover --test --cleanup --vm {vm} --store {}",
                open.id,
                open.dir.display(),
                a.store
            )));
        }
        // Unique: the pid and a counter (a plan makes several in one process within a second).
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!(
            "{kind}-{}-{}{}-{}",
            point.seq,
            std::process::id(),
            if n == 0 {
                String::new()
            } else {
                format!("x{n}")
            },
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string()
                .replace([':', '-'], "")
                .trim_end_matches('Z')
        );
        let dir = blob_dir(&prefix, &vm, &id);
        let mut rec = Record {
            format: FORMAT.into(),
            version: VERSION,
            id: id.clone(),
            kind: kind.into(),
            vm: vm.clone(),
            point: point.id.clone(),
            point_seq: point.seq,
            point_time: point.time.clone(),
            point_kind: point.kind.clone(),
            created: now_rfc3339(),
            state: "creating".into(),
            dir: PathBuf::from(&dir),
            dir_created: true,
            disks: point
                .disks
                .iter()
                .map(|d| DiskOut {
                    disk: d.name.clone(),
                    path: PathBuf::from(format!("{dir}/{}", disk_file(&vm, &d.name, false))),
                    size: d.size,
                    blake3: d.blake3.clone(),
                    written: false,
                })
                .collect(),
            cleaned: None,
        };
        check(&rec)?;
        if !blobs
            .create_block_blob(
                &record_blob(&rec.id),
                serde_json::to_vec_pretty(&rec).expect("record serializes"),
            )
            .map_err(az)?
        {
            return Err(JobError::Usage(format!(
                "a failover record {id} exists already; try again in a second"
            )));
        }
        // Disks whose copy this failover started: only those are its to delete if it fails.
        let mut started = vec![false; rec.disks.len()];
        let made = (|| -> Result<(), JobError> {
            let _pin = ferry_job::azure_pins::pin_point(&blobs, &vm, point.seq)?;
            let listed = ferry_job::azure::load_manifest(&blobs, &vm)?
                .is_some_and(|m| m.points.iter().any(|p| p.seq == point.seq));
            if !listed {
                return Err(JobError::Usage(format!(
                    "point {} was just pruned by retention; choose another",
                    point.id
                )));
            }
            for (i, started) in started.iter_mut().enumerate() {
                let d = rec.disks[i].clone();
                let name = d.path.to_str().expect("utf-8");
                if blobs.blob_size(name).map_err(az)?.is_some() {
                    return Err(JobError::Usage(format!("blob {name} exists already")));
                }
                *started = true;
                ferry_job::azure::restore_to_blob(&blobs, &vm, &point, &d.disk, name, a.verify)?;
                rec.disks[i].written = true;
                put(&blobs, &rec)?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            return Err(match remove(&blobs, &mut rec, "failed", Some(&started)) {
                Ok(_) => JobError::Usage(format!(
                    "{what} of {vm} failed, and what it had made is deleted: {e}"
                )),
                Err(c) => JobError::Usage(format!(
                    "{what} of {vm} failed ({e}), and deleting what it made failed too ({c}): {}",
                    if a.real {
                        format!("delete the blobs under {dir}/ and failovers/{id}.json by hand")
                    } else {
                        format!(
                            "run `ferry failover --test --cleanup --vm {vm} --store {}`",
                            a.store
                        )
                    }
                )),
            });
        }
        rec.state = "ready".into();
        put(&blobs, &rec)?;
        if a.real && !here {
            errln!(
                "note: no process server state for {} here ({}): the failover is recorded in the container (failovers/{id}.json); if the appliance still runs, its server keeps accepting the VM's agent until complete-migration runs there",
                a.store,
                lroot.display()
            );
        }
        if a.real && here {
            // The process server stops expecting the agent; `final` stays known.
            let r = lifecycle::update(&lroot, &vm, |cur| match cur {
                Some(l) if l.state != lifecycle::CUT_OVER => Err(format!(
                    "the VM became {} while its disks were written",
                    l.state
                )),
                cur => {
                    let mut l = cur
                        .unwrap_or_else(|| lifecycle::Lifecycle::new(&vm, lifecycle::FAILED_OVER));
                    l.failover = Some(id.clone());
                    if l.state != lifecycle::FAILED_OVER {
                        l.enter(lifecycle::FAILED_OVER);
                    }
                    Ok((Some(l), ()))
                }
            });
            if let Err(e) = r {
                return Err(JobError::Usage(format!(
                    "the disks are written under {dir}/, but the VM's lifecycle record is not: {e}"
                )));
            }
        }
        event(
            &a.state_dir,
            ferry_serve::events::Event::new(
                "failover",
                Some(&vm),
                format!(
                    "{what} {id} at point {} ({}) into {}/{dir}/",
                    point.id, point.kind, a.store
                ),
            )
            .with(describe(&rec)),
        );
        Ok(rec)
    }

    /// The `az` commands that make managed disks and a test VM of the record's page blobs.
    pub(crate) fn az_commands(store: &StoreLocation, r: &Record) -> Vec<String> {
        let base = match open(store) {
            Ok((b, _, _)) => b.container_url().trim_end_matches('/').to_string(),
            Err(_) => String::from("https://ACCOUNT.blob.core.windows.net/CONTAINER"),
        };
        let mut c = Vec::new();
        let mut names = Vec::new();
        for d in &r.disks {
            let n = format!(
                "{}-{}-{}",
                r.vm,
                d.disk,
                r.id.split('-').next().unwrap_or("test")
            );
            c.push(format!(
                "az disk create -g RESOURCE_GROUP -n {n} --source {base}/{} --source-storage-account-id STORAGE_ACCOUNT_ID",
                d.path.display()
            ));
            names.push(n);
        }
        if let Some((os, data)) = names.split_first() {
            let mut vm = if r.kind == "test" {
                format!(
                    "az vm create -g RESOURCE_GROUP -n {}-test --attach-os-disk {os} --os-type linux --vnet-name ISOLATED_TEST_VNET --subnet SUBNET --public-ip-address \"\"",
                    r.vm
                )
            } else {
                format!(
                    "az vm create -g RESOURCE_GROUP -n {} --attach-os-disk {os} --os-type linux --vnet-name VNET --subnet SUBNET",
                    r.vm
                )
            };
            if !data.is_empty() {
                vm.push_str(&format!(" --attach-data-disks {}", data.join(" ")));
            }
            c.push(vm);
        }
        c
    }

    /// `--cleanup` of an Azure store's test failover.
    pub(crate) fn cleanup(
        store: &StoreLocation,
        vm: &str,
    ) -> Result<(Record, Vec<PathBuf>, bool), JobError> {
        let (blobs, _, _) = open(store)?;
        let Some(mut rec) = records(&blobs)?.into_iter().find(|r| {
            r.vm == vm && r.kind == "test" && r.state != "cleaned" && r.state != "failed"
        }) else {
            return Err(JobError::Usage(format!(
                "VM {vm} has no test failover to clean up (`ferry failover list --store {store}` shows them)"
            )));
        };
        let removed = remove(&blobs, &mut rec, "cleaned", None)?;
        Ok((rec, removed, true))
    }

    /// `ferry complete-migration` of an Azure store where no process server state is (the
    /// appliance is lost, or this is another machine): the container's data of the VM is deleted
    /// (the VM is marked retired there first: `ferry apply` skips it); no agent can be refused
    /// from here.
    pub(crate) fn complete_offline(a: &CompleteArgs) -> Result<(), JobError> {
        ferry_job::validate_name("VM", &a.vm)?;
        let vm = &a.vm;
        let blobs = blobs(&a.store)?;
        let all = records(&blobs)?;
        let failed_over = all
            .iter()
            .find(|r| &r.vm == vm && r.kind == "failover" && r.state == "ready");
        if ferry_job::azure::load_manifest(&blobs, vm)
            .map_err(|e| JobError::Azure(e.to_string()))?
            .is_none()
            && !ferry_job::azure::is_retired(&blobs, vm)?
        {
            return Err(JobError::Usage(format!(
                "store {} has no VM '{vm}' (ferry points list --store {} shows them)",
                a.store, a.store
            )));
        }
        if failed_over.is_none() && !a.force {
            return Err(JobError::Usage(format!(
                "VM {vm} has not been failed over (no failover record in {}): complete-migration deletes every point of it. Fail over first (ferry failover --vm {vm} --store {}), or give --force",
                a.store, a.store
            )));
        }
        if let Some(t) = all.iter().find(|r| {
            &r.vm == vm && r.kind == "test" && r.state != "cleaned" && r.state != "failed"
        }) {
            return Err(JobError::Usage(format!(
                "VM {vm} has a test failover ({}, in {}): clean it up first (ferry failover --test --cleanup --vm {vm} --store {})",
                t.id,
                t.dir.display(),
                a.store
            )));
        }
        let r = ferry_job::azure::remove_vm(&blobs, vm)?;
        event(
            &a.state_dir,
            ferry_serve::events::Event::new(
                "migration",
                Some(vm),
                format!(
                    "operator completed the migration without the process server: {} point(s), {} replica(s) deleted from {}",
                    r.points, r.replicas, a.store
                ),
            ),
        );
        if a.json {
            outln!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "vm": vm, "state": "retired", "failover": failed_over.map(|f| &f.id),
                    "forced": failed_over.is_none(), "azure": r, "process_server": false,
                }))
                .expect("json")
            );
        } else {
            outln!(
                "migration of {vm} is completed: deleted from {} its manifest ({} point(s)), {} replica page blob(s) with their snapshots ({}) and {} other blob(s)",
                a.store,
                r.points,
                r.replicas,
                crate::units::human(r.replica_bytes),
                r.other
            );
            if let Some(f) = failed_over {
                outln!(
                    "  the failed-over disks stay (failover {}, under {})",
                    f.id,
                    f.dir.display()
                );
            }
        }
        errln!(
            "note: no process server state for {} here ({}): if the appliance still runs, run complete-migration there too, so that its server refuses the VM's agent",
            a.store,
            a.store.local_dir().display()
        );
        Ok(())
    }

    /// Refuses a real failover of a VM that has one (made, or being made) in the container.
    fn no_open_failover(blobs: &ferry_azure::AzureBlobs, vm: &str) -> Result<(), JobError> {
        match records(blobs)?.into_iter().find(|r| {
            r.vm == vm && r.kind == "failover" && r.state != "cleaned" && r.state != "failed"
        }) {
            None => Ok(()),
            Some(open) => Err(JobError::Usage(format!(
                "VM {vm} has a failover already ({}, at point {}, in {}, {}){}",
                open.id,
                open.point,
                open.dir.display(),
                open.state,
                if open.state == "creating" {
                    "; if no failover runs any more, delete its record blob failovers/ID.json and its blobs, and try again"
                } else {
                    ""
                }
            ))),
        }
    }

    /// `failovers/VM.claim`: a real failover of the VM is running (on any machine).
    struct Claim<'a> {
        blobs: &'a ferry_azure::AzureBlobs,
        name: String,
    }

    impl<'a> Claim<'a> {
        fn take(blobs: &'a ferry_azure::AzureBlobs, vm: &str) -> Result<Claim<'a>, JobError> {
            let name = format!("failovers/{vm}.claim");
            let body = format!(
                "{{\"pid\": {}, \"host\": {:?}, \"since\": {:?}}}\n",
                std::process::id(),
                std::fs::read_to_string("/etc/hostname")
                    .unwrap_or_default()
                    .trim(),
                now_rfc3339()
            );
            if blobs
                .create_block_blob(&name, body.into_bytes())
                .map_err(az)?
            {
                return Ok(Claim { blobs, name });
            }
            let who = blobs
                .get_blob(&name)
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                .unwrap_or_default();
            Err(JobError::Usage(format!(
                "another failover of {vm} is running ({name}: {who}); if none runs any more (it was killed), delete that blob and try again"
            )))
        }
    }

    impl Drop for Claim<'_> {
        fn drop(&mut self) {
            if let Err(e) = self.blobs.delete_blob(&self.name) {
                errln!(
                    "warning: cannot delete {}: {e}; delete it before the next failover of this VM",
                    self.name
                );
            }
        }
    }

    /// The container of an Azure store.
    pub(crate) fn blobs(store: &StoreLocation) -> Result<ferry_azure::AzureBlobs, JobError> {
        open(store).map(|(b, _, _)| b)
    }

    /// Whether the VM has a test failover to clean up.
    pub(crate) fn has_open_test(store: &StoreLocation, vm: &str) -> Result<bool, JobError> {
        let (blobs, _, _) = open(store)?;
        Ok(records(&blobs)?
            .iter()
            .any(|r| r.vm == vm && r.kind == "test" && r.state != "cleaned" && r.state != "failed"))
    }

    /// The records, for `list`.
    pub(crate) fn all(store: &StoreLocation) -> Result<Vec<Record>, JobError> {
        let (blobs, _, _) = open(store)?;
        records(&blobs)
    }
}
