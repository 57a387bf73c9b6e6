use super::*;
use ferry_format::cache::CacheEntry;

fn key() -> MasterKey {
    MasterKey::from_bytes(&[4u8; 32], "k")
}

fn cfg(dir: &Path) -> CacheConfig {
    CacheConfig {
        dir: dir.to_owned(),
        quota: 4 << 20,
        file_size: 1 << 20,
    }
}

fn write(i: u64) -> CacheEntry {
    CacheEntry::Write {
        vm: "vm".into(),
        disk: "d".into(),
        offset: i * 65536,
        digest: [i as u8; 32],
        data: vec![i as u8; 20_000],
    }
}

fn read_all(c: &Cache) -> Vec<(u64, CacheEntry)> {
    let mut r = c.reader();
    let mut out = Vec::new();
    while let Next::Record(s, e) = r.next(false).unwrap() {
        out.push((s, e));
    }
    out
}

#[test]
fn only_synced_records_are_visible_and_survive_reopen() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    let mut w = c.writer().unwrap();
    for i in 0..10 {
        w.append(&write(i)).unwrap();
    }
    assert!(read_all(&c).is_empty(), "nothing synced yet");
    w.sync().unwrap();
    for i in 10..15 {
        w.append(&write(i)).unwrap();
    }
    assert_eq!(read_all(&c).len(), 10);
    // Crash: the unsynced tail is written partially.
    w.write_buf().unwrap();
    let (f, p) = w.file.as_ref().unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 777).unwrap();
    let p = p.clone();
    drop(w);
    drop(c);
    let (c, rec) = Cache::open(cfg(d.path()), key()).unwrap();
    assert!(rec.dropped_bytes > 0, "torn tail truncated");
    let got = read_all(&c);
    assert_eq!(got.len(), 14, "records 0..14 whole, 14 torn");
    assert_eq!(got[13].1, write(13));
    assert!(fs::metadata(&p).unwrap().len() < len);
    // Appending continues the sequence.
    let mut w = c.writer().unwrap();
    assert_eq!(w.append(&write(99)).unwrap(), got.last().unwrap().0 + 1);
    w.sync().unwrap();
    assert_eq!(read_all(&c).len(), 15);
}

#[test]
fn rotation_consume_and_quota_backpressure() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    let c2 = c.clone();
    let writer = std::thread::spawn(move || {
        let mut w = c2.writer().unwrap();
        for i in 0..400 {
            w.append(&write(i)).unwrap();
            if i % 7 == 0 {
                w.sync().unwrap();
            }
        }
        w.sync().unwrap();
        c2.close();
    });
    let mut r = c.reader();
    let mut n = 0;
    let mut max_used = 0;
    loop {
        match r.next(true).unwrap() {
            Next::Record(s, e) => {
                assert_eq!(e, write(n));
                n += 1;
                max_used = max_used.max(c.used_bytes());
                if n % 20 == 0 {
                    c.consume_through(s + 1).unwrap();
                }
            }
            Next::Closed => break,
            Next::Idle => unreachable!(),
        }
    }
    writer.join().unwrap();
    assert_eq!(n, 400);
    // 400 * 20 KB = 8 MB went through a 4 MiB cache.
    assert!(max_used <= 5 << 20, "quota held: {max_used}");
    c.consume_through(r.next_seq()).unwrap();
    drop(c);
    let (c, rec) = Cache::open(cfg(d.path()), key()).unwrap();
    assert_eq!(rec.pending_records, 0);
    assert!(read_all(&c).is_empty());
}

#[test]
fn wrong_key_is_refused_with_the_file_named() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    let mut w = c.writer().unwrap();
    w.append(&write(1)).unwrap();
    w.sync().unwrap();
    drop(w);
    drop(c);
    let other = MasterKey::from_bytes(&[5u8; 32], "o");
    let e = Cache::open(cfg(d.path()), other).err().unwrap().to_string();
    assert!(e.contains(".log") && e.contains("key"), "{e}");
}

