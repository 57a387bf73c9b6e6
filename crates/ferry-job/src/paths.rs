//! Default locations and name rules.

use std::path::{Path, PathBuf};

use crate::JobError;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// `$FERRY_KEY_FILE`, else `/etc/ferry/master.key` for root, else `~/.config/ferry/master.key`.
pub fn default_key_file() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_KEY_FILE") {
        return p.into();
    }
    if is_root() {
        PathBuf::from("/etc/ferry/master.key")
    } else {
        home().join(".config/ferry/master.key")
    }
}

/// `$FERRY_STATE_DIR`, else `/var/lib/ferry` for root, else `~/.local/state/ferry`.
pub fn default_state_root() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_STATE_DIR") {
        return PathBuf::from(p);
    }
    if is_root() {
        PathBuf::from("/var/lib/ferry")
    } else {
        home().join(".local/state/ferry")
    }
}

/// The state root's `cache/`. A store's cache lives in a subdirectory named by the store id.
pub fn default_cache_root() -> PathBuf {
    default_state_root().join("cache")
}

/// The default name of a disk: the file name without its extension (`disk.img` → `disk`).
pub fn disk_name_from_path(p: &Path) -> String {
    p.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("disk")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Names become path components in the store: letters, digits, `-`, `_`, `.`; 1..=64 bytes, not
/// starting with `.`.
pub fn validate_name(what: &str, n: &str) -> Result<(), JobError> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(JobError::Usage(format!(
            "{what} name '{n}' is not allowed: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}
