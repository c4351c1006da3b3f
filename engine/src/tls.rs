//! TLS for the AMQPS listener, the admin API's HTTPS and (with
//! `[cluster] tls`) the links between cluster nodes, through rustls.
//!
//! One [`Tls`] holds the server's certificate, key and (optionally) the CA
//! that client certificates are verified against, as read from the files
//! the `[tls]` section names. Each new connection takes the configuration
//! current when it arrives, so a certificate rotated on disk is served to
//! the next connection while the open ones keep theirs: [`Tls::watch`]
//! reloads the files when they change. A set of files that does not load
//! (a key that does not match its certificate, a half-written PEM, a file
//! over [`MAX_PEM_BYTES`], a chain of more than [`MAX_CHAIN`]
//! certificates) is refused with a warning and the previous certificate
//! keeps serving; the next change tries again. A set that loads must also
//! complete a TLS handshake with itself in memory before it serves: a
//! chain a client would refuse (one too large for a handshake message, a
//! key that cannot sign what the certificate announces) never replaces
//! one that works.
//!
//! rustls speaks TLS 1.2 and 1.3 only, so nothing older is ever offered.
//!
//! Client certificates are asked for only when a CA file is set, and then
//! only by the AMQP listener and by cluster nodes (which require one: a
//! node proves it belongs with a certificate the CA signed, and checks
//! the peer it dials the same way): the admin API authenticates with HTTP
//! basic auth. A verified certificate's subject CN is what the `EXTERNAL`
//! mechanism logs in as (RabbitMQ's `rabbitmq_auth_mechanism_ssl` with
//! `ssl_cert_login_from = common_name`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

/// Quiet time after a change in a watched folder before the files are read:
/// a certificate and its key are written one after the other.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The largest certificate, key or CA file read.
pub const MAX_PEM_BYTES: u64 = 1 << 20;
/// The most certificates a served chain may have.
pub const MAX_CHAIN: usize = 16;

/// The `[tls]` section of the configuration file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The server's certificate chain, PEM, leaf first.
    pub cert_file: PathBuf,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates are verified
    /// against. When set, AMQPS clients are asked for a certificate and a
    /// verified one allows the `EXTERNAL` login.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// With `ca_file`: refuse clients that present no certificate
    /// (RabbitMQ's `fail_if_no_peer_cert`). A certificate that is
    /// presented and does not verify is always refused.
    #[serde(default)]
    pub fail_if_no_peer_cert: bool,
    /// Reload the files when they change on disk.
    #[serde(default = "yes")]
    pub watch: bool,
}

