//! Hostile peers against a real process server (in-process, real TLS 1.3 on loopback): an oversized
//! frame, a frame of an unknown wire version and a record before authentication are each refused
//! (code 5, or 1 for the version) and the connection closed, while the server keeps registering
//! and serving others. Runs that do not build on what the server holds — a record outside any
//! run, a Begin on a run it never held, a Tag of another run — are refused with code 8, and two
//! disks with one identity with code 5.

use std::net::TcpListener as StdListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_wire::{
    client_config, header_checksum, refuse, server_name, AsyncFrameReader, AsyncFrameWriter,
    Message, Passphrase, MAX_PAYLOAD,
};
use tokio::io::{split, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn header(version: u8, ty: u8, len: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(b"FWIR");
    h[4] = version;
    h[5] = ty;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    let c = header_checksum(&h[..12]);
    h[12..].copy_from_slice(&c);
    h
}

async fn tls(addr: &str, pass: &Passphrase) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(client_config(pass.fingerprint).unwrap())
        .connect(server_name(), tcp)
        .await
        .unwrap()
}

/// Sends raw bytes first thing on a fresh connection; returns the server's answer.
async fn raw_then_read(addr: &str, pass: &Passphrase, bytes: &[u8]) -> Option<Message> {
    let (rd, mut wr) = split(tls(addr, pass).await);
    wr.write_all(bytes).await.unwrap();
    wr.flush().await.unwrap();
    let mut r = AsyncFrameReader::new(rd);
    let m = tokio::time::timeout(Duration::from_secs(10), r.read())
        .await
        .expect("the server answers")
        .expect("a well-formed answer");
    // Then the server closes.
    let end = tokio::time::timeout(Duration::from_secs(10), r.read()).await;
    assert!(matches!(end, Ok(Ok(None)) | Ok(Err(_))), "{end:?}");
    m
}

