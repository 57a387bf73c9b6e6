//! `ferry appliance configure` (run at every boot of the appliance, docs/APPLIANCE.md) and
//! `ferry key export|import` (the master key's backup).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ferry_job::appliance::{self, Settings};
use serde_json::json;

use crate::server::ConfigArg;

#[derive(Subcommand)]
pub(crate) enum ApplianceCmd {
    /// Turns the appliance's settings into its configuration; the appliance runs it at every
    /// boot (ferry-appliance-setup.service) before `ferry serve` starts.
    ///
    /// Settings come from OVF properties (--ovf-env, the ovf-env.xml of the ISO VMware attaches)
    /// or a cloud-init NoCloud volume (--nocloud, the mounted `cidata` volume: user-data as
    /// #cloud-config YAML with a `ferry:` mapping, meta-data, network-config version 2). Keys:
    /// hostname, network (dhcp|static), address, gateway, dns, store, azure_connection_string,
    /// azure_account_key, azure_sas_token, azure_allow_http, listen_port, metrics_port, downloads_port,
    /// cache_size, retention, throttle_ingest, throttle_upload, master_key, root_password_hash
    /// (docs/APPLIANCE.md says what each takes).
    ///
    /// Writes ROOT/etc/ferry/ferry.toml, ROOT/etc/ferry/serve.env (Azure credentials, 0600),
    /// ROOT/etc/systemd/network/10-ferry-*.network, ROOT/etc/hostname, root's password hash in
    /// ROOT/etc/shadow, and ROOT/var/lib/ferry/master.key when a master_key is given (never
    /// replacing another key). With a source, its settings replace the files at every boot;
    /// without one, missing files get the defaults (DHCP, the local store on the cache disk) and
    /// existing ones are left as the operator edited them. A bad setting changes nothing and
    /// exits 2, naming the setting.
    ///
    /// Examples:
    ///   ferry appliance configure --nocloud /run/ferry/cidata
    ///   ferry appliance configure --ovf-env /run/ferry/ovfenv/ovf-env.xml --json
    ///   ferry appliance configure --root /tmp/image --nocloud ./cidata   # check a cidata dir
    #[command(verbatim_doc_comment)]
    Configure(ConfigureArgs),
}

#[derive(Args)]
pub(crate) struct ConfigureArgs {
    /// The root of the appliance's file system.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// A mounted NoCloud volume (the directory holding user-data, meta-data, network-config).
    #[arg(long, value_name = "DIR", conflicts_with = "ovf_env")]
    nocloud: Option<PathBuf>,
    /// An OVF environment document (ovf-env.xml).
    #[arg(long, value_name = "FILE")]
    ovf_env: Option<PathBuf>,
    /// The cache disk's file system: the cache quota defaults to 80 % of its size. Default:
    /// ROOT/var/lib/ferry.
    #[arg(long, value_name = "DIR")]
    cache_fs: Option<PathBuf>,
    /// One JSON object on stdout: the source, the settings (secrets shown as "(set)"), the files
    /// written.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(crate) enum KeyCmd {
    /// Prints the master key, to keep offline: without it nothing in the store can be restored
    /// (losing the appliance without a copy of its key loses every point). Records the export
    /// (KEY_FILE.exported), which ends the appliance's console reminder.
    ///
    /// The output is what `ferry key import` reads. Anyone holding it and the store reads every
    /// protected disk: keep it like a root password.
    ///
    /// Examples:
    ///   ferry key export --out /media/usb/ferry-master-key.txt   # a new file, mode 0600
    ///   ferry key export --key-file /var/lib/ferry/master.key --out /root/key.txt
    ///   ferry key export | gpg --encrypt -r ops@example.com > key.gpg
    #[command(verbatim_doc_comment)]
    Export {
        #[command(flatten)]
        key: KeyFileArg,
        /// Write to this new file (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Puts an exported master key in place (a rebuilt or upgraded appliance reading an existing
    /// store). Refuses to replace a different key.
    ///
    /// Examples:
    ///   ferry key import /media/usb/ferry-master-key.txt
    ///   ferry key import - --key-file /var/lib/ferry/master.key < key.txt
    #[command(verbatim_doc_comment)]
    Import {
        /// The exported key (`-`: standard input).
        from: PathBuf,
        #[command(flatten)]
        key: KeyFileArg,
    },
}

#[derive(Args)]
pub(crate) struct KeyFileArg {
    /// The key file. Default: key_file of the config file's [serve] table, else FERRY_KEY_FILE,
    /// else /etc/ferry/master.key (root) or ~/.config/ferry/master.key.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArg,
}

impl KeyFileArg {
    fn resolve(&self) -> Result<PathBuf, String> {
        if let Some(k) = &self.key_file {
            return Ok(k.clone());
        }
        let c = self.config.load().map_err(|e| e.to_string())?;
        Ok(c.serve.key_file.unwrap_or_else(ferry_job::default_key_file))
    }
}

fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

fn read_opt(p: &Path) -> Result<String, String> {
    match std::fs::read_to_string(p) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

fn load(a: &ConfigureArgs) -> Result<(String, Settings), String> {
    if let Some(f) = &a.ovf_env {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read the OVF environment {}: {e}", f.display()))?;
        return Ok((
            format!("ovf-env {}", f.display()),
            appliance::from_ovf_env(&text)?,
        ));
    }
    if let Some(d) = &a.nocloud {
        if !d.is_dir() {
            return Err(format!(
                "{} is not a directory: give the mounted cidata volume",
                d.display()
            ));
        }
        let s = appliance::from_nocloud(
            &read_opt(&d.join("meta-data"))?,
            &read_opt(&d.join("user-data"))?,
            &read_opt(&d.join("network-config"))?,
        )?;
        return Ok((format!("nocloud {}", d.display()), s));
    }
    Ok(("none".into(), Settings::default()))
}

/// Writes `text` durably with `mode` from its creation (replacing the file), keeping the group
/// of the file it replaces, or giving it `group`.
fn put(path: &Path, text: &str, mode: u32, group: Option<u32>) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let dir = path.parent().expect("absolute");
    ferry_durable::create_dir_durable(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    let gid = group.or_else(|| std::fs::metadata(path).ok().map(|m| m.gid()));
    if let Some(g) = gid {
        match std::os::unix::fs::fchown(&f, None, Some(g)) {
            Ok(()) => {}
            // Not root (checking a cidata directory by hand): the file is ours, group as it comes.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(err(e)),
        }
    }
    ferry_durable::sync_file(&f).map_err(err)?;
    ferry_durable::durable_rename(&tmp, path).map_err(err)
}

/// The gid of `name` in ROOT/etc/group.
fn group_id(root: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(under(root, "/etc/group")).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
    })
}

