//! Throughput of Ferry's data path on the mixed data set (see `ferry_benches` and
//! `docs/BENCHMARKS.md`).
//!
//! - `pipeline/threads/N`: the per-chunk work of scan + pipeline on 1 GiB in memory — zero check,
//!   keyed digest, dedupe against the digests seen so far, then zstd level 1 + AES-256-GCM exactly as
//!   the pipeline's workers do it (`ferry_pipeline::encode_chunk`) — on N crossbeam workers. No I/O.
//! - `stages/*`: each of those steps alone on the first 64 MiB of the same data (every chunk goes
//!   through the step), to see which one dominates.
//! - `replicate_once/threads/N`: the real job (`ferry_job::replicate_once`: scan, durable cache,
//!   pipeline, store, applier, point commit) — an initial sync of a 256 MiB image file into a fresh
//!   store and cache each iteration. The image stays in the page cache (warm reads); fsyncs are real.

use std::collections::HashSet;
use std::hint::black_box;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
    Throughput,
};
use ferry_benches::{mixed_dataset, write_image, CHUNK, DEFAULT_SEED};
use ferry_crypto::{is_zero, Digest, MasterKey};
use ferry_format::segment::{BlobSealer, SegmentBuilder};
use ferry_job::{NoProgress, ReplicateOptions, StoreLocation};
use ferry_pipeline::encode_chunk;

const PIPELINE_BYTES: usize = 1 << 30;
const STAGE_BYTES: usize = 64 << 20;
const IMAGE_BYTES: u64 = 256 << 20;
const SECRET: [u8; 32] = [7u8; 32];

/// What one pass did, in chunks; the same for every thread count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    zero: u64,
    dedupe: u64,
    stored: u64,
    sealed_bytes: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Self) {
        self.zero += o.zero;
        self.dedupe += o.dedupe;
        self.stored += o.stored;
        self.sealed_bytes += o.sealed_bytes;
    }
}

fn sealer(key: &MasterKey) -> Arc<BlobSealer> {
    SegmentBuilder::new(key, [1u8; 16], "vm", "d", 1, "journal/vm/d/1.seg".into()).sealer()
}

/// The per-chunk work of scan + pipeline over `data`, spread over `threads` crossbeam workers.
/// Dedupe uses one shared set, so exactly one copy of each distinct chunk is encoded whatever the
/// interleaving. The owned copy `encode_chunk` takes stands for the buffer the pipeline receives
/// from the cache.
fn per_chunk_work(data: &[u8], key: &MasterKey, sealer: &BlobSealer, threads: usize) -> Tally {
    let chunks = data.len() / CHUNK;
    let seen: Mutex<HashSet<Digest>> = Mutex::new(HashSet::with_capacity(chunks));
    let (tx, rx) = crossbeam_channel::bounded::<usize>(threads * 8);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, seen) = (rx.clone(), &seen);
                s.spawn(move || {
                    let mut z = zstd::bulk::Compressor::new(1).expect("zstd level 1");
                    let mut t = Tally::default();
                    for i in rx {
                        let chunk = &data[i * CHUNK..(i + 1) * CHUNK];
                        if is_zero(chunk) {
                            t.zero += 1;
                            continue;
                        }
                        let d = key.digest(chunk);
                        if !seen.lock().expect("no worker panics").insert(d) {
                            t.dedupe += 1;
                            continue;
                        }
                        t.stored += 1;
                        t.sealed_bytes +=
                            encode_chunk(&mut z, sealer, i as u32, chunk.to_vec()) as u64;
                    }
                    t
                })
            })
            .collect();
        drop(rx);
        for i in 0..chunks {
            tx.send(i).expect("workers run until the channel closes");
        }
        drop(tx);
        let mut total = Tally::default();
        for w in workers {
            total += w.join().expect("worker panicked");
        }
        total
    })
}

/// Long iterations: one iteration per sample, ten samples, a short warm-up.
fn slow_group<'c>(
    c: &'c mut Criterion,
    name: &str,
    bytes: u64,
) -> BenchmarkGroup<'c, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(bytes))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    g
}

