//! `ferry-simagents`: many simulated mobility agents against one running `ferry serve`; used by
//! `benches/agents.sh`.
//!
//! Each simulated agent speaks the real protocol through `ferry-wire`, as `ferry-agent` does
//! (`crates/ferry-agent/src/lib.rs`): TCP + TLS 1.3 pinned to the fingerprint in the passphrase,
//! `Hello`, `Register` with the passphrase proof (once), then on a new connection `Auth` with its
//! credential, `Welcome {credits}`, `Inventory {vm, disks}`, `Begin`, `Write` (and optionally
//! `Zero`) records with increasing seq, each sent only when the credit covers its frame, and after
//! `--seconds` a `Tag`; then it waits for the `Ack` that covers the tag's seq.
//!
//! Each agent protects one VM (`PREFIX-NNN`) with one disk (`disk0`, `--disk-size`) that starts
//! all zero on the replica. Writes are `--write-size` bytes at random chunk-aligned offsets, filled
//! from SplitMix64 seeded by (seed, agent): incompressible and never repeated, so neither zstd nor
//! dedupe makes them cheaper. The agent keeps the blake3 chaining value of each 64 KiB chunk of its
//! disk (`ferry_benches::disk_hash`), so its `Tag` carries the exact blake3 of the disk image the
//! point must restore to (`ferry restore --verify` checks it).
//!
//! All agents register first, then connect, then start writing together. Prints one JSON object on
//! stdout (see `report.rs`); progress goes to stderr. Exits 1 if any agent failed.

mod agent;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use ferry_benches::{disk_hash, CHUNK, DEFAULT_SEED};
use ferry_wire::{AgentId, AgentKey, Passphrase};
use tokio::sync::{watch, Barrier, Semaphore};

#[derive(Parser, Debug)]
#[command(
    name = "ferry-simagents",
    about = "Many simulated Ferry agents against one `ferry serve`"
)]
pub(crate) struct Args {
    /// The process server, HOST:PORT.
    #[arg(long)]
    server: String,
    /// The registration passphrase (`ferry passphrase show --state-dir DIR > FILE`).
    #[arg(long)]
    passphrase_file: PathBuf,
    /// Simulated agents (one VM with one disk each).
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Seconds each agent writes before it sends its Tag.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Bytes per disk (a multiple of 64 KiB, at least 128 KiB).
    #[arg(long, default_value_t = 64 << 20)]
    disk_size: u64,
    /// Bytes per Write record (a multiple of 64 KiB, at most 4 MiB).
    #[arg(long, default_value_t = 64 << 10)]
    write_size: u64,
    /// Per-agent write rate in bytes/s; 0 = as fast as credit and the connection allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Every Nth record is a Zero record of --write-size bytes instead of a Write; 0 = never.
    #[arg(long, default_value_t = 0)]
    zero_every: u64,
    /// Handshakes (registrations, connections) in flight at once.
    #[arg(long, default_value_t = 16)]
    connect_concurrency: usize,
    /// VM names are PREFIX-000, PREFIX-001, …
    #[arg(long, default_value = "sim")]
    vm_prefix: String,
    /// Seed of the written data.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Async runtime worker threads. Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Give up waiting for a Tag's Ack after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    tag_timeout: f64,
    /// Also cut a crash-consistent point every this many seconds while writing (0: only at the
    /// end), as a real agent does; the server's status then shows each VM's RPO.
    #[arg(long, default_value_t = 0.0)]
    cut_every: f64,
}

impl Args {
    fn check(&self) -> anyhow::Result<()> {
        let chunk = CHUNK as u64;
        if self.disk_size < 2 * chunk || !self.disk_size.is_multiple_of(chunk) {
            bail!("--disk-size must be a multiple of 64 KiB and at least 128 KiB");
        }
        if self.write_size == 0
            || !self.write_size.is_multiple_of(chunk)
            || self.write_size > ferry_wire::MAX_DATA as u64
            || self.write_size > self.disk_size
        {
            bail!("--write-size must be a multiple of 64 KiB, at most 4 MiB and at most the disk size");
        }
        if self.agents == 0 || self.agents > 100_000 {
            bail!("--agents must be between 1 and 100000");
        }
        if !(self.seconds > 0.0 && self.seconds.is_finite()) {
            bail!("--seconds must be positive");
        }
        Ok(())
    }

