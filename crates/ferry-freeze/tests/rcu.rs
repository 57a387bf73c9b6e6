//! RCU grace periods are expedited while FIFREEZE runs, and only then: the machine's real switch
//! (/sys/kernel/rcu_expedited) is watched from another thread during a freeze that has 64 MiB to
//! flush, and read after it; and the real watchdog binary puts the switch back when the agent's
//! end of it closes without a clean end (the agent died inside FIFREEZE). Its own test binary:
//! the switch is the whole machine's. Needs root and a loop disk; skips loudly otherwise.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use ferry_freeze::rcu::{KNOB, MARKER};

/// The two tests share the machine's switch: one at a time.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one() -> std::sync::MutexGuard<'static, ()> {
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn knob() -> String {
    std::fs::read_to_string(KNOB).unwrap().trim().to_owned()
}

/// Why the switch cannot be used here (or is someone else's 1), if so.
fn knob_skip_reason() -> Option<String> {
    if !ferry_freeze::is_root() {
        return Some("not running as root (the RCU switch needs it)".into());
    }
    match std::fs::read_to_string(KNOB) {
        Ok(v) if v.trim() == "0" => None,
        Ok(v) => Some(format!("{KNOB} is {} (someone else's choice)", v.trim())),
        Err(e) => Some(format!("cannot read {KNOB}: {e}")),
    }
}

/// Freezes an ext4 with 64 MiB dirty (no presync: FIFREEZE flushes it) while a thread watches the
/// switch; returns whether it saw 1 during the freeze.
fn freeze_watching(expedite: bool) -> bool {
    let mut d = LoopDisk::new(256, &[]);
    let dev = d.dev.clone();
    let mnt = d.mkfs_mount(&dev, "ext4", "fs");
    std::fs::write(mnt.join("dirty"), vec![7u8; 64 << 20]).unwrap();
    let seen = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    /// Stops the watcher however the scope ends (a failed assertion included).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if knob() == "1" {
                    seen.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let g = freezer()
            .presync(false)
            .expedite_rcu(expedite)
            .freeze(&[&mnt], Duration::from_secs(10))
            .unwrap();
        // Back to 0 as soon as FIFREEZE returned, while still frozen.
        assert_eq!(knob(), "0", "the switch stays on after FIFREEZE");
        assert!(
            !Path::new(MARKER).exists(),
            "the marker outlives the freeze"
        );
        g.finish().unwrap();
    });
    seen.load(Ordering::Relaxed)
}

#[test]
fn grace_periods_are_expedited_while_fifreeze_runs_and_only_then() {
    let test = "grace_periods_are_expedited_while_fifreeze_runs_and_only_then";
    let _one = one();
    if let Some(why) = loop_skip_reason(&["mkfs.ext4"]).or_else(knob_skip_reason) {
        skip(test, &why);
        return;
    }
    assert!(
        freeze_watching(true),
        "the switch was never 1 during FIFREEZE"
    );
    assert!(
        !freeze_watching(false),
        "expedite_rcu(false) turned the switch on"
    );
    assert_eq!(knob(), "0");
}

#[test]
fn the_watchdog_puts_the_switch_back_when_the_agent_dies_inside_fifreeze() {
    let test = "the_watchdog_puts_the_switch_back_when_the_agent_dies_inside_fifreeze";
    let _one = one();
    if let Some(why) = knob_skip_reason() {
        skip(test, &why);
        return;
    }
    // The real binary, as the agent starts it: the protocol, no mount points, one end of a
    // SOCK_SEQPACKET pair on its standard input.
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair");
    // SAFETY: both are fresh descriptors owned by nothing else.
    let (ours, theirs) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-thaw-watchdog"))
        .arg("ferry-thaw-watchdog-v1")
        .stdin(std::process::Stdio::from(theirs))
        .spawn()
        .unwrap();
    let mut ready = [0u8; 16];
    // SAFETY: a read into a buffer we own.
    let n = unsafe {
        use std::os::fd::AsRawFd;
        libc::read(ours.as_raw_fd(), ready.as_mut_ptr().cast(), ready.len())
    };
    assert_eq!((n, ready[0]), (1, b'R'), "the watchdog's ready message");
    // What an agent leaves when it dies inside FIFREEZE: its marker, the switch on...
    std::fs::create_dir_all(Path::new(MARKER).parent().unwrap()).unwrap();
    std::fs::write(MARKER, "1\n").unwrap();
    std::fs::write(KNOB, "1").unwrap();
    // ...and its end of the socket closed by the kernel, with no clean end.
    drop(ours);
    assert!(child.wait().unwrap().success());
    let (now, marker) = (knob(), Path::new(MARKER).exists());
    // Whatever the outcome, leave the machine as it was.
    let _ = std::fs::write(KNOB, "0");
    let _ = std::fs::remove_file(MARKER);
    assert_eq!(now, "0", "the watchdog left the switch on");
    assert!(!marker, "the watchdog left the marker");
}