/// The cache's files, oldest first.
fn logs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_damaged_record_before_the_last_file_stops_recovery_and_drops_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    let mut w = c.writer().unwrap();
    for i in 0..150 {
        w.append(&write(i)).unwrap();
    }
    w.sync().unwrap();
    drop(w);
    drop(c);
    let files = logs(d.path());
    assert!(files.len() >= 3);
    let before: Vec<_> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    let mut b = before[1].clone();
    b[5000] ^= 0xff;
    fs::write(&files[1], &b).unwrap();
    let err = match Cache::open(cfg(d.path()), key()) {
        Err(e) => e,
        Ok(_) => panic!("recovery accepted a damaged acknowledged record"),
    };
    let msg = err.to_string();
    assert!(
        matches!(err, CacheError::Damaged { ref path, .. } if *path == files[1]),
        "{msg}"
    );
    assert!(
        msg.contains(&files[1].display().to_string()) && msg.contains("offset"),
        "{msg}"
    );
    // Nothing was truncated or removed.
    assert_eq!(logs(d.path()), files);
    for (f, b0) in files.iter().zip(&before).skip(2) {
        assert_eq!(&fs::read(f).unwrap(), b0, "{} changed", f.display());
    }
    assert_eq!(fs::read(&files[1]).unwrap(), b);
}

#[test]
fn a_torn_tail_is_truncated_and_new_records_go_to_a_new_file_with_a_new_salt() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    let mut w = c.writer().unwrap();
    for i in 0..10 {
        w.append(&write(i)).unwrap();
    }
    w.sync().unwrap();
    drop(w);
    drop(c);
    let files = logs(d.path());
    assert_eq!(files.len(), 1);
    // A torn last record: half of it reached the disk.
    let full = fs::metadata(&files[0]).unwrap().len();
    let torn = full - 10_000;
    OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .set_len(torn)
        .unwrap();
    let (c, rec) = Cache::open(cfg(d.path()), key()).unwrap();
    assert!(rec.dropped_bytes > 0);
    assert_eq!(rec.pending_records, 9);
    let mut w = c.writer().unwrap();
    w.append(&write(9)).unwrap();
    w.sync().unwrap();
    drop(w);
    let files2 = logs(d.path());
    assert_eq!(files2.len(), 2, "a new file for new records: {files2:?}");
    let salt = |p: &Path| {
        CacheFileHeader::decode(&fs::read(p).unwrap(), key().id())
            .unwrap()
            .salt
    };
    assert_ne!(salt(&files2[0]), salt(&files2[1]), "a fresh salt");
    assert!(
        fs::metadata(&files2[0]).unwrap().len() < torn,
        "the torn tail was cut"
    );
    let got = read_all(&c);
    assert_eq!(got.len(), 10);
    for (i, (_, e)) in got.iter().enumerate() {
        assert_eq!(*e, write(i as u64));
    }
    drop(c);
    // And all of it survives another restart.
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    assert_eq!(read_all(&c).len(), 10);
}

/// The crash-state recorder is process-wide: its tests take turns.
static CRASHSIM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Power-loss proof for the cache: the crash state "nothing unsynced survived"
/// (`ferry_durable::crashsim`) after every sync of a writer that rotates files, and on each every
/// record returned by `sync` as durable is recovered, with its content. Catches a missing group
/// commit fdatasync and a missing directory fsync of a new cache file.
#[test]
fn every_crash_state_keeps_every_record_sync_returned() {
    use ferry_durable::crashsim;
    use std::sync::{Arc, Mutex};
    let _one = CRASHSIM.lock().unwrap_or_else(|e| e.into_inner());
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let acked = Arc::new(Mutex::new(0u64));
    let states = {
        let acked = acked.clone();
        crashsim::take_states(&root, &d.path().join("crashes"), 2, move || {
            *acked.lock().unwrap()
        })
        .unwrap()
    };
    let (c, _) = Cache::open(cfg(&root.join("cache")), key()).unwrap();
    let mut w = c.writer().unwrap();
    // 20 KB records, 1 MiB files: several rotations.
    for i in 0..120u64 {
        w.append(&write(i)).unwrap();
        if i % 7 == 6 {
            let next = w.sync().unwrap();
            *acked.lock().unwrap() = next - 1;
        }
    }
    drop(w);
    drop(c);
    let taken = crashsim::finish(&states);
    assert!(taken.len() > 15, "{} syncs", taken.len());
    let torn = taken
        .iter()
        .filter(|(p, _)| p.to_string_lossy().contains("-torn"))
        .count();
    assert!(torn >= 5, "only {torn} torn states taken");
    check_states(taken);
}

