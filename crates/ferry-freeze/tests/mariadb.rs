//! The MariaDB/MySQL hook against a real MariaDB server started for the test on a temporary
//! datadir and a unix socket (no networking). Needs root and mariadb-server (`mariadbd`,
//! `mariadb-install-db`); skips loudly otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::skip;
use ferry_freeze::{HookError, MysqlHook, MysqlTarget};
use ferry_testkit::mariadb::{Mariadb, MariadbOptions};
use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder};

const INIT_SQL: &str = "
CREATE USER IF NOT EXISTS 'ferry'@'localhost' IDENTIFIED BY 'hook-pass';
GRANT RELOAD ON *.* TO 'ferry'@'localhost';
CREATE USER IF NOT EXISTS 'noreload'@'localhost' IDENTIFIED BY 'nr-pass';
CREATE USER IF NOT EXISTS 'app'@'localhost' IDENTIFIED BY 'app-pass';
GRANT ALL ON appdb.* TO 'app'@'localhost';
GRANT PROCESS ON *.* TO 'app'@'localhost';
CREATE DATABASE IF NOT EXISTS appdb;
CREATE TABLE IF NOT EXISTS appdb.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(32)) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS appdb.t2 (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(32)) ENGINE=InnoDB;
";

/// A throw-away MariaDB server (`ferry_testkit::mariadb`) with the users of `INIT_SQL`; shut
/// down on drop.
struct MariaDb {
    m: Mariadb,
    dir: tempfile::TempDir,
}

impl MariaDb {
    fn socket(&self) -> PathBuf {
        self.m.socket()
    }

