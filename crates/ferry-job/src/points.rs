//! Listing and resolving recovery points, and restoring them.

use std::path::PathBuf;

use ferry_apply::{OutputFormat, RestoreReport};
use ferry_format::manifest::Point;

use crate::azure::StoreLocation;
use crate::stores::{open_recovery, FileJob, RecoveryStore};
use crate::{JobError, Progress};

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

/// Every point in the store (of one VM, or all), oldest first.
pub fn list_points(
    store: &dyn RecoveryStore,
    vm: Option<&str>,
) -> Result<Vec<(String, Point)>, JobError> {
    let vms = store.vms()?;
    let chosen: Vec<String> = match vm {
        Some(v) if vms.iter().any(|x| x == v) => vec![v.to_owned()],
        Some(v) => return Err(no_vm(&store.name(), v, &vms)),
        None => vms,
    };
    let mut out = Vec::new();
    for v in chosen {
        if let Some(m) = store.manifest(&v)? {
            out.extend(m.points.into_iter().map(|p| (v.clone(), p)));
        }
    }
    out.sort_by(|a, b| (&a.1.time, a.1.seq, &a.0).cmp(&(&b.1.time, b.1.seq, &b.0)));
    Ok(out)
}

fn no_vm(store: &str, v: &str, vms: &[String]) -> JobError {
    JobError::Usage(format!(
        "store {store} has no VM '{v}'; it has: {}",
        if vms.is_empty() {
            "none yet (run `ferry replicate` first)".to_string()
        } else {
            vms.join(", ")
        }
    ))
}

/// Finds the point a selector names; refuses ambiguity with the list of choices.
pub fn resolve_point(
    store: &dyn RecoveryStore,
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
                    store.name(),
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
                    "no point '{id}' in {0}; list them with `ferry points list --store {0}`",
                    store.name()
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
    let store = open_recovery(&r.store, Some(&r.key_file))?;
    let (vm, point) = resolve_point(store.as_ref(), r.vm.as_deref(), &r.point)?;
    let disk = choose_disk(&vm, &point, r.disk.as_deref())?;
    if r.out.starts_with("azure://") {
        let bytes = store.restore_in_store(&vm, &point, &disk, &r.out, r.force, r.verify)?;
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
    progress.start(&format!("restoring {} of {vm}/{disk}", point.id), size);
    let rep = store.restore_to_file(
        &FileJob {
            vm: &vm,
            point: &point,
            disk: &disk,
            out: &out,
            format,
            threads: r.threads,
        },
        &|d| progress.update(d),
    );
    progress.finish();
    let bytes = rep?;
    if r.verify {
        progress.start(&format!("verifying {}", out.display()), size);
        let v = ferry_apply::verify_file(&out, &point, &disk, format, &|d| progress.update(d));
        progress.finish();
        v?;
    }
    Ok((
        vm,
        disk,
        point,
        RestoreReport {
            bytes,
            chunks_read: 0,
        },
    ))
}

/// The disk to restore: the one asked for, or the only one; refuses ambiguity with the choices.
fn choose_disk(vm: &str, point: &Point, asked: Option<&str>) -> Result<String, JobError> {
    let names = || {
        point
            .disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match asked {
        Some(d) if point.disks.iter().any(|x| x.name == d) => Ok(d.to_owned()),
        Some(d) => Err(JobError::Usage(format!(
            "point {} of VM '{vm}' has no disk '{d}'; it has: {}",
            point.id,
            names()
        ))),
        None if point.disks.len() == 1 => Ok(point.disks[0].name.clone()),
        None => Err(JobError::Usage(format!(
            "point {} of VM '{vm}' has several disks ({}); choose one with --disk",
            point.id,
            names()
        ))),
    }
}
