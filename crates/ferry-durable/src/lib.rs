//! Ferry's one way to make files durable. Every writer of durable state (store, cache, server state,
//! agent state, keys) goes through these helpers, so there is one place to read, review and record.
//!
//! Invariants:
//! - [`durable_write`] / [`write_private`]: temp file → write → `fsync` → rename over the target →
//!   `fsync` of the directory. After they return, a crash leaves the new content; before, the old
//!   content or the new, never a mix.
//! - [`create_dir_durable`]: every directory it creates is `fsync`ed in its parent, so a file made
//!   durable inside a new directory cannot vanish with the directory after a power cut.
//! - [`remove_durable`]: the unlink is `fsync`ed in the directory.
//! - Private files (`0600`) are created with that mode, never widened, not even for an instant.
//! - Errors are returned, never dropped (a failed directory fsync is a failed write).
//! - A file or directory root creates in a directory root does not own takes that directory's
//!   owner ([`adopt_owner`]): `ferry serve` runs as a dedicated user, and an operator's command
//!   run as root (`ferry agents revoke`, a restore's pin) must not leave it files it cannot read.
//!
//! Must not: decide what is durable or when; callers order their writes (data before the commit
//! point that names it).

pub mod crashsim;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Gives `f`, just created in `dir`, the owner and group of `dir` when `f` belongs to root and
/// `dir` does not (root's command working on a service user's files); otherwise changes nothing.
pub fn adopt_owner(f: &File, dir: &Path) -> io::Result<()> {
    let d = fs::metadata(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })?;
    let m = f.metadata()?;
    if m.uid() == 0 && d.uid() != 0 && (m.uid(), m.gid()) != (d.uid(), d.gid()) {
        std::os::unix::fs::fchown(f, Some(d.uid()), Some(d.gid()))?;
    }
    Ok(())
}

/// `fsync` of a file (data and metadata). Every durable file sync goes through here (or
/// [`sync_data`], [`sync_data_appended`]), so the crash-state recorder ([`crashsim`]) sees it.
pub fn sync_file(f: &File) -> io::Result<()> {
    f.sync_all()?;
    crashsim::file_synced(f, None);
    Ok(())
}

/// `fdatasync` of a file (see [`sync_file`]).
pub fn sync_data(f: &File) -> io::Result<()> {
    f.sync_data()?;
    crashsim::file_synced(f, None);
    Ok(())
}

/// `fdatasync` of an append-only file of which only the first `len` bytes must be durable, while
/// another thread may be appending past them (a background group commit). The crash-state
/// recorder keeps only those `len` bytes: what was appended meanwhile counts as not synced.
pub fn sync_data_appended(f: &File, len: u64) -> io::Result<()> {
    f.sync_data()?;
    crashsim::file_synced(f, Some(len));
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Syncs a directory so a create, rename or unlink inside it survives a crash.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()?;
    crashsim::dir_synced(dir);
    Ok(())
}

/// Creates `dir` and its missing parents; each new directory is fsynced in its parent.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(p) = dir.parent() {
        create_dir_durable(p)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => adopt_owner(&File::open(dir)?, parent(dir))?,
        // Made by someone else meanwhile: fine if it is a directory.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(e),
    }
    fsync_dir(parent(dir))
}

fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    create_dir_durable(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        adopt_owner(&f, dir)?;
        f.write_all(bytes)?;
        sync_file(&f)?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Atomically replaces `path` with `bytes` (mode `0644` less the umask), creating its directory
/// durably if needed.
pub fn durable_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, 0o644)
}

/// [`durable_write`] for secrets and private state: the file is `0600` from its creation.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, 0o600)
}

/// Makes an already-written temp file durable under its final name (fsync file, rename, fsync dir).
pub fn durable_rename(tmp: &Path, path: &Path) -> io::Result<()> {
    sync_file(&File::open(tmp)?)?;
    fs::rename(tmp, path)?;
    fsync_dir(parent(path))
}

/// Creates `path` with `bytes` and mode `0600`, refusing to replace an existing file, durably (file
/// and directory synced). Used where two writers must never both win (a new master key).
pub fn create_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    create_dir_durable(dir)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    adopt_owner(&f, dir)?;
    f.write_all(bytes)?;
    sync_file(&f)?;
    fsync_dir(dir)
}

/// Removes `path` and syncs its directory (absent already: Ok).
pub fn remove_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// As root (CI), in a directory owned by another user: what is created there is that user's.
    /// Not as root: nothing to give away, nothing changes (checked too).
    #[test]
    fn root_creates_files_for_the_owner_of_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("state");
        fs::create_dir(&base).unwrap();
        let me = fs::metadata(&base).unwrap().uid();
        if me == 0 {
            std::os::unix::fs::chown(&base, Some(65534), Some(65534)).unwrap();
        }
        let want = if me == 0 { 65534 } else { me };
        write_private(&base.join("agents.json"), b"{}").unwrap();
        durable_write(&base.join("q/vm.release"), b"x").unwrap();
        create_private(&base.join("k/key"), b"x").unwrap();
        for p in ["agents.json", "q", "q/vm.release", "k", "k/key"] {
            let m = fs::metadata(base.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (want, want), "{p}");
        }
        // A root-owned directory keeps root's files root's.
        let own = d.path().join("own/f");
        durable_write(&own, b"x").unwrap();
        assert_eq!(fs::metadata(&own).unwrap().uid(), me);
    }

    #[test]
    fn writes_replace_whole_files_in_new_directories_with_their_modes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/c.json");
        durable_write(&p, b"one").unwrap();
        durable_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let s = d.path().join("s/secret");
        write_private(&s, b"x").unwrap();
        assert_eq!(
            fs::metadata(&s).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files left behind.
        assert_eq!(fs::read_dir(d.path().join("a/b")).unwrap().count(), 1);
        let k = d.path().join("k/key");
        create_private(&k, b"1").unwrap();
        assert_eq!(
            create_private(&k, b"2").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs::read(&k).unwrap(), b"1");
        remove_durable(&k).unwrap();
        remove_durable(&k).unwrap();
        assert!(!k.exists());
    }

    #[test]
    fn a_file_where_a_directory_belongs_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("notadir"), b"a file").unwrap();
        let e = create_dir_durable(&d.path().join("notadir")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(durable_write(&d.path().join("notadir/x"), b"x").is_err());
    }
}
