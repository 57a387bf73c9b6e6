//! What this machine has, and running commands.

use std::path::Path;
use std::process::Command;

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Effective uid 0.
    Root,
    /// `/dev/loop-control`.
    LoopDevices,
    /// `/sys/kernel/btf/vmlinux` (the eBPF tracker).
    Btf,
    /// A command on `PATH` (or in `/usr/sbin`, `/sbin`).
    Tool(&'static str),
}

/// Whether we run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `cmd` can be run.
pub fn have(cmd: &str) -> bool {
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success());
    on_path
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(cmd).exists())
}

/// Why `needs` are not all met here (the first one missing), or `None`.
pub fn missing(needs: &[Need]) -> Option<String> {
    for n in needs {
        match n {
            Need::Root if !is_root() => return Some("not running as root".into()),
            Need::LoopDevices if !Path::new("/dev/loop-control").exists() => {
                return Some("no loop devices (/dev/loop-control missing)".into())
            }
            Need::Btf if !Path::new("/sys/kernel/btf/vmlinux").exists() => {
                return Some("no kernel BTF (the eBPF tracker cannot run)".into())
            }
            Need::Tool(t) if !have(t) => return Some(format!("{t} is not installed")),
            _ => {}
        }
    }
    None
}

/// Runs `cmd args`; its trimmed stdout, or an error with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd} {} failed ({}): {}{}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Runs a shell script; its trimmed stdout. Panics (with its output) if it fails.
pub fn sh(script: &str) -> String {
    run("sh", &["-c", script]).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_names_the_first_need_not_met() {
        assert_eq!(missing(&[Need::Tool("sh")]), None);
        let m = missing(&[Need::Tool("sh"), Need::Tool("no-such-tool-ferry")]);
        assert_eq!(m.as_deref(), Some("no-such-tool-ferry is not installed"));
        assert_eq!(sh("echo ' hi '"), "hi");
        let e = run("sh", &["-c", "echo oops >&2; exit 3"]).unwrap_err();
        assert!(e.contains("oops") && e.contains("exit status: 3"), "{e}");
    }
}