fn pipeline(c: &mut Criterion) {
    let t = Instant::now();
    let data = mixed_dataset(DEFAULT_SEED, PIPELINE_BYTES);
    eprintln!(
        "generated {} MiB of mixed data in {:.1}s",
        data.len() >> 20,
        t.elapsed().as_secs_f64()
    );
    let key = MasterKey::from_bytes(&SECRET, "bench");
    let sealer = sealer(&key);
    let one = per_chunk_work(&data, &key, &sealer, 1);
    eprintln!(
        "mix: {} chunks: {} zero, {} dedupe hits, {} stored -> {} MiB sealed ({:.2}x on stored chunks)",
        data.len() / CHUNK,
        one.zero,
        one.dedupe,
        one.stored,
        one.sealed_bytes >> 20,
        (one.stored * CHUNK as u64) as f64 / one.sealed_bytes as f64
    );
    assert_eq!(
        per_chunk_work(&data, &key, &sealer, 2),
        one,
        "work must not depend on threads"
    );

    let mut g = slow_group(c, "pipeline", data.len() as u64);
    for threads in [1usize, 2] {
        g.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, &n| {
            b.iter(|| per_chunk_work(black_box(&data), &key, &sealer, n))
        });
    }
    g.finish();

    let part = &data[..STAGE_BYTES];
    let chunks = || part.chunks_exact(CHUNK);
    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Bytes(part.len() as u64))
        .sample_size(10);
    g.bench_function("is_zero", |b| {
        b.iter(|| chunks().filter(|c| is_zero(c)).count())
    });
    g.bench_function("digest", |b| {
        b.iter(|| chunks().map(|c| key.digest(c)[0]).fold(0u8, |a, x| a ^ x))
    });
    g.bench_function("copy", |b| {
        b.iter(|| chunks().map(|c| black_box(c.to_vec()).len()).sum::<usize>())
    });
    g.bench_function("zstd1", |b| {
        let mut z = zstd::bulk::Compressor::new(1).expect("zstd level 1");
        b.iter(|| {
            chunks()
                .map(|c| z.compress(c).map_or(0, |v| v.len()))
                .sum::<usize>()
        })
    });
    g.bench_function("seal_raw", |b| {
        b.iter(|| {
            chunks()
                .enumerate()
                .map(|(i, c)| sealer.seal(i as u32, c.to_vec()).len())
                .sum::<usize>()
        })
    });
    g.bench_function("encode_chunk", |b| {
        let mut z = zstd::bulk::Compressor::new(1).expect("zstd level 1");
        b.iter(|| {
            chunks()
                .enumerate()
                .map(|(i, c)| encode_chunk(&mut z, &sealer, i as u32, c.to_vec()))
                .sum::<usize>()
        })
    });
    g.finish();
}

fn write_key(path: &Path) {
    use std::io::Write;
    let hex: String = SECRET.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create key file");
    f.write_all(hex.as_bytes()).expect("write key file");
}

fn replicate(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-")
        .tempdir()
        .expect("tempdir");
    let image = dir.path().join("disk.img");
    write_image(&image, DEFAULT_SEED, IMAGE_BYTES).expect("write image");
    let key_file = dir.path().join("key");
    write_key(&key_file);

    let mut g = slow_group(c, "replicate_once", IMAGE_BYTES);
    for threads in [1usize, 2] {
        g.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, &n| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let run = tempfile::tempdir_in(dir.path()).expect("run dir");
                    // The options `ferry replicate --once` builds, with its defaults.
                    let mut o = ReplicateOptions::new(
                        vec![image.clone()],
                        "vm",
                        vec!["disk".into()],
                        StoreLocation::Local(run.path().join("store")),
                        key_file.clone(),
                        run.path().join("cache"),
                    );
                    o.pipeline.threads = n;
                    let t = Instant::now();
                    let r = ferry_job::replicate_once(&o, &NoProgress, &AtomicBool::new(false))
                        .expect("replicate_once");
                    spent += t.elapsed();
                    assert!(r.point.is_some(), "the run cut its point");
                    drop(run);
                }
                spent
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pipeline, replicate);
criterion_main!(benches);
