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

/// An account SAS (blob service; container and object; read, write, delete, list, add, create)
/// signed with `key`, per "Create an account SAS" (signed version 2020-12-06 and later).
pub fn account_sas(account: &str, key_b64: &str) -> String {
    let (sv, ss, srt, sp, se, spr) = (
        "2021-08-06",
        "b",
        "sco",
        "rwdlac",
        "2099-01-01T00:00:00Z",
        "https,http",
    );
    // account, sp, ss, srt, st, se, sip, spr, sv, ses, then a trailing newline.
    let to_sign = format!("{account}\n{sp}\n{ss}\n{srt}\n\n{se}\n\n{spr}\n{sv}\n\n");
    let key = azure_core::base64::decode(key_b64).expect("key");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let sig = azure_core::base64::encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let sig: String = sig
        .bytes()
        .map(|b| match b {
            b'+' => "%2B".to_string(),
            b'/' => "%2F".to_string(),
            b'=' => "%3D".to_string(),
            _ => char::from(b).to_string(),
        })
        .collect();
    let se = se.replace(':', "%3A");
    let spr = spr.replace(',', "%2C");
    format!("sv={sv}&ss={ss}&srt={srt}&sp={sp}&se={se}&spr={spr}&sig={sig}")
}
