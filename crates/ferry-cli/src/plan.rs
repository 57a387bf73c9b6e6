//! Recovery plans: `ferry failover --plan NAME [--test] [--cleanup]` fails a set of VMs over in
//! ordered groups (the database first, then the web tier), with optional scripts before and after
//! each group and waits between them.
//!
//! A plan is a TOML file: `--plan NAME` reads `PLANS_DIR/NAME.toml` (`/etc/ferry/plans` unless
//! `--plans-dir` or `FERRY_PLANS_DIR` says otherwise); a `--plan` that contains a `/` or ends in
//! `.toml` is a path. Format (docs/CONFIGURATION.md):
//!
//! ```toml
//! description = "the shop: database first, then the web tier"
//! point = "latest"          # default for every VM: latest | latest-app | final | an id
//! to = "/srv/failover"      # default --to
//!
//! [[group]]
//! name = "database"
//! vms = ["db01"]
//! post = "/etc/ferry/plans/check-db.sh"   # run after the group; failing stops the plan
//! wait = "30s"                             # then wait this long
//!
//! [[group]]
//! name = "web"
//! vms = ["web01", "web02"]
//! pre = "/etc/ferry/plans/web-pre.sh"
//! ```
//!
//! - Groups run in order; the VMs of a group one after the other, each at its own point (no
//!   consistency across VMs). A failure (a VM's failover, a script exiting non-zero) stops the
//!   plan: what was made stays and is listed (`--cleanup` removes test failovers).
//! - Scripts run as root would run anything: each must be a regular file owned by root or the
//!   caller and writable by no one else. They get `FERRY_PLAN`, `FERRY_GROUP`, `FERRY_PLAN_MODE`
//!   (`test` or `failover`), `FERRY_VMS` (the group's, space-separated) and `FERRY_PLAN_RESULT`
//!   (a JSON file of every VM failed over so far, with its disks), and get 10 minutes.
//! - `--test --cleanup` cleans up the test failovers of the plan's VMs, last group first (VMs
//!   with none are skipped).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_job::plan::{parse, Group};
use ferry_job::{JobError, PointSelector, StoreLocation};
use serde_json::json;

/// Default directory of plans.
pub const DEFAULT_PLANS_DIR: &str = "/etc/ferry/plans";
/// Longest a plan script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

/// Where `--plan NAME` is.
fn plan_path(name: &str, dir: &Path) -> Result<PathBuf, JobError> {
    if name.contains('/') || name.ends_with(".toml") {
        return Ok(PathBuf::from(name));
    }
    ferry_job::validate_name("plan", name)?;
    Ok(dir.join(format!("{name}.toml")))
}

/// A script may run if it is a regular file of root or the caller that no one else may write,
/// in directories no one else may change (a sticky one, like /tmp, excepted).
fn check_script(p: &Path) -> Result<(), JobError> {
    check_trusted(p, "plan script")?;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p)
        .map_err(|e| JobError::Usage(format!("plan script {}: {e}", p.display())))?;
    if m.mode() & 0o111 == 0 {
        return Err(JobError::Usage(format!(
            "plan script {} is not executable (chmod +x)",
            p.display()
        )));
    }
    Ok(())
}

/// A file that decides what runs as this user (a plan, its scripts): a regular file of root or
/// the caller, writable by no one else, in directories no one else may change.
fn check_trusted(p: &Path, what: &str) -> Result<(), JobError> {
    use std::os::unix::fs::MetadataExt;
    let p = &std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let m = std::fs::symlink_metadata(p)
        .map_err(|e| JobError::Usage(format!("{what} {}: {e}", p.display())))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !m.file_type().is_file() || (m.uid() != 0 && m.uid() != me) || m.mode() & 0o022 != 0 {
        return Err(JobError::Usage(format!(
            "{what} {} is not used: it must be a regular file (no link) owned by root or you, writable by no one else (chmod go-w)",
            p.display()
        )));
    }
    let mut dir = p.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        let dm = std::fs::symlink_metadata(d)
            .map_err(|e| JobError::Usage(format!("{}: {e}", d.display())))?;
        let open = dm.mode() & 0o022 != 0 && dm.mode() & 0o1000 == 0;
        if dm.file_type().is_symlink() || (dm.uid() != 0 && dm.uid() != me) || open {
            return Err(JobError::Usage(format!(
                "{what} {} is not used: its directory {} is a link, or another user's, or writable by others",
                p.display(),
                d.display()
            )));
        }
        dir = d.parent();
    }
    Ok(())
}

