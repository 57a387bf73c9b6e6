//! The whole protocol over real TLS on tokio, with a minimal process server written from the
//! crate's pieces: hello and version negotiation, registration with the passphrase (right and
//! wrong), authentication with the agent's key bound to the TLS session (a signature relayed from
//! another session is refused), records under credit with cumulative acks, and revocation.

use std::sync::{Arc, Mutex};

use ferry_wire::{
    client_config, negotiate, new_nonce, refuse, server_name, AgentId, AgentKey, AgentRegistry,
    AsyncFrameReader, AsyncFrameWriter, AuthError, Binding, Credits, DiskCut, Message, Passphrase,
    PointKind, PointTag, ServerIdentity, MAX_FRAME,
};
use tokio::io::{split, AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

struct Server {
    passphrase: Passphrase,
    registry: Mutex<AgentRegistry>,
}

type Reader<S> = AsyncFrameReader<ReadHalf<S>>;
type Writer<S> = AsyncFrameWriter<WriteHalf<S>>;

async fn refuse<S: AsyncWrite>(w: &mut Writer<S>, code: u16, message: String) {
    let _ = w.send(&Message::Refused { code, message }).await;
    let _ = w.flush().await;
}

/// One agent connection, as the process server would run it (cache and fdatasync elided: records
/// are acked as each Tag arrives).
async fn serve<S: AsyncRead + AsyncWrite>(srv: Arc<Server>, stream: S, binding: Binding) {
    let (rd, wr) = split(stream);
    let (mut r, mut w) = (AsyncFrameReader::new(rd), AsyncFrameWriter::new(wr));
    let Ok(Some(Message::Hello {
        min_version,
        max_version,
        ..
    })) = r.read().await
    else {
        return;
    };
    let Some(version) = negotiate(min_version, max_version) else {
        let why = format!("agent speaks {min_version}..={max_version}, this server 3");
        return refuse(&mut w, refuse::VERSION, why).await;
    };
    let nonce = new_nonce().unwrap();
    w.send(&Message::HelloAck { version, nonce }).await.unwrap();
    w.flush().await.unwrap();
    assert!(r.set_version(version) && w.set_version(version));
    match r.read().await {
        Ok(Some(Message::Register {
            proof,
            hostname,
            public_key,
        })) => {
            if !srv.passphrase.verify(&nonce, &proof) {
                let why = "wrong passphrase".to_string();
                return refuse(&mut w, refuse::BAD_PASSPHRASE, why).await;
            }
            let agent_id = srv
                .registry
                .lock()
                .unwrap()
                .register(&hostname, public_key)
                .unwrap();
            let m = Message::Registered { agent_id };
            w.send(&m).await.unwrap();
            w.flush().await.unwrap();
        }
        Ok(Some(Message::Auth {
            agent_id,
            public_key,
            signature,
            legacy,
        })) => {
            let verdict = srv
                .registry
                .lock()
                .unwrap()
                .verify(
                    &agent_id,
                    (&public_key, &signature, &legacy),
                    &nonce,
                    &binding,
                )
                .map(|_| ());
            if let Err(e) = verdict {
                let code = match e {
                    AuthError::UnknownAgent(_) => refuse::UNKNOWN_AGENT,
                    AuthError::BadProof(_) => refuse::BAD_CREDENTIAL,
                };
                return refuse(&mut w, code, e.to_string()).await;
            }
            let mut granted = Credits::new(MAX_FRAME);
            w.send(&Message::Welcome {
                credits: MAX_FRAME,
                resume: vec![],
            })
            .await
            .unwrap();
            w.flush().await.unwrap();
            while let Ok(Some(m)) = r.read().await {
                if let Some(seq) = m.seq() {
                    // The server keeps its own account of the grant: an overrun is a protocol error.
                    if !granted.try_take(m.frame_len().unwrap() as u64) {
                        let why = "credit overrun".to_string();
                        return refuse(&mut w, refuse::PROTOCOL, why).await;
                    }
                    if matches!(m, Message::Tag { .. }) {
                        w.send(&Message::Ack { seq }).await.unwrap();
                        w.send(&Message::Credit { bytes: MAX_FRAME }).await.unwrap();
                        granted.grant(MAX_FRAME);
                        w.flush().await.unwrap();
                    }
                }
            }
        }
        _ => {}
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    pass: &Passphrase,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = TlsConnector::from(client_config(pass.fingerprint).unwrap());
    connector.connect(server_name(), tcp).await.unwrap()
}

type Client = tokio_rustls::client::TlsStream<TcpStream>;

/// Opens a connection and exchanges Hello/HelloAck; returns the streams, the nonce and the TLS
/// session's binding.
async fn hello(
    addr: std::net::SocketAddr,
    pass: &Passphrase,
) -> (Reader<Client>, Writer<Client>, [u8; 32], Binding) {
    let tls = connect(addr, pass).await;
    let binding = ferry_wire::agentkey::tls_binding(tls.get_ref().1).unwrap();
    let (rd, wr) = split(tls);
    let (mut r, mut w) = (AsyncFrameReader::new(rd), AsyncFrameWriter::new(wr));
    w.send(&Message::Hello {
        min_version: 1,
        max_version: 5,
        software: "ferry-agent test".into(),
    })
    .await
    .unwrap();
    w.flush().await.unwrap();
    let Some(Message::HelloAck {
        version: ferry_wire::WIRE_VERSION,
        nonce,
    }) = r.read().await.unwrap()
    else {
        panic!("no HelloAck")
    };
    assert!(r.set_version(ferry_wire::WIRE_VERSION) && w.set_version(ferry_wire::WIRE_VERSION));
    (r, w, nonce, binding)
}

async fn register(
    addr: std::net::SocketAddr,
    pass: &Passphrase,
    secret: &[u8; 16],
    key: &AgentKey,
) -> Message {
    let (mut r, mut w, nonce, _) = hello(addr, pass).await;
    let proof = ferry_wire::prove(secret, &nonce);
    w.send(&Message::Register {
        proof,
        hostname: "web01".into(),
        public_key: key.public(),
    })
    .await
    .unwrap();
    w.flush().await.unwrap();
    r.read().await.unwrap().unwrap()
}

async fn auth(
    addr: std::net::SocketAddr,
    pass: &Passphrase,
    id: AgentId,
    key: &AgentKey,
    relayed: bool,
) -> (Reader<Client>, Writer<Client>, Message) {
    let (mut r, mut w, nonce, binding) = hello(addr, pass).await;
    // `relayed`: signed for another TLS session (what a server passing the agent's Auth on to
    // this one would send).
    let binding = if relayed { [0x42; 32] } else { binding };
    w.send(&Message::Auth {
        agent_id: id,
        public_key: key.public(),
        signature: key.sign(&id, &nonce, &binding),
        legacy: [0; 32],
    })
    .await
    .unwrap();
    w.flush().await.unwrap();
    let m = r.read().await.unwrap().unwrap();
    (r, w, m)
}

#[tokio::test]
async fn register_authenticate_ship_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let identity = ServerIdentity::load_or_create(&dir.path().join("state")).unwrap();
    let passphrase = Passphrase::generate(identity.fingerprint()).unwrap();
    let registry = AgentRegistry::load(&dir.path().join("agents.json")).unwrap();
    let srv = Arc::new(Server {
        passphrase: passphrase.clone(),
        registry: Mutex::new(registry),
    });
    let acceptor = TlsAcceptor::from(identity.server_config().unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_srv = srv.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let srv = server_srv.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let binding = ferry_wire::agentkey::tls_binding(tls.get_ref().1).unwrap();
                    serve(srv, tls, binding).await;
                }
            });
        }
    });

    // The operator hands the printed passphrase to the agent.
    let pass: Passphrase = passphrase.to_string().parse().unwrap();

    // A wrong secret (same pin) is refused.
    let wrong = [0x55u8; 16];
    let key = AgentKey::generate().unwrap();
    match register(addr, &pass, &wrong, &key).await {
        Message::Refused { code, .. } => assert_eq!(code, refuse::BAD_PASSPHRASE),
        m => panic!("{m:?}"),
    }

    // The right one registers.
    let Message::Registered { agent_id } = register(addr, &pass, &pass.secret, &key).await else {
        panic!("not registered")
    };

    // Another key is refused, and so is the right key's signature made for another TLS session.
    let forged = AgentKey::generate().unwrap();
    let (_, _, m) = auth(addr, &pass, agent_id, &forged, false).await;
    assert!(
        matches!(
            m,
            Message::Refused {
                code: refuse::BAD_CREDENTIAL,
                ..
            }
        ),
        "{m:?}"
    );
    let (_, _, m) = auth(addr, &pass, agent_id, &key, true).await;
    assert!(
        matches!(
            m,
            Message::Refused {
                code: refuse::BAD_CREDENTIAL,
                ..
            }
        ),
        "{m:?}"
    );

    // The key authenticates; records flow under credit and are acked cumulatively.
    let (mut r, mut w, m) = auth(addr, &pass, agent_id, &key, false).await;
    let Message::Welcome { credits, .. } = m else {
        panic!("{m:?}")
    };
    let mut credit = Credits::new(credits);
    let run = [7u8; 16];
    let records = vec![
        Message::Begin {
            seq: 1,
            run,
            time_ns: 1,
            disks: vec![("sda".into(), 1 << 20)],
            bases: vec![[0; 16]],
        },
        Message::write(2, "sda", 0, vec![0xAB; 64 << 10]),
        Message::Zero {
            seq: 3,
            disk: "sda".into(),
            offset: 64 << 10,
            len: 64 << 10,
        },
        Message::Tag {
            seq: 4,
            tag: PointTag {
                run,
                time_ns: 2,
                kind: PointKind::Crash,
                disks: vec![DiskCut {
                    name: "sda".into(),
                    size: 1 << 20,
                    blake3: [0; 32],
                }],
            },
        },
    ];
    for m in &records {
        assert!(credit.try_take(m.frame_len().unwrap() as u64), "credit");
        w.send(m).await.unwrap();
    }
    w.flush().await.unwrap();
    assert_eq!(r.read().await.unwrap(), Some(Message::Ack { seq: 4 }));
    assert_eq!(
        r.read().await.unwrap(),
        Some(Message::Credit { bytes: MAX_FRAME })
    );
    drop((r, w));

    // Revoked: the same key is refused from now on.
    srv.registry
        .lock()
        .unwrap()
        .revoke(&agent_id)
        .unwrap()
        .unwrap();
    let (_, _, m) = auth(addr, &pass, agent_id, &key, false).await;
    match m {
        Message::Refused { code, message } => {
            assert_eq!(code, refuse::UNKNOWN_AGENT);
            assert!(message.contains("revoked"), "{message}");
        }
        m => panic!("{m:?}"),
    }
}