#[test]
fn hostile_frames_are_refused_and_others_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let o = ferry_serve::ServeOptions {
        listen: addr.clone(),
        store: ferry_job::StoreLocation::Local(dir.path().join("store")),
        key_file: dir.path().join("master.key"),
        cache_dir: dir.path().join("cache"),
        state_dir: dir.path().join("state"),
        cache_size: 64 << 20,
        pipeline: ferry_pipeline::PipelineConfig {
            threads: 2,
            ..Default::default()
        },
        window: 8 << 20,
        retention: None,
        metrics_listen: None,
        initial_throttles: (None, None),
        admin: None,
    };
    let pass = ferry_serve::passphrase(&o.state_dir).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (o, stop) = (o.clone(), stop.clone());
        std::thread::spawn(move || ferry_serve::serve(&o, stop))
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "server not up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Oversized frame: refused before anything is allocated.
        let m = raw_then_read(&addr, &pass, &header(1, 1, MAX_PAYLOAD + 1)).await;
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::PROTOCOL, message }) if message.contains("4198401")),
            "{m:?}"
        );
        // A frame of wire version 9: refused, naming the versions.
        let m = raw_then_read(&addr, &pass, &header(9, 1, 0)).await;
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::PROTOCOL, message }) if message.contains("version 9")),
            "{m:?}"
        );
        // A record before Hello/Auth.
        let (rd, wr) = split(tls(&addr, &pass).await);
        let (mut r, mut w) = (AsyncFrameReader::new(rd), AsyncFrameWriter::new(wr));
        w.send(&Message::Zero {
            seq: 1,
            disk: "sda".into(),
            offset: 0,
            len: 4096,
        })
        .await
        .unwrap();
        w.flush().await.unwrap();
        let m = r.read().await.unwrap();
        assert!(
            matches!(
                &m,
                Some(Message::Refused {
                    code: refuse::PROTOCOL,
                    ..
                })
            ),
            "{m:?}"
        );

        // The server still registers agents.
        let (rd, wr) = split(tls(&addr, &pass).await);
        let (mut r, mut w) = (AsyncFrameReader::new(rd), AsyncFrameWriter::new(wr));
        w.send(&Message::Hello {
            min_version: ferry_wire::WIRE_VERSION,
            max_version: ferry_wire::WIRE_VERSION,
            software: "test".into(),
        })
        .await
        .unwrap();
        w.flush().await.unwrap();
        let Some(Message::HelloAck { nonce, .. }) = r.read().await.unwrap() else {
            panic!("no HelloAck")
        };
        assert!(r.set_version(ferry_wire::WIRE_VERSION) && w.set_version(ferry_wire::WIRE_VERSION));
        w.send(&Message::Register {
            proof: pass.prove(&nonce),
            hostname: "web01".into(),
            public_key: ferry_wire::AgentKey::generate().unwrap().public(),
        })
        .await
        .unwrap();
        w.flush().await.unwrap();
        let m = r.read().await.unwrap();
        assert!(matches!(m, Some(Message::Registered { .. })), "{m:?}");
    });
    rt.block_on(async {
        // Issue 8: a VM belongs to the first agent that claims it; another agent is refused
        // (code 9, NOT_OWNER) without learning anything of the owner; a newer connection of the
        // same agent replaces the older one.
        let a = register(&addr, &pass).await;
        let b = register(&addr, &pass).await;
        let (mut ra1, _wa1) = auth_inventory(&addr, &pass, &a, "web01").await;
        let (mut rb, _wb) = auth_inventory(&addr, &pass, &b, "web01").await;
        let m = rb.read().await.unwrap();
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::NOT_OWNER, message })
                if message.contains("belongs to another agent")
                    && !message.contains(&a.0.to_string())
                    && message.contains(&b.0.to_string())),
            "{m:?}"
        );
        let (mut ra2, mut wa2) = auth_inventory(&addr, &pass, &a, "web01").await;
        let m = ra2.read().await.unwrap();
        assert!(matches!(&m, Some(Message::Holding { disks, .. }) if disks[0].replica == "sda"), "{m:?}");
        // The policy's cut intervals follow the Holding (none set: the agent's own).
        let m = ra2.read().await.unwrap();
        assert!(
            matches!(
                m,
                Some(Message::Policy {
                    crash_every_ms: ferry_wire::POLICY_OWN,
                    app_every_ms: ferry_wire::POLICY_OWN
                })
            ),
            "{m:?}"
        );
        // The server closes the old connection (after the Holding it had sent it)...
        let old = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match ra1.read().await {
                    Ok(Some(Message::Holding { .. } | Message::Policy { .. })) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the old connection is closed");
        assert!(matches!(old, Ok(None) | Err(_)), "{old:?}");
        // ...and the new one stays open.
        wa2.send(&Message::Ping { token: 2 }).await.unwrap();
        wa2.flush().await.unwrap();
        let new = tokio::time::timeout(Duration::from_millis(500), ra2.read()).await;
        assert!(new.is_err(), "the newer connection was closed: {new:?}");
        // The owner gone: still refused (ownership is not "whoever is connected").
        drop((ra1, ra2, wa2));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut rb, _wb) = auth_inventory(&addr, &pass, &b, "web01").await;
        let m = rb.read().await.unwrap();
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::NOT_OWNER, .. })),
            "{m:?}"
        );

        // Two disks with one identity: refused.
        let two = vec![inv("sda", "serial:SAME"), inv("sdb", "serial:SAME")];
        let (mut r, _w) = auth_inventory_with(&addr, &pass, &a, "db01", two).await;
        let m = r.read().await.unwrap();
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::PROTOCOL, message }) if message.contains("same identity")),
            "{m:?}"
        );
        // A record outside any run: refused with code 8 (the agent starts a run again).
        let (mut r, mut w) = auth_inventory(&addr, &pass, &a, "db02").await;
        let m = r.read().await.unwrap();
        let Some(Message::Holding { open, disks, .. }) = m else {
            panic!("{m:?}")
        };
        assert_eq!((open, disks[0].last_run), (ferry_wire::NO_RUN, ferry_wire::NO_RUN));
        w.send(&Message::write(1, "sda", 0, vec![1; 4096])).await.unwrap();
        w.flush().await.unwrap();
        let m = read_past_credit(&mut r).await;
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::STALE_BASE, message }) if message.contains("outside any run")),
            "{m:?}"
        );
        // A run built on a run the server does not hold: refused with code 8.
        let (mut r, mut w) = auth_inventory(&addr, &pass, &a, "db03").await;
        let _holding = r.read().await.unwrap();
        w.send(&begin([1; 16], [9; 16])).await.unwrap();
        w.flush().await.unwrap();
        let m = read_past_credit(&mut r).await;
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::STALE_BASE, message }) if message.contains("builds on run")),
            "{m:?}"
        );
        // A tag of another run than the open one: refused with code 8.
        let (mut r, mut w) = auth_inventory(&addr, &pass, &a, "db04").await;
        let _holding = r.read().await.unwrap();
        w.send(&begin([1; 16], ferry_wire::NO_RUN)).await.unwrap();
        w.send(&Message::Tag {
            seq: 2,
            tag: ferry_wire::PointTag {
                run: [2; 16],
                time_ns: 1,
                kind: ferry_wire::PointKind::Crash,
                disks: vec![ferry_wire::DiskCut {
                    name: "sda".into(),
                    size: 1 << 20,
                    blake3: [0; 32],
                }],
            },
        })
        .await
        .unwrap();
        w.flush().await.unwrap();
        let m = read_past_credit(&mut r).await;
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::STALE_BASE, message }) if message.contains("while run")),
            "{m:?}"
        );

        // Issue 8: records the pipeline would refuse later are refused before the ack (code 5),
        // and the server goes on: unaligned writes, a zero range of part of a chunk mid-disk, a
        // disk of 0 bytes or beyond the page-blob maximum.
        let bad: Vec<(Message, &str)> = vec![
            (Message::write(2, "sda", 4096, vec![1; 65536]), "not whole 64 KiB chunks"),
            (Message::write(2, "sda", 65536, vec![1; 4096]), "not whole 64 KiB chunks"),
            (
                Message::Zero {
                    seq: 2,
                    disk: "sda".into(),
                    offset: 65536,
                    len: 4096,
                },
                "not whole 64 KiB chunks",
            ),
        ];
        for (i, (m, why)) in bad.into_iter().enumerate() {
            let (mut r, mut w) = auth_inventory(&addr, &pass, &a, &format!("bad{i}")).await;
            let _holding = r.read().await.unwrap();
            w.send(&begin([1; 16], ferry_wire::NO_RUN)).await.unwrap();
            w.send(&m).await.unwrap();
            w.flush().await.unwrap();
            let got = read_past_credit(&mut r).await;
            assert!(
                matches!(&got, Some(Message::Refused { code: refuse::PROTOCOL, message }) if message.contains(why)),
                "{m:?}: {got:?}"
            );
        }
        // A run may announce only the disks the inventory named, at the sizes it gave.
        for (disk, size, why) in [
            ("sdz", 1u64 << 20, "did not name"),
            ("sda", 2 << 20, "the inventory said"),
        ] {
            let (mut r, _w) = sized_run(&addr, &pass, &a, "bad8", 1 << 20, (disk, size), 3).await;
            let got = read_past_credit(&mut r).await;
            assert!(
                matches!(&got, Some(Message::Refused { code: refuse::PROTOCOL, message }) if message.contains(why)),
                "{disk}: {got:?}"
            );
        }
        for size in [0, ferry_wire::MAX_DISK_SIZE + 1] {
            let (mut r, _w) = sized_run(&addr, &pass, &a, "bad9", size, ("sda", size), 3).await;
            let got = read_past_credit(&mut r).await;
            assert!(
                matches!(&got, Some(Message::Refused { code: refuse::PROTOCOL, message }) if message.contains("Ferry replicates disks of 1 byte")),
                "{size}: {got:?}"
            );
        }
        // A replica with no point (left by a run that never got its tag, or after a quarantine
        // release) holds a run to its size before anything is acknowledged.
        ferry_store::Replica::open_or_create(
            &dir.path().join("store").join("replicas").join("pre01").join("sda"),
            1 << 20,
        )
        .unwrap();
        let (mut r, _w) = sized_run(&addr, &pass, &a, "pre01", 2 << 20, ("sda", 2 << 20), 3).await;
        let got = read_past_credit(&mut r).await;
        assert!(
            matches!(&got, Some(Message::Refused { code: refuse::PROTOCOL, message }) if message.contains("its replica")),
            "{got:?}"
        );
        // The disk's last chunk may be shorter: accepted (acknowledged).
        let (mut r, mut w) =
            sized_run(&addr, &pass, &a, "odd01", 65536 + 4096, ("sda", 65536 + 4096), 4).await;
        w.send(&Message::write(2, "sda", 65536, vec![7; 4096])).await.unwrap();
        w.flush().await.unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match r.read().await {
                    Ok(Some(Message::Ack { seq, .. })) if seq >= 2 => return true,
                    Ok(Some(Message::Refused { .. })) | Ok(None) | Err(_) => return false,
                    _ => continue,
                }
            }
        })
        .await
        .unwrap_or(false);
        assert!(acked, "a short last chunk is refused or never acknowledged");

        // The operator's controls, applied by the running server within a second.
        let control = ferry_serve::control::Control::new(&dir.path().join("state"));
        // A move: B may replicate web01 now; A, connected, is disconnected with code 9.
        let (mut ra, _wa) = auth_inventory(&addr, &pass, &a, "web01").await;
        assert!(matches!(ra.read().await.unwrap(), Some(Message::Holding { .. })));
        control.move_vm("web01", &b.0.to_string()).unwrap();
        let m = tokio::time::timeout(Duration::from_secs(2), read_past_credit(&mut ra))
            .await
            .expect("the former owner is disconnected within a second");
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::NOT_OWNER, message }) if message.contains("moved")),
            "{m:?}"
        );
        let (mut rb, mut wb) = auth_inventory(&addr, &pass, &b, "web01").await;
        assert!(matches!(rb.read().await.unwrap(), Some(Message::Holding { .. })));
        // A revocation: A's live connection is closed with "unknown agent"; A cannot log in.
        let (mut ra, _wa) = auth_inventory(&addr, &pass, &a, "db09").await;
        assert!(matches!(ra.read().await.unwrap(), Some(Message::Holding { .. })));
        assert!(control.revoke(&a.0.to_string()).unwrap());
        let m = tokio::time::timeout(Duration::from_secs(2), read_past_credit(&mut ra))
            .await
            .expect("the revoked agent is disconnected within a second");
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::UNKNOWN_AGENT, message }) if message.contains("revoked")),
            "{m:?}"
        );
        let (mut r, mut w, nonce, binding) = hello(&addr, &pass).await;
        w.send(&Message::Auth {
            agent_id: a.0,
            public_key: a.1.public(),
            signature: a.1.sign(&a.0, &nonce, &binding),
            legacy: [0; 32],
        })
        .await
        .unwrap();
        w.flush().await.unwrap();
        let m = r.read().await.unwrap();
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::UNKNOWN_AGENT, .. })),
            "{m:?}"
        );
        // `ferry passphrase rotate`: the old passphrase no longer registers, the new one does,
        // registered agents go on.
        let new_pass = ferry_serve::rotate_passphrase(&dir.path().join("state")).unwrap();
        assert_ne!(new_pass, pass);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (mut r, mut w, nonce, _) = hello(&addr, &pass).await;
        w.send(&Message::Register {
            proof: pass.prove(&nonce),
            hostname: "late".into(),
            public_key: ferry_wire::AgentKey::generate().unwrap().public(),
        })
        .await
        .unwrap();
        w.flush().await.unwrap();
        let m = r.read().await.unwrap();
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::BAD_PASSPHRASE, .. })),
            "{m:?}"
        );
        let _c = register(&addr, &new_pass).await;
        // Keys, not secrets: an agent registered with a credential before keys existed moves to
        // a key at its first Auth (proving the credential once); from then on the registry holds
        // only its public key, the credential alone is worth nothing, and a signature made for
        // another TLS session (relayed) is refused.
        let (old_id, old_cred) = {
            let _l = control.lock().unwrap();
            let mut reg = control.registry().unwrap();
            reg.register_legacy("old01").unwrap()
        };
        let key = ferry_wire::AgentKey::generate().unwrap();
        let auth_with = |key: ferry_wire::AgentKey, legacy: bool, relay: bool| {
            let (addr, pass, cred) = (addr.clone(), pass.clone(), old_cred.clone());
            async move {
                let (mut r, mut w, nonce, binding) = hello(&addr, &pass).await;
                let binding = if relay { [0x42; 32] } else { binding };
                w.send(&Message::Auth {
                    agent_id: old_id,
                    public_key: key.public(),
                    signature: key.sign(&old_id, &nonce, &binding),
                    legacy: if legacy { cred.prove(&nonce) } else { [0; 32] },
                })
                .await
                .unwrap();
                w.flush().await.unwrap();
                r.read().await.unwrap()
            }
        };
        // The server reloads its registry within 250 ms; until then the id is unknown.
        let t = std::time::Instant::now();
        let m = loop {
            let m = auth_with(key.clone(), true, true).await;
            let unknown = matches!(&m, Some(Message::Refused { code: refuse::UNKNOWN_AGENT, .. }));
            if !unknown || t.elapsed() > Duration::from_secs(10) {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::BAD_CREDENTIAL, .. })),
            "relayed: {m:?}"
        );
        let m = auth_with(key.clone(), true, false).await;
        assert!(matches!(m, Some(Message::Welcome { .. })), "{m:?}");
        let text = std::fs::read_to_string(dir.path().join("state").join("agents.json")).unwrap();
        assert!(text.contains(&hex::encode(key.public())), "{text}");
        assert!(!text.contains("verifier"), "the verifier is forgotten: {text}");
        let thief = ferry_wire::AgentKey::generate().unwrap();
        let m = auth_with(thief, true, false).await;
        assert!(
            matches!(&m, Some(Message::Refused { code: refuse::BAD_CREDENTIAL, .. })),
            "the old credential with another key: {m:?}"
        );
        let m = auth_with(key.clone(), false, false).await;
        assert!(matches!(m, Some(Message::Welcome { .. })), "{m:?}");
        // B, untouched, is still connected (nothing comes: no refusal, no close).
        wb.send(&Message::Ping { token: 3 }).await.unwrap();
        wb.flush().await.unwrap();
        let still =
            tokio::time::timeout(Duration::from_millis(800), read_past_credit(&mut rb)).await;
        assert!(still.is_err(), "B was disconnected: {still:?}");
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap().unwrap();
}

