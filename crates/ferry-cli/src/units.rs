//! Human units: sizes (`4GiB`), intervals (`30s`).

// The parsers live in ferry-job (a library, so the fuzz targets reach them); `ferry.toml`'s
// `cache_size` and `retention` use the same ones.
pub use ferry_job::serve_config::{parse_interval, parse_rate, parse_retention, parse_size};

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
    use std::time::Duration;

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