    /// A new server with its datadir under `data_in` (default: its temporary directory).
    fn start(data_in: Option<&Path>) -> Result<MariaDb, String> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-mariadb-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = data_in.unwrap_or(dir.path()).join("data");
        let m = Mariadb::start(&MariadbOptions {
            init_sql: Some(INIT_SQL.into()),
            args: vec!["--innodb-buffer-pool-size=32M".into()],
            ..MariadbOptions::new(&data, &dir.path().join("run"))
        })?;
        Self::ready(MariaDb { m, dir })
    }

    /// A server on an existing `data` directory (a restored copy), run from a new temporary
    /// directory, without the init SQL.
    fn serve_existing(data: &Path) -> Result<MariaDb, String> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-mariadb-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let m = Mariadb::start(&MariadbOptions {
            install: false,
            args: vec!["--innodb-buffer-pool-size=32M".into()],
            ..MariadbOptions::new(data, &dir.path().join("run"))
        })?;
        Self::ready(MariaDb { m, dir })
    }

    /// Waits until the application user can log in.
    fn ready(db: MariaDb) -> Result<MariaDb, String> {
        let t = Instant::now();
        loop {
            match db.conn("app", "app-pass") {
                Ok(_) => return Ok(db),
                Err(e) if t.elapsed() > Duration::from_secs(30) => {
                    return Err(format!("app cannot log in: {e}\n{}", db.m.log_text()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn conn(&self, user: &str, pass: &str) -> Result<Conn, mysql::Error> {
        Conn::new(
            OptsBuilder::new()
                .socket(Some(self.socket().display().to_string()))
                .user(Some(user))
                .pass(Some(pass))
                .read_timeout(Some(Duration::from_secs(30))),
        )
    }

    fn password_file(&self, name: &str, pass: &str) -> PathBuf {
        let f = self.dir.path().join(name);
        std::fs::write(&f, format!("{pass}\n")).unwrap();
        f
    }

    fn hook(&self, user: &str, pw: &Path, timeout: Duration) -> Result<MysqlHook, HookError> {
        MysqlHook::connect(&MysqlTarget::Socket(self.socket()), user, Some(pw), timeout)
    }
}

/// Runs `sql` as the application on another thread; the receiver gets the time it took.
fn app_statement(db: &MariaDb, sql: &'static str) -> mpsc::Receiver<Duration> {
    let mut c = db.conn("app", "app-pass").unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        c.query_drop(sql).unwrap();
        let _ = tx.send(t.elapsed());
    });
    rx
}

/// The processlist state of the session running `prefix...`.
fn state_of(db: &MariaDb, prefix: &str) -> Option<String> {
    let mut c = db.conn("app", "app-pass").unwrap();
    let rows: Vec<(Option<String>, Option<String>)> = c
        .query("SELECT STATE, INFO FROM information_schema.PROCESSLIST")
        .unwrap();
    rows.into_iter()
        .find(|(_, info)| info.as_deref().is_some_and(|i| i.starts_with(prefix)))
        .and_then(|(state, _)| state)
}

fn skip_reason() -> Option<String> {
    if !ferry_freeze::is_root() {
        return Some("not running as root (mariadbd is started with --user=root)".into());
    }
    ferry_testkit::sys::missing(&ferry_testkit::mariadb::TOOLS)
        .map(|m| format!("{m} (apt: mariadb-server, mariadb-client)"))
}

#[test]
fn mysql_hook_holds_the_read_lock_against_a_real_mariadb() {
    const NAME: &str = "mysql_hook_holds_the_read_lock_against_a_real_mariadb";
    if let Some(why) = skip_reason() {
        skip(NAME, &why);
        return;
    }
    let db = match MariaDb::start(None) {
        Ok(db) => db,
        Err(e) => panic!("mariadb-server is installed but did not start: {e}"),
    };
    let ferry_pw = db.password_file("ferry.pw", "hook-pass");

    // 1. While the hook holds the lock, an INSERT from another session waits for it, and goes
    //    through once it is released.
    let mut hook = db
        .hook("ferry", &ferry_pw, Duration::from_secs(10))
        .unwrap();
    let took = hook.lock().unwrap();
    assert!(hook.is_locked());
    let insert = app_statement(&db, "INSERT INTO appdb.t (v) VALUES ('during the cut')");
    assert!(
        insert.recv_timeout(Duration::from_millis(800)).is_err(),
        "the INSERT went through while the read lock was held"
    );
    let state = state_of(&db, "INSERT INTO appdb.t").expect("the INSERT is in the processlist");
    assert!(
        state.to_lowercase().contains("lock"),
        "waiting on the lock, not slow: {state}"
    );
    let released = Instant::now();
    hook.unlock().unwrap();
    let waited = insert
        .recv_timeout(Duration::from_secs(5))
        .expect("INSERT after unlock");
    eprintln!(
        "mariadb: FTWRL took {took:?}; INSERT waited {waited:?} ({state}); done {:?} after \
         UNLOCK TABLES",
        released.elapsed()
    );
    assert!(waited >= Duration::from_millis(700));
    assert!(released.elapsed() < Duration::from_secs(2));

    // 2. Dropping a hook that holds the lock releases it.
    let mut hook2 = db
        .hook("ferry", &ferry_pw, Duration::from_secs(10))
        .unwrap();
    hook2.lock().unwrap();
    let insert = app_statement(&db, "INSERT INTO appdb.t (v) VALUES ('after drop')");
    assert!(insert.recv_timeout(Duration::from_millis(300)).is_err());
    drop(hook2);
    insert
        .recv_timeout(Duration::from_secs(5))
        .expect("INSERT after drop");

    // 3. A session holding LOCK TABLES ... WRITE stalls FTWRL. The server gives up at
    //    lock_wait_timeout (2 s here), and nothing stays blocked.
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let mut blocker = db.conn("app", "app-pass").unwrap();
    blocker.query_drop("LOCK TABLES appdb.t WRITE").unwrap();
    let blocker_thread = std::thread::spawn(move || {
        let _ = release_rx.recv();
        blocker.query_drop("UNLOCK TABLES").unwrap();
    });
    let mut hook = db.hook("ferry", &ferry_pw, Duration::from_secs(2)).unwrap();
    let t = Instant::now();
    let err = hook.lock().unwrap_err();
    let server_gave_up = t.elapsed();
    assert!(matches!(err, HookError::LockTimeout { .. }), "{err}");
    assert!(err.to_string().contains("crash-consistent"), "{err}");
    assert!(!hook.is_locked());
    assert!(
        server_gave_up >= Duration::from_secs(2) && server_gave_up < Duration::from_secs(3),
        "{server_gave_up:?}"
    );
    app_statement(&db, "INSERT INTO appdb.t2 (v) VALUES ('not blocked')")
        .recv_timeout(Duration::from_secs(2))
        .expect("no global read lock left behind");
    // The session survived (the server answered); it can lock again once the blocker is gone.

    // 4. A timeout under a second: the socket times out before the server does, and the hook
    //    kills its own session so no half-taken global read lock lingers.
    let mut quick = db
        .hook("ferry", &ferry_pw, Duration::from_millis(500))
        .unwrap();
    let id = quick.connection_id().unwrap();
    let t = Instant::now();
    let err = quick.lock().unwrap_err();
    let gave_up = t.elapsed();
    assert!(matches!(err, HookError::LockTimeout { .. }), "{err}");
    assert!(err.to_string().contains("killed"), "{err}");
    assert!(gave_up < Duration::from_millis(1500), "{gave_up:?}");
    app_statement(&db, "INSERT INTO appdb.t2 (v) VALUES ('still not blocked')")
        .recv_timeout(Duration::from_secs(2))
        .expect("no global read lock left behind");
    let mut c = db.conn("app", "app-pass").unwrap();
    let alive: Option<u64> = c
        .query_first(format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = {id}"
        ))
        .unwrap();
    assert_eq!(alive, Some(0), "the timed-out session was killed");
    eprintln!("mariadb: FTWRL stalled by LOCK TABLES: server gave up after {server_gave_up:?}; sub-second timeout killed the session after {gave_up:?}");

    release_tx.send(()).unwrap();
    blocker_thread.join().unwrap();
    hook.lock().unwrap();
    hook.unlock().unwrap();

    // 5. Clear errors for a user without RELOAD and for a wrong password.
    let nr_pw = db.password_file("nr.pw", "nr-pass");
    let err = db
        .hook("noreload", &nr_pw, Duration::from_secs(5))
        .unwrap()
        .lock()
        .unwrap_err();
    assert!(matches!(err, HookError::Statement { .. }), "{err}");
    assert!(err.to_string().contains("RELOAD"), "{err}");
    let bad_pw = db.password_file("bad.pw", "wrong");
    let err = db
        .hook("ferry", &bad_pw, Duration::from_secs(5))
        .err()
        .expect("wrong password refused");
    assert!(matches!(err, HookError::Connect { .. }), "{err}");
    let err = db
        .hook(
            "ferry",
            &db.dir.path().join("missing.pw"),
            Duration::from_secs(5),
        )
        .err()
        .expect("missing password file");
    assert!(matches!(err, HookError::PasswordFile { .. }), "{err}");
}

/// The whole app-consistent cut with real parts: MariaDB's datadir on an ext4 loop disk; the
/// hook takes the read lock, the disk's filesystems are frozen, the disk is copied (standing in
/// for the residual read), then thaw and unlock. A second server started on the copy finds
/// exactly the rows committed before the cut.
#[test]
fn app_consistent_cut_of_a_mariadb_datadir_on_a_loop_disk() {
    const NAME: &str = "app_consistent_cut_of_a_mariadb_datadir_on_a_loop_disk";
    if let Some(why) = skip_reason().or_else(|| common::loop_skip_reason(&["mkfs.ext4"])) {
        skip(NAME, &why);
        return;
    }
    let mut disk = common::LoopDisk::new(768, &[]);
    let dev = disk.dev.clone();
    let mnt = disk.mkfs_mount(&dev, "ext4", "db");
    let db = MariaDb::start(Some(&mnt)).expect("mariadbd on the loop disk");
    let ferry_pw = db.password_file("ferry.pw", "hook-pass");

    // The application commits rows all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut app = db.conn("app", "app-pass").unwrap();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                app.query_drop("INSERT INTO appdb.t (v) VALUES ('row')")
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // The cut: pre-hook lock, freeze, copy, finish, post-hook unlock.
    let mut hook = db
        .hook("ferry", &ferry_pw, Duration::from_secs(10))
        .unwrap();
    hook.lock().unwrap();
    let mounts = ferry_freeze::discover(&[&dev]).unwrap();
    assert_eq!(mounts.len(), 1);
    let guard = common::freezer()
        .freeze(&mounts, Duration::from_secs(15))
        .unwrap();
    let mut reader = db.conn("app", "app-pass").unwrap();
    let at_cut: u64 = reader
        .query_first("SELECT COUNT(*) FROM appdb.t")
        .unwrap()
        .unwrap();
    let copy = disk.dir.path().join("copy.img");
    let t = Instant::now();
    std::io::copy(
        &mut std::fs::File::open(&dev).unwrap(),
        &mut std::fs::File::create(&copy).unwrap(),
    )
    .unwrap();
    let copied_in = t.elapsed();
    let stats = guard.finish().expect("the freeze held through the copy");
    hook.unlock().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > at_cut, "the application went on after the cut");
    eprintln!(
        "app-consistent cut: {at_cut} rows at the cut, {written} by the end; copy {copied_in:?}, \
         window {:?}",
        stats.window
    );

    // Restore: the copy, mounted elsewhere, serves exactly the rows of the cut.
    let (_restored, rmnt) = common::LoopDisk::attach_and_mount(&copy, "db");
    let second = MariaDb::serve_existing(&rmnt.join("data")).expect("server on the copy");
    let mut c = second.conn("app", "app-pass").unwrap();
    let rows: u64 = c
        .query_first("SELECT COUNT(*) FROM appdb.t")
        .unwrap()
        .unwrap();
    assert_eq!(
        rows, at_cut,
        "the restored database holds exactly the rows at the cut"
    );
    let check: Vec<(String, String, String, String)> = c.query("CHECK TABLE appdb.t").unwrap();
    assert!(
        check.iter().any(|r| r.2 == "status" && r.3 == "OK"),
        "{check:?}"
    );
    drop(second);
    drop(db);
}
