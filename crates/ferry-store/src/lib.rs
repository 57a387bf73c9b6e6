//! Ferry's embedded local store: a directory that holds everything a replicated VM needs.
//!
//! Job: keep segments (`journal/VM/DISK/SEQ.seg`), per-VM manifests (`manifests/VM.json`, the commit
//! point), one replica per disk (`replicas/VM/DISK/`, see [`replica`]) and the dedupe index
//! (`index/chunks.redb`, see [`index`]).
//!
//! Invariants:
//! - Data before the manifest that references it: segments and deltas are durable (temp + fsync +
//!   rename + fsync dir, [`durable`]) before the manifest naming them is replaced the same way. A point
//!   exists iff the manifest lists it.
//! - Every object is sealed with the store's master key; the marker `ferry-store.json` names the key id
//!   so a wrong key is refused up front with a message naming both ids.
//! - One writer at a time: [`LocalStore::lock`] takes an exclusive `flock` on `.lock` (the dedupe
//!   index is single-process). Readers of manifests need no lock (manifests are replaced atomically).
//!
//! Locking table:
//! | object            | writers                      | readers without lock |
//! |-------------------|------------------------------|----------------------|
//! | manifests/*.json  | applier, under lock          | points list          |
//! | journal/**        | pipeline, under lock         | —                    |
//! | replicas/**       | applier, under lock          | —                    |
//! | index/chunks.redb | pipeline, under lock         | —                    |
//!
//! Must not: decide what to replicate or when; that is the job's.

pub mod durable;
pub mod index;
pub mod readers;
pub mod replica;

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_crypto::MasterKey;
use ferry_format::manifest::Manifest;
use ferry_format::segment::{self, ChunkLoc, SegmentHeader, SegmentIndex, SEGMENT_HEADER_LEN};
use ferry_format::FormatError;
use serde::{Deserialize, Serialize};

pub use index::ChunkIndex;
pub use replica::Replica;

const MARKER: &str = "ferry-store.json";
const MARKER_FORMAT: &str = "ferry-local-store";
const MARKER_VERSION: u16 = 1;

/// Errors of the store. Messages say what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// cannot {op} {path}: {source}
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    /// {path}: {source}
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FormatError },
    /// {path} is not a Ferry store
    #[error("{} is not a Ferry store (no {MARKER}); check the --store path, or use an empty directory to create one", path.display())]
    NotAStore { path: PathBuf },
    /// store was created with another key
    #[error("store {} was created with key {store_key}, but key file {} has id {key}; pass the store's key with --key-file", store.display(), key_path.display())]
    WrongKey {
        store: PathBuf,
        store_key: String,
        key: String,
        key_path: PathBuf,
    },
    /// dedupe index error: {0}
    #[error("dedupe index: {0}")]
    Index(String),
    /// a lock is held by another process for longer than the caller waits
    #[error("{what} {} is in use by {holder}; gave up after {}s (stop that process, or try again when it is done)", path.display(), waited.as_secs())]
    Busy {
        what: String,
        path: PathBuf,
        holder: String,
        waited: std::time::Duration,
    },
    /// the replica has not reached a listed point yet (its writer is finishing the commit)
    #[error("replica {} is at point {generation}, not yet at listed point {seq}: its writer has a commit to finish", replica.display())]
    Behind {
        replica: PathBuf,
        generation: u64,
        seq: u64,
    },
}

impl StoreError {
    fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
        move |source| StoreError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }

    /// True if retrying cannot help (corruption, wrong key, bad path).
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            StoreError::Io { .. } | StoreError::Busy { .. } | StoreError::Behind { .. }
        )
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    format: String,
    version: u16,
    store_id: String,
    key_id: String,
}

/// A local store directory.
pub struct LocalStore {
    root: PathBuf,
    key: MasterKey,
    store_id: String,
    headers: Mutex<HashMap<String, Arc<(File, SegmentHeader)>>>,
}

/// Held while a process writes to the store.
pub struct StoreLock {
    _file: File,
}