fn yes() -> bool {
    true
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{}: {what}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the combination (e.g. a key that is not the
    /// certificate's).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not make a verifier.
    #[error("client CA {}: {what}", path.display())]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The folders could not be watched.
    #[error("watching the certificate files: {0}")]
    Watch(#[from] notify::Error),
}

/// The rustls configurations currently served.
struct Configs {
    amqp: Arc<ServerConfig>,
    admin: Arc<ServerConfig>,
    /// Between cluster nodes (with a CA only): both sides present the
    /// certificate and verify the other's against the CA.
    cluster: Option<(Arc<ServerConfig>, Arc<rustls::ClientConfig>)>,
    /// The files' contents they were made from, to tell a real change.
    source: Sources,
}

/// The server side of TLS: what new AMQPS and HTTPS connections are
/// accepted with.
pub struct Tls {
    settings: TlsSettings,
    current: ArcSwap<Configs>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let fail = |what: String| TlsError::File {
        path: path.to_owned(),
        what,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(fail(format!("larger than {MAX_PEM_BYTES} bytes")));
    }
    Ok(bytes)
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_owned(),
            what: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

impl Tls {
    /// Read the files `settings` names.
    pub fn load(settings: TlsSettings) -> Result<Arc<Tls>, TlsError> {
        let configs = build(&settings, Sources::read(&settings)?)?;
        Ok(Arc::new(Tls {
            settings,
            current: ArcSwap::from_pointee(configs),
        }))
    }

    /// The settings it was loaded with.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// Whether AMQPS clients are asked for a certificate.
    pub fn verifies_clients(&self) -> bool {
        self.settings.ca_file.is_some()
    }

    /// What a new AMQPS connection is accepted with.
    pub fn amqp_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().amqp.clone())
    }

    /// What a new HTTPS connection to the admin API is accepted with.
    pub fn admin_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().admin.clone())
    }

    /// What a cluster node accepts a peer's link with, and dials one with
    /// (mutual TLS against the CA); none without a CA file.
    pub fn cluster(&self) -> Option<(TlsAcceptor, tokio_rustls::TlsConnector)> {
        let c = self.current.load();
        let (server, client) = c.cluster.as_ref()?;
        Some((
            TlsAcceptor::from(server.clone()),
            tokio_rustls::TlsConnector::from(client.clone()),
        ))
    }

    /// Read the files again; serve them from the next connection on if they
    /// load. Returns whether anything changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let source = Sources::read(&self.settings)?;
        if source == self.current.load().source {
            return Ok(false);
        }
        let configs = build(&self.settings, source)?;
        self.current.store(Arc::new(configs));
        Ok(true)
    }

    /// Reload whenever a file in the folders of the configured files
    /// changes. The folders are watched rather than the files: rotation
    /// often renames a new file over the old one, and a Kubernetes Secret
    /// volume swaps a `..data` symlink without touching the files' names.
    pub fn watch(self: &Arc<Self>) -> Result<TlsWatcher, TlsError> {
        let (tx, rx) = mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(e) = event
                    && !matches!(e.kind, notify::EventKind::Access(_))
                {
                    let _ = tx.send(());
                }
            })?;
        let mut folders: Vec<PathBuf> = [
            Some(&self.settings.cert_file),
            Some(&self.settings.key_file),
            self.settings.ca_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|f| match f.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
        folders.sort();
        folders.dedup();
        for folder in &folders {
            watcher.watch(folder, RecursiveMode::NonRecursive)?;
        }
        let tls = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("wasmq-tls-watch".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Wait for the writes to settle.
                    loop {
                        match rx.recv_timeout(DEBOUNCE) {
                            Ok(()) => continue,
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    let Some(tls) = tls.upgrade() else { return };
                    match tls.reload() {
                        Ok(true) => tracing::info!(
                            cert = %tls.settings.cert_file.display(),
                            "TLS certificate reloaded; new connections get it"
                        ),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(
                            "TLS files changed but do not load ({e}); the previous certificate keeps serving"
                        ),
                    }
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(TlsWatcher { _watcher: watcher })
    }
}

/// A running certificate watcher; dropping it stops watching.
pub struct TlsWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for TlsWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsWatcher")
    }
}

/// The configured files' contents, read once per load.
#[derive(PartialEq, Eq)]
struct Sources {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

impl Sources {
    fn read(settings: &TlsSettings) -> Result<Sources, TlsError> {
        Ok(Sources {
            cert: read(&settings.cert_file)?,
            key: read(&settings.key_file)?,
            ca: settings.ca_file.as_deref().map(read).transpose()?,
        })
    }
}

fn build(settings: &TlsSettings, source: Sources) -> Result<Configs, TlsError> {
    let certs = certificates(&settings.cert_file, &source.cert)?;
    if certs.len() > MAX_CHAIN {
        return Err(TlsError::File {
            path: settings.cert_file.clone(),
            what: format!(
                "a chain of {} certificates; at most {MAX_CHAIN} are served",
                certs.len()
            ),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&source.key).map_err(|e| TlsError::File {
        path: settings.key_file.clone(),
        what: e.to_string(),
    })?;
    let versions = &[&rustls::version::TLS13, &rustls::version::TLS12];
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let mut cluster = None;
    let amqp = match (&settings.ca_file, &source.ca) {
        (Some(ca), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, pem)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    path: ca.clone(),
                    what: e.to_string(),
                })?;
            }
            let roots = Arc::new(roots);
            let ca_error = |e: &dyn std::fmt::Display| TlsError::ClientCa {
                path: ca.clone(),
                what: e.to_string(),
            };
            // Nodes: a peer must present a certificate the CA signed.
            let peers = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| ca_error(&e))?;
            let server = builder
                .clone()
                .with_client_cert_verifier(peers)
                .with_single_cert(certs.clone(), key.clone_key())?;
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)?
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(certs.clone(), key.clone_key())?;
            cluster = Some((Arc::new(server), Arc::new(client)));
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if settings.fail_if_no_peer_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                path: ca.clone(),
                what: e.to_string(),
            })?;
            builder
                .clone()
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs.clone(), key.clone_key())?
        }
        _ => builder
            .clone()
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())?,
    };
    let mut admin = builder.with_no_client_auth().with_single_cert(certs, key)?;
    admin.alpn_protocols = vec![b"http/1.1".to_vec()];
    let admin = Arc::new(admin);
    self_handshake(admin.clone()).map_err(|e| TlsError::File {
        path: settings.cert_file.clone(),
        what: format!("a TLS handshake with this certificate and key fails: {e}"),
    })?;
    Ok(Configs {
        amqp: Arc::new(amqp),
        admin,
        cluster,
        source,
    })
}