/// Every crash state recovers, and holds every record (numbered from 1, `write(i)`) up to what was
/// durable when it was taken, in order and intact.
fn check_states(taken: Vec<(PathBuf, u64)>) {
    for (state, acked) in taken {
        let (c, _) = Cache::open(cfg(&state.join("cache")), key()).unwrap_or_else(|e| {
            panic!(
                "{}: recovery failed on a legal crash state: {e}",
                state.display()
            )
        });
        let got = read_all(&c);
        // Records are numbered from 1; every one up to `acked` is there, in order, intact.
        assert!(
            got.len() as u64 >= acked,
            "{}: {} records recovered, {acked} were durable",
            state.display(),
            got.len()
        );
        for (i, (s, e)) in got.iter().enumerate() {
            assert_eq!(*s, i as u64 + 1);
            assert_eq!(*e, write(i as u64), "{}: record {s}", state.display());
        }
    }
}

/// Records kept in memory come back exactly as the files hold them, interleaved with records the
/// budget left to the files, across file rotations; nothing before its sync.
#[test]
fn memory_and_file_records_interleave_exactly_in_order() {
    let d = tempfile::tempdir().unwrap();
    let big = CacheConfig {
        dir: d.path().to_owned(),
        quota: 64 << 20,
        file_size: 1 << 20,
    };
    let (c, _) = Cache::open(big, key()).unwrap();
    // Room for about three records: each sync's first few stay in memory, the rest are read back.
    c.set_memory_budget(3 * (20_000 + 128));
    let mut w = c.writer().unwrap();
    let mut r = c.reader();
    let mut got = Vec::new();
    let mut next = 0u64;
    for round in 0..40u64 {
        for _ in 0..(1 + round % 7) {
            w.append_owned(write(next)).unwrap();
            next += 1;
        }
        if round == 0 {
            assert!(
                matches!(r.next(false).unwrap(), Next::Idle),
                "an unsynced record must not be returned"
            );
        }
        w.sync().unwrap();
        // Read part of what is durable (the reader lags and catches up by turns).
        for _ in 0..(round % 5) {
            match r.next(false).unwrap() {
                Next::Record(s, e) => got.push((s, e)),
                _ => break,
            }
        }
    }
    while let Next::Record(s, e) = r.next(false).unwrap() {
        got.push((s, e));
    }
    let want: Vec<(u64, CacheEntry)> = (0..next).map(|i| (i + 1, write(i))).collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "records differ from what was appended");
    assert!(
        r.from_memory() > 0 && r.from_memory() < next,
        "both paths taken: {} of {next} from memory",
        r.from_memory()
    );
    // What memory gave is not decrypted from the files as well (the reader moves past it).
    assert_eq!(
        r.decoded(),
        next - r.from_memory(),
        "records decrypted from files"
    );
    assert!(logs(d.path()).len() > 2, "the test crosses cache files");
    // A fresh reader (a restart) reads everything from the files.
    let again = read_all(&c);
    assert!(again == want);
}

/// With no memory budget, every record is read back from the files (the path after a restart).
#[test]
fn without_memory_everything_is_read_back() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    c.set_memory_budget(0);
    let mut w = c.writer().unwrap();
    for i in 0..30 {
        w.append_owned(write(i)).unwrap();
    }
    w.sync().unwrap();
    let mut r = c.reader();
    let mut n = 0;
    while let Next::Record(s, e) = r.next(false).unwrap() {
        assert_eq!((s, e), (n + 1, write(n)));
        n += 1;
    }
    assert_eq!((n, r.from_memory()), (30, 0));
}

