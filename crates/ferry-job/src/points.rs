//! Listing and resolving recovery points, and restoring them.

use std::path::{Path, PathBuf};

use ferry_apply::{OutputFormat, RestoreOptions, RestoreReport};
use ferry_format::manifest::Point;
use ferry_store::Replica;

use crate::azure::{self, StoreLocation};
use crate::{open_store, JobError, Progress};

/// Which point to restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointSelector {
    Latest,
    LatestApp,
    /// An id, or a unique prefix of one.
    Id(String),
}

impl std::str::FromStr for PointSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "latest" => PointSelector::Latest,
            "latest-app" => PointSelector::LatestApp,
            "" => return Err("empty point id".into()),
            id => PointSelector::Id(id.into()),
        })
    }
}

/// Every point in the store (of one VM, or all), oldest first. Needs no key.
pub fn list_points(
    store: &StoreLocation,
    vm: Option<&str>,
) -> Result<Vec<(String, Point)>, JobError> {
    match store {
        StoreLocation::Local(p) => list_local_points(p, vm),
        StoreLocation::Azure { url, .. } => {
            let blobs = azure::connect(url)?;
            let vms = azure::list_vms(&blobs)?;
            let chosen: Vec<String> = match vm {
                Some(v) if vms.iter().any(|x| x == v) => vec![v.to_owned()],
                Some(v) => return Err(no_vm(Path::new(url), v, &vms)),
                None => vms,
            };
            let mut out = Vec::new();
            for v in chosen {
                if let Some(m) = azure::load_manifest(&blobs, &v)? {
                    out.extend(m.points.into_iter().map(|p| (v.clone(), p)));
                }
            }
            out.sort_by(|a, b| (&a.1.time, a.1.seq, &a.0).cmp(&(&b.1.time, b.1.seq, &b.0)));
            Ok(out)
        }
    }
}

fn list_local_points(store: &Path, vm: Option<&str>) -> Result<Vec<(String, Point)>, JobError> {
    let vms = ferry_store::list_vms_at(store)?;
    let chosen: Vec<String> = match vm {
        Some(v) if vms.iter().any(|x| x == v) => vec![v.to_owned()],
        Some(v) => return Err(no_vm(store, v, &vms)),
        None => vms,
    };
    let mut out = Vec::new();
    for v in chosen {
        if let Some(m) = ferry_store::load_manifest_at(store, &v)? {
            out.extend(m.points.into_iter().map(|p| (v.clone(), p)));
        }
    }
    out.sort_by(|a, b| (&a.1.time, a.1.seq, &a.0).cmp(&(&b.1.time, b.1.seq, &b.0)));
    Ok(out)
}

fn no_vm(store: &Path, v: &str, vms: &[String]) -> JobError {
    JobError::Usage(format!(
        "store {} has no VM '{v}'; it has: {}",
        store.display(),
        if vms.is_empty() {
            "none yet (run `ferry replicate` first)".to_string()
        } else {
            vms.join(", ")
        }
    ))
}