/// Reads the marker of the store at `root` without a key: its store id and key id.
pub fn peek(root: &Path) -> Result<Option<(String, String)>, StoreError> {
    let mp = root.join(MARKER);
    match fs::read(&mp) {
        Ok(b) => {
            let m: Marker = serde_json::from_slice(&b).map_err(|e| StoreError::Format {
                path: mp.clone(),
                source: FormatError::Corrupt {
                    what: "store marker",
                    offset: 0,
                    detail: e.to_string(),
                },
            })?;
            if m.format != MARKER_FORMAT {
                return Err(StoreError::NotAStore { path: root.into() });
            }
            if m.version != MARKER_VERSION {
                return Err(StoreError::Format {
                    path: mp,
                    source: FormatError::Version {
                        what: "store",
                        found: m.version,
                        supported: MARKER_VERSION,
                    },
                });
            }
            Ok(Some((m.store_id, m.key_id)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(&mp, "read")(e)),
    }
}

impl LocalStore {
    /// Opens the store at `root`; with `create`, makes a new one if `root` is empty or missing.
    pub fn open(root: &Path, key: MasterKey, create: bool) -> Result<Self, StoreError> {
        let (store_id, key_id) = match peek(root)? {
            Some(m) => m,
            None if create => {
                if root.exists()
                    && fs::read_dir(root)
                        .map_err(StoreError::io(root, "list"))?
                        .next()
                        .is_some()
                {
                    return Err(StoreError::NotAStore { path: root.into() });
                }
                durable::create_dir_durable(root).map_err(StoreError::io(root, "create"))?;
                let mut id = [0u8; 16];
                ferry_crypto::random_bytes(&mut id)
                    .map_err(|e| StoreError::Index(e.to_string()))?;
                let m = Marker {
                    format: MARKER_FORMAT.into(),
                    version: MARKER_VERSION,
                    store_id: hex::encode(id),
                    key_id: key.id().to_string(),
                };
                let mp = root.join(MARKER);
                durable::durable_write(&mp, &serde_json::to_vec_pretty(&m).expect("marker"))
                    .map_err(StoreError::io(&mp, "write"))?;
                (m.store_id, m.key_id)
            }
            None => return Err(StoreError::NotAStore { path: root.into() }),
        };
        if key_id != key.id().to_string() {
            return Err(StoreError::WrongKey {
                store: root.into(),
                store_key: key_id,
                key: key.id().to_string(),
                key_path: key.path().into(),
            });
        }
        for d in ["journal", "replicas", "manifests", "index"] {
            let p = root.join(d);
            durable::create_dir_durable(&p).map_err(StoreError::io(&p, "create"))?;
        }
        Ok(LocalStore {
            root: root.to_owned(),
            key,
            store_id,
            headers: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn key(&self) -> &MasterKey {
        &self.key
    }

    /// Random id of this store (names its cache directory).
    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    /// Takes the writer lock. If another writer holds it, says who (pid, command, since when) every
    /// 30 s and waits until it is released. Readers never take it (see [`readers`]).
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        self.lock_wait(None)
    }

    /// [`Self::lock`], giving up with [`StoreError::Busy`] after `wait` (None: no limit).
    pub fn lock_wait(&self, wait: Option<std::time::Duration>) -> Result<StoreLock, StoreError> {
        let p = self.root.join(".lock");
        let f = readers::open_lock_file(&p)?;
        readers::lock_file(&f, &p, "store", wait)?;
        readers::write_holder(&f, &p)?;
        Ok(StoreLock { _file: f })
    }

    /// Takes the writer lock only if it is free right now.
    pub fn try_lock(&self) -> Result<Option<StoreLock>, StoreError> {
        let p = self.root.join(".lock");
        Ok(match readers::try_lock(&p)? {
            Some(f) => {
                readers::write_holder(&f, &p)?;
                Some(StoreLock { _file: f })
            }
            None => None,
        })
    }

    /// Opens the dedupe index (hold the lock while it is open).
    pub fn open_index(&self) -> Result<ChunkIndex, StoreError> {
        ChunkIndex::open(&self.root.join("index").join("chunks.redb"))
    }

    // ---- journal ----

    /// Store-relative path of a segment.
    pub fn segment_path(vm: &str, disk: &str, seq: u64) -> String {
        format!("journal/{vm}/{disk}/{seq:016}.seg")
    }

    /// Sequence numbers of a disk's segments, ascending.
    pub fn list_segments(&self, vm: &str, disk: &str) -> Result<Vec<u64>, StoreError> {
        let d = self.root.join("journal").join(vm).join(disk);
        let mut out = Vec::new();
        match fs::read_dir(&d) {
            Ok(it) => {
                for e in it {
                    let e = e.map_err(StoreError::io(&d, "list"))?;
                    if let Some(s) = e
                        .file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".seg"))
                        .and_then(|n| n.parse().ok())
                    {
                        out.push(s);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&d, "list")(e)),
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Stores a sealed segment durably.
    pub fn put_segment(&self, rel: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let p = self.root.join(rel);
        durable::durable_write(&p, bytes).map_err(StoreError::io(&p, "write"))
    }

    /// Reads, authenticates and decodes a segment's index.
    pub fn read_segment_index(
        &self,
        vm: &str,
        disk: &str,
        seq: u64,
    ) -> Result<SegmentIndex, StoreError> {
        let rel = Self::segment_path(vm, disk, seq);
        let p = self.root.join(&rel);
        let fe = |source| StoreError::Format {
            path: p.clone(),
            source,
        };
        // Only the header and the index are read, not the chunk data between them.
        let f = File::open(&p).map_err(StoreError::io(&p, "open"))?;
        let len = f.metadata().map_err(StoreError::io(&p, "stat"))?.len();
        let mut hb = [0u8; SEGMENT_HEADER_LEN];
        if len < SEGMENT_HEADER_LEN as u64 {
            return Err(fe(FormatError::Truncated {
                what: "segment",
                offset: len,
            }));
        }
        f.read_exact_at(&mut hb, 0)
            .map_err(StoreError::io(&p, "read"))?;
        let h = SegmentHeader::decode(&hb, Some(self.key.id())).map_err(fe)?;
        if h.index_offset > len {
            return Err(fe(FormatError::Truncated {
                what: "segment",
                offset: len,
            }));
        }
        let mut tail = vec![0u8; (len - h.index_offset) as usize];
        f.read_exact_at(&mut tail, h.index_offset)
            .map_err(StoreError::io(&p, "read"))?;
        let idx = segment::open_index_tail(&h, &self.key, &tail).map_err(fe)?;
        if idx.vm != vm || idx.disk != disk || idx.seq != seq {
            return Err(fe(FormatError::Corrupt {
                what: "segment",
                offset: h.index_offset,
                detail: format!(
                    "holds {}/{}#{} but is stored as {vm}/{disk}#{seq}",
                    idx.vm, idx.disk, idx.seq
                ),
            }));
        }
        Ok(idx)
    }

    fn segment_handle(&self, rel: &str) -> Result<Arc<(File, SegmentHeader)>, StoreError> {
        if let Some(h) = self.headers.lock().expect("poisoned").get(rel) {
            return Ok(h.clone());
        }
        let p = self.root.join(rel);
        let f = File::open(&p).map_err(StoreError::io(&p, "open"))?;
        let mut hb = [0u8; SEGMENT_HEADER_LEN];
        f.read_exact_at(&mut hb, 0)
            .map_err(StoreError::io(&p, "read"))?;
        let h = SegmentHeader::decode(&hb, Some(self.key.id())).map_err(|source| {
            StoreError::Format {
                path: p.clone(),
                source,
            }
        })?;
        let a = Arc::new((f, h));
        let mut m = self.headers.lock().expect("poisoned");
        if m.len() > 256 {
            m.clear();
        }
        m.insert(rel.to_owned(), a.clone());
        Ok(a)
    }

    /// Reads, authenticates and decodes one stored chunk.
    pub fn read_chunk(&self, loc: &ChunkLoc) -> Result<Vec<u8>, StoreError> {
        let h = self.segment_handle(&loc.segment)?;
        let p = self.root.join(&loc.segment);
        let mut sealed = vec![0u8; loc.sealed_len as usize];
        h.0.read_exact_at(&mut sealed, loc.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Format {
                    path: p.clone(),
                    source: FormatError::Truncated {
                        what: "segment",
                        offset: loc.offset,
                    },
                }
            } else {
                StoreError::io(&p, "read")(e)
            }
        })?;
        segment::open_blob(&h.1, &self.key, loc, sealed)
            .map_err(|source| StoreError::Format { path: p, source })
    }

    // ---- manifests ----

    fn manifest_path(&self, vm: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{vm}.json"))
    }

    /// The manifest of `vm`, if it has one.
    pub fn load_manifest(&self, vm: &str) -> Result<Option<Manifest>, StoreError> {
        load_manifest_at(&self.root, vm)
    }

    /// Commits a manifest: after this returns, its points exist.
    pub fn commit_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        let p = self.manifest_path(&m.vm);
        durable::durable_write(&p, &m.to_json()).map_err(StoreError::io(&p, "write"))
    }

    /// Names of the VMs with a manifest, sorted.
    pub fn list_vms(&self) -> Result<Vec<String>, StoreError> {
        list_vms_at(&self.root)
    }

    // ---- replicas ----

    pub fn replica_dir(&self, vm: &str, disk: &str) -> PathBuf {
        self.root.join("replicas").join(vm).join(disk)
    }
}

/// Loads a manifest without opening the store (no key needed).
pub fn load_manifest_at(root: &Path, vm: &str) -> Result<Option<Manifest>, StoreError> {
    let p = root.join("manifests").join(format!("{vm}.json"));
    match fs::read(&p) {
        Ok(b) => Manifest::from_json(&b)
            .map(Some)
            .map_err(|source| StoreError::Format { path: p, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(&p, "read")(e)),
    }
}

/// Lists VMs without opening the store (no key needed).
pub fn list_vms_at(root: &Path) -> Result<Vec<String>, StoreError> {
    if peek(root)?.is_none() {
        return Err(StoreError::NotAStore { path: root.into() });
    }
    let d = root.join("manifests");
    let mut out = Vec::new();
    for e in fs::read_dir(&d).map_err(StoreError::io(&d, "list"))? {
        let e = e.map_err(StoreError::io(&d, "list"))?;
        if let Some(n) = e.file_name().to_str().and_then(|n| n.strip_suffix(".json")) {
            if !n.starts_with('.') {
                out.push(n.to_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}
