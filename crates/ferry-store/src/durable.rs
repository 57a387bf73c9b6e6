//! The one way Ferry makes a file durable: write a temp file, fsync it, rename it over the target,
//! fsync the directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Syncs a directory so a rename or create inside it survives a crash.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Atomically replaces `path` with `bytes`: after this returns, a crash leaves either the old or
/// the new content, never a mix.
pub fn durable_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // New directories on the way must survive a crash too: each is fsynced in its parent.
    create_dir_durable(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Makes an already-written temp file durable under its final name.
pub fn durable_rename(tmp: &Path, path: &Path) -> std::io::Result<()> {
    File::open(tmp)?.sync_all()?;
    fs::rename(tmp, path)?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Creates `dir` and its parents and makes the new entries durable.
pub fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(p) = dir.parent() {
        create_dir_durable(p)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if let Some(p) = dir.parent() {
        fsync_dir(p)?;
    }
    Ok(())
}
