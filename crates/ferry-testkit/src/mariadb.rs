//! A throw-away MariaDB server on a unix socket (no networking), run as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sys::run;

/// The tools a test needs for [`Mariadb`] (with [`crate::sys::missing`]).
pub const TOOLS: [crate::sys::Need; 3] = [
    crate::sys::Need::Tool("mariadbd"),
    crate::sys::Need::Tool("mariadb-install-db"),
    crate::sys::Need::Tool("mariadb"),
];

/// How to start a server.
#[derive(Clone, Debug)]
pub struct MariadbOptions {
    /// The data directory.
    pub datadir: PathBuf,
    /// Where its socket, pid file, error log and temporary files go (created).
    pub run_dir: PathBuf,
    /// Create a fresh data directory first (`mariadb-install-db`).
    pub install: bool,
    /// SQL run at every start (`--init-file`).
    pub init_sql: Option<String>,
    /// More `mariadbd` arguments.
    pub args: Vec<String>,
}

impl MariadbOptions {
    pub fn new(datadir: &Path, run_dir: &Path) -> MariadbOptions {
        MariadbOptions {
            datadir: datadir.to_owned(),
            run_dir: run_dir.to_owned(),
            install: true,
            init_sql: None,
            args: Vec::new(),
        }
    }
}

/// A running `mariadbd`; SIGTERM and a wait (then SIGKILL) on drop.
pub struct Mariadb {
    child: Option<Child>,
    run_dir: PathBuf,
}

impl Mariadb {
    /// Starts a server and waits (up to 60 s) until it answers on its socket.
    pub fn start(o: &MariadbOptions) -> Result<Mariadb, String> {
        let d = &o.run_dir;
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        // Its own temporary directory: two bootstraps sharing /tmp trip over each other's
        // temporary tables ("Could not remove temporary table", seen in CI).
        let tmp = d.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        if o.install {
            std::fs::create_dir_all(&o.datadir)
                .map_err(|e| format!("{}: {e}", o.datadir.display()))?;
            run(
                "mariadb-install-db",
                &[
                    "--no-defaults",
                    "--user=root",
                    &format!("--datadir={}", o.datadir.display()),
                    &format!("--tmpdir={}", tmp.display()),
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
            )?;
        }
        let mut c = Command::new("mariadbd");
        c.arg("--no-defaults")
            .arg("--user=root")
            .arg(format!("--datadir={}", o.datadir.display()))
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg("--skip-networking");
        if let Some(sql) = &o.init_sql {
            let init = d.join("init.sql");
            std::fs::write(&init, sql).map_err(|e| format!("{}: {e}", init.display()))?;
            c.arg(format!("--init-file={}", init.display()));
        }
        c.args(&o.args);
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run mariadbd: {e}"))?;
        let mut m = Mariadb {
            child: Some(child),
            run_dir: d.clone(),
        };
        let t = Instant::now();
        loop {
            if m.sql("select 1").is_ok() {
                return Ok(m);
            }
            if let Some(Ok(Some(st))) = m.child.as_mut().map(Child::try_wait) {
                return Err(format!("mariadbd exited {st}:\n{}", m.log_text()));
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "mariadbd did not answer in 60 s:\n{}",
                    m.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its unix socket.
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("mysqld.sock")
    }

    /// Its error log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("error.log")).unwrap_or_default()
    }

    /// Runs `q` as root over the socket (`mariadb -N -B`); its output.
    pub fn sql(&self, q: &str) -> Result<String, String> {
        let s = self.socket();
        run(
            "mariadb",
            &[
                "-S",
                &s.to_string_lossy(),
                "-u",
                "root",
                "-N",
                "-B",
                "-e",
                q,
            ],
        )
    }

    /// SIGTERM and wait for a clean shutdown.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) with the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        self.shut_down();
    }
}
