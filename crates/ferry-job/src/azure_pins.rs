//! Point pins in an Azure store: a restore (a test failover) keeps retention from deleting the
//! snapshot it reads.
//!
//! A pin is a small block blob `pins/VM/SEQ.RAND.json` holding `{"vm","seq","expires"}` (Unix
//! seconds). Its reader renews it every [`RENEW`] while it reads and deletes it when done; a pin
//! past its expiry belongs to a reader that is gone (crashed, killed, lost its network) and is
//! deleted by retention. Retention ([`crate::azure::prune_manifests`]) never unlists a pinned point
//! or a newer one, and after its manifest commit it lists the pins again and leaves behind the
//! snapshots of any point a reader pinned in between (logged; nothing reads them afterwards, so the
//! cost is storage only, in that rare race).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_azure::AzureBlobs;
use serde::{Deserialize, Serialize};

use crate::azure::az;
use crate::JobError;

/// How long a pin lives without renewal.
pub const LIFETIME: Duration = Duration::from_secs(15 * 60);
/// How often a reader renews its pin.
pub const RENEW: Duration = Duration::from_secs(5 * 60);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBlob {
    vm: String,
    seq: u64,
    /// Unix seconds.
    expires: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn body(vm: &str, seq: u64, lifetime: Duration) -> Vec<u8> {
    serde_json::to_vec(&PinBlob {
        vm: vm.to_owned(),
        seq,
        expires: now_secs() + lifetime.as_secs(),
    })
    .expect("pin serializes")
}

/// A pinned point of an Azure store; renewed while it lives, deleted when dropped.
#[must_use = "the pin is released when dropped"]
pub struct AzurePin {
    blobs: AzureBlobs,
    name: String,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AzurePin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if let Err(e) = self.blobs.delete_blob(&self.name) {
            tracing::warn!(pin = %self.name, error = %e, "cannot remove a point pin; it expires by itself");
        }
    }
}

/// Pins point `seq` of `vm` (see the module doc).
pub fn pin_point(blobs: &AzureBlobs, vm: &str, seq: u64) -> Result<AzurePin, JobError> {
    pin_for(blobs, vm, seq, LIFETIME)
}

/// [`pin_point`] with another lifetime (tests).
pub fn pin_for(
    blobs: &AzureBlobs,
    vm: &str,
    seq: u64,
    lifetime: Duration,
) -> Result<AzurePin, JobError> {
    let mut r = [0u8; 8];
    ferry_crypto::random_bytes(&mut r)?;
    let name = format!("pins/{vm}/{seq}.{}.json", hex::encode(r));
    blobs
        .put_block_blob(&name, body(vm, seq, lifetime))
        .map_err(az)?;
    let stop = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (blobs, name, stop, vm) = (blobs.clone(), name.clone(), stop.clone(), vm.to_owned());
        std::thread::spawn(move || {
            let mut next = std::time::Instant::now() + RENEW.min(lifetime / 3);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if std::time::Instant::now() >= next {
                    if let Err(e) = blobs.put_block_blob(&name, body(&vm, seq, lifetime)) {
                        tracing::warn!(pin = %name, error = %e, "cannot renew a point pin");
                    }
                    next = std::time::Instant::now() + RENEW.min(lifetime / 3);
                }
            }
        })
    };
    Ok(AzurePin {
        blobs: blobs.clone(),
        name,
        stop,
        renewer: Some(renewer),
    })
}

/// The lowest pinned point seq per VM among unexpired pins; expired and unreadable pins are
/// deleted.
pub fn live_pins(blobs: &AzureBlobs) -> Result<HashMap<String, u64>, JobError> {
    let mut out: HashMap<String, u64> = HashMap::new();
    let now = now_secs();
    for (name, _) in blobs.list("pins/").map_err(az)? {
        let Some(b) = blobs.get_blob(&name).map_err(az)? else {
            continue; // released meanwhile
        };
        match serde_json::from_slice::<PinBlob>(&b) {
            Ok(p) if p.expires > now => {
                let m = out.entry(p.vm).or_insert(p.seq);
                *m = (*m).min(p.seq);
            }
            _ => {
                tracing::info!(pin = %name, "removing an expired point pin");
                let _ = blobs.delete_blob(&name);
            }
        }
    }
    Ok(out)
}
