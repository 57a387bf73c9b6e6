//! Test-only helpers shared by Ferry's test suites (never linked into a binary users run).
//!
//! - [`skip`]: the one way a test may decline to run (below).
//! - [`sys`]: what this machine has (root, loop devices, BTF, tools) and running commands.
//! - [`loopdev`]: loop devices (attach, partitions, mounts), detached on drop, attached one at a
//!   time.
//! - [`mariadb`]: a throw-away MariaDB server on a unix socket.
//! - [`proc`]: child processes logging to a file (the Ferry binaries), their log, SIGTERM/SIGKILL,
//!   and the binaries built next to a test's own.
//!
//! [`skip`] is the one way a test may decline to run: it is a failure when the named
//! `FERRY_REQUIRE_*` variable is `1` (scripts/test sets them where everything is installed), and
//! otherwise it is written past the test harness's output capture *and* appended to the file named
//! by `FERRY_SKIP_LOG`, which scripts/test prints in its summary, so a passing run shows every skip.

use std::io::Write;

pub mod loopdev;
pub mod mariadb;
pub mod proc;
pub mod sys;

/// Declines to run `test` because of `why`. Panics if `require_var` is set to `1`.
pub fn skip(test: &str, why: &str, require_var: &str) {
    if std::env::var_os(require_var).is_some_and(|v| v == "1") {
        panic!("{test} cannot run: {why}; {require_var}=1, so this is a failure, not a skip");
    }
    let line = format!("SKIPPED {test}: {why} (set {require_var}=1 to make this a failure)");
    // Straight to the process's stderr: libtest captures print!/eprint!, not this.
    let _ = writeln!(std::io::stderr(), "\n*** {line} ***\n");
    if let Some(p) = std::env::var_os("FERRY_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_logged_and_a_required_one_fails() {
        let d = std::env::temp_dir().join(format!("ferry-testkit-{}", std::process::id()));
        // SAFETY of the environment: this test is the only one in this crate touching these
        // variables, and tests in one binary that read them are in this module only.
        std::env::set_var("FERRY_SKIP_LOG", &d);
        skip("t1", "no widget", "FERRY_REQUIRE_TESTKIT_SELFTEST");
        let log = std::fs::read_to_string(&d).unwrap();
        assert!(log.contains("SKIPPED t1: no widget"), "{log}");
        std::env::set_var("FERRY_REQUIRE_TESTKIT_SELFTEST", "1");
        let r =
            std::panic::catch_unwind(|| skip("t2", "no gadget", "FERRY_REQUIRE_TESTKIT_SELFTEST"));
        assert!(r.is_err(), "a required skip must fail");
        let _ = std::fs::remove_file(&d);
    }
}
