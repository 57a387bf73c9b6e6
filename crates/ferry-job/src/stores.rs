//! The operator's view of a store, whatever its backend: its VMs, their manifests (the commit
//! points), and the bytes of a point. `ferry points list` and `ferry restore` work only through
//! [`RecoveryStore`]; the local directory and Azure Blob Storage implement it.

use std::path::{Path, PathBuf};

use ferry_apply::{OutputFormat, RestoreOptions};
use ferry_azure::AzureBlobs;
use ferry_format::manifest::{Manifest, Point};
use ferry_store::Replica;

use crate::azure::{self, StoreLocation};
use crate::{open_store, JobError};

/// One disk of one point, to a local file.
pub struct FileJob<'a> {
    pub vm: &'a str,
    pub point: &'a Point,
    pub disk: &'a str,
    pub out: &'a Path,
    pub format: OutputFormat,
    pub threads: usize,
}

/// A store as recovery sees it.
pub trait RecoveryStore {
    /// How the store is named to the operator (path or URL).
    fn name(&self) -> String;
    /// VMs with a manifest, sorted.
    fn vms(&self) -> Result<Vec<String>, JobError>;
    /// A VM's manifest, if it has one.
    fn manifest(&self, vm: &str) -> Result<Option<Manifest>, JobError>;
    /// Writes one disk of a point to a local raw image or fixed VHD; returns the disk's size.
    fn restore_to_file(
        &self,
        job: &FileJob<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, JobError>;
    /// Makes a new replica-shaped object in the store itself from a point (Azure: server-side copy
    /// of the snapshot into a new page blob). `dst` is the store URL of the new object.
    fn restore_in_store(
        &self,
        vm: &str,
        point: &Point,
        disk: &str,
        dst: &str,
        force: bool,
        verify: bool,
    ) -> Result<u64, JobError>;
}

/// Opens the recovery view of a store. The local store needs its key (to decrypt chunks); page-blob
/// snapshots in Azure hold plain bytes and need none.
/// `key_file` may be None where only manifests are read (listing points).
pub fn open_recovery(
    loc: &StoreLocation,
    key_file: Option<&Path>,
) -> Result<Box<dyn RecoveryStore>, JobError> {
    Ok(match loc {
        StoreLocation::Local(p) => Box::new(LocalRecovery {
            root: p.clone(),
            key_file: key_file.map(Path::to_owned),
        }),
        StoreLocation::Azure {
            url,
            account,
            container,
        } => Box::new(AzureRecovery {
            blobs: azure::connect(url)?,
            url: url.clone(),
            account: account.clone(),
            container: container.clone(),
        }),
    })
}

/// How long a reader waits for a writer to finish a commit it has started.
const BEHIND_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Makes sure the replica of `vm`/`disk` has reached point `seq`. A replica behind its manifest is a
/// commit a crash interrupted: with no writer running, it is finished here (under the writer lock,
/// briefly); with a writer running, that writer finishes it at start-up, so this waits for it (up to
/// [`BEHIND_WAIT`], saying who it waits for).
fn wait_for_replica(
    store: &ferry_store::LocalStore,
    vm: &str,
    disk: &str,
    seq: u64,
    latest: u64,
) -> Result<(), JobError> {
    let dir = store.replica_dir(vm, disk);
    let t0 = std::time::Instant::now();
    let mut said = false;
    loop {
        if ferry_store::readers::replica_generation(&dir)? >= seq {
            return Ok(());
        }
        if let Some(_lock) = store.try_lock()? {
            // Re-read under the lock: the writer may have finished and exited meanwhile.
            let m = store.load_manifest(vm)?;
            let latest = m
                .map(|m| {
                    m.points
                        .iter()
                        .filter(|p| p.disks.iter().any(|d| d.name == disk))
                        .map(|p| p.seq)
                        .max()
                        .unwrap_or(0)
                })
                .unwrap_or(latest);
            Replica::open(&dir)?.recover(latest)?;
            return Ok(());
        }
        let holder = ferry_store::readers::lock_holder(store.root());
        if t0.elapsed() >= BEHIND_WAIT {
            return Err(ferry_store::StoreError::Busy {
                what: format!("replica {vm}/{disk} is behind its manifest, and store"),
                path: store.root().to_owned(),
                holder: holder.describe(),
                waited: t0.elapsed(),
            }
            .into());
        }
        if !said {
            tracing::warn!(
                "replica {vm}/{disk} has a commit to finish; waiting up to {}s for the writer, {}",
                BEHIND_WAIT.as_secs(),
                holder.describe()
            );
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The embedded local store.
pub struct LocalRecovery {
    root: PathBuf,
    key_file: Option<PathBuf>,
}

impl RecoveryStore for LocalRecovery {
    fn name(&self) -> String {
        self.root.display().to_string()
    }

    fn vms(&self) -> Result<Vec<String>, JobError> {
        Ok(ferry_store::list_vms_at(&self.root)?)
    }

    fn manifest(&self, vm: &str) -> Result<Option<Manifest>, JobError> {
        Ok(ferry_store::load_manifest_at(&self.root, vm)?)
    }

    fn restore_to_file(
        &self,
        job: &FileJob<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, JobError> {
        let key_file = self
            .key_file
            .clone()
            .unwrap_or_else(crate::default_key_file);
        let store = open_store(&self.root, &key_file, false)?;
        // No writer lock: `ferry serve` / `ferry replicate` keep writing meanwhile. The pin keeps
        // retention from deleting what this point needs; then the point must still be listed.
        let _pin = ferry_store::readers::pin_point(&self.root, job.vm, job.point.seq)?;
        let manifest = store
            .load_manifest(job.vm)?
            .ok_or_else(|| JobError::Usage(format!("VM '{}' has no manifest", job.vm)))?;
        if !manifest.points.iter().any(|p| p.seq == job.point.seq) {
            return Err(JobError::Usage(format!(
                "point {} of VM '{}' was just pruned by retention; list the points again with `ferry points list` and choose another",
                job.point.id, job.vm
            )));
        }
        let latest = manifest
            .points
            .iter()
            .filter(|p| p.disks.iter().any(|d| d.name == job.disk))
            .map(|p| p.seq)
            .max()
            .unwrap_or(0);
        wait_for_replica(&store, job.vm, job.disk, job.point.seq, latest)?;
        let rep = ferry_apply::restore(
            &store,
            &RestoreOptions {
                vm: job.vm,
                disk: job.disk,
                point: job.point,
                out: job.out,
                format: job.format,
                threads: job.threads,
                progress,
            },
        )?;
        Ok(rep.bytes)
    }

    fn restore_in_store(
        &self,
        _: &str,
        _: &Point,
        _: &str,
        _: &str,
        _: bool,
        _: bool,
    ) -> Result<u64, JobError> {
        Err(JobError::Usage(
            "restoring into Azure needs an azure:// --store (server-side copy of the point's snapshot)".into(),
        ))
    }
}

/// An Azure Blob Storage container.
pub struct AzureRecovery {
    blobs: AzureBlobs,
    url: String,
    account: String,
    container: String,
}

impl RecoveryStore for AzureRecovery {
    fn name(&self) -> String {
        self.url.clone()
    }

    fn vms(&self) -> Result<Vec<String>, JobError> {
        azure::list_vms(&self.blobs)
    }

    fn manifest(&self, vm: &str) -> Result<Option<Manifest>, JobError> {
        Ok(azure::load_manifest(&self.blobs, vm)?)
    }

    fn restore_to_file(
        &self,
        job: &FileJob<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, JobError> {
        let _pin = self.pin(job.vm, job.point)?;
        azure::restore_to_file(&self.blobs, job, progress)
    }

    fn restore_in_store(
        &self,
        vm: &str,
        point: &Point,
        disk: &str,
        dst: &str,
        force: bool,
        verify: bool,
    ) -> Result<u64, JobError> {
        let rest = dst.strip_prefix("azure://").unwrap_or(dst);
        let mut it = rest.splitn(3, '/');
        let (a, c, path) = (
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
        );
        if a != self.account || c != self.container || path.is_empty() {
            return Err(JobError::Usage(format!(
                "--out {dst} must be a blob path in the store's own container: azure://{}/{}/PATH",
                self.account, self.container
            )));
        }
        if !force && self.blobs.blob_size(path).map_err(azure::az)?.is_some() {
            return Err(JobError::Usage(format!(
                "{dst} already exists; delete it or pass --force"
            )));
        }
        let _pin = self.pin(vm, point)?;
        azure::restore_to_blob(&self.blobs, vm, point, disk, path, verify)
    }
}

impl AzureRecovery {
    /// Pins `point` against retention, then checks it is still listed.
    fn pin(&self, vm: &str, point: &Point) -> Result<crate::azure_pins::AzurePin, JobError> {
        let pin = crate::azure_pins::pin_point(&self.blobs, vm, point.seq)?;
        let listed = azure::load_manifest(&self.blobs, vm)?
            .is_some_and(|m| m.points.iter().any(|p| p.seq == point.seq));
        if !listed {
            return Err(JobError::Usage(format!(
                "point {} of VM '{vm}' was just pruned by retention; list the points again with `ferry points list` and choose another",
                point.id
            )));
        }
        Ok(pin)
    }
}
