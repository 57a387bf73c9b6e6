//! What the agent (root) may execute: hooks and the thaw watchdog.
//!
//! Job: a file runs only if it, and every directory from `/` down to it, can be changed by no one
//! but root (or the agent's own user): owned by them, not writable by group or others (a
//! directory with the sticky bit, like `/tmp`, may be world-writable: others cannot rename what
//! it holds). The file is opened once, without following a symbolic link, checked on that open
//! descriptor, and executed from it (`/proc/self/fd/N`), so what was checked is what runs: a file
//! swapped between the check and the exec is never run.
//!
//! Must not: follow a symbolic link to an executable, or run a file someone else could have
//! written.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a file or directory with this metadata must not be trusted, if it must not.
pub(crate) fn insecure(meta: &fs::Metadata) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Some(format!("owned by uid {}, not root", meta.uid()));
    }
    let sticky_dir = meta.is_dir() && meta.mode() & 0o1000 != 0;
    if meta.mode() & 0o022 != 0 && !sticky_dir {
        return Some(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Why `dir` or a directory above it must not be trusted, if one must not: `(path, why)`. Both
/// the path as given and the path it resolves to are walked: a symbolic link on the way is
/// trusted only if root (or the agent's user) owns it and its directory (who may repoint a link
/// is who may write its directory), so no one else can redirect the path.
pub(crate) fn insecure_dirs(dir: &Path) -> Result<Option<(PathBuf, String)>, std::io::Error> {
    let given = std::path::absolute(dir)?;
    let mut p = given.as_path();
    loop {
        let m = fs::symlink_metadata(p)?;
        let why = if m.file_type().is_symlink() {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            (m.uid() != 0 && m.uid() != me)
                .then(|| format!("a symbolic link owned by uid {}, not root", m.uid()))
        } else {
            insecure(&m)
        };
        if let Some(why) = why {
            return Ok(Some((p.to_path_buf(), why)));
        }
        match p.parent() {
            Some(up) => p = up,
            None => break,
        }
    }
    let real = fs::canonicalize(dir)?;
    let mut p = real.as_path();
    loop {
        let m = fs::metadata(p)?;
        if let Some(why) = insecure(&m) {
            return Ok(Some((p.to_path_buf(), why)));
        }
        match p.parent() {
            Some(up) => p = up,
            None => return Ok(None),
        }
    }
}

/// Why a file is not run.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Not a candidate at all (reported as skipped): a directory, a device, not executable.
    Skip(&'static str),
    /// A candidate that must not run: a symbolic link, writable by others, another owner.
    Insecure(String),
    /// It could not be opened or examined.
    Io(std::io::Error),
}

/// Opens `path` for execution without following a symbolic link at its last component, and
/// checks the open file: a regular file, executable, trusted ([`insecure`]). Its directories are
/// the caller's to check ([`insecure_dirs`]).
pub(crate) fn open_executable(path: &Path) -> Result<File, Refused> {
    let f = OpenOptions::new()
        .read(true)
        // O_NONBLOCK: a FIFO put there must not hang the agent (it is refused below).
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Refused::Insecure(
                    "a symbolic link (hooks and the watchdog run only from regular files)".into(),
                )
            } else {
                Refused::Io(e)
            }
        })?;
    let m = f.metadata().map_err(Refused::Io)?;
    if !m.is_file() {
        return Err(Refused::Skip("not a regular file"));
    }
    if m.permissions().mode() & 0o111 == 0 {
        return Err(Refused::Skip("not executable"));
    }
    if let Some(why) = insecure(&m) {
        return Err(Refused::Insecure(why));
    }
    Ok(f)
}

/// A command that executes the open file `f` itself (not whatever its path names by then). The
/// descriptor stays open across the exec in the child only (a script's interpreter reads it
/// through `/proc/self/fd/N`); `argv[0]` is `shown_as`.
pub(crate) fn command_for(f: &File, shown_as: &Path) -> Command {
    let fd = f.as_raw_fd();
    let mut cmd = Command::new(format!("/proc/self/fd/{fd}"));
    cmd.arg0(shown_as);
    // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec of a descriptor this
    // (forked) child owns a copy of.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn script(path: &Path, body: &str, mode: u32) {
        let mut f = fs::File::create(path).unwrap();
        writeln!(f, "#!/bin/sh\n{body}").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn what_was_checked_is_what_runs_even_if_the_path_is_swapped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hook");
        script(&p, "echo checked", 0o700);
        let f = open_executable(&p).unwrap();
        // Swapped after the check: the path now names another file.
        let evil = d.path().join("evil");
        script(&evil, "echo swapped", 0o700);
        fs::rename(&evil, &p).unwrap();
        let out = command_for(&f, &p).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "checked");
    }

    #[test]
    fn links_writable_files_and_fifos_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        script(&real, "true", 0o700);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(
            matches!(open_executable(&link), Err(Refused::Insecure(w)) if w.contains("symbolic link"))
        );
        let loose = d.path().join("loose");
        script(&loose, "true", 0o722);
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o722)).unwrap();
        assert!(
            matches!(open_executable(&loose), Err(Refused::Insecure(w)) if w.contains("writable"))
        );
        let plain = d.path().join("plain");
        script(&plain, "true", 0o600);
        assert!(matches!(
            open_executable(&plain),
            Err(Refused::Skip("not executable"))
        ));
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o700) }, 0);
        assert!(matches!(
            open_executable(&fifo),
            Err(Refused::Skip("not a regular file"))
        ));
    }

    #[test]
    fn a_writable_directory_above_is_found() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        let inner = open.join("hooks.d");
        fs::create_dir_all(&inner).unwrap();
        assert!(
            insecure_dirs(&inner).unwrap().is_none(),
            "a private tree is trusted"
        );
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let (at, why) = insecure_dirs(&inner).unwrap().expect("found");
        assert_eq!(at, fs::canonicalize(&open).unwrap());
        assert!(why.contains("writable"), "{why}");
        // The sticky bit (as on /tmp) makes a world-writable directory safe to pass through.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(insecure_dirs(&inner).unwrap().is_none());
        // A link to a trusted directory, in a directory others may write: they could repoint it.
        let shared = d.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let link = shared.join("hooks");
        std::os::unix::fs::symlink(&inner, &link).unwrap();
        let (at, _) = insecure_dirs(&link).unwrap().expect("found");
        assert_eq!(at, shared, "the link's own directory is checked");
        // The same link in a private directory is fine.
        let private = d.path().join("private");
        fs::create_dir(&private).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&inner, private.join("hooks")).unwrap();
        assert!(insecure_dirs(&private.join("hooks")).unwrap().is_none());
    }
}
