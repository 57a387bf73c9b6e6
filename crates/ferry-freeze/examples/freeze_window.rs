//! Measures the freeze window of a cut while an application writes.
//!
//! A background thread writes ~50 MB/s (buffered, no fsync: the worst case, everything dirty
//! since the last cut is synced by FIFREEZE) to a file on the filesystem; the main thread cuts
//! every `--interval-ms`: freeze, read a small residual straight from the disk (O_DIRECT, as the
//! reader would ship the residual dirty blocks), finish. Prints percentiles of the window (first
//! FIFREEZE to last FITHAW), its parts, and what the writer saw.
//!
//! As root: `cargo build --release -p ferry-freeze --bins --examples &&
//! target/release/examples/freeze_window [--fs ext4|xfs] [--cuts 100] [--interval-ms 200]
//! [--rate-mb 50] [--residual-mb 4] [--no-presync]`. Without `--disk DEV --mount PATH` it makes a 2 GiB loop
//! disk (direct I/O to a sparse image) in a temporary directory and removes it after.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_freeze::{discover, Freezer, DEFAULT_BOUND};

struct Args {
    fs: String,
    cuts: usize,
    interval: Duration,
    rate_mb: f64,
    residual_mb: usize,
    disk: Option<String>,
    mount: Option<PathBuf>,
    presync: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        fs: "ext4".into(),
        cuts: 100,
        interval: Duration::from_millis(200),
        rate_mb: 50.0,
        residual_mb: 4,
        disk: None,
        mount: None,
        presync: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--fs" => a.fs = v()?,
            "--cuts" => a.cuts = v()?.parse()?,
            "--interval-ms" => a.interval = Duration::from_millis(v()?.parse()?),
            "--rate-mb" => a.rate_mb = v()?.parse()?,
            "--residual-mb" => a.residual_mb = v()?.parse()?,
            "--disk" => a.disk = Some(v()?),
            "--mount" => a.mount = Some(v()?.into()),
            "--no-presync" => a.presync = false,
            other => bail!("unknown argument {other} (see the doc comment of this example)"),
        }
    }
    Ok(a)
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| cmd.to_string())?;
    if !o.status.success() {
        bail!("{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// A loop disk with a filesystem, removed on drop.
struct Scratch {
    dev: String,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Scratch {
    fn new(fs: &str) -> Result<Scratch> {
        let dir = tempfile::Builder::new().prefix("ferry-window-").tempdir()?;
        let img = dir.path().join("disk.img");
        File::create(&img)?.set_len(2 << 30)?;
        // Direct I/O to the image: no second page cache under the filesystem's, so a flush of
        // the loop disk costs what a flush of a real disk costs.
        let dev = run(
            "losetup",
            &["--find", "--show", "--direct-io=on", img.to_str().unwrap()],
        )?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        let s = Scratch {
            dev: dev.clone(),
            mnt: mnt.clone(),
            _dir: dir,
        };
        match fs {
            "ext4" => run(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    &dev,
                ],
            )?,
            "xfs" => run("mkfs.xfs", &["-q", "-f", &dev])?,
            other => bail!("--fs {other}: ext4 or xfs"),
        };
        run("mount", &[&dev, mnt.to_str().unwrap()])?;
        Ok(s)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = ferry_freeze::thaw_all(&[&self.mnt]);
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(name: &str, v: &mut [Duration]) {
    println!(
        "{name:<26} p50 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms",
        ms(pct(v, 0.5)),
        ms(pct(v, 0.99)),
        ms(pct(v, 1.0))
    );
}

/// Writes 1 MiB buffers at `rate_mb` MB/s into a 256 MiB file, round and round.
fn writer(
    path: PathBuf,
    rate_mb: f64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, Duration, Vec<Duration>)> {
    std::thread::spawn(move || {
        const CHUNK: usize = 1 << 20;
        const SPAN: u64 = 256 << 20;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the writer's file");
        let buf = vec![0x5au8; CHUNK];
        let every = Duration::from_secs_f64(CHUNK as f64 / (rate_mb * 1e6));
        let start = Instant::now();
        let mut lat = Vec::new();
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let due = start + every * n as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait.min(Duration::from_millis(50)));
                continue;
            }
            let t = Instant::now();
            f.write_all_at(&buf, (n * CHUNK as u64) % SPAN)
                .expect("write");
            lat.push(t.elapsed());
            n += 1;
        }
        (n * CHUNK as u64, start.elapsed(), lat)
    })
}

fn main() -> Result<()> {
    let a = args()?;
    if !ferry_freeze::is_root() {
        bail!("run as root: FIFREEZE and loop devices need it");
    }
    let freezer = Freezer::new()
        .context("build the watchdog: cargo build --release -p ferry-freeze --bins")?
        .presync(a.presync);
    let scratch;
    let (disk, mnt) = match (&a.disk, &a.mount) {
        (Some(d), Some(m)) => (d.clone(), m.clone()),
        (None, None) => {
            scratch = Scratch::new(&a.fs)?;
            (scratch.dev.clone(), scratch.mnt.clone())
        }
        _ => bail!("give both --disk and --mount, or neither"),
    };
    let mounts = discover(&[&disk])?;
    if mounts.is_empty() {
        bail!("nothing mounted on {disk}");
    }
    println!(
        "disk {disk}: freezing {:?} ({}); writer {} MB/s; {} cuts every {:?}; residual {} MiB; \
         presync {}",
        mounts.iter().map(|m| &m.mount_point).collect::<Vec<_>>(),
        mounts[0].fstype,
        a.rate_mb,
        a.cuts,
        a.interval,
        a.residual_mb,
        a.presync
    );
    let stop = Arc::new(AtomicBool::new(false));
    let w =
        (a.rate_mb > 0.0).then(|| writer(mnt.join("ferry-window.dat"), a.rate_mb, stop.clone()));
    std::thread::sleep(Duration::from_secs(1));

    // The residual read: O_DIRECT from the disk, like the reader.
    let dev = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&disk)?;
    let rlen = a.residual_mb << 20;
    let mut raw = vec![0u8; rlen + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let mut win = Vec::new();
    let mut sync = Vec::new();
    let mut held = Vec::new();
    let mut thaw = Vec::new();
    let mut overruns = 0;
    let t0 = Instant::now();
    for i in 0..a.cuts {
        let due = t0 + a.interval * (i as u32 + 1);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let g = freezer.freeze(&mounts, DEFAULT_BOUND)?;
        dev.read_exact_at(&mut raw[off..off + rlen], (i * rlen) as u64 % (1 << 30))?;
        match g.finish() {
            Ok(s) => {
                win.push(s.window);
                sync.push(s.freeze_took);
                held.push(s.held);
                thaw.push(s.thaw_took);
            }
            Err(ferry_freeze::FreezeError::Overrun { .. }) => overruns += 1,
            Err(e) => return Err(e.into()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (bytes, took, mut lat) = match w {
        Some(w) => w.join().expect("writer"),
        None => (0, Duration::from_secs(1), vec![Duration::ZERO]),
    };
    println!(
        "cuts {} ok, {overruns} overrun(s) of the {:?} bound",
        win.len(),
        DEFAULT_BOUND
    );
    summary("freeze window (total)", &mut win);
    summary("  FIFREEZE (sync)", &mut sync);
    summary("  held (residual read)", &mut held);
    summary("  FITHAW", &mut thaw);
    println!(
        "writer: {:.1} MB/s achieved, {} writes of 1 MiB",
        bytes as f64 / 1e6 / took.as_secs_f64(),
        lat.len()
    );
    summary("writer 1 MiB write latency", &mut lat);
    Ok(())
}
