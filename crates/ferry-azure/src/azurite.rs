//! Test harness (cargo feature `azurite`): a real Azurite blob service on a free loopback port,
//! its data in a temporary directory, stopped on drop. It can be stopped and restarted on the
//! same port and folder to simulate an outage.
//!
//! Azurite is found at `$FERRY_AZURITE_BIN` or `tools/azurite/node_modules/.bin/azurite-blob`
//! (installed by `scripts/install-azurite`). It is started with `--disableTelemetry` (no
//! outbound traffic) and `--skipApiVersionCheck` (the SDK speaks a newer API version).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{AzureConfig, AZURITE_ACCOUNT, AZURITE_KEY};

/// Set to `1` to make a missing Azurite a test failure instead of a skip (CI).
pub const REQUIRE_ENV: &str = "FERRY_REQUIRE_AZURITE";

/// A running (or stopped) Azurite blob service owned by a test.
#[derive(Debug)]
pub struct Azurite {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Azurite {
    /// Where `azurite-blob` is, if installed.
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("FERRY_AZURITE_BIN") {
            let p = PathBuf::from(p);
            return p.is_file().then_some(p);
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let p = manifest
            .join("../../tools/azurite/node_modules/.bin/azurite-blob")
            .canonicalize()
            .ok()?;
        p.is_file().then_some(p)
    }

    /// Start Azurite, or print a loud SKIP line and return `None` when it is not installed
    /// (panics instead if `FERRY_REQUIRE_AZURITE=1`). Panics if it is installed but does not
    /// start: that is a real failure.
    pub fn start_or_skip() -> Option<Azurite> {
        let Some(bin) = Self::binary() else {
            let msg = "SKIP: azurite not installed (run scripts/install-azurite)";
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!("{msg}; {REQUIRE_ENV}=1 makes this a failure");
            }
            // Written to the stderr handle, not with eprintln!: the test harness captures the
            // print macros of passing tests, and a skip must be seen.
            let _ = writeln!(io::stderr(), "\n*** {msg} ***\n");
            // And into the skip log scripts/test prints (as ferry_testkit::skip does; this
            // module is linked into the library, the test-only crate is not).
            if let Some(p) = std::env::var_os("FERRY_SKIP_LOG") {
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                {
                    let _ = writeln!(f, "SKIPPED an Azurite test: azurite not installed (set {REQUIRE_ENV}=1 to make this a failure)");
                }
            }
            return None;
        };
        match Self::start(bin) {
            Ok(a) => Some(a),
            Err(e) => panic!("azurite is installed but did not start: {e}"),
        }
    }

    /// Start `bin` on a free loopback port with a fresh data directory.
    pub fn start(bin: PathBuf) -> io::Result<Azurite> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-azurite-")
            .tempdir()?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        let mut a = Azurite {
            bin,
            port: 0,
            dir,
            child: None,
        };
        let mut last_err = None;
        // The free port can be taken between probing and binding: try a few.
        for _ in 0..3 {
            a.port = free_port()?;
            match a.spawn() {
                Ok(()) => return Ok(a),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("azurite did not start")))
    }

    /// Loopback port Azurite listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Blob endpoint of the dev account, e.g. `http://127.0.0.1:PORT/devstoreaccount1`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    /// A shared-key configuration for `container` on this Azurite.
    pub fn config(&self, container: &str) -> AzureConfig {
        AzureConfig::shared_key(&self.endpoint(), AZURITE_ACCOUNT, AZURITE_KEY, container)
            .unwrap_or_else(|e| panic!("azurite config: {e}"))
    }

    /// A connection string for this Azurite (what `AZURE_STORAGE_CONNECTION_STRING` would hold).
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
             BlobEndpoint={};",
            self.endpoint()
        )
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Stop Azurite gracefully (SIGTERM, so it saves its metadata), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped, so the
            // pid cannot have been reused by another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Start again on the same port and data directory (after [`Azurite::stop`]).
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// The log of Azurite's stdout and stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("azurite.log")
    }

    fn spawn(&mut self) -> io::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // The log is appended to across restarts: only what this start writes counts.
        let from = log.metadata()?.len() as usize;
        let data = self.dir.path().join("data");
        let child = Command::new(&self.bin)
            .arg("--blobHost")
            .arg("127.0.0.1")
            .arg("--blobPort")
            .arg(self.port.to_string())
            .arg("--location")
            .arg(&data)
            .arg("--silent")
            .arg("--disableTelemetry")
            .arg("--skipApiVersionCheck")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Our own child must say it listens: a port probed free can be taken by another
            // test's Azurite before ours binds it, and then a connect would reach *that* one
            // while ours exits with EADDRINUSE.
            if std::fs::read(self.log_path()).is_ok_and(|b| {
                b.get(from..)
                    .is_some_and(|t| String::from_utf8_lossy(t).contains("successfully listens"))
            }) && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if !self.is_running() {
                self.child = None;
                return Err(io::Error::other(format!(
                    "azurite exited during start-up on port {}; log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                self.kill_now();
                return Err(io::Error::other(format!(
                    "azurite did not listen on port {} within 60 s; log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_now(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}
