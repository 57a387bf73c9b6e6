//! Can the eBPF tracker run on this machine, and if not, why not.

use std::path::Path;

use crate::tracker::load;
use crate::Tracker;

const BTF: &str = "/sys/kernel/btf/vmlinux";
const MIN_KERNEL: (u32, u32) = (5, 12);
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

impl Tracker {
    /// `Ok` when the eBPF tracker can run here, else why not, as one line a log can carry (the
    /// caller falls back to the scan tracker). Checks, in order: kernel BTF, kernel >= 5.12,
    /// privileges (root, or CAP_BPF + CAP_PERFMON), then loads the programs through the verifier
    /// without attaching them, which catches whatever the static checks cannot (a kernel without
    /// the tracepoints, BPF disabled, a lockdown mode).
    pub fn available() -> Result<(), String> {
        if !Path::new(BTF).exists() {
            return Err(format!(
                "no kernel BTF at {BTF} (the kernel is built without CONFIG_DEBUG_INFO_BTF)"
            ));
        }
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_err(|e| format!("cannot read the kernel version: {e}"))?;
        match parse_release(&release) {
            Some(v) if v >= MIN_KERNEL => {}
            _ => {
                return Err(format!(
                    "kernel {} is older than {}.{} (needs bio->bi_bdev and BPF atomics)",
                    release.trim(),
                    MIN_KERNEL.0,
                    MIN_KERNEL.1
                ))
            }
        }
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
        let caps = effective_caps(&status).unwrap_or(0);
        let has = |cap: u32| caps & (1u64 << cap) != 0;
        if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) {
            return Err(
                "not privileged: needs root, or CAP_BPF and CAP_PERFMON (e.g. AmbientCapabilities= \
                 in the systemd unit)"
                    .to_owned(),
            );
        }
        load(1, 2, 16)
            .map(drop)
            .map_err(|e| format!("the kernel refused the tracker programs: {e}"))
    }
}

/// `6.18.44-fc-v782` -> (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The `CapEff:` mask of a `/proc/PID/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.44-fc-v782\n"), Some((6, 18)));
        assert_eq!(parse_release("5.12.0"), Some((5, 12)));
        assert_eq!(parse_release("4.19.0-26-amd64"), Some((4, 19)));
        assert!(parse_release("4.19.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_release("weird"), None);
    }

    #[test]
    fn caps() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }
}
