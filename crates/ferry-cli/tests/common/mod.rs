//! Helpers shared by the end-to-end tests: run the real `ferry` binary on real files.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("FERRY_LOG", "warn");
    c
}

/// A scratch area with a store, a key and a cache.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("ferry-test-")
                .tempdir_in(std::env::var_os("FERRY_TEST_DIR").unwrap_or_else(|| "/var/tmp".into()))
                .unwrap(),
        }
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub fn store(&self) -> PathBuf {
        self.path("store")
    }
    pub fn key(&self) -> PathBuf {
        self.path("master.key")
    }
    /// `ferry replicate SOURCES --once` with this env's store, key and cache.
    pub fn replicate(&self, sources: &[&Path], extra: &[&str]) -> Output {
        let mut c = ferry();
        c.arg("replicate").args(sources).arg("--once");
        c.arg("--store").arg(self.store());
        c.arg("--key-file").arg(self.key());
        c.arg("--cache-dir").arg(self.path("cache"));
        c.args(extra);
        c.output().unwrap()
    }
    pub fn replicate_ok(&self, sources: &[&Path], extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let o = self.replicate(sources, &args);
        assert!(
            o.status.success(),
            "replicate failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }
    pub fn restore(&self, point: &str, out: &Path, extra: &[&str]) -> Output {
        let mut c = ferry();
        c.args(["restore", "--point", point, "--force"]);
        c.arg("--store").arg(self.store());
        c.arg("--key-file").arg(self.key());
        c.arg("--out").arg(out);
        c.args(extra);
        c.output().unwrap()
    }
    pub fn points(&self) -> Vec<serde_json::Value> {
        let o = ferry()
            .args(["points", "list", "--json", "--store"])
            .arg(self.store())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).unwrap()
    }
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Writes `len` random bytes at `off`.
pub fn write_random(path: &Path, rng: &mut Rng, off: u64, len: usize) {
    let mut b = vec![0u8; len];
    rng.fill(&mut b);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&b, off).unwrap();
}

/// Writes zeros at `off`.
pub fn write_zeros(path: &Path, off: u64, len: usize) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; len], off).unwrap();
}

/// Punches a hole (reads back as zeros).
pub fn punch_hole(path: &Path, off: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    let f = OpenOptions::new().write(true).open(path).unwrap();
    // SAFETY: fallocate takes a valid fd and plain integers.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
    };
    if r != 0 {
        write_zeros(path, off, len as usize);
    }
}

pub fn b3(path: &Path) -> String {
    blake3::hash(&fs::read(path).unwrap()).to_hex().to_string()
}

pub fn same_bytes(a: &Path, b: &Path) -> bool {
    fs::read(a).unwrap() == fs::read(b).unwrap()
}

pub use ferry_testkit::proc::Proc;

/// The `ferry-agent` binary built next to `ferry` (`cargo build --release --bins` builds both).
pub fn agent_bin() -> PathBuf {
    ferry_testkit::proc::sibling_bin(env!("CARGO_BIN_EXE_ferry"), "ferry-agent")
}

/// Spawns `ferry serve` (`c` without `--listen`) with `--listen LISTEN` if given (else the address
/// its config names), logging to `log`, and waits for its "process server listening" line: the
/// process and the address it bound. Give `127.0.0.1:0` for a port the kernel picks (no
/// free-port-then-spawn race); a restart gives the address the first start bound.
pub fn spawn_serve(mut c: Command, listen: Option<&str>, log: &Path) -> (Proc, String) {
    c.env("FERRY_LOG", "info");
    if let Some(l) = listen {
        c.args(["--listen", l]);
    }
    let mut p = Proc::spawn(c, log);
    let addr = p.wait_log(
        "the listening line",
        std::time::Duration::from_secs(30),
        |l| {
            if !l.contains("process server listening") {
                return None;
            }
            let (_, rest) = l.split_once("addr=")?;
            Some(rest.split_whitespace().next()?.to_owned())
        },
    );
    (p, addr)
}

/// `ferry status --json` of the process server whose state directory is `ps-state`. Exit 3 (a
/// critical condition holds) is a valid answer, and then the JSON must say `critical`.
pub fn status_json(env: &Env) -> serde_json::Value {
    let o = ferry()
        .args(["status", "--json", "--state-dir"])
        .arg(env.path("ps-state"))
        .output()
        .unwrap();
    status_answer(&o)
}

/// The JSON of a `ferry status --json` run: exit 0 with health `ok` or `warning`, or exit 3 with
/// health `critical`; anything else fails the test.
pub fn status_answer(o: &std::process::Output) -> serde_json::Value {
    assert!(
        matches!(o.status.code(), Some(0 | 3)),
        "ferry status --json failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let critical = v["health"] == "critical";
    assert_eq!(
        o.status.code() == Some(3),
        critical,
        "exit status {} with health {}",
        o.status,
        v["health"]
    );
    v
}

/// Panics, showing its output, unless the command succeeded.
pub fn ok(o: &std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `ferry serve` on `env`'s store, key, cache (`ps-cache`) and state (`ps-state`) with a cache of
/// `cache_size`; add flags, then [`spawn_serve`] it.
pub fn serve_cmd(env: &Env, cache_size: &str) -> Command {
    let mut c = ferry();
    c.args(["serve", "--cache-size", cache_size, "--store"])
        .arg(env.store())
        .arg("--key-file")
        .arg(env.key())
        .arg("--cache-dir")
        .arg(env.path("ps-cache"))
        .arg("--state-dir")
        .arg(env.path("ps-state"));
    c
}

/// The registration passphrase of the server in `ps-state`, in `pass.txt`.
pub fn passphrase_txt(env: &Env) -> PathBuf {
    let o = ferry()
        .args(["passphrase", "show", "--state-dir"])
        .arg(env.path("ps-state"))
        .output()
        .unwrap();
    ok(&o, "passphrase show");
    let p = env.path("pass.txt");
    fs::write(&p, &o.stdout).unwrap();
    p
}

/// Registers an agent with state directory `agent_state` (under `env`) at `addr`.
pub fn register_agent(env: &Env, addr: &str, agent_state: &str) {
    register_with(env, addr, &passphrase_txt(env), agent_state);
}

/// Registers an agent with state directory `agent_state` (under `env`) at `addr`, with the
/// passphrase in the file `pass`.
pub fn register_with(env: &Env, addr: &str, pass: &Path, agent_state: &str) {
    let o = Command::new(agent_bin())
        .args(["register", "--server", addr, "--passphrase-file"])
        .arg(pass)
        .arg("--state-dir")
        .arg(env.path(agent_state))
        .output()
        .unwrap();
    ok(&o, "register");
}
