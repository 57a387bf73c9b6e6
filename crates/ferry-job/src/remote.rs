//! `ferry apply`: split mode's applier, run near the store.
//!
//! The process side uploads only sealed segments (`journal/VM/DISK/SEQ.seg`). This applier reads
//! them, and for every run whose tag reached every disk of its cut writes the run to the replica page
//! blobs, snapshots them and replaces the manifest (the commit point). The manifest records, per
//! disk, the journal position just past the last applied tag, so a restart (after kill -9 at any
//! moment) resumes there; re-writing a run writes the same bytes, and a run already in the manifest
//! is skipped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_apply::{point_from_tag, ApplyError, RunOp, RunSpan, TargetError};
use ferry_azure::AzureBlobs;
use ferry_crypto::MasterKey;
use ferry_format::manifest::{JournalPos, Manifest, Point};
use ferry_format::segment::{self, PointTag, Record, SegmentHeader, SEGMENT_HEADER_LEN};

use crate::azure::{az, ensure_replica, load_manifest, publish_point, replica_blob, write_run};
use crate::JobError;

/// What one `ferry apply` pass did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    pub points: Vec<(String, Point)>,
    pub segments_read: u64,
    pub bytes_read: u64,
}

type Seg = Arc<(SegmentHeader, Vec<u8>, Vec<Record>)>;

/// Downloaded segments, bounded by size.
struct SegCache<'a> {
    blobs: &'a AzureBlobs,
    key: &'a MasterKey,
    map: HashMap<String, Seg>,
    order: VecDeque<String>,
    bytes: usize,
    report: &'a mut ApplyReport,
}

impl SegCache<'_> {
    fn get(&mut self, path: &str) -> Result<Seg, ApplyError> {
        if let Some(s) = self.map.get(path) {
            return Ok(s.clone());
        }
        let bytes = self
            .blobs
            .get_blob(path)
            .map_err(|e| TargetError(e.to_string()))?
            .ok_or_else(|| TargetError(format!("segment {path} is missing from the store")))?;
        self.report.segments_read += 1;
        self.report.bytes_read += bytes.len() as u64;
        let bad = |e: ferry_format::FormatError| TargetError(format!("{path}: {e}"));
        if bytes.len() < SEGMENT_HEADER_LEN {
            return Err(TargetError(format!("{path}: truncated segment")).into());
        }
        let h = SegmentHeader::decode(&bytes[..SEGMENT_HEADER_LEN], Some(self.key.id()))
            .map_err(bad)?;
        let idx = segment::open_index(&h, self.key, &bytes).map_err(bad)?;
        let s = Arc::new((h, bytes, idx.records));
        self.bytes += s.1.len();
        self.map.insert(path.to_owned(), s.clone());
        self.order.push_back(path.to_owned());
        while self.bytes > 1 << 30 && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front() {
                if let Some(o) = self.map.remove(&old) {
                    self.bytes -= o.1.len();
                }
            }
        }
        Ok(s)
    }

    fn chunk(&mut self, loc: &segment::ChunkLoc) -> Result<Vec<u8>, ApplyError> {
        let s = self.get(&loc.segment)?;
        let end = loc.offset as usize + loc.sealed_len as usize;
        let sealed =
            s.1.get(loc.offset as usize..end)
                .ok_or_else(|| TargetError(format!("{}: chunk outside the segment", loc.segment)))?
                .to_vec();
        segment::open_blob(&s.0, self.key, loc, sealed)
            .map_err(|e| TargetError(format!("{} offset {}: {e}", loc.segment, loc.offset)).into())
    }
}

/// One complete run found on a disk.
struct Found {
    tag: PointTag,
    from: JournalPos,
    to: JournalPos,
}