/// A connection for `vm` whose inventory names one disk `sda` of `inv_size` bytes, past its
/// `Holding`, that has sent a `Begin` of run `[run; 16]` announcing `disk` (flushed).
async fn sized_run(
    addr: &str,
    pass: &Passphrase,
    agent: &Agent,
    vm: &str,
    inv_size: u64,
    (disk, size): (&str, u64),
    run: u8,
) -> (R, W) {
    let one = vec![ferry_wire::InvDisk {
        name: "sda".into(),
        size: inv_size,
        id: "serial:TEST1".into(),
    }];
    let (mut r, mut w) = auth_inventory_with(addr, pass, agent, vm, one).await;
    let m = r.read().await.unwrap();
    assert!(matches!(m, Some(Message::Holding { .. })), "{m:?}");
    w.send(&Message::Begin {
        seq: 1,
        run: [run; 16],
        time_ns: 1,
        disks: vec![(disk.into(), size)],
        bases: vec![ferry_wire::NO_RUN],
    })
    .await
    .unwrap();
    w.flush().await.unwrap();
    (r, w)
}

fn inv(name: &str, id: &str) -> ferry_wire::InvDisk {
    ferry_wire::InvDisk {
        name: name.into(),
        size: 1 << 20,
        id: id.into(),
    }
}

