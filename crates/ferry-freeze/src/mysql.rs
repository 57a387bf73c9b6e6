//! The built-in MariaDB/MySQL hook: `FLUSH TABLES WITH READ LOCK` held across the freeze.
//!
//! The lock belongs to one client session, so it lives exactly as long as this hook's
//! connection: `lock()` before the freeze, `unlock()` after the thaw, and if the agent dies the
//! server ends the session and drops the lock by itself. The client is the pure-Rust `mysql`
//! crate (no TLS: it talks to a local server over its unix socket or loopback).
//!
//! Every statement is bounded by the hook's timeout: the socket read timeout, and
//! `lock_wait_timeout` for the lock itself. If the lock is not granted in time (a long query
//! keeps tables open, the classic FTWRL stall), the session is killed from a second connection
//! so no half-taken global read lock keeps blocking the database, and `LockTimeout` is returned:
//! the cut goes on crash-consistent.
//!
//! The read lock makes MyISAM/Aria tables and the binary log consistent on disk; InnoDB is
//! crash-safe by design and recovers from the frozen image like after a power cut.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::{Conn, Opts, OptsBuilder};

use crate::error::HookError;

/// Default bound on each database statement, the lock included.
pub const DEFAULT_DB_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the database listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MysqlTarget {
    /// A unix socket, e.g. `/run/mysqld/mysqld.sock`.
    Socket(PathBuf),
    /// TCP, normally loopback.
    Tcp { host: String, port: u16 },
}

impl fmt::Display for MysqlTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MysqlTarget::Socket(p) => write!(f, "unix:{}", p.display()),
            MysqlTarget::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A session that can hold `FLUSH TABLES WITH READ LOCK`.
pub struct MysqlHook {
    conn: Option<Conn>,
    opts: Opts,
    target: String,
    user: String,
    timeout: Duration,
    locked: bool,
}

fn read_password(path: &Path) -> Result<String, HookError> {
    let err = |source| HookError::PasswordFile {
        path: path.into(),
        source,
    };
    let meta = fs::metadata(path).map_err(err)?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "database password file is readable by group or others; chmod 600 it"
        );
    }
    let text = fs::read_to_string(path).map_err(err)?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    Ok(line.strip_suffix('\r').unwrap_or(line).to_owned())
}

impl MysqlHook {
    /// Connects as `user` (password from `password_file`, if any) with every statement bounded
    /// by `timeout` ([`DEFAULT_DB_TIMEOUT`] is a good value).
    pub fn connect(
        target: &MysqlTarget,
        user: &str,
        password_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<MysqlHook, HookError> {
        let pass = password_file.map(read_password).transpose()?;
        let mut b = OptsBuilder::new()
            .user(Some(user))
            .pass(pass)
            .read_timeout(Some(timeout))
            .write_timeout(Some(timeout))
            .tcp_connect_timeout(Some(timeout))
            .prefer_socket(false)
            .stmt_cache_size(0);
        b = match target {
            MysqlTarget::Socket(p) => b.socket(Some(p.to_string_lossy())),
            MysqlTarget::Tcp { host, port } => b.ip_or_hostname(Some(host)).tcp_port(*port),
        };
        let opts = Opts::from(b);
        let target = target.to_string();
        let conn = Conn::new(opts.clone()).map_err(|e| HookError::Connect {
            target: target.clone(),
            user: user.into(),
            detail: e.to_string(),
        })?;
        Ok(MysqlHook {
            conn: Some(conn),
            opts,
            target,
            user: user.into(),
            timeout,
            locked: false,
        })
    }

    /// The server's id of this session (as in `SHOW PROCESSLIST`).
    pub fn connection_id(&self) -> Option<u32> {
        self.conn.as_ref().map(Conn::connection_id)
    }

    /// Whether this session holds the read lock.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    fn conn(&mut self) -> Result<&mut Conn, HookError> {
        self.conn.as_mut().ok_or_else(|| HookError::Connect {
            target: self.target.clone(),
            user: self.user.clone(),
            detail: "the session was killed after an earlier timeout; connect again".into(),
        })
    }

    /// Takes `FLUSH TABLES WITH READ LOCK`; returns how long it took. Call before the freeze.
    pub fn lock(&mut self) -> Result<Duration, HookError> {
        let started = Instant::now();
        // Whole seconds, at most the timeout, so the server normally gives up first (the session
        // stays usable); the socket read timeout is the backstop.
        let secs = self.timeout.as_secs().max(1);
        self.conn()?
            .query_drop(format!("SET SESSION lock_wait_timeout = {secs}"))
            .map_err(|e| HookError::Statement {
                statement: "SET SESSION lock_wait_timeout",
                detail: e.to_string(),
            })?;
        match self.conn()?.query_drop("FLUSH TABLES WITH READ LOCK") {
            Ok(()) => {
                self.locked = true;
                Ok(started.elapsed())
            }
            // ER_LOCK_WAIT_TIMEOUT, MariaDB ER_STATEMENT_TIMEOUT, MySQL ER_QUERY_TIMEOUT: the server gave up; the session is
            // intact and holds nothing.
            Err(mysql::Error::MySqlError(e)) if matches!(e.code, 1205 | 1969 | 3024) => {
                Err(HookError::LockTimeout {
                    timeout: self.timeout,
                    detail: e.message,
                })
            }
            Err(mysql::Error::MySqlError(e)) => Err(HookError::Statement {
                statement: "FLUSH TABLES WITH READ LOCK",
                detail: e.to_string(),
            }),
            Err(e) => {
                // The socket timed out or broke: the statement may still run on the server,
                // half-holding the global read lock. End that session for sure.
                let id = self.connection_id();
                self.conn = None;
                let killed = id.map(|id| self.kill_session(id));
                Err(HookError::LockTimeout {
                    timeout: self.timeout,
                    detail: format!("{e}; session {id:?} killed: {killed:?}"),
                })
            }
        }
    }

    /// Releases the read lock (`UNLOCK TABLES`). Call after the thaw.
    pub fn unlock(&mut self) -> Result<(), HookError> {
        if !self.locked {
            return Ok(());
        }
        let r = self.conn()?.query_drop("UNLOCK TABLES");
        match r {
            Ok(()) => {
                self.locked = false;
                Ok(())
            }
            Err(e) => {
                // Do not leave the database read-only: end the session, which drops the lock.
                let id = self.connection_id();
                self.conn = None;
                self.locked = false;
                if let Some(id) = id {
                    let _ = self.kill_session(id);
                }
                Err(HookError::Statement {
                    statement: "UNLOCK TABLES",
                    detail: e.to_string(),
                })
            }
        }
    }

    /// Kills session `id` from a fresh connection.
    fn kill_session(&self, id: u32) -> Result<(), String> {
        let mut c = Conn::new(self.opts.clone()).map_err(|e| e.to_string())?;
        c.query_drop(format!("KILL CONNECTION {id}"))
            .map_err(|e| e.to_string())
    }
}

impl Drop for MysqlHook {
    fn drop(&mut self) {
        if self.locked {
            if let Err(e) = self.unlock() {
                tracing::error!(error = %e, "releasing the database read lock on drop");
            }
        }
    }
}
