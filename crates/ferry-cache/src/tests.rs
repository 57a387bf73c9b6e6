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

#[test]
fn corrupt_middle_file_drops_everything_after_it() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = Cache::open(cfg(d.path()), key()).unwrap();
    let mut w = c.writer().unwrap();
    for i in 0..150 {
        w.append(&write(i)).unwrap();
    }
    w.sync().unwrap();
    drop(w);
    drop(c);
    let mut files: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    assert!(files.len() >= 3);
    let mut b = fs::read(&files[1]).unwrap();
    b[5000] ^= 0xff;
    fs::write(&files[1], b).unwrap();
    let (c, rec) = Cache::open(cfg(d.path()), key()).unwrap();
    assert!(rec.dropped_bytes > 0);
    let got = read_all(&c);
    assert!(got.len() < 150 && got.len() > 10);
    for (i, (_, e)) in got.iter().enumerate() {
        assert_eq!(*e, write(i as u64), "a prefix, no gaps");
    }
}