fn begin(run: [u8; 16], base: [u8; 16]) -> Message {
    Message::Begin {
        seq: 1,
        run,
        time_ns: 1,
        disks: vec![("sda".into(), 1 << 20)],
        bases: vec![base],
    }
}

/// The next message other than Ack, Credit or Ping.
async fn read_past_credit(r: &mut R) -> Option<Message> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), r.read())
            .await
            .expect("the server answers")
            .ok()?;
        match m {
            Some(
                Message::Ack { .. }
                | Message::Credit { .. }
                | Message::Ping { .. }
                | Message::Policy { .. },
            ) => continue,
            m => return m,
        }
    }
}

async fn auth_inventory_with(
    addr: &str,
    pass: &Passphrase,
    (id, key): &Agent,
    vm: &str,
    disks: Vec<ferry_wire::InvDisk>,
) -> (R, W) {
    let (mut r, mut w, nonce, binding) = hello(addr, pass).await;
    w.send(&Message::Auth {
        agent_id: *id,
        public_key: key.public(),
        signature: key.sign(id, &nonce, &binding),
        legacy: [0; 32],
    })
    .await
    .unwrap();
    w.flush().await.unwrap();
    let m = r.read().await.unwrap();
    assert!(matches!(m, Some(Message::Welcome { .. })), "{m:?}");
    w.send(&Message::Inventory {
        vm: vm.into(),
        disks,
    })
    .await
    .unwrap();
    w.flush().await.unwrap();
    (r, w)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;
type Agent = (ferry_wire::AgentId, ferry_wire::AgentKey);
type R = AsyncFrameReader<tokio::io::ReadHalf<Tls>>;
type W = AsyncFrameWriter<tokio::io::WriteHalf<Tls>>;

async fn hello(addr: &str, pass: &Passphrase) -> (R, W, [u8; 32], ferry_wire::Binding) {
    let tls = tls(addr, pass).await;
    let binding = ferry_wire::agentkey::tls_binding(tls.get_ref().1).unwrap();
    let (rd, wr) = split(tls);
    let (mut r, mut w) = (AsyncFrameReader::new(rd), AsyncFrameWriter::new(wr));
    w.send(&Message::Hello {
        min_version: ferry_wire::WIRE_VERSION,
        max_version: ferry_wire::WIRE_VERSION,
        software: "test".into(),
    })
    .await
    .unwrap();
    w.flush().await.unwrap();
    let Some(Message::HelloAck { nonce, .. }) = r.read().await.unwrap() else {
        panic!("no HelloAck")
    };
    assert!(r.set_version(ferry_wire::WIRE_VERSION) && w.set_version(ferry_wire::WIRE_VERSION));
    (r, w, nonce, binding)
}

async fn register(addr: &str, pass: &Passphrase) -> Agent {
    let key = ferry_wire::AgentKey::generate().unwrap();
    let (mut r, mut w, nonce, _) = hello(addr, pass).await;
    w.send(&Message::Register {
        proof: pass.prove(&nonce),
        hostname: "web01".into(),
        public_key: key.public(),
    })
    .await
    .unwrap();
    w.flush().await.unwrap();
    match r.read().await.unwrap() {
        Some(Message::Registered { agent_id }) => (agent_id, key),
        m => panic!("{m:?}"),
    }
}

async fn auth_inventory(addr: &str, pass: &Passphrase, agent: &Agent, vm: &str) -> (R, W) {
    auth_inventory_with(addr, pass, agent, vm, vec![inv("sda", "serial:TEST1")]).await
}
