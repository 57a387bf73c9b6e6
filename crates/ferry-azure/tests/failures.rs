//! Failure behaviour against a real Azurite: bad credentials, an outage in the middle of an
//! upload, the throttle, cancellation.

mod common;

use std::time::{Duration, Instant};

use common::{init_tracing, pattern, setup};
use ferry_azure::azurite::Azurite;
use ferry_azure::{AzureBlobs, AzureConfig, AzureError, RateLimit};

const MIB: u64 = 1024 * 1024;

#[test]
fn wrong_account_key_fails_fast_and_permanently() {
    init_tracing();
    let Some(az) = Azurite::start_or_skip() else {
        return;
    };
    // Valid base64, wrong key.
    let wrong = "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgd3Jvbmcga2V5IHdyb25nIGtleQ==";
    let cfg =
        AzureConfig::shared_key(&az.endpoint(), "devstoreaccount1", wrong, "keys").expect("config");
    let blobs = AzureBlobs::new(cfg).expect("client");
    let t = Instant::now();
    let e = blobs.ensure_container().expect_err("wrong key must fail");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(e.is_permanent(), "{e:?}");
    assert!(e.is_auth(), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("account key"), "{msg}");
    assert_eq!(blobs.stats().retries, 0);
    assert_eq!(blobs.stats().requests, 1, "no hidden SDK retries");
    eprintln!("wrong-key error: {msg}");
}

#[test]
fn outage_during_put_pages_many_is_ridden_out() {
    let Some((mut az, _)) = setup("outage") else {
        return;
    };
    let mut cfg = az.config("outage");
    // Slow enough that the upload is still running when Azurite goes away.
    cfg.tuning.rate_limit = Some(RateLimit {
        bytes_per_sec: 6 * MIB,
        one_time_burst: 0,
    });
    let blobs = AzureBlobs::new(cfg).expect("client");
    let name = "replicas/vm/disk.vhd";
    let size = 72 * MIB;
    blobs.create_page_blob(name, size).expect("create");

    // 48 MiB in 1 MiB pieces with 1 MiB gaps and some adjacent runs.
    let mut writes = Vec::new();
    let mut model = vec![0u8; size as usize];
    for i in 0..48u64 {
        let off = (i + i / 2) * MIB;
        let d = pattern(100 + i, MIB as usize);
        model[off as usize..(off + MIB) as usize].copy_from_slice(&d);
        writes.push((off, d));
    }

    let uploader = {
        let blobs = blobs.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = blobs.put_pages_many(name, writes);
            (r, t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !uploader.is_finished(),
        "upload finished before the outage: too fast to test"
    );
    az.stop();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    az.restart()
        .expect("restart azurite on the same port and folder");
    eprintln!("azurite was down for {:?}", stopped.elapsed());

    let (r, took) = uploader.join().expect("uploader thread");
    r.expect("put_pages_many must ride out a 5 s outage");
    let s = blobs.stats();
    eprintln!("upload took {took:?}; stats {s:?}");
    assert!(s.retries > 0, "retries must be counted: {s:?}");
    assert!(took >= Duration::from_secs(5), "{took:?}");

    let back = blobs.get_range(name, None, 0, size).expect("read back");
    assert!(back == model, "data after the outage differs");
}

#[test]
fn throttle_limits_upload_rate() {
    let Some((az, _)) = setup("throttle") else {
        return;
    };
    let mut cfg = az.config("throttle");
    cfg.tuning.rate_limit = Some(RateLimit {
        bytes_per_sec: 4 * MIB,
        one_time_burst: 0,
    });
    let blobs = AzureBlobs::new(cfg).expect("client");
    blobs.create_page_blob("p", 16 * MIB).expect("create");
    let t = Instant::now();
    // The full bucket (4 MiB) goes at once, the other 8 MiB take ~2 s.
    blobs
        .put_pages_many("p", vec![(0, pattern(1, 12 * MIB as usize))])
        .expect("put");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(10),
        "12 MiB at 4 MiB/s took {took:?}"
    );
    assert!(blobs.stats().bytes_sent >= 12 * MIB);
    // Lifting the limit takes effect at once.
    blobs.throttle().set_rate(None);
    let t = Instant::now();
    blobs
        .put_pages("p", 0, pattern(2, 4 * MIB as usize))
        .expect("put");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn cancel_stops_waiting_operations() {
    let Some((az, _)) = setup("cancel") else {
        return;
    };
    let mut cfg = az.config("cancel");
    cfg.tuning.rate_limit = Some(RateLimit {
        bytes_per_sec: 1024,
        one_time_burst: 0,
    });
    let blobs = AzureBlobs::new(cfg).expect("client");
    blobs.create_page_blob("p", 4 * MIB).expect("create");
    let canceller = {
        let token = blobs.cancel_token().clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            token.cancel();
        })
    };
    let t = Instant::now();
    // 1 MiB at 1 KiB/s would take 17 minutes.
    let e = blobs
        .put_pages_many("p", vec![(0, vec![1; 4096]), (8192, vec![2; MIB as usize])])
        .expect_err("cancelled");
    canceller.join().expect("canceller");
    assert!(matches!(e, AzureError::Cancelled { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Issue 8: the HTTP stack's error texts carry the request URL, which carries the SAS; none of it
/// may reach an error (or the retry log, which prints the same text). No Azurite needed: a closed
/// port on loopback.
#[test]
fn a_sas_token_never_appears_in_errors() {
    let cs = "AccountName=devstoreaccount1;SharedAccessSignature=sv=2024-01-01&ss=b&srt=sco&sp=rwdl&sig=TOPSECRETSIG;BlobEndpoint=http://127.0.0.1:1/devstoreaccount1";
    let mut cfg = AzureConfig::from_url_with_env("azure://devstoreaccount1/secrets", |k| {
        (k == "AZURE_STORAGE_CONNECTION_STRING").then(|| cs.to_string())
    })
    .expect("config");
    cfg.tuning.retry.max_elapsed = Duration::from_secs(2);
    let blobs = AzureBlobs::new(cfg).expect("client");
    let e = blobs.get_blob("x").expect_err("nothing listens there");
    let text = format!("{e} / {e:?}");
    assert!(!text.contains("TOPSECRETSIG"), "{text}");
    assert!(
        text.contains("127.0.0.1"),
        "the error still says where: {text}"
    );
}