fn default_cache(fs: &Path) -> u64 {
    // 80 % of the cache disk; 4 GiB where it cannot be measured (the serve default).
    let c = std::ffi::CString::new(fs.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 4 << 30;
    }
    let total = st.f_blocks as u64 * st.f_frsize as u64;
    (total / 5 * 4).max(1 << 30)
}

/// ROOT/etc/shadow with root's password hash replaced.
fn shadow_with(shadow: &Path, hash: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(shadow)
        .map_err(|e| format!("cannot read {}: {e}", shadow.display()))?;
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&"root") && f.len() > 2 {
                found = true;
                f[1] = hash;
                f[2] = ""; // last change unknown: not expired
                f.join(":")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        return Err(format!("{} has no root entry", shadow.display()));
    }
    Ok(out.join("\n") + "\n")
}

/// Whether the key file at `path` holds `hex` (Some(true)), another key (Some(false)), or is
/// absent (None). A key file that cannot be read or parsed is an error.
fn key_in_place(path: &Path, hex: &str) -> Result<Option<bool>, String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        Ok(m) if !m.is_file() => {
            return Err(format!(
                "{} is not a regular file: move it away, then boot again",
                path.display()
            ))
        }
        Ok(_) => {}
    }
    let have = ferry_crypto::MasterKey::load(path).map_err(|e| e.to_string())?;
    let mut secret = [0u8; 32];
    hex::decode_to_slice(hex, &mut secret).map_err(|e| format!("master_key: {e}"))?;
    Ok(Some(
        have.id() == ferry_crypto::MasterKey::from_bytes(&secret, path).id(),
    ))
}

/// Puts the key at `path` atomically (a complete file or none, never replacing one).
fn import_key(path: &Path, hex: &str) -> Result<bool, String> {
    import_key_once(path, hex, true)
}

fn import_key_once(path: &Path, hex: &str, retry: bool) -> Result<bool, String> {
    match key_in_place(path, hex)? {
        Some(true) => return Ok(false),
        Some(false) => {
            return Err(format!(
                "{} holds another master key: refusing to replace it (the points it encrypted would be lost). Move it away first if you mean it",
                path.display()
            ))
        }
        None => {}
    }
    let dir = path.parent().expect("absolute");
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    ferry_durable::create_dir_durable(dir).map_err(err)?;
    let tmp = dir.join(".master.key.import");
    let _ = std::fs::remove_file(&tmp);
    ferry_durable::create_private(&tmp, format!("{hex}\n").as_bytes()).map_err(err)?;
    // link(2) fails if the name exists: never a replaced key, and never half a key under it.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        // Made meanwhile: compare with it (once).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && retry => {
            return import_key_once(path, hex, false);
        }
        Err(e) => return Err(err(e)),
    }
    ferry_durable::fsync_dir(dir).map_err(err)?;
    Ok(true)
}

