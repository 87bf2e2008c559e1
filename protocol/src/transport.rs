//! QUIC endpoint builders for the control plane.
//!
//! The coordinator makes a fresh self-signed certificate per run and hands its DER to workers
//! out of band (the launcher passes it along with the join token), or workers pin its SHA-256
//! fingerprint (`Trust`); either way they trust exactly that certificate and nothing from the
//! system store. The rustls crypto provider (ring) is passed explicitly to every config, so
//! nothing depends on a process-wide default provider being installed (rustls panics when none
//! or several are).

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Application protocol negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"xkd/1";
/// The name workers expect in the coordinator's certificate, whatever address they dial.
pub const SERVER_NAME: &str = "xkd-coordinator";
/// A silent connection is dropped after this long ...
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// ... which keep-alives prevent while both ends are alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// QUIC application close codes: the reason a connection ended, readable by the other side.
pub const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);
/// The coordinator refused the join (the Reject frame says why).
pub const CLOSE_REJECTED: VarInt = VarInt::from_u32(1);
/// The coordinator declared the worker lost (silence, malformed frame, protocol violation).
pub const CLOSE_LOST: VarInt = VarInt::from_u32(2);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot generate the coordinator certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("cannot read the coordinator's {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("`{given}` is not a SHA-256 fingerprint: {reason} (64 hex digits, `:` allowed)")]
    Fingerprint { given: String, reason: String },
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The coordinator's certificate and private key, both DER.
pub struct ServerIdentity {
    /// The end-entity certificate: what `--cert` holds and `Fingerprint` hashes.
    pub cert_der: Vec<u8>,
    /// Intermediates sent after it (a given certificate's chain; none when generated).
    chain: Vec<Vec<u8>>,
    /// Kept private so it cannot end up in a log line by accident.
    key: PrivateKeyDer<'static>,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        ServerIdentity {
            cert_der: self.cert_der.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("cert_der", &format_args!("{} bytes", self.cert_der.len()))
            .field("chain", &self.chain.len())
            .field("key_der", &"<redacted>")
            .finish()
    }
}

impl ServerIdentity {
    /// A fresh self-signed certificate naming `xkd-coordinator` and `localhost`.
    pub fn generate() -> Result<ServerIdentity, TransportError> {
        let names = vec![SERVER_NAME.to_string(), "localhost".to_string()];
        let certified = rcgen::generate_simple_self_signed(names)?;
        Ok(ServerIdentity {
            cert_der: certified.cert.der().to_vec(),
            chain: Vec::new(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                certified.signing_key.serialize_der(),
            )),
        })
    }

    /// A certificate and key the coordinator is given (a Kubernetes Secret, cert-manager):
    /// `cert_pem` holds the end-entity certificate first, then any intermediates; `key_pem`
    /// its key as PKCS#8, PKCS#1 or SEC1. Refused here, not at the first join, when either
    /// does not parse or the key is not the certificate's.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerIdentity, TransportError> {
        let pem = |what, e: rustls::pki_types::pem::Error| TransportError::Pem {
            what,
            detail: e.to_string(),
        };
        let mut certs = CertificateDer::pem_slice_iter(cert_pem)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem("certificate", e))?;
        if certs.is_empty() {
            return Err(TransportError::Pem {
                what: "certificate",
                detail: "no CERTIFICATE section".into(),
            });
        }
        let cert_der = certs.remove(0);
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem("private key", e))?;
        let id = ServerIdentity {
            cert_der,
            chain: certs,
            key,
        };
        server_config(&id)?;
        Ok(id)
    }
}

/// The SHA-256 of a certificate's DER, the way `openssl x509 -fingerprint -sha256` counts it;
/// shown as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert_der).into())
    }

    /// 64 hex digits, either case, optionally `:`-separated (as openssl prints them).
    pub fn parse(given: &str) -> Result<Fingerprint, TransportError> {
        let refuse = |reason: String| TransportError::Fingerprint {
            given: given.to_string(),
            reason,
        };
        let digits: Vec<u8> = given.trim().bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(refuse(format!("{} hex digits", digits.len())));
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|e| refuse(e.to_string()))?;
            *byte =
                u8::from_str_radix(pair, 16).map_err(|_| refuse(format!("`{pair}` is not hex")))?;
        }
        Ok(Fingerprint(bytes))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&xkd_config::hex(&self.0))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// How a worker recognises the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly this self-signed certificate (DER), as its only root: the coordinator must hold
    /// its key, and it must name `SERVER_NAME` and be within its validity.
    Certificate(Vec<u8>),
    /// Whatever certificate hashes to this: the coordinator must hold its key (the handshake
    /// signature is checked against it as always); name, issuer and validity are not asked,
    /// as with a pinned SSH host key.
    Fingerprint(Fingerprint),
}