fn run_script(
    p: &Path,
    plan: &str,
    group: &Group,
    mode: &str,
    result: &Path,
) -> Result<(), JobError> {
    check_script(p)?;
    use std::os::unix::process::CommandExt;
    // Its output goes to stderr: stdout is the plan's report (`--json`).
    let out = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| JobError::Usage(format!("cannot pass stderr to {}: {e}", p.display())))?;
    let mut child = std::process::Command::new(p)
        .process_group(0)
        .stdout(std::process::Stdio::from(out))
        .env("FERRY_PLAN", plan)
        .env("FERRY_GROUP", &group.name)
        .env("FERRY_PLAN_MODE", mode)
        .env("FERRY_VMS", group.vms.join(" "))
        .env("FERRY_PLAN_RESULT", result)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| JobError::Usage(format!("cannot run {}: {e}", p.display())))?;
    let t = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => {
                return Err(JobError::Usage(format!(
                    "plan script {} of group {} failed ({st}): the plan stops here",
                    p.display(),
                    group.name
                )))
            }
            Ok(None) if t.elapsed() > SCRIPT_TIMEOUT => {
                // The whole group: what the script started goes too.
                // SAFETY: kill(2) of the process group the child leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Err(JobError::Usage(format!(
                    "plan script {} ran over {} s and was killed: the plan stops here",
                    p.display(),
                    SCRIPT_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(JobError::Usage(format!("{}: {e}", p.display()))),
        }
    }
}

/// What `ferry failover --plan` was asked.
pub(crate) struct Args {
    pub name: String,
    pub plans_dir: PathBuf,
    pub test: bool,
    pub cleanup: bool,
    pub store: StoreLocation,
    pub key_file: PathBuf,
    /// `--point`, when given (else the plan's, else latest).
    pub point: Option<PointSelector>,
    pub to: Option<PathBuf>,
    pub raw: bool,
    pub threads: usize,
    pub json: bool,
    pub state_dir: Option<PathBuf>,
}