    pub(crate) fn vm_name(&self, i: usize) -> String {
        format!("{}-{i:03}", self.vm_prefix)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ferry-simagents: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs everything and prints the report; false if any agent failed.
fn run(a: Args) -> anyhow::Result<bool> {
    a.check()?;
    let pass = Passphrase::read_file(&a.passphrase_file)
        .with_context(|| format!("cannot read {}", a.passphrase_file.display()))?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = a.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = rt
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let zero_cvs = Arc::new(disk_hash::zero_cvs(a.disk_size));
    let a = Arc::new(a);
    let cpu0 = cpu_seconds();

    let t = Instant::now();
    let ids = rt.block_on(register_all(&a, &pass))?;
    let register_s = t.elapsed().as_secs_f64();
    eprintln!(
        "ferry-simagents: registered {} agents in {register_s:.2} s",
        ids.len()
    );
    let outcome = rt.block_on(run_all(&a, &pass, ids, zero_cvs));
    let cpu_s = cpu_seconds() - cpu0;
    let report = report::report(&a, register_s, outcome, cpu_s);
    let ok = report["errors"]["count"].as_u64() == Some(0);
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ok)
}

/// Registers every agent, `--connect-concurrency` at a time (as `ferry-agent register` does).
async fn register_all(
    a: &Arc<Args>,
    pass: &Passphrase,
) -> anyhow::Result<Vec<(AgentId, AgentKey)>> {
    let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let mut tasks = Vec::new();
    for i in 0..a.agents {
        let (a, pass, gate) = (a.clone(), pass.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("semaphore open");
            agent::register(&a, &pass, i).await
        }));
    }
    let mut ids = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.context("registration task panicked")?;
        ids.push(r.with_context(|| format!("registering agent {i}"))?);
    }
    Ok(ids)
}

/// Connects every agent, starts them together, and collects what each measured.
async fn run_all(
    a: &Arc<Args>,
    pass: &Passphrase,
    ids: Vec<(AgentId, AgentKey)>,
    zero_cvs: Arc<Vec<blake3::hazmat::ChainingValue>>,
) -> report::Outcome {
    let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    // Every agent waits here after connecting (or failing to), so the writing starts together;
    // the extra party is this task, which then takes the start time.
    let barrier = Arc::new(Barrier::new(ids.len() + 1));
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, (id, cred)) in ids.into_iter().enumerate() {
        let (a, pass, gate, barrier, zero_cvs, mut start_rx) = (
            a.clone(),
            pass.clone(),
            gate.clone(),
            barrier.clone(),
            zero_cvs.clone(),
            start_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let conn = {
                let _permit = gate.acquire().await.expect("semaphore open");
                agent::connect(&a, &pass, i, id, &cred).await
            };
            barrier.wait().await;
            let start = match start_rx.wait_for(Option::is_some).await {
                Ok(s) => s.expect("start is set"),
                Err(_) => return Err(anyhow!("start signal lost")),
            };
            let conn = conn.with_context(|| format!("agent {i}: connecting"))?;
            agent::run(&a, i, conn, start, &zero_cvs)
                .await
                .with_context(|| format!("agent {i} ({})", a.vm_name(i)))
        }));
    }
    barrier.wait().await;
    let connect_s = t.elapsed().as_secs_f64();
    let start = Instant::now();
    let _ = start_tx.send(Some(start));
    eprintln!(
        "ferry-simagents: {} agents connected in {connect_s:.2} s; writing for {} s",
        tasks.len(),
        a.seconds
    );
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap_or_else(|e| Err(anyhow!("agent task: {e}"))));
    }
    report::Outcome {
        connect_s,
        start,
        results,
    }
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage` for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