/// An idle reader returns when its timeout passes, not at the next 100 ms poll (the start-up
/// recovery drain of every `ferry replicate` waited 100 ms for nothing).
#[test]
fn an_idle_reader_returns_at_its_timeout() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    let mut r = c.reader();
    let mut took = Vec::new();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        assert!(matches!(
            r.next_within(Some(Duration::from_millis(10))).unwrap(),
            Next::Idle
        ));
        took.push(t.elapsed());
    }
    took.sort();
    // The median of five: one slow wake-up on a busy machine does not decide.
    assert!(
        took[2] < Duration::from_millis(60),
        "an idle read with a 10 ms timeout took {:?}",
        took
    );
}

/// Polls until every record below `seq` is durable (a background sync publishes it), or panics.
fn wait_durable(c: &Cache, seq: u64) {
    let t = std::time::Instant::now();
    while c.durable_seq() < seq {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "durable_seq stuck at {}, {seq} expected",
            c.durable_seq()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `sync_behind` makes what was appended before it durable and readable (from memory), in order;
/// while its sync is held back, more than a buffer's worth appended and written to the same file
/// stays invisible, and nothing is published; released, it publishes exactly its own records;
/// `sync` waits for the one in flight.
/// With a memory budget the reader takes them from memory, without one from the file (up to the
/// length the sync published, not what the file holds by then).
#[test]
fn sync_behind_publishes_what_came_before_it_and_nothing_after() {
    sync_behind_overlap(MEMORY_BUDGET);
}

#[test]
fn sync_behind_publishes_only_its_own_bytes_of_the_file() {
    sync_behind_overlap(0);
}

fn sync_behind_overlap(budget: u64) {
    let d = tempfile::tempdir().unwrap();
    let big = CacheConfig {
        dir: d.path().to_owned(),
        quota: 256 << 20,
        file_size: 64 << 20,
    };
    let (c, _) = Cache::open(big.clone(), key()).unwrap();
    c.set_memory_budget(budget);
    let mut w = c.writer().unwrap();
    let mut r = c.reader();
    let d0 = c.durable_seq();
    for i in 0..10 {
        w.append_owned(write(i)).unwrap();
    }
    w.gate_behind(true, None);
    w.sync_behind().unwrap();
    // 9.2 MB more while the sync is held: past the 8 MiB buffer, so written to the file.
    for i in 10..470 {
        w.append_owned(write(i)).unwrap();
    }
    assert!(w.file_len > 8 << 20, "the appends reached the file");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(c.durable_seq(), d0, "nothing published before its sync ran");
    assert!(matches!(r.next(false).unwrap(), Next::Idle));
    w.gate_behind(false, None);
    wait_durable(&c, d0 + 10);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        c.durable_seq(),
        d0 + 10,
        "exactly the records before sync_behind"
    );
    let mut got = Vec::new();
    while let Next::Record(s, e) = r.next(false).unwrap() {
        got.push((s, e));
    }
    assert_eq!(got.len(), 10);
    for (i, (s, e)) in got.iter().enumerate() {
        assert_eq!((*s, e), (d0 + i as u64, &write(i as u64)));
    }
    let from_memory = if budget > 0 { 10 } else { 0 };
    assert_eq!(
        r.from_memory(),
        from_memory,
        "records kept in memory are handed over"
    );
    w.sync_behind().unwrap();
    w.append_owned(write(470)).unwrap();
    assert_eq!(w.sync().unwrap(), d0 + 471);
    assert_eq!(c.durable_seq(), d0 + 471);
    let mut n = 10;
    while let Next::Record(s, e) = r.next(false).unwrap() {
        assert_eq!(e, write(s - d0));
        n += 1;
    }
    assert_eq!(n, 471);
    drop(w);
    // And from the files, after a reopen.
    drop(r);
    drop(c);
    let (c, _) = Cache::open(big, key()).unwrap();
    assert_eq!(read_all(&c).len(), 471);
}

/// Dropping the writer lets the sync in flight finish and publish.
#[test]
fn dropping_the_writer_finishes_the_sync_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let (c, w, d0) = held_sync(d.path(), 10, 10);
    let release = release_in_50ms(&w);
    drop(w);
    release.join().unwrap();
    assert_eq!(c.durable_seq(), d0 + 10);
    assert_eq!(read_all(&c).len(), 10);
}

