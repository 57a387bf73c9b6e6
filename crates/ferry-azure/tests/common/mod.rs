//! Helpers shared by the Azurite integration tests.
#![allow(dead_code)] // Each test binary uses a different subset.

use ferry_azure::azurite::Azurite;
use ferry_azure::AzureBlobs;

/// Deterministic pseudo-random bytes (xorshift64*), different per `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Log to the test's output (shown on failure); `RUST_LOG` overrides the default.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferry_azure=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Start Azurite and a client for `container` (created); `None` = skipped.
pub fn setup(container: &str) -> Option<(Azurite, AzureBlobs)> {
    init_tracing();
    let az = Azurite::start_or_skip()?;
    let blobs = AzureBlobs::new(az.config(container)).expect("client");
    blobs.ensure_container().expect("ensure_container");
    Some((az, blobs))
}
