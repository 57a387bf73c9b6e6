//! The pure parsing half of `ferry.toml` (the `ferry serve` configuration, docs/CONFIGURATION.md)
//! and the human units of the `ferry` command: text in, values or an error message out, no file
//! system. Here (not in the `ferry` binary) so the fuzz targets in `fuzz/` can reach it; the binary
//! reads the file, names it in errors and makes relative paths absolute.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub serve: ServeFile,
}

/// `[serve]`: every key is optional. Relative paths are relative to the file's directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    pub listen: Option<String>,
    pub store: Option<String>,
    pub key_file: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "size")]
    pub cache_size: Option<u64>,
    pub state_dir: Option<PathBuf>,
    pub threads: Option<usize>,
    #[serde(default, deserialize_with = "retention")]
    pub retention: Option<Duration>,
    pub log_json: Option<bool>,
    /// `IP:PORT` of the Prometheus endpoint; unset: none.
    pub metrics_listen: Option<String>,
    /// Initial ingest throttle schedule (used while the state directory has no throttle.json).
    pub throttle_ingest: Option<String>,
    /// Initial upload throttle schedule (idem).
    pub throttle_upload: Option<String>,
    /// Members of this group may use the admin socket (default `ferry`, when it exists).
    pub admin_group: Option<String>,
}

/// Parses the text of a `ferry.toml` (unknown keys and tables are errors naming them).
pub fn parse_file_config(text: &str) -> Result<FileConfig, toml::de::Error> {
    toml::from_str(text)
}

/// A size: a string with a unit (`"4GiB"`) or a number of bytes.
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    Ok(Some(
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a size such as \"4GiB\" or a number of bytes")
        })? {
            Raw::Bytes(n) => n,
            Raw::Text(s) => parse_size(&s).map_err(serde::de::Error::custom)?,
        },
    ))
}

/// A retention window: `"24h"`, `"7d"`, or `"0"` / `0` to keep everything.
fn retention<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Zero(u64),
        Text(String),
    }
    Ok(Some(match Raw::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a duration such as \"24h\" or \"7d\", or \"0\"")
    })? {
        Raw::Zero(0) => Duration::ZERO,
        Raw::Zero(n) => {
            return Err(serde::de::Error::custom(format!(
                "write a duration with a unit, e.g. \"{n}s\" or \"24h\" (a bare number is only allowed as 0)"
            )))
        }
        Raw::Text(s) => parse_retention(&s).map_err(serde::de::Error::custom)?,
    }))
}

/// Parses `123`, `64KiB`, `512MiB`, `4GiB`, `1TiB` (also `K`, `M`, `G`, `T`, `KB`… as binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; write e.g. 4GiB or 512MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit '{u}' in '{s}'; use KiB, MiB, GiB or TiB"
            ))
        }
    };
    Ok((n * mult as f64) as u64)
}

/// Parses an interval of at least one second: `30s`, `5m`, `1h`.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("'{s}': {e}; write e.g. 30s or 5m"))?;
    if d < Duration::from_secs(1) {
        return Err("the interval must be at least 1s".into());
    }
    Ok(d)
}

/// Parses a retention window: `0` (keep everything), `90s`, `24h`, `7d`.
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}': {e}; write e.g. 24h or 7d, or 0 to keep everything"))
}

/// Parses a rate in bytes per second: `50MiB/s`, `400Mbit/s`, `1Gbit/s`, `10MB/s` (MB = 10^6).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let body = t
        .strip_suffix("/s")
        .ok_or_else(|| format!("'{s}' is not a rate; write e.g. 50MiB/s or 400Mbit/s"))?;
    let split = body
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a rate; write e.g. 50MiB/s or 400Mbit/s"))?;
    let bytes = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "Kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        u => {
            return Err(format!(
                "unknown rate unit '{u}' in '{s}'; use B, KiB, MiB, GiB, KB, MB, GB, Kbit, Mbit or Gbit, then /s"
            ))
        }
    };
    let r = (n * bytes) as u64;
    if r == 0 {
        return Err("a rate must be more than 0".into());
    }
    Ok(r)
}