/// A failed background sync publishes nothing, and every later call of the writer fails: a
/// failed fdatasync is never followed by one that would report the lost pages as durable.
#[test]
fn a_failed_background_sync_publishes_nothing_and_stops_the_writer() {
    let d = tempfile::tempdir().unwrap();
    let (c, mut w, d0) = appended(d.path(), 10);
    w.gate_behind(false, Some(Inject::Fail));
    w.sync_behind().unwrap();
    // Accepted or refused: the failure may or may not be known yet.
    let _ = w.append_owned(write(10));
    assert_stopped(&mut w, &c, d0);
}

/// Power-loss proof for `sync_behind`: a crash state is taken after every sync, including one of an
/// unrelated file made durable once each background sync was published; in every state, each record
/// [`Cache::durable_seq`] had published is recovered intact. Catches a background sync that
/// publishes without (or before) its fdatasync.
#[test]
fn every_crash_state_keeps_every_record_sync_behind_published() {
    use ferry_durable::crashsim;
    use std::sync::{Arc, Mutex};
    let _one = CRASHSIM.lock().unwrap_or_else(|e| e.into_inner());
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let cache: Arc<Mutex<Option<Cache>>> = Arc::new(Mutex::new(None));
    let states = {
        let cache = cache.clone();
        crashsim::take_states(&root, &d.path().join("crashes"), 2, move || {
            cache
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, |c| c.durable_seq() - 1)
        })
        .unwrap()
    };
    let (c, _) = Cache::open(cfg(&root.join("cache")), key()).unwrap();
    *cache.lock().unwrap() = Some(c.clone());
    let mut w = c.writer().unwrap();
    let mut published = 0;
    for i in 0..120u64 {
        w.append_owned(write(i)).unwrap();
        if i % 7 == 6 {
            let next = w.next_seq();
            w.sync_behind().unwrap();
            wait_durable(&c, next);
            published += 1;
            // A durable write elsewhere: a crash state with only this background sync behind it.
            ferry_durable::durable_write(&root.join("marker"), &i.to_le_bytes()).unwrap();
        }
    }
    w.sync().unwrap();
    drop(w);
    *cache.lock().unwrap() = None;
    drop(c);
    let taken = crashsim::finish(&states);
    let torn = taken
        .iter()
        .filter(|(p, _)| p.to_string_lossy().contains("-torn"))
        .count();
    // Torn states are taken on the syncer's thread between its fdatasync and its publish: the
    // ones that see a publish made too early.
    assert!(
        torn >= published,
        "{torn} torn states for {published} background syncs ({} states in all)",
        taken.len()
    );
    check_states(taken);
}

/// `sync` waits for the background sync in flight: the durable position only ever moves forward
/// (a later publish of the older job would move it back).
#[test]
fn sync_waits_for_the_sync_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let (c, mut w, d0) = held_sync(d.path(), 10, 15);
    let release = release_in_50ms(&w);
    assert_eq!(w.sync().unwrap(), d0 + 15);
    release.join().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(c.durable_seq(), d0 + 15);
    let got = read_all(&c);
    assert_eq!(got.len(), 15);
}

/// A failed blocking sync publishes nothing and stops the writer too (the path `ferry serve`'s
/// committer and every cache file rotation take): a second fdatasync would report success over
/// the pages the first one lost.
#[test]
fn a_failed_sync_publishes_nothing_and_stops_the_writer() {
    let d = tempfile::tempdir().unwrap();
    let (c, mut w, d0) = appended(d.path(), 10);
    w.fail_sync = true;
    assert_stopped(&mut w, &c, d0);
}