/// A client that takes any certificate the server shows but checks that
/// the server's signatures verify with it: for [`self_handshake`], which
/// asks whether a client could complete a handshake at all, not whether
/// it trusts the issuer.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Complete a TLS handshake between `server` and a client in memory.
fn self_handshake(server: Arc<ServerConfig>) -> Result<(), rustls::Error> {
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("wasmq.self-check")
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut client =
        rustls::Connection::from(rustls::ClientConnection::new(Arc::new(client), name)?);
    let mut server = rustls::Connection::from(rustls::ServerConnection::new(server)?);
    fn pass(
        from: &mut rustls::Connection,
        to: &mut rustls::Connection,
    ) -> Result<(), rustls::Error> {
        let io = |e: io::Error| rustls::Error::General(e.to_string());
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).map_err(io)?;
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).map_err(io)?;
            to.process_new_packets()?;
        }
        Ok(())
    }
    // A full handshake is two round trips; a few more leave room for
    // session tickets.
    for _ in 0..8 {
        pass(&mut client, &mut server)?;
        pass(&mut server, &mut client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    Err(rustls::Error::General(
        "the handshake did not finish".into(),
    ))
}

/// The subject CN of the client's verified certificate, if it sent one.
/// rustls keeps a client's certificates only once they verified.
pub fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// A short name of the negotiated protocol ("TLSv1.3"), for the admin API.
pub fn protocol_name(conn: &rustls::ServerConnection) -> &'static str {
    match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    }
}

/// Wait up to `limit` for `fut`, as an `io::Result` (a TLS handshake that
/// never finishes is a timeout error like any other).
pub(crate) async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// How long a client has to finish its TLS handshake.
pub(crate) const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client's TLS handshake on `stream` (AMQPS, RESP over TLS), within
/// [`CLIENT_HANDSHAKE_TIMEOUT`]; `None` if it failed (logged, at most once
/// per source address per 10 s) or the broker is shutting down.
pub(crate) async fn accept_client(
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let accepted = tokio::select! {
        r = within(CLIENT_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => r,
        () = shutdown.cancelled() => return None,
    };
    match accepted {
        Ok(s) => Some(s),
        Err(e) => {
            if let Some(quiet) = crate::amqp::REFUSALS.admit(peer.ip()) {
                tracing::info!(%peer, also_refused = quiet, "TLS handshake failed: {e}");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, cert.pem())
    }

    fn settings(cert_file: PathBuf, key_file: PathBuf) -> TlsSettings {
        TlsSettings {
            cert_file,
            key_file,
            ca_file: None,
            fail_if_no_peer_cert: false,
            watch: false,
        }
    }

    #[test]
    fn a_chain_no_client_could_take_is_refused_and_the_old_one_serves() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k, pem) = pair(dir.path(), "old.example");
        let tls = Tls::load(settings(c.clone(), k.clone())).unwrap();
        let before = tls.current.load().admin.clone();
        // Over the chain bound.
        std::fs::write(&c, pem.repeat(MAX_CHAIN + 1)).unwrap();
        let e = tls.reload().unwrap_err().to_string();
        assert!(e.contains("chain of 17 certificates"), "{e}");
        // Within it, but too large for a handshake message (64 KiB): 12
        // copies of a certificate with many names.
        let big = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["big.example".into()]).unwrap();
        params.subject_alt_names = (0..400)
            .map(|i| rcgen::SanType::DnsName(format!("name-{i}.example").try_into().unwrap()))
            .collect();
        let cert = params.self_signed(&big).unwrap();
        std::fs::write(&c, cert.pem().repeat(12)).unwrap();
        std::fs::write(&k, big.serialize_pem()).unwrap();
        let e = tls.reload().unwrap_err().to_string();
        assert!(e.contains("handshake"), "{e}");
        // The same certificate alone serves.
        std::fs::write(&c, cert.pem()).unwrap();
        let tls_big = Tls::load(settings(c.clone(), k.clone()));
        assert!(tls_big.is_ok(), "{:?}", tls_big.err());
        std::fs::write(&c, pem.repeat(MAX_CHAIN + 1)).unwrap();
        // A file over the size bound is not even read whole.
        std::fs::write(&c, vec![b'x'; MAX_PEM_BYTES as usize + 1]).unwrap();
        assert!(
            tls.reload()
                .unwrap_err()
                .to_string()
                .contains("larger than")
        );
        assert!(
            Arc::ptr_eq(&before, &tls.current.load().admin),
            "the previous certificate keeps serving"
        );
        // A good pair still replaces it.
        pair(dir.path(), "new.example");
        assert!(tls.reload().unwrap());
    }
}
