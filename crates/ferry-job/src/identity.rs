//! Store identity: local state is bound to the store it describes.
//!
//! An Azure store (a container) gets a marker blob `ferry-store.json` when Ferry first uses it: a
//! random id and a creation generation, written once. The local staging store that describes it
//! (digest maps, journal, dedupe index: what the next run compares against) records the marker it
//! was built against in `remote-store.json`. Every run checks both before it ships anything: if the
//! container was emptied or re-created (a fresh Azurite, a new account with the same name, an
//! operator starting over), the staging state no longer describes it, and a run that trusted it would
//! ship only recent changes into an empty replica and publish a point of mostly zeros. Ferry refuses
//! instead, naming both ids and what to do.
//!
//! The cache is bound the same way to the local (or staging) store it feeds: `CACHE/store-id`.

use std::path::{Path, PathBuf};

use ferry_azure::AzureBlobs;
use ferry_store::LocalStore;

use crate::azure::az;
use crate::JobError;

/// Name of the marker blob in an Azure container.
pub const AZURE_MARKER: &str = "ferry-store.json";
/// Name of the binding file in a staging store.
const BINDING: &str = "remote-store.json";
/// Name of the binding file in a cache directory.
const CACHE_BINDING: &str = "store-id";

pub use ferry_format::marker::StoreMarker;

fn new_marker(key_id: String) -> Result<StoreMarker, JobError> {
    let mut id = [0u8; 16];
    ferry_crypto::random_bytes(&mut id)?;
    Ok(StoreMarker {
        format: ferry_format::marker::AZURE_MARKER_FORMAT.into(),
        version: 1,
        store_id: hex::encode(id),
        generation: 1,
        key_id,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    })
}

fn fresh(store: &LocalStore) -> Result<bool, JobError> {
    Ok(store.list_vms()?.is_empty()
        && !store
            .root()
            .join("journal")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()))
}

