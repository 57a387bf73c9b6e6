//! The agent's Debian package (`packaging/deb/build-agent`), built from this build's binaries and
//! installed into a throw-away root with dpkg (`--root`, maintainer scripts run chroot-less with
//! DPKG_ROOT): reproducible, the files and Depends an installed agent needs, a commented
//! configuration the agent accepts, nothing started before registration, an unregistered agent
//! that exits with the status its unit does not restart, remove keeping the state and the edited
//! configuration, purge removing both. Needs root and dpkg; costs ~5 s.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_testkit::sys::{missing, Need};

/// The command's stdout, once it succeeded (`common::ok` panics otherwise, showing both streams).
fn ok(o: &Output, what: &str) -> String {
    common::ok(o, what);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the .deb from the binaries next to the test's `ferry-agent` into `out`, under `umask`.
fn build(out: &Path, umask: &str) -> PathBuf {
    let bins = common::agent_bin().parent().unwrap().to_owned();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("umask {umask}; exec bash \"$0\" \"$@\""))
        .arg(repo().join("packaging/deb/build-agent"))
        .args(["--no-build", "--bin-dir"])
        .arg(&bins)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    PathBuf::from(ok(&o, "packaging/deb/build-agent").trim())
}

#[test]
fn the_agent_deb_installs_starts_nothing_unregistered_and_purge_removes_its_state() {
    if let Some(why) = missing(&[
        Need::Root,
        Need::Tool("dpkg-deb"),
        Need::Tool("dpkg"),
        Need::Tool("objdump"),
    ]) {
        ferry_testkit::skip(
            "the_agent_deb_installs_starts_nothing_unregistered_and_purge_removes_its_state",
            &why,
            "FERRY_REQUIRE_ROOT_TESTS",
        );
        return;
    }
    let env = common::Env::new();
    let deb = build(&env.path("out1"), "0022");
    // Another umask: the same package (its modes are the script's, not the builder's).
    let deb2 = build(&env.path("out2"), "0002");
    assert_eq!(
        fs::read(&deb).unwrap(),
        fs::read(&deb2).unwrap(),
        "the same binaries gave different packages"
    );
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("ferry-agent_") && name.ends_with("_amd64.deb"),
        "{name}"
    );
    let field = |f: &str| {
        ok(
            &Command::new("dpkg-deb")
                .arg("-f")
                .arg(&deb)
                .arg(f)
                .output()
                .unwrap(),
            "dpkg-deb -f",
        )
    };
    let depends = field("Depends");
    for p in ["libc6", "libelf1", "zlib1g"] {
        assert!(depends.contains(p), "Depends: {depends}");
    }
    let contents = ok(
        &Command::new("dpkg-deb")
            .arg("--contents")
            .arg(&deb)
            .output()
            .unwrap(),
        "dpkg-deb --contents",
    );
    for p in [
        "./usr/bin/ferry-agent",
        "./usr/libexec/ferry/ferry-thaw-watchdog",
        "./lib/systemd/system/ferry-agent.service",
        "./etc/ferry/agent.toml",
        "./etc/ferry/hooks.d/",
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.ends_with(p) && l.starts_with(if p.ends_with('/') { 'd' } else { '-' })),
            "{p} missing:\n{contents}"
        );
    }

    // A throw-away root with an empty dpkg database.
    let root = env.path("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("var/lib/dpkg/status"), b"").unwrap();
    let dpkg = |args: &[&str]| {
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args)
            .output()
            .unwrap()
    };
    let o = dpkg(&["-i", deb.to_str().unwrap()]);
    let said = ok(&o, "dpkg -i");
    assert!(
        said.contains("protects nothing yet") && said.contains("ferry-agent register"),
        "{said}"
    );
    // Nothing enabled or started: no wants link anywhere in the root.
    assert!(!root
        .join("etc/systemd/system/multi-user.target.wants")
        .exists());
    let state = root.join("var/lib/ferry-agent");
    assert_eq!(
        fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let unit = fs::read_to_string(root.join("lib/systemd/system/ferry-agent.service")).unwrap();
    // Starts without an agent.toml (the default is read only if it exists), and a configuration
    // error (exit 2) or a retired VM (exit 3) is not restarted.
    assert!(
        unit.lines().any(|l| l == "ExecStart=/usr/bin/ferry-agent"),
        "{unit}"
    );
    assert!(
        unit.lines().any(|l| l == "RestartPreventExitStatus=2 3"),
        "{unit}"
    );
    let wd = root.join("usr/libexec/ferry/ferry-thaw-watchdog");
    assert_eq!(
        fs::metadata(&wd).unwrap().permissions().mode() & 0o777,
        0o755
    );

    // The installed agent accepts the packaged configuration and, not registered, exits with 2.
    let o = Command::new(root.join("usr/bin/ferry-agent"))
        .arg("--config")
        .arg(root.join("etc/ferry/agent.toml"))
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("not registered") && e.contains("ferry-agent register"),
        "{e}"
    );

    // Registered (its identity file), the configuration edited; remove keeps both.
    fs::write(state.join("agent.json"), b"{}").unwrap();
    let conf = root.join("etc/ferry/agent.toml");
    let mut edited = fs::read_to_string(&conf).unwrap();
    edited.push_str("vm = \"web01\"\n");
    fs::write(&conf, &edited).unwrap();
    ok(&dpkg(&["-r", "ferry-agent"]), "dpkg -r");
    assert!(!root.join("usr/bin/ferry-agent").exists());
    assert!(!wd.exists());
    assert!(
        state.join("agent.json").exists(),
        "remove dropped the agent's state"
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
    // Reinstalled over the kept state: registered, so no "next steps"; not enabled, so it says
    // how to resume.
    let said = ok(&dpkg(&["-i", deb.to_str().unwrap()]), "dpkg -i again");
    assert!(!said.contains("protects nothing yet"), "{said}");
    assert!(
        said.contains("systemctl enable --now ferry-agent resumes"),
        "{said}"
    );
    assert_eq!(
        fs::read_to_string(&conf).unwrap(),
        edited,
        "the edited conffile was replaced"
    );
    // Enabled (as `systemctl enable` does): an upgrade says nothing; the enablement outlives a
    // remove and goes with a purge, with the state and the configuration.
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/lib/systemd/system/ferry-agent.service",
        wants.join("ferry-agent.service"),
    )
    .unwrap();
    let said = ok(&dpkg(&["-i", deb.to_str().unwrap()]), "dpkg -i (upgrade)");
    assert!(
        !said.contains("protects nothing yet") && !said.contains("resumes protection"),
        "{said}"
    );
    ok(&dpkg(&["-r", "ferry-agent"]), "dpkg -r");
    assert!(
        fs::symlink_metadata(wants.join("ferry-agent.service")).is_ok(),
        "remove dropped the enablement"
    );
    ok(&dpkg(&["-P", "ferry-agent"]), "dpkg -P");
    assert!(!state.exists(), "purge left {}", state.display());
    assert!(!conf.exists(), "purge left {}", conf.display());
    assert!(
        fs::symlink_metadata(wants.join("ferry-agent.service")).is_err(),
        "purge left the enablement"
    );
}
