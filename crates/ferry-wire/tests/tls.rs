//! Real TLS handshakes over loopback TCP (blocking rustls streams): the right pin connects with TLS
//! 1.3, a wrong pin is refused with both fingerprints named, and TLS 1.2 is refused both ways.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_wire::{
    client_config, provider, server_name, Fingerprint, FrameReader, FrameWriter, Message,
    ServerIdentity,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ProtocolVersion, ServerConfig,
    ServerConnection, SignatureScheme, StreamOwned,
};

fn hello() -> Message {
    Message::Hello {
        min_version: 1,
        max_version: 1,
        software: "test".into(),
    }
}

/// Accepts one connection: reads a Hello, answers with a HelloAck. Returns the server-side error
/// text if anything fails.
fn serve_one(cfg: Arc<ServerConfig>) -> (SocketAddr, JoinHandle<Result<Message, String>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (sock, _) = l.accept().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let conn = ServerConnection::new(cfg).map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, sock);
        let m = FrameReader::new(&mut tls)
            .read()
            .map_err(|e| e.to_string())?
            .ok_or("no hello")?;
        let mut w = FrameWriter::new(&mut tls);
        w.send(&Message::HelloAck {
            version: 1,
            nonce: [1; 32],
        })
        .map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())?;
        tls.conn.send_close_notify();
        let _ = tls.conn.complete_io(&mut tls.sock);
        Ok(m)
    });
    (addr, h)
}

/// Connects, completes the handshake, sends Hello and reads the answer.
fn client(cfg: Arc<ClientConfig>, addr: SocketAddr) -> io::Result<(ProtocolVersion, Message)> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = ClientConnection::new(cfg, server_name()).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let version = tls.conn.protocol_version().unwrap();
    let mut w = FrameWriter::new(&mut tls);
    w.send(&hello()).map_err(io::Error::other)?;
    w.flush().map_err(io::Error::other)?;
    let m = FrameReader::new(&mut tls)
        .read()
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::other("closed"))?;
    Ok((version, m))
}

fn identity() -> (tempfile::TempDir, ServerIdentity) {
    let dir = tempfile::tempdir().unwrap();
    let id = ServerIdentity::create(dir.path()).unwrap();
    (dir, id)
}

#[test]
fn right_pin_connects_with_tls13() {
    let (_d, id) = identity();
    let (addr, server) = serve_one(id.server_config().unwrap());
    let (version, m) = client(client_config(id.fingerprint()).unwrap(), addr).unwrap();
    assert_eq!(version, ProtocolVersion::TLSv1_3);
    assert!(matches!(m, Message::HelloAck { version: 1, .. }));
    assert_eq!(server.join().unwrap().unwrap(), hello());
}

#[test]
fn identity_reloaded_from_disk_still_matches_the_pin() {
    let (d, id) = identity();
    let pin = id.fingerprint();
    drop(id);
    let id = ServerIdentity::load(d.path()).unwrap();
    let (addr, server) = serve_one(id.server_config().unwrap());
    client(client_config(pin).unwrap(), addr).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn wrong_pin_is_refused_clearly() {
    let (_d, id) = identity();
    let (_d2, other) = identity();
    let (addr, server) = serve_one(id.server_config().unwrap());
    let e = client(client_config(other.fingerprint()).unwrap(), addr).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("does not match the pinned fingerprint")
            && msg.contains(&id.fingerprint().to_string())
            && msg.contains(&other.fingerprint().to_string()),
        "{msg}"
    );
    // The server saw the client's alert; no frame was exchanged.
    assert!(server.join().unwrap().is_err());
}

/// A verifier that accepts anything: only for building a TLS 1.2 client to show the server
/// refuses it for its version, not for its certificate checks.
#[derive(Debug)]
struct AcceptAll;

impl ServerCertVerifier for AcceptAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn server_refuses_a_tls12_client() {
    let (_d, id) = identity();
    let (addr, server) = serve_one(id.server_config().unwrap());
    let tls12 = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAll))
        .with_no_client_auth();
    let e = client(Arc::new(tls12), addr).unwrap_err().to_string();
    assert!(e.contains("ProtocolVersion"), "client: {e}");
    let s = server.join().unwrap().unwrap_err();
    assert!(s.contains("peer is incompatible"), "server: {s}");
}

#[test]
fn client_refuses_a_tls12_server() {
    let (d, id) = identity();
    // A server on the same identity that speaks only TLS 1.2.
    let pem = std::fs::read(d.path().join(ferry_wire::IDENTITY_FILE)).unwrap();
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem).unwrap();
    let tls12 = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![id.certificate().clone()], key)
        .unwrap();
    let (addr, server) = serve_one(Arc::new(tls12));
    let e = client(client_config(id.fingerprint()).unwrap(), addr)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ProtocolVersion") || e.contains("incompatible"),
        "client: {e}"
    );
    assert!(server.join().unwrap().is_err());
}

#[test]
fn fingerprint_is_sha256_of_the_certificate() {
    let (_d, id) = identity();
    let der: &[u8] = id.certificate();
    let expect = ring_sha256(der);
    assert_eq!(id.fingerprint(), Fingerprint(expect));
}

fn ring_sha256(b: &[u8]) -> [u8; 32] {
    // Independent of the crate's helper: computed with rustls' own provider hash.
    let suite = rustls::crypto::ring::default_provider()
        .cipher_suites
        .iter()
        .find_map(|s| {
            s.tls13()
                .filter(|s| s.common.hash_provider.output_len() == 32)
        })
        .unwrap();
    suite
        .common
        .hash_provider
        .hash(b)
        .as_ref()
        .try_into()
        .unwrap()
}