/// Only the identity check of rustls' verifier is replaced: the end-entity certificate must
/// hash to the pin. The handshake signatures are verified with the provider's algorithms, so
/// a peer that merely copied the certificate cannot finish the handshake.
#[derive(Debug)]
struct PinnedFingerprint {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Why a pinned handshake failed: both fingerprints, so an operator sees at once whether the
/// pin is stale (a restarted coordinator made a new certificate) or mistyped.
struct FingerprintMismatch {
    expected: Fingerprint,
    presented: Fingerprint,
}

impl std::fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the coordinator's certificate has SHA-256 fingerprint {}, but {} was pinned",
            self.presented, self.expected
        )
    }
}

// rustls prints a certificate error's cause with `{:?}`: make that the message too.
impl std::fmt::Debug for FingerprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for FingerprintMismatch {}

impl ServerCertVerifier for PinnedFingerprint {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of(end_entity);
        if presented == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = FingerprintMismatch {
            expected: self.pin,
            presented,
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(mismatch)),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether `cert_der` is a certificate a worker can trust as its only root (it parses as
/// X.509 with a usable public key): a launcher that hands over the wrong file fails here,
/// at start, rather than in every handshake.
pub fn check_certificate(cert_der: &[u8]) -> Result<(), TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert_der.to_vec()))?;
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Idle timeout and keep-alive for both sides; `bidi` is how many bidirectional streams the
/// peer may open (a worker opens one; the coordinator opens none).
fn transport_config(bidi: u32) -> Result<Arc<TransportConfig>, TransportError> {
    let idle = IdleTimeout::try_from(IDLE_TIMEOUT)
        .map_err(|e| TransportError::Quic(format!("idle timeout: {e}")))?;
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_concurrent_bidi_streams(VarInt::from_u32(bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    Ok(Arc::new(t))
}

fn server_config(id: &ServerIdentity) -> Result<quinn::ServerConfig, TransportError> {
    let chain = std::iter::once(&id.cert_der)
        .chain(&id.chain)
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config(1)?);
    Ok(config)
}

/// Trusts exactly what `trust` names: a self-signed certificate as the only root, or the
/// certificate with the pinned fingerprint; either way only a server holding its private key
/// passes.
fn client_config(trust: &Trust) -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match trust {
        Trust::Certificate(der) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from(der.clone()))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedFingerprint {
                pin: *pin,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config(0)?);
    Ok(config)
}

/// A QUIC server on `addr` presenting `id`. Must run inside a tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    id: &ServerIdentity,
) -> Result<quinn::Endpoint, TransportError> {
    quinn::Endpoint::server(server_config(id)?, addr)
        .map_err(|source| TransportError::Bind { addr, source })
}

/// A QUIC client on an ephemeral IPv4 port that trusts only what `trust` names; connect with
/// `endpoint.connect(addr, SERVER_NAME)`. Must run inside a tokio runtime.
pub fn client_endpoint(trust: &Trust) -> Result<quinn::Endpoint, TransportError> {
    client_endpoint_on(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), trust)
}

