//! Tracks block devices with the eBPF tracker until killed; used by `bench-overhead.sh`.
//!
//! Usage: `track [--drain-every SECONDS] [--verbose] DEVICE...`
//! Prints the BPF program ids, then `ready` once the programs are attached; with `--drain-every`, one line per disk and
//! drain: the number of dirty chunks (with `--verbose`, their runs) and any resync reason.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_ebpf::Tracker;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut every = None;
    let mut verbose = false;
    let mut disks = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--drain-every" {
            let secs: f64 = args
                .next()
                .context("--drain-every needs a value")?
                .parse()?;
            every = Some(Duration::from_secs_f64(secs));
        } else if arg == "--verbose" {
            verbose = true;
        } else {
            disks.push(PathBuf::from(arg));
        }
    }
    if disks.is_empty() {
        bail!("usage: track [--drain-every SECONDS] DEVICE...");
    }
    if let Err(why) = Tracker::available() {
        bail!("eBPF tracker not available: {why}");
    }
    let mut tracker = Tracker::open(&disks)?;
    let start = std::time::Instant::now();
    for (name, id) in tracker.program_ids() {
        println!("program {name} id {id}");
    }
    println!("ready");
    loop {
        match every {
            None => std::thread::sleep(Duration::from_secs(3600)),
            Some(every) => {
                std::thread::sleep(every);
                for (i, set) in tracker.drain_all()?.into_iter().enumerate() {
                    let path = tracker.path(i).unwrap_or(std::path::Path::new("?"));
                    let resync: Vec<String> = set.resync.iter().map(|r| r.to_string()).collect();
                    if set.is_empty() && set.resync.is_empty() && verbose {
                        continue;
                    }
                    println!(
                        "{}{}: {} dirty chunks{}{}",
                        if verbose {
                            format!("{:9.3}s ", start.elapsed().as_secs_f64())
                        } else {
                            String::new()
                        },
                        path.display(),
                        set.len(),
                        if verbose {
                            format!(" {:?}", set.runs())
                        } else {
                            String::new()
                        },
                        if resync.is_empty() {
                            String::new()
                        } else {
                            format!(", needs resync: {}", resync.join("; "))
                        }
                    );
                }
            }
        }
    }
}