/// `ferry failover --plan NAME [--test] [--cleanup]`.
pub(crate) fn run(a: Args) -> Result<(), JobError> {
    let path = plan_path(&a.name, &a.plans_dir)?;
    if path.exists() {
        check_trusted(&path, "plan")?;
    }
    let text = std::fs::read_to_string(&path).map_err(|e| {
        JobError::Usage(format!(
            "plan {}: {e} (plans are {}/NAME.toml; --plans-dir, or give a path)",
            path.display(),
            a.plans_dir.display()
        ))
    })?;
    let plan =
        parse(&text).map_err(|e| JobError::Usage(format!("plan {}: {e}", path.display())))?;
    let mode = if a.test { "test" } else { "failover" };
    if let (Some(d), false) = (&plan.description, a.json) {
        outln!("plan {}: {d}", a.name);
    }
    if a.cleanup {
        if !a.test {
            return Err(JobError::Usage(
                "--cleanup removes test failovers: give --test --cleanup (a real failover is ended with ferry complete-migration)".into(),
            ));
        }
        let mut cleaned = Vec::new();
        for g in plan.groups.iter().rev() {
            for vm in g.vms.iter().rev() {
                if crate::failover::has_open_test(&a.store, vm)? {
                    let (rec, removed, _) = crate::failover::cleanup_vm(&a.store, vm)?;
                    if !a.json {
                        outln!(
                            "group {}: {vm}: test failover {} cleaned up ({} file(s) removed)",
                            g.name,
                            rec.id,
                            removed.len()
                        );
                    }
                    cleaned
                        .push(json!({"group": g.name, "vm": vm, "id": rec.id, "removed": removed}));
                } else if !a.json {
                    outln!("group {}: {vm}: no test failover", g.name);
                }
            }
        }
        crate::failover::event(
            &a.state_dir,
            ferry_serve::events::Event::new(
                "plan",
                None,
                format!(
                    "plan {}: test failovers cleaned up ({})",
                    a.name,
                    cleaned.len()
                ),
            ),
        );
        if a.json {
            outln!("{}", json!({"plan": a.name, "cleaned": cleaned}));
        }
        return Ok(());
    }
    let point = match (&a.point, &plan.point) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => p.parse().map_err(JobError::Usage)?,
        (None, None) => PointSelector::Latest,
    };
    let to = a.to.clone().or(plan.to.clone());
    // Every VM's failovers so far, for the scripts (FERRY_PLAN_RESULT) and the report.
    // In a new private directory: no one can plant or pre-create the file.
    let tmp = {
        use std::os::unix::fs::DirBuilderExt;
        let mut n = 0u32;
        loop {
            let d = std::env::temp_dir().join(format!("ferry-plan-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&d) {
                Ok(()) => break d,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => {
                    return Err(JobError::Usage(format!(
                        "cannot create {}: {e}",
                        d.display()
                    )))
                }
            }
        }
    };
    let result = tmp.join("result.json");
    let mut done: Vec<serde_json::Value> = Vec::new();
    let write_result = |done: &Vec<serde_json::Value>| -> Result<(), JobError> {
        ferry_durable::write_private(
            &result,
            serde_json::to_string_pretty(&json!({"plan": a.name, "mode": mode, "vms": done}))
                .expect("json")
                .as_bytes(),
        )
        .map_err(|e| JobError::Usage(format!("cannot write {}: {e}", result.display())))
    };
    write_result(&done)?;
    crate::failover::event(
        &a.state_dir,
        ferry_serve::events::Event::new(
            "plan",
            None,
            format!(
                "plan {} started ({mode}, {} group(s))",
                a.name,
                plan.groups.len()
            ),
        ),
    );
    let outcome = (|| -> Result<(), JobError> {
        for (i, g) in plan.groups.iter().enumerate() {
            if !a.json {
                outln!(
                    "group {} ({}/{}): {}",
                    g.name,
                    i + 1,
                    plan.groups.len(),
                    g.vms.join(", ")
                );
            }
            if let Some(s) = &g.pre {
                run_script(s, &a.name, g, mode, &result)?;
            }
            for vm in &g.vms {
                let rec = crate::failover::failover_vm(&crate::failover::TestArgs {
                    store: a.store.clone(),
                    key_file: a.key_file.clone(),
                    vm: vm.clone(),
                    point: point.clone(),
                    to: to.clone(),
                    raw: a.raw,
                    verify: false,
                    threads: a.threads,
                    json: a.json,
                    real: !a.test,
                    state_dir: a.state_dir.clone(),
                    shutdown_source: None,
                })
                .map_err(|e| {
                    JobError::Usage(format!(
                        "group {}, VM {vm}: {e}; the plan stops here",
                        g.name
                    ))
                })?;
                if !a.json {
                    outln!(
                        "  {vm}: point {} ({}) → {}",
                        rec.point,
                        rec.point_kind,
                        rec.dir.display()
                    );
                }
                let mut d = crate::failover::describe_pub(&rec);
                d["group"] = json!(g.name);
                done.push(d);
                write_result(&done)?;
            }
            if let Some(s) = &g.post {
                run_script(s, &a.name, g, mode, &result)?;
            }
            if let Some(w) = &g.wait {
                let w = humantime::parse_duration(w).expect("checked by parse");
                if i + 1 < plan.groups.len() {
                    if !a.json {
                        outln!(
                            "  waiting {} before the next group",
                            humantime::format_duration(w)
                        );
                    }
                    std::thread::sleep(w);
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&result);
    let _ = std::fs::remove_dir(&tmp);
    let msg = match &outcome {
        Ok(()) => format!("plan {} done ({mode}): {} VM(s)", a.name, done.len()),
        Err(e) => format!(
            "plan {} stopped ({mode}) after {} VM(s): {e}",
            a.name,
            done.len()
        ),
    };
    crate::failover::event(
        &a.state_dir,
        ferry_serve::events::Event::new("plan", None, msg.clone()),
    );
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "plan": a.name, "mode": mode, "ok": outcome.is_ok(),
                "error": outcome.as_ref().err().map(|e| e.to_string()),
                "vms": done,
            }))
            .expect("json")
        );
    } else if outcome.is_ok() {
        outln!("{msg}");
        if a.test {
            outln!(
                "When done: ferry failover --plan {} --test --cleanup --store {}",
                a.name,
                a.store
            );
        }
    }
    outcome
}