/// Like `client_endpoint`, bound on the unspecified address of `remote`'s family, so an IPv6
/// coordinator is reachable too.
pub fn client_endpoint_for(
    remote: SocketAddr,
    trust: &Trust,
) -> Result<quinn::Endpoint, TransportError> {
    let bind = match remote {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    client_endpoint_on(bind, trust)
}

fn client_endpoint_on(bind: SocketAddr, trust: &Trust) -> Result<quinn::Endpoint, TransportError> {
    let config = client_config(trust)?;
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    /// Accepts one connection and one stream, echoes one byte.
    async fn echo_once(server: quinn::Endpoint) {
        let Some(incoming) = server.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        if let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let mut b = [0u8; 1];
            if recv.read_exact(&mut b).await.is_ok() {
                let _ = send.write_all(&b).await;
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        }
    }

    /// Serves `id`, and sends one byte there and back through a client trusting `trust`.
    async fn echo_through(id: &ServerIdentity, trust: &Trust) {
        let server = server_endpoint(loopback(), id).unwrap();
        let addr = server.local_addr().unwrap();
        let echo = tokio::spawn(echo_once(server));
        let conn = client_endpoint(trust)
            .unwrap()
            .connect(addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[7]).await.unwrap();
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [7]);
        echo.await.unwrap();
    }

    #[tokio::test]
    async fn client_talks_to_the_trusted_server() {
        let id = ServerIdentity::generate().unwrap();
        let server = server_endpoint(loopback(), &id).unwrap();
        let addr = server.local_addr().unwrap();
        let echo = tokio::spawn(echo_once(server));
        let client = client_endpoint(&Trust::Certificate(id.cert_der.clone())).unwrap();
        let conn = client.connect(addr, SERVER_NAME).unwrap().await.unwrap();
        let alpn = conn.handshake_data().unwrap();
        let alpn = alpn
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap();
        assert_eq!(alpn.protocol.as_deref(), Some(ALPN));
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[7]).await.unwrap();
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [7]);
        echo.await.unwrap();
    }

    #[tokio::test]
    async fn client_refuses_another_certificate() {
        let id = ServerIdentity::generate().unwrap();
        let impostor = ServerIdentity::generate().unwrap();
        let server = server_endpoint(loopback(), &impostor).unwrap();
        let addr = server.local_addr().unwrap();
        let _accept = tokio::spawn(echo_once(server));
        let client = client_endpoint(&Trust::Certificate(id.cert_der.clone())).unwrap();
        let got = client.connect(addr, SERVER_NAME).unwrap().await;
        assert!(
            got.is_err(),
            "handshake with an untrusted certificate succeeded"
        );
    }

    #[tokio::test]
    async fn a_pinned_fingerprint_admits_its_certificate_only() {
        let id = ServerIdentity::generate().unwrap();
        let pin = Trust::Fingerprint(Fingerprint::of(&id.cert_der));
        echo_through(&id, &pin).await;

        let impostor = ServerIdentity::generate().unwrap();
        let server = server_endpoint(loopback(), &impostor).unwrap();
        let addr = server.local_addr().unwrap();
        let _accept = tokio::spawn(echo_once(server));
        let got = client_endpoint(&pin)
            .unwrap()
            .connect(addr, SERVER_NAME)
            .unwrap()
            .await;
        let error = got.expect_err("a handshake with another certificate succeeded");
        let text = error.to_string();
        assert!(
            text.contains(&Fingerprint::of(&id.cert_der).to_string()),
            "{text}"
        );
        assert!(
            text.contains(&Fingerprint::of(&impostor.cert_der).to_string()),
            "{text}"
        );
    }

    #[test]
    fn fingerprints_parse_as_openssl_and_sha256sum_print_them() {
        let id = ServerIdentity::generate().unwrap();
        let pin = Fingerprint::of(&id.cert_der);
        let hex = pin.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(Fingerprint::parse(&hex).unwrap(), pin);
        let openssl: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap().to_uppercase())
            .collect();
        assert_eq!(Fingerprint::parse(&openssl.join(":")).unwrap(), pin);
        assert_eq!(Fingerprint::parse(&format!(" {hex}\n")).unwrap(), pin);
        for bad in [
            "",
            &hex[..62],
            &format!("{hex}00"),
            &format!("zz{}", &hex[2..]),
        ] {
            let error = Fingerprint::parse(bad).unwrap_err().to_string();
            assert!(error.contains("SHA-256 fingerprint"), "{error}");
        }
    }

    #[test]
    fn a_generated_certificate_checks_and_garbage_does_not() {
        let id = ServerIdentity::generate().unwrap();
        check_certificate(&id.cert_der).unwrap();
        assert!(check_certificate(&id.cert_der[..id.cert_der.len() / 2]).is_err());
        assert!(check_certificate(b"not a certificate").is_err());
    }

    /// A certificate signed by a CA (as cert-manager issues them), its chain in one PEM file
    /// and its key in another: served as given, and a worker pinning the leaf joins.
    #[tokio::test]
    async fn a_given_certificate_and_key_are_served() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["xkd.example".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let chain_pem = format!("{}{}", leaf.pem(), ca.pem());
        let id =
            ServerIdentity::from_pem(chain_pem.as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        assert_eq!(id.cert_der, leaf.der().to_vec());
        assert_eq!(id.chain, vec![ca.der().to_vec()]);

        echo_through(&id, &Trust::Fingerprint(Fingerprint::of(leaf.der()))).await;

        let other = rcgen::KeyPair::generate().unwrap();
        let mismatched =
            ServerIdentity::from_pem(chain_pem.as_bytes(), other.serialize_pem().as_bytes());
        assert!(
            mismatched.is_err(),
            "a key that is not the certificate's was taken"
        );
        let error = ServerIdentity::from_pem(b"", key.serialize_pem().as_bytes()).unwrap_err();
        assert!(error.to_string().contains("certificate"), "{error}");
        let error = ServerIdentity::from_pem(chain_pem.as_bytes(), b"").unwrap_err();
        assert!(error.to_string().contains("private key"), "{error}");
    }

    #[test]
    fn debug_hides_the_key() {
        let id = ServerIdentity::generate().unwrap();
        assert!(format!("{id:?}").contains("<redacted>"));
    }
}