/// A sync thread that dies fails its job (and the writer) instead of leaving the writer waiting
/// for it forever.
#[test]
fn a_panicking_sync_thread_fails_the_writer_instead_of_hanging_it() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    let mut w = c.writer().unwrap();
    let d0 = c.durable_seq();
    w.append_owned(write(0)).unwrap();
    w.gate_behind(false, Some(Inject::Panic));
    w.sync_behind().unwrap();
    let e = w.sync().unwrap_err();
    assert!(e.to_string().contains("panicked"), "{e}");
    assert_eq!(c.durable_seq(), d0);
    assert!(w.sync().is_err());
}

/// Two background syncs in a row: the second waits for the first, and each publishes exactly its
/// own records, in order.
#[test]
fn back_to_back_background_syncs_publish_in_order() {
    let d = tempfile::tempdir().unwrap();
    let (c, mut w, d0) = held_sync(d.path(), 5, 8);
    let release = release_in_50ms(&w);
    // Returns only once the first has published (it is held for 50 ms).
    w.sync_behind().unwrap();
    assert!(c.durable_seq() >= d0 + 5, "the second waited for the first");
    release.join().unwrap();
    wait_durable(&c, d0 + 8);
    assert_eq!(read_all(&c).len(), 8);
}

/// After an injected sync failure: the next `sync` returns it, nothing was published, and every
/// later call of the writer fails.
fn assert_stopped(w: &mut CacheWriter, c: &Cache, d0: u64) {
    let e = w.sync().unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    assert_eq!(c.durable_seq(), d0, "nothing published");
    for e in [
        w.sync().map(|_| ()).unwrap_err(),
        w.sync_behind().unwrap_err(),
        w.append(&write(11)).map(|_| ()).unwrap_err(),
    ] {
        assert!(e.to_string().contains("an earlier sync"), "{e}");
    }
    assert_eq!(c.durable_seq(), d0);
    assert!(matches!(c.reader().next(false).unwrap(), Next::Idle));
}

/// A cache in `dir` whose writer appended records 0..`first`, handed them to a background sync
/// that is held, then appended `first`..`then`. Returns the cache, the writer and the first seq.
fn held_sync(dir: &Path, first: u64, then: u64) -> (Cache, CacheWriter, u64) {
    let (c, mut w, d0) = appended(dir, first);
    w.gate_behind(true, None);
    w.sync_behind().unwrap();
    for i in first..then {
        w.append_owned(write(i)).unwrap();
    }
    (c, w, d0)
}

/// Releases the held background sync of `w` 50 ms from now.
fn release_in_50ms(w: &CacheWriter) -> std::thread::JoinHandle<()> {
    let slot = w.behind.as_ref().unwrap().slot.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        lock_behind(&slot).hold = false;
        slot.1.notify_all();
    })
}

/// A cache in `dir` whose writer appended records 0..`n` (unsynced). Returns the cache, the writer
/// and the first record's seq.
fn appended(dir: &Path, n: u64) -> (Cache, CacheWriter, u64) {
    let (c, _) = Cache::open(cfg(dir), key()).unwrap();
    let mut w = c.writer().unwrap();
    let d0 = c.durable_seq();
    for i in 0..n {
        w.append_owned(write(i)).unwrap();
    }
    (c, w, d0)
}

/// A full file system gets an error that says what to do; other errors are left as they are.
#[test]
fn a_full_file_system_says_what_to_do() {
    let full = io(Path::new("/c/1.log"), "write")(std::io::Error::from_raw_os_error(28));
    let s = full.to_string();
    assert!(
        s.starts_with("cache: cannot write /c/1.log: No space left on device"),
        "{s}"
    );
    assert!(
        s.contains("free space there") && s.contains("--cache-dir"),
        "{s}"
    );
    let quota = io(Path::new("/c/1.log"), "write")(std::io::Error::from_raw_os_error(122));
    assert!(quota.to_string().contains("disk quota"), "{quota}");
    let other = io(Path::new("/c/1.log"), "write")(std::io::Error::from_raw_os_error(5));
    assert_eq!(
        other.to_string(),
        "cache: cannot write /c/1.log: Input/output error (os error 5)"
    );
}