/// Why configure failed: a setting (nothing changed, exit 2) or the system (exit 1).
enum Failed {
    Setting(String),
    System(String),
}

fn configure_inner(a: &ConfigureArgs) -> Result<serde_json::Value, Failed> {
    let (source, s) = load(a).map_err(Failed::Setting)?;
    for (k, v) in [
        ("throttle_ingest", &s.throttle_ingest),
        ("throttle_upload", &s.throttle_upload),
    ] {
        if let Some(v) = v {
            ferry_serve::throttle::Schedule::parse(v)
                .map_err(|e| Failed::Setting(format!("setting {k}: {e}")))?;
        }
    }
    let root = &a.root;
    let has_source = source != "none";
    // Everything is decided and rendered first; a setting that cannot apply changes nothing.
    let key_path = under(root, &format!("{}/master.key", appliance::STATE_ROOT));
    if let Some(hex) = &s.master_key {
        if key_in_place(&key_path, hex).map_err(Failed::System)? == Some(false) {
            return Err(Failed::Setting(format!(
                "setting master_key: {} holds another master key: refusing to replace it (the points it encrypted would be lost). Move it away first if you mean it",
                key_path.display()
            )));
        }
    }
    let ferry_gid = group_id(root, "ferry");
    // (path, text, mode, group)
    let mut plan: Vec<(PathBuf, String, u32, Option<u32>)> = Vec::new();
    let mut remove: Vec<PathBuf> = Vec::new();
    let toml_path = under(root, "/etc/ferry/ferry.toml");
    if has_source || !toml_path.exists() {
        let fs = a
            .cache_fs
            .clone()
            .unwrap_or_else(|| under(root, appliance::STATE_ROOT));
        let text = appliance::ferry_toml(&s, default_cache(&fs));
        ferry_job::serve_config::parse_file_config(&text).map_err(|e| {
            Failed::System(format!(
                "internal: the generated ferry.toml does not parse: {e}"
            ))
        })?;
        plan.push((toml_path, text, 0o640, ferry_gid));
    }
    let env_path = under(root, "/etc/ferry/serve.env");
    match appliance::serve_env(&s) {
        Some(text) => plan.push((env_path, text, 0o600, None)),
        None if has_source && env_path.exists() => remove.push(env_path),
        None => {}
    }
    let netdir = under(root, "/etc/systemd/network");
    let old_net: Vec<PathBuf> = std::fs::read_dir(&netdir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("10-ferry-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    if has_source || old_net.is_empty() {
        let new = appliance::networkd(&s);
        for p in old_net {
            if !new.iter().any(|(n, _)| netdir.join(n) == p) {
                remove.push(p);
            }
        }
        for (name, text) in new {
            plan.push((netdir.join(name), text, 0o644, None));
        }
    }
    if let Some(h) = &s.hostname {
        plan.push((under(root, "/etc/hostname"), format!("{h}\n"), 0o644, None));
    }
    if let Some(h) = &s.root_password_hash {
        let shadow = under(root, "/etc/shadow");
        plan.push((
            shadow.clone(),
            shadow_with(&shadow, h).map_err(Failed::System)?,
            0o640,
            None,
        ));
    }
    let appliance_env = under(root, "/etc/ferry/appliance.env");
    if has_source || !appliance_env.exists() {
        plan.push((
        appliance_env,
        format!(
            "# Written by `ferry appliance configure`.\nFERRY_DOWNLOADS_PORT={}\nFERRY_LISTEN_PORT={}\n",
            s.downloads_port.unwrap_or(8080),
            s.listen_port.unwrap_or(7443)
        ),
        0o644,
        None,
    ));
    }

    let mut written = Vec::new();
    for (path, text, mode, group) in plan {
        put(&path, &text, mode, group).map_err(Failed::System)?;
        written.push(path.display().to_string());
    }
    for p in remove {
        ferry_durable::remove_durable(&p)
            .map_err(|e| Failed::System(format!("cannot remove {}: {e}", p.display())))?;
        written.push(format!("{} (removed)", p.display()));
    }
    let mut key = "unchanged";
    if let Some(hex) = &s.master_key {
        if import_key(&key_path, hex).map_err(Failed::System)? {
            written.push(key_path.display().to_string());
            key = "imported";
        } else {
            key = "already in place";
        }
        // The key came from outside: a copy exists there, so the console's backup reminder ends.
        let mut marker = key_path.clone().into_os_string();
        marker.push(".exported");
        let marker = PathBuf::from(marker);
        if !marker.exists() {
            ferry_durable::durable_write(
                &marker,
                b"key imported from the appliance's settings (a copy exists outside)\n",
            )
            .map_err(|e| Failed::System(format!("cannot write {}: {e}", marker.display())))?;
        }
    }
    Ok(json!({
        "source": source,
        "settings": appliance::summary(&s),
        "written": written,
        "master_key": key,
    }))
}

pub(crate) fn configure(a: ConfigureArgs) -> ExitCode {
    match configure_inner(&a) {
        Ok(v) => {
            if a.json {
                println!("{v}");
            } else {
                println!("settings from: {}", v["source"].as_str().unwrap_or(""));
                if let Some(m) = v["settings"].as_object() {
                    for (k, val) in m {
                        println!("  {k} = {}", val.as_str().unwrap_or(""));
                    }
                }
                for w in v["written"].as_array().into_iter().flatten() {
                    println!("wrote {}", w.as_str().unwrap_or(""));
                }
                println!("master key: {}", v["master_key"].as_str().unwrap_or(""));
            }
            ExitCode::SUCCESS
        }
        Err(Failed::Setting(e)) => {
            eprintln!("error: {e}");
            eprintln!(
                "nothing was changed: fix the setting in the OVF properties or the cidata volume and reboot (docs/APPLIANCE.md)"
            );
            ExitCode::from(2)
        }
        Err(Failed::System(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

const EXPORT_HEAD: &str = "# Ferry master key";

pub(crate) fn key(cmd: KeyCmd) -> ExitCode {
    let r = match cmd {
        KeyCmd::Export { key, out } => export(&key, out.as_deref()),
        KeyCmd::Import { from, key } => import(&key, &from),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("error: {e}");
            ExitCode::from(code)
        }
    }
}

fn export(k: &KeyFileArg, out: Option<&Path>) -> Result<(), (u8, String)> {
    let path = k.resolve().map_err(|e| (2, e))?;
    let key = ferry_crypto::MasterKey::load(&path).map_err(|e| (1, e.to_string()))?;
    let hex = std::fs::read(&path)
        .map_err(|e| (1, format!("cannot read {}: {e}", path.display())))
        .map(|raw| {
            if raw.len() == 32 {
                hex::encode(raw)
            } else {
                String::from_utf8_lossy(&raw).trim().to_ascii_lowercase()
            }
        })?;
    let text = format!(
        "{EXPORT_HEAD} (id {}), exported from {}.\n# Keep it offline and secret: without it no point can be restored; with it and the store,\n# anyone reads every protected disk. Put it back with: ferry key import FILE --key-file {}\n{hex}\n",
        key.id(),
        path.display(),
        path.display()
    );
    match out {
        Some(o) => ferry_durable::create_private(o, text.as_bytes()).map_err(|e| {
            (
                1,
                format!("cannot create {} (it must not exist): {e}", o.display()),
            )
        })?,
        None => {
            use std::io::Write;
            let mut so = std::io::stdout().lock();
            so.write_all(text.as_bytes())
                .and_then(|_| so.flush())
                .map_err(|e| (1, format!("cannot write the key to standard output: {e}")))?;
        }
    }
    let mut marker = path.clone().into_os_string();
    marker.push(".exported");
    let marker = PathBuf::from(marker);
    ferry_durable::durable_write(
        &marker,
        format!(
            "key {} exported at {}\n",
            key.id(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        )
        .as_bytes(),
    )
    .map_err(|e| {
        (
            1,
            format!(
                "exported, but cannot record it in {}: {e}",
                marker.display()
            ),
        )
    })?;
    eprintln!(
        "exported master key {} ({}); keep the copy offline",
        key.id(),
        path.display()
    );
    Ok(())
}

fn import(k: &KeyFileArg, from: &Path) -> Result<(), (u8, String)> {
    let path = k.resolve().map_err(|e| (2, e))?;
    let text = if from == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| (1, format!("cannot read standard input: {e}")))?
    } else {
        std::fs::read_to_string(from)
            .map_err(|e| (1, format!("cannot read {}: {e}", from.display())))?
    };
    let hex =
        appliance::parse_key_export(&text).map_err(|e| (1, format!("{}: {e}", from.display())))?;
    let fresh = import_key(&path, &hex).map_err(|e| (1, e))?;
    let key = ferry_crypto::MasterKey::load(&path).map_err(|e| (1, e.to_string()))?;
    if fresh {
        eprintln!("master key {} is now {}", key.id(), path.display());
    } else {
        eprintln!("master key {} was already {}", key.id(), path.display());
    }
    Ok(())
}
