//! Bandwidth rates as operators write them: `50MiB/s`, `400Mbit/s`, `unlimited` (throttles of the
//! process server, `max_rate` of the agent).

use std::fmt;

/// The least rate a throttle may set (below it one 64 KiB chunk would take more than a second).
pub const MIN_RATE: u64 = 64 << 10;

/// A rate in bytes per second, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rate {
    /// Bytes per second.
    Bytes(u64),
    Unlimited,
}

impl Rate {
    /// Bytes per second, `None` when unlimited.
    pub fn bytes(self) -> Option<u64> {
        match self {
            Rate::Bytes(b) => Some(b),
            Rate::Unlimited => None,
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rate::Unlimited => f.write_str("unlimited"),
            Rate::Bytes(b) => f.write_str(&human_rate(b)),
        }
    }
}

/// `52428800` → `50 MiB/s`; `12500000` → `100 Mbit/s`; `50000000` → `50 MB/s`; other values
/// with two decimals in MiB/s.
pub fn human_rate(b: u64) -> String {
    for (unit, size) in [
        ("GiB/s", 1u64 << 30),
        ("MiB/s", 1 << 20),
        ("KiB/s", 1 << 10),
    ] {
        if b >= size && b.is_multiple_of(size) {
            return format!("{} {unit}", b / size);
        }
    }
    for (unit, size) in [("GB/s", 1_000_000_000u64), ("MB/s", 1_000_000)] {
        if b >= size && b.is_multiple_of(size) {
            return format!("{} {unit}", b / size);
        }
    }
    // Network rates are set in bits: 12500000 B/s is 100 Mbit/s.
    for (unit, bits) in [("Gbit/s", 1_000_000_000u64), ("Mbit/s", 1_000_000)] {
        if let Some(x) = b.checked_mul(8) {
            if x >= bits && x.is_multiple_of(bits) {
                return format!("{} {unit}", x / bits);
            }
        }
    }
    if b >= 1000 && b.is_multiple_of(1000) && b < 1_000_000 {
        return format!("{} kB/s", b / 1000);
    }
    if b >= 1 << 20 {
        format!("{:.2} MiB/s", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{b} B/s")
    }
}

/// Parses `50MiB/s`, `400Mbit/s`, `1.5GB/s`, `unlimited` (units: B, kB/KB, MB, GB, KiB, MiB,
/// GiB per second, and kbit, Mbit, Gbit per second; the `/s` may be left out).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
        return Ok(Rate::Unlimited);
    }
    let example = "write it like 50MiB/s, 400Mbit/s or unlimited";
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    // `Mbps` is megabits per second, as network people write it.
    let bps = unit.strip_suffix("bps").map(|p| format!("{p}bit"));
    let unit = match &bps {
        Some(b) => b.as_str(),
        None => unit.strip_suffix("/s").unwrap_or(unit),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("rate {s:?}: no number; {example}"))?;
    let per = match unit {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" | "kiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        "bit" => 0.125,
        "kbit" | "Kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        "" => {
            return Err(format!(
                "rate {s:?} has no unit (bytes or bits per second?); {example}"
            ))
        }
        "Mb" | "Gb" | "kb" | "Kb" | "mb" | "gb" => {
            return Err(format!(
                "rate {s:?}: is {unit} bits or bytes? Write {}bit/s for bits, {}B/s for bytes",
                &unit[..1],
                &unit[..1].to_uppercase()
            ))
        }
        other => return Err(format!("rate {s:?}: unknown unit {other:?}; {example}")),
    };
    let b = n * per;
    if !b.is_finite() || b >= u64::MAX as f64 {
        return Err(format!("rate {s:?} is too large; {example}"));
    }
    let b = b.round() as u64;
    if b < MIN_RATE {
        return Err(format!(
            "rate {s:?} is below the least throttle, {} (to stop a VM replicating, stop its agent)",
            human_rate(MIN_RATE)
        ));
    }
    Ok(Rate::Bytes(b))
}
