//! `ferry.toml`: the appliance's configuration file. Today it has one table, `[serve]`, holding
//! every `ferry serve` setting; flags and environment variables override it, built-in defaults
//! fill what it leaves out. Unknown keys and tables are errors naming the key and the file.

use std::path::{Path, PathBuf};

pub use ferry_job::serve_config::{FileConfig, ServeFile};

/// `/etc/ferry/ferry.toml` as root, else `~/.config/ferry/ferry.toml` (beside the default key).
pub fn default_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/etc/ferry/ferry.toml")
    } else {
        std::env::var_os("HOME")
            .map_or_else(|| PathBuf::from("/"), PathBuf::from)
            .join(".config/ferry/ferry.toml")
    }
}

/// A loaded configuration and where it came from (None: no file, built-in defaults).
#[derive(Debug, Default)]
pub struct Loaded {
    pub serve: ServeFile,
    pub path: Option<PathBuf>,
}

/// Loads `explicit` (which must exist), else the default file if there is one.
pub fn load(explicit: Option<&Path>) -> Result<Loaded, String> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => {
            let p = default_path();
            if !p.exists() {
                return Ok(Loaded::default());
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read the config file {}: {e}; check --config (or FERRY_CONFIG)",
            path.display()
        )
    })?;
    let mut f: FileConfig = ferry_job::serve_config::parse_file_config(&text).map_err(|e| {
        format!(
            "config file {}: {}",
            path.display(),
            e.to_string().trim_end()
        )
    })?;
    let abs = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    let base = abs.parent().unwrap_or(Path::new("/"));
    let s = &mut f.serve;
    for p in [&mut s.key_file, &mut s.cache_dir, &mut s.state_dir]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    if let Some(st) = &mut s.store {
        if !st.starts_with("azure://") && Path::new(st.as_str()).is_relative() {
            *st = base.join(st.as_str()).display().to_string();
        }
    }
    if s.threads == Some(0) {
        return Err(format!(
            "config file {}: [serve] threads must be at least 1",
            path.display()
        ));
    }
    Ok(Loaded {
        serve: f.serve,
        path: Some(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("ferry.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn every_key_parses_and_relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            r#"
[serve]
listen = "127.0.0.1:7443"
store = "store"
key_file = "/etc/ferry/master.key"
cache_dir = "cache"
cache_size = "512MiB"
state_dir = "/var/lib/ferry/server"
threads = 2
retention = "7d"
log_json = true
"#,
        );
        let s = load(Some(&p)).unwrap().serve;
        assert_eq!(s.listen.as_deref(), Some("127.0.0.1:7443"));
        assert_eq!(
            s.store.as_deref(),
            Some(dir.path().join("store").to_str().unwrap())
        );
        assert_eq!(s.cache_dir, Some(dir.path().join("cache")));
        assert_eq!(s.key_file, Some(PathBuf::from("/etc/ferry/master.key")));
        assert_eq!(s.cache_size, Some(512 << 20));
        assert_eq!(s.threads, Some(2));
        assert_eq!(s.retention, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(s.log_json, Some(true));
        // Numbers of bytes, 0 retention, an empty file.
        let p = write(dir.path(), "[serve]\ncache_size = 1048576\nretention = 0\n");
        let s = load(Some(&p)).unwrap().serve;
        assert_eq!(
            (s.cache_size, s.retention),
            (Some(1 << 20), Some(Duration::ZERO))
        );
        let p = write(dir.path(), "");
        assert!(load(Some(&p)).unwrap().serve.listen.is_none());
    }

    #[test]
    fn mistakes_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (text, want) in [
            ("[serve]\ncache_sise = \"1GiB\"\n", "cache_sise"),
            ("[srve]\nlisten = \"x\"\n", "srve"),
            ("[serve]\ncache_size = \"4 parsecs\"\n", "parsecs"),
            ("[serve]\nretention = 3600\n", "3600s"),
            ("[serve]\nthreads = \"two\"\n", "threads"),
            ("[serve]\nthreads = 0\n", "threads"),
        ] {
            let p = write(dir.path(), text);
            let e = load(Some(&p)).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains(p.to_str().unwrap()), "{text}: {e}");
        }
        let e = load(Some(&dir.path().join("missing.toml"))).unwrap_err();
        assert!(e.contains("missing.toml"), "{e}");
    }
}
