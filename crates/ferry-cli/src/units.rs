//! Human units: sizes (`4GiB`), intervals (`30s`).

use std::time::Duration;

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

/// `1.5 GiB`.
pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("4XB").is_err());
        assert_eq!(human(1536), "1.5 KiB");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50MiB/s").unwrap(), 50 << 20);
        assert_eq!(parse_rate("400Mbit/s").unwrap(), 50_000_000);
        assert!(parse_rate("50MiB").is_err());
        assert!(parse_rate("0MB/s").is_err());
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("30s").unwrap(), Duration::from_secs(30));
        assert!(parse_interval("10ms").is_err());
    }
}