/// Finds the point a selector names; refuses ambiguity with the list of choices.
pub fn resolve_point(
    store: &StoreLocation,
    vm: Option<&str>,
    sel: &PointSelector,
) -> Result<(String, Point), JobError> {
    let all = list_points(store, vm)?;
    let vms: Vec<&String> = {
        let mut v: Vec<&String> = all.iter().map(|(v, _)| v).collect();
        v.dedup();
        v.sort();
        v.dedup();
        v
    };
    match sel {
        PointSelector::Latest | PointSelector::LatestApp => {
            if vms.len() > 1 {
                return Err(JobError::Usage(format!(
                    "store {} holds several VMs ({}); choose one with --vm",
                    store,
                    vms.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let app = *sel == PointSelector::LatestApp;
            all.into_iter()
                .rev()
                .find(|(_, p)| !app || p.kind == "app")
                .ok_or_else(|| {
                    JobError::Usage(if app {
                        "no app-consistent point exists; list points with `ferry points list`"
                            .into()
                    } else {
                        "no recovery point exists yet; run `ferry replicate` first".into()
                    })
                })
        }
        PointSelector::Id(id) => {
            let hits: Vec<(String, Point)> =
                all.iter().filter(|(_, p)| p.id == *id).cloned().collect();
            let hits = if hits.is_empty() {
                all.iter()
                    .filter(|(_, p)| p.id.starts_with(id.as_str()))
                    .cloned()
                    .collect()
            } else {
                hits
            };
            match hits.len() {
                1 => Ok(hits.into_iter().next().expect("one")),
                0 => Err(JobError::Usage(format!(
                    "no point '{id}' in {store}; list them with `ferry points list --store {store}`"
                ))),
                _ => Err(JobError::Usage(format!(
                    "point '{id}' is ambiguous: {}; give the full id and --vm",
                    hits.iter()
                        .map(|(v, p)| format!("{} (vm {v})", p.id))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
    }
}

/// What to restore.
#[derive(Clone, Debug)]
pub struct RestoreRequest {
    pub store: StoreLocation,
    pub key_file: PathBuf,
    pub vm: Option<String>,
    pub disk: Option<String>,
    pub point: PointSelector,
    /// A local file, or `azure://ACCOUNT/CONTAINER/PATH` (a new page blob in the same store).
    pub out: String,
    pub verify: bool,
    pub force: bool,
    pub threads: usize,
}

/// Restores a point's disk to a file; returns vm, disk, point and what was done.
pub fn restore_point(
    r: &RestoreRequest,
    progress: &dyn Progress,
) -> Result<(String, String, Point, RestoreReport), JobError> {
    let (vm, point) = resolve_point(&r.store, r.vm.as_deref(), &r.point)?;
    let disk = match &r.disk {
        Some(d) => d.clone(),
        None if point.disks.len() == 1 => point.disks[0].name.clone(),
        None => {
            return Err(JobError::Usage(format!(
                "point {} of VM '{vm}' has several disks ({}); choose one with --disk",
                point.id,
                point
                    .disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    if !point.disks.iter().any(|d| d.name == disk) {
        return Err(JobError::Usage(format!(
            "point {} of VM '{vm}' has no disk '{disk}'; it has: {}",
            point.id,
            point
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if let Some(rest) = r.out.strip_prefix("azure://") {
        let StoreLocation::Azure {
            url,
            account,
            container,
        } = &r.store
        else {
            return Err(JobError::Usage(
                "restoring into Azure needs an azure:// --store (server-side copy of the point's snapshot)".into(),
            ));
        };
        let mut it = rest.splitn(3, '/');
        let (a, c, path) = (
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
        );
        if a != account || c != container || path.is_empty() {
            return Err(JobError::Usage(format!(
                "--out {} must be a blob path in the store's own container: azure://{account}/{container}/PATH",
                r.out
            )));
        }
        let blobs = azure::connect(url)?;
        if !r.force && blobs.blob_size(path).map_err(azure::az)?.is_some() {
            return Err(JobError::Usage(format!(
                "{} already exists; delete it or pass --force",
                r.out
            )));
        }
        let size = azure::restore_to_blob(&blobs, &vm, &point, &disk, path, r.verify)?;
        return Ok((
            vm,
            disk,
            point,
            RestoreReport {
                bytes: size,
                chunks_read: 0,
            },
        ));
    }
    let out = PathBuf::from(&r.out);
    if let Ok(m) = std::fs::metadata(&out) {
        use std::os::unix::fs::FileTypeExt;
        if m.file_type().is_block_device() && !r.force {
            return Err(JobError::Usage(format!(
                "{} is a block device; restoring overwrites all of it — pass --force if that is what you want",
                out.display()
            )));
        }
        if m.is_file() && m.len() > 0 && !r.force {
            return Err(JobError::Usage(format!(
                "{} already exists; remove it or pass --force to overwrite it",
                out.display()
            )));
        }
    }
    let format = OutputFormat::from_path(&out);
    let size = point
        .disks
        .iter()
        .find(|d| d.name == disk)
        .map_or(0, |d| d.size);
    let root = match &r.store {
        StoreLocation::Local(p) => p.clone(),
        StoreLocation::Azure { url, .. } => {
            // Page-blob snapshots hold plain bytes: no key needed.
            let blobs = azure::connect(url)?;
            progress.start(&format!("restoring {} of {vm}/{disk}", point.id), size);
            let job = azure::FileRestore {
                vm: &vm,
                point: &point,
                disk: &disk,
                out: &out,
                format,
                threads: r.threads,
            };
            let rep = azure::restore_to_file(&blobs, &job, &|d| progress.update(d));
            progress.finish();
            let bytes = rep?;
            if r.verify {
                progress.start(&format!("verifying {}", out.display()), size);
                let v =
                    ferry_apply::verify_file(&out, &point, &disk, format, &|d| progress.update(d));
                progress.finish();
                v?;
            }
            return Ok((
                vm,
                disk,
                point,
                RestoreReport {
                    bytes,
                    chunks_read: 0,
                },
            ));
        }
    };
    let store = open_store(&root, &r.key_file, false)?;
    let _lock = store.lock()?;
    // Finish a commit a crash may have interrupted before reading the replica.
    let manifest = store
        .load_manifest(&vm)?
        .ok_or_else(|| JobError::Usage(format!("VM '{vm}' has no manifest")))?;
    let latest = manifest
        .points
        .iter()
        .filter(|p| p.disks.iter().any(|d| d.name == disk))
        .map(|p| p.seq)
        .max()
        .unwrap_or(0);
    Replica::open(&store.replica_dir(&vm, &disk))?.recover(latest)?;
    progress.start(&format!("restoring {} of {vm}/{disk}", point.id), size);
    let rep = ferry_apply::restore(
        &store,
        &RestoreOptions {
            vm: &vm,
            disk: &disk,
            point: &point,
            out: &out,
            format,
            threads: r.threads,
            progress: &|d| progress.update(d),
        },
    );
    progress.finish();
    let rep = rep?;
    if r.verify {
        progress.start(&format!("verifying {}", out.display()), size);
        let v = ferry_apply::verify_file(&out, &point, &disk, format, &|d| progress.update(d));
        progress.finish();
        v?;
    }
    Ok((vm, disk, point, rep))
}
