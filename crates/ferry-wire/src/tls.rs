//! TLS 1.3, and only 1.3, on rustls with the ring provider; the server is authenticated by the
//! SHA-256 fingerprint of its self-signed certificate (pinned from the registration passphrase),
//! with no CA and no hostname check.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

use crate::durable::{loose_mode, write_private};
use crate::TlsError;

/// The file in the state directory holding the appliance's certificate and private key (PEM).
pub const IDENTITY_FILE: &str = "tls-identity.pem";
/// The name the client asks for and the certificate carries. Not checked: the pin is.
pub const SERVER_NAME: &str = "ferry-process-server";

/// SHA-256 of a certificate's DER encoding. Shown as `sha256:` and 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut f = [0u8; 32];
        f.copy_from_slice(d.as_ref());
        Fingerprint(f)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = String;
    /// Accepts `sha256:` + hex or bare hex, with or without colons (as `openssl x509 -fingerprint`
    /// prints it).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let t = t.strip_prefix("sha256:").unwrap_or(t).replace(':', "");
        let mut f = [0u8; 32];
        hex::decode_to_slice(&t, &mut f)
            .map_err(|_| format!("{s:?} is not a SHA-256 fingerprint (64 hex digits)"))?;
        Ok(Fingerprint(f))
    }
}

/// The crypto provider for both sides: rustls' ring provider (no aws-lc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server name clients present (any name works; this one is in the certificate).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME)
        .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// The appliance's TLS identity: a self-signed ECDSA P-256 certificate and its key.
pub struct ServerIdentity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Loads the identity from `state_dir`, creating it on first start. The identity never
    /// changes by itself: a new one changes the fingerprint, and every agent must register again.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TlsError> {
        if state_dir.join(IDENTITY_FILE).exists() {
            Self::load(state_dir)
        } else {
            Self::create(state_dir)
        }
    }

    /// Generates a new identity and writes it durably to `state_dir/tls-identity.pem` (mode
    /// `0600`, certificate and key in one file, so a crash never leaves half an identity).
    pub fn create(state_dir: &Path) -> Result<Self, TlsError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Ferry process server");
        let cert = params.self_signed(&key_pair)?;
        let pem = format!("{}{}", cert.pem(), key_pair.serialize_pem());
        let path = state_dir.join(IDENTITY_FILE);
        ferry_durable::create_dir_durable(state_dir).map_err(io("create", state_dir))?;
        write_private(&path, pem.as_bytes()).map_err(io("write", &path))?;
        let cert = cert.der().clone();
        Ok(ServerIdentity {
            fingerprint: Fingerprint::of(&cert),
            cert,
            key: PrivateKeyDer::Pkcs8(key_pair.serialize_der().into()),
        })
    }

    /// Loads `state_dir/tls-identity.pem`; refuses a file others may read.
    pub fn load(state_dir: &Path) -> Result<Self, TlsError> {
        let path = state_dir.join(IDENTITY_FILE);
        let pem = std::fs::read(&path).map_err(io("read", &path))?;
        if let Some(mode) = loose_mode(&path).map_err(io("stat", &path))? {
            return Err(TlsError::Permissions { path, mode });
        }
        let bad = |what, detail: String| TlsError::Pem {
            path: path.clone(),
            what,
            detail,
        };
        let cert = CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| bad("certificate", "no CERTIFICATE section".into()))?
            .map_err(|e| bad("certificate", e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad("private key", e.to_string()))?;
        let id = ServerIdentity {
            fingerprint: Fingerprint::of(&cert),
            cert,
            key,
        };
        // Refuses a key that does not match the certificate now, not at the first handshake.
        id.server_config()?;
        Ok(id)
    }

    /// SHA-256 of the certificate: what the passphrase pins.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The process server's rustls configuration: TLS 1.3 only, no client certificates (agents
    /// authenticate inside the stream).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path: PathBuf = path.to_path_buf();
    move |source| TlsError::Io { op, path, source }
}

/// The agent's rustls configuration: TLS 1.3 only, the server accepted if and only if its
/// certificate's fingerprint is `pin` and it proves the certificate's key in the handshake.
pub fn client_config(pin: Fingerprint) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = PinnedServer {
        pin,
        algs: provider.signature_verification_algorithms,
    };
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Accepts exactly one certificate, by fingerprint.
#[derive(Debug)]
struct PinnedServer {
    pin: Fingerprint,
    algs: WebPkiSupportedAlgorithms,
}

/// Why a pinned server was refused; rustls carries it inside its certificate error and prints it
/// with `Debug`, so `Debug` is the message too.
struct PinMismatch {
    expected: Fingerprint,
    found: Fingerprint,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate {} does not match the pinned fingerprint {} from the \
             passphrase: this is not the process server the agent registered with (or its \
             identity was recreated: register again with its new passphrase)",
            self.found, self.expected
        )
    }
}

impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = Fingerprint::of(end_entity);
        if found == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                expected: self.pin,
                found,
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with a TLS 1.3-only config; refuse rather than trust.
        Err(rustls::Error::General(
            "TLS 1.2 is not accepted by Ferry".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn fingerprint_text() {
        let f = Fingerprint([0xab; 32]);
        let s = f.to_string();
        assert_eq!(s, format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(s.parse::<Fingerprint>().unwrap(), f);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), f);
        assert!("sha256:abc".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = ServerIdentity::load_or_create(&state).unwrap();
        let path = state.join(IDENTITY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = ServerIdentity::load_or_create(&state).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(Fingerprint::of(b.certificate()), a.fingerprint());
        assert!(format!("{a:?}").contains("sha256:"));
        let pem = std::fs::read_to_string(&path).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE") && pem.contains("BEGIN PRIVATE KEY"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = ServerIdentity::load(&state).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        // A key that is not the certificate's is refused at load.
        let other = tempfile::tempdir().unwrap();
        ServerIdentity::create(other.path()).unwrap();
        let other_pem = std::fs::read_to_string(other.path().join(IDENTITY_FILE)).unwrap();
        let cert_end = pem.find("-----END CERTIFICATE-----").unwrap() + 26;
        let key_start = other_pem.find("-----BEGIN PRIVATE KEY").unwrap();
        let mixed = format!("{}{}", &pem[..cert_end], &other_pem[key_start..]);
        write_private(&path, mixed.as_bytes()).unwrap();
        assert!(matches!(
            ServerIdentity::load(&state),
            Err(TlsError::Config(_))
        ));
        write_private(&path, b"garbage").unwrap();
        let e = ServerIdentity::load(&state).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e}");
    }
}