/// Applies every complete run in the store's journal. Returns when nothing more can be applied.
pub fn apply_all(
    blobs: &AzureBlobs,
    key: &MasterKey,
    stop: &AtomicBool,
) -> Result<ApplyReport, JobError> {
    let mut report = ApplyReport::default();
    let mut journal: BTreeMap<String, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
    for (name, _) in blobs.list("journal/").map_err(az)? {
        let parts: Vec<&str> = name.split('/').collect();
        if let [_, vm, disk, file] = parts[..] {
            if let Some(seq) = file.strip_suffix(".seg").and_then(|s| s.parse().ok()) {
                journal
                    .entry(vm.to_owned())
                    .or_default()
                    .entry(disk.to_owned())
                    .or_default()
                    .push(seq);
            }
        }
    }
    for (vm, disks) in journal {
        // A VM whose migration was completed: its segments are being deleted, nothing of it is
        // applied (that would make its manifest and replicas again).
        if crate::azure::is_retired(blobs, &vm)? {
            tracing::info!(vm = %vm, "skipped: its migration was completed (lifecycle/VM.retired)");
            continue;
        }
        let mut m =
            load_manifest(blobs, &vm)?.unwrap_or_else(|| Manifest::new(&vm, &key.id().to_string()));
        if m.key_id != key.id().to_string() {
            return Err(JobError::Usage(format!(
                "the store's VM '{vm}' was written with key {}, but key file {} has id {}; pass the right --key-file",
                m.key_id,
                key.path().display(),
                key.id()
            )));
        }
        let mut cache = SegCache {
            blobs,
            key,
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            report: &mut report,
        };
        let mut applied_points = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // The first run not yet applied, per disk.
            let mut first: BTreeMap<String, Found> = BTreeMap::new();
            for (disk, seqs) in &disks {
                let from = m.disks.get(disk).map(|d| d.applied).unwrap_or_default();
                if let Some(f) = next_run(&mut cache, &vm, disk, seqs, from, &m)? {
                    first.insert(disk.clone(), f);
                }
            }
            // A run is ready when every disk of its cut has it first.
            let Some(ready) = first.values().find(|f| {
                f.tag
                    .disks
                    .iter()
                    .all(|d| first.get(&d.name).is_some_and(|g| g.tag.run == f.tag.run))
            }) else {
                break;
            };
            let tag = ready.tag.clone();
            let spans: Vec<RunSpan> = tag
                .disks
                .iter()
                .map(|d| RunSpan {
                    disk: d.name.clone(),
                    size: d.size,
                    from: first[&d.name].from,
                    to: first[&d.name].to,
                    fresh: !m
                        .points
                        .iter()
                        .any(|p| p.disks.iter().any(|x| x.name == d.name)),
                })
                .collect();
            for span in &spans {
                ensure_replica(blobs, &vm, &span.disk, span.size, span.fresh)?;
                let ops = span_ops(&mut cache, &vm, span, &disks[&span.disk]);
                write_run(blobs, &replica_blob(&vm, &span.disk), ops)?;
            }
            let point = point_from_tag(m.next_seq, &tag);
            let p = publish_point(blobs, &mut m, point, &spans)?;
            tracing::info!(vm = %vm, point = %p.id, "applied and published recovery point");
            applied_points.push((vm.clone(), p));
        }
        report.points.extend(applied_points);
    }
    Ok(report)
}

/// Finds the next complete run (Begin .. Tag) of a disk after `from`, skipping runs already in the
/// manifest.
fn next_run(
    cache: &mut SegCache<'_>,
    vm: &str,
    disk: &str,
    seqs: &[u64],
    from: JournalPos,
    m: &Manifest,
) -> Result<Option<Found>, ApplyError> {
    let mut begin: Option<JournalPos> = None;
    for &seq in seqs.iter().filter(|s| **s >= from.segment) {
        let s = cache.get(&format!("journal/{vm}/{disk}/{seq:016}.seg"))?;
        for (i, r) in s.2.iter().enumerate() {
            let pos = JournalPos {
                segment: seq,
                record: i as u32,
            };
            if pos < from {
                continue;
            }
            match r {
                Record::Begin { .. } => begin = Some(pos),
                Record::Tag(t) => {
                    let to = JournalPos {
                        segment: seq,
                        record: i as u32 + 1,
                    };
                    let run = hex::encode(t.run);
                    if m.points.iter().any(|p| p.run == run) {
                        begin = None;
                        continue;
                    }
                    if let Some(b) = begin {
                        return Ok(Some(Found {
                            tag: t.clone(),
                            from: b,
                            to,
                        }));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(None)
}

/// The page operations of a span, streamed, with chunk data from the (cached) segments.
fn span_ops<'c, 'a: 'c>(
    cache: &'c mut SegCache<'a>,
    vm: &'c str,
    span: &'c RunSpan,
    seqs: &'c [u64],
) -> impl Iterator<Item = Result<RunOp, ApplyError>> + use<'c, 'a> {
    let mut segs = seqs
        .iter()
        .copied()
        .filter(move |s| *s >= span.from.segment && *s <= span.to.segment);
    let mut cur: Option<(u64, Seg)> = None;
    let mut idx = 0usize;
    std::iter::from_fn(move || loop {
        let (seq, s) = match &cur {
            Some(c) => (c.0, c.1.clone()),
            None => {
                let seq = segs.next()?;
                match cache.get(&format!("journal/{vm}/{}/{seq:016}.seg", span.disk)) {
                    Ok(s) => {
                        cur = Some((seq, s.clone()));
                        idx = 0;
                        (seq, s)
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
        };
        if idx >= s.2.len() {
            cur = None;
            continue;
        }
        let i = idx;
        idx += 1;
        let pos = JournalPos {
            segment: seq,
            record: i as u32,
        };
        if pos < span.from || pos >= span.to {
            continue;
        }
        match &s.2[i] {
            Record::Write { offset, loc, .. } => {
                return Some(cache.chunk(loc).map(|data| RunOp::Write {
                    offset: *offset,
                    data,
                }))
            }
            Record::Zero { offset, len } => {
                return Some(Ok(RunOp::Zero {
                    offset: *offset,
                    len: *len,
                }))
            }
            _ => {}
        }
    })
}

/// Retention in split mode, near the store: expired points leave the manifests, then their
/// snapshots are deleted. (Journal segments are deleted by the process side once applied.)
pub fn prune(blobs: &AzureBlobs, retention: std::time::Duration) -> Result<usize, JobError> {
    crate::azure::prune_manifests(blobs, retention)
}