/// Whether every VM of the staging store has, in the container, a manifest whose newest point is
/// the staging store's newest point: the container is the one the staging state was built against
/// (used once, to adopt state written before stores had markers).
fn same_history(store: &LocalStore, blobs: &AzureBlobs) -> Result<bool, JobError> {
    let vms = store.list_vms()?;
    if vms.is_empty() {
        return Ok(false);
    }
    for vm in vms {
        let local = store
            .load_manifest(&vm)?
            .and_then(|m| m.points.last().cloned());
        // By run, not by id: the store numbers its own points. The remote may be ahead (it is
        // published first), so the local newest run may be anywhere in it.
        let remote = crate::azure::load_manifest(blobs, &vm)?;
        match (local, remote) {
            (Some(l), Some(r)) if r.points.iter().any(|p| p.run == l.run) => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Checks that the staging store `store` describes the Azure store behind `blobs` (creating the
/// marker of a new container and the binding of a fresh staging store), or refuses.
pub fn bind_azure(
    store: &LocalStore,
    blobs: &AzureBlobs,
    url: &str,
) -> Result<StoreMarker, JobError> {
    let remote = match blobs.get_blob(AZURE_MARKER).map_err(az)? {
        Some(b) => Some(StoreMarker::parse(&b).map_err(|e| {
            JobError::Azure(format!("{url}/{AZURE_MARKER}: {e}; this container is not a Ferry store (or a newer Ferry's): use another container"))
        })?),
        None => None,
    };
    let bp = store.root().join(BINDING);
    let local = match std::fs::read(&bp) {
        Ok(b) => Some(StoreMarker::parse(&b).map_err(|e| {
            JobError::Usage(format!(
                "{}: {e}; move the staging directory {} aside to start over (a full resync)",
                bp.display(),
                store.root().display()
            ))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(ferry_store::StoreError::Io {
                path: bp,
                op: "read",
                source: e,
            }
            .into())
        }
    };
    let key_id = store.key().id().to_string();
    let start_over = |why: String| -> JobError {
        JobError::Usage(format!(
            "{why}. The local staging state in {dir} no longer describes {url}, so a run would publish points built on data the store does not hold; nothing was shipped. To replicate into {url} from scratch (a full resync), move the staging directory aside: mv {dir} {dir}.old",
            dir = store.root().display()
        ))
    };
    let m = match (remote, local) {
        (Some(r), Some(l)) if r.store_id == l.store_id && r.generation == l.generation => {
            return Ok(r)
        }
        (Some(r), Some(l)) => {
            return Err(start_over(format!(
                "{url} is store {}, but the local staging state was built against store {}",
                r.describe(),
                l.describe()
            )))
        }
        (None, Some(l)) => {
            return Err(start_over(format!(
                "{url} has no store marker ({AZURE_MARKER}): the container was emptied or re-created since the local staging state was built against store {}",
                l.describe()
            )))
        }
        (Some(r), None) => {
            if r.key_id != key_id {
                return Err(JobError::Usage(format!(
                    "{url} is store {}, made with master key {}; this run has key {key_id} ({}). Use the key file of that store, or another container",
                    r.describe(),
                    r.key_id,
                    store.key().path().display()
                )));
            }
            if !fresh(store)? && !same_history(store, blobs)? {
                return Err(start_over(format!(
                    "{url} is store {}, and the local staging state was never bound to it and does not match its points",
                    r.describe()
                )));
            }
            r
        }
        (None, None) => {
            if !fresh(store)? && !same_history(store, blobs)? {
                return Err(start_over(format!(
                    "{url} has no store marker ({AZURE_MARKER}) and does not hold the points the local staging state was built with"
                )));
            }
            let m = new_marker(key_id)?;
            // Created only if absent: of two processes binding a new container at once, one
            // writes its marker and the other adopts it (never two ids for one store).
            if blobs
                .create_block_blob(AZURE_MARKER, serde_json::to_vec_pretty(&m).expect("marker"))
                .map_err(az)?
            {
                tracing::info!(store = %url, id = %m.store_id, "created the store marker");
                m
            } else {
                let b = blobs.get_blob(AZURE_MARKER).map_err(az)?.ok_or_else(|| {
                    JobError::Azure(format!(
                        "{url}/{AZURE_MARKER} exists and then does not: is another process deleting this container? Try again"
                    ))
                })?;
                let r = StoreMarker::parse(&b).map_err(|e| {
                    JobError::Azure(format!("{url}/{AZURE_MARKER}: {e}; this container is not a Ferry store (or a newer Ferry's): use another container"))
                })?;
                // Our own marker (the id is random): a retry after a lost response. Anything else
                // is another writer that bound this new container in the same instant, from
                // another staging directory: two writers on one store must not both go on.
                if r.store_id != m.store_id {
                    return Err(start_over(format!(
                        "{url} became store {} a moment ago, created by another Ferry process with its own staging state; only one writer may replicate into a store",
                        r.describe()
                    )));
                }
                r
            }
        }
    };
    ferry_durable::durable_write(&bp, &serde_json::to_vec_pretty(&m).expect("marker")).map_err(
        |source| ferry_store::StoreError::Io {
            path: bp.clone(),
            op: "write",
            source,
        },
    )?;
    Ok(m)
}

/// Checks that the cache directory `dir` belongs to `store` (binding a new or empty one), or
/// refuses: records acknowledged for another store must never be applied to this one.
pub fn bind_cache(store: &LocalStore, dir: &Path) -> Result<(), JobError> {
    let p: PathBuf = dir.join(CACHE_BINDING);
    match std::fs::read_to_string(&p) {
        Ok(s) if s.trim() == store.store_id() => Ok(()),
        Ok(s) => Err(JobError::Usage(format!(
            "cache directory {} belongs to store {}, not to store {} ({}); its records must not be applied here. Use that store, or give this one its own --cache-dir",
            dir.display(),
            s.trim(),
            store.store_id(),
            store.root().display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let has_logs = std::fs::read_dir(dir).is_ok_and(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "log"))
            });
            if has_logs {
                // A cache from before caches were bound: its records were written for this store
                // only if the caller's choice of directory says so; adopt it (the default cache
                // directory is named after the store id).
                tracing::info!(cache = %dir.display(), store = %store.store_id(), "binding an existing cache to its store");
            }
            ferry_durable::durable_write(&p, format!("{}\n", store.store_id()).as_bytes())
                .map_err(|source| {
                    ferry_store::StoreError::Io {
                        path: p.clone(),
                        op: "write",
                        source,
                    }
                    .into()
                })
        }
        Err(e) => Err(ferry_store::StoreError::Io {
            path: p,
            op: "read",
            source: e,
        }
        .into()),
    }
}
