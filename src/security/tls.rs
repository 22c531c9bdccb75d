//! TLS with rustls: the server side (`-secure-proxy`) with certificates reloaded when their
//! files change, and the client side of each upstream leg.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tracing::{info, warn};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The server's TLS configuration and, with `-cert-path`, what keeps its certificate current.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    resolver: Arc<ReloadingCert>,
}

impl ServerTls {
    /// Loads `tls.crt`/`tls.key` from `cert_dir`, or makes a self-signed certificate.
    pub fn new(cert_dir: Option<&Path>) -> Result<Self, String> {
        let (key, files) = match cert_dir {
            Some(dir) => {
                let files = CertFiles::new(dir);
                (files.load()?, Some(files))
            }
            None => (self_signed()?, None),
        };
        let resolver = Arc::new(ReloadingCert {
            current: RwLock::new(Arc::new(key)),
            files,
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            resolver,
        })
    }

    /// Re-reads the certificate files every `interval` and swaps them in when they changed
    /// (Kubernetes rotates mounted secrets in place). Returns at once without `-cert-path`.
    pub async fn reload_forever(&self, interval: Duration) {
        let Some(files) = &self.resolver.files else {
            return std::future::pending().await;
        };
        let mut seen = files.modified();
        loop {
            tokio::time::sleep(interval).await;
            let now = files.modified();
            if now == seen {
                continue;
            }
            match files.load() {
                Ok(key) => {
                    if let Ok(mut current) = self.resolver.current.write() {
                        *current = Arc::new(key);
                    }
                    seen = now;
                    info!(dir = %files.dir.display(), "TLS certificate reloaded");
                }
                // A half-written rotation: keep serving the old pair and retry next tick.
                Err(e) => warn!(error = %e, "TLS certificate reload failed; keeping the old one"),
            }
        }
    }
}

#[derive(Debug)]
struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
    files: Option<CertFiles>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|k| k.clone())
    }
}

#[derive(Debug)]
struct CertFiles {
    dir: PathBuf,
}

impl CertFiles {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let m = |f: &str| {
            std::fs::metadata(self.dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        };
        Some((m("tls.crt")?, m("tls.key")?))
    }

    fn load(&self) -> Result<CertifiedKey, String> {
        let crt = self.dir.join("tls.crt");
        let key = self.dir.join("tls.key");
        let certs = CertificateDer::pem_file_iter(&crt)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", crt.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate", crt.display()));
        }
        let key =
            PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{}: {e}", key.display()))?;
        certified(certs, key)
    }
}

fn certified(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, String> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    Ok(CertifiedKey::new(certs, signing))
}

/// A certificate for `localhost` made at start, as the Go sidecar does without `-cert-path`.
fn self_signed() -> Result<CertifiedKey, String> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| format!("self-signed certificate: {e}"))?;
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
        .map_err(|e| format!("self-signed key: {e}"))?;
    certified(vec![generated.cert.der().clone()], key)
}

/// TLS settings of one upstream leg.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Accept any certificate (`-*-tls-insecure-skip-verify`): encryption without identity.
    pub insecure_skip_verify: bool,
    /// Extra trusted roots, PEM (`-tls-ca-file`), on top of the public web roots.
    pub ca_file: Option<PathBuf>,
}

impl ClientTls {
    /// The rustls client configuration.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        // hyper-rustls sets ALPN itself (HTTP/1.1, which vLLM speaks).
        let config = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider())))
                .with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots_anchors());
            if let Some(path) = &self.ca_file {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("{}: no usable CA certificate", path.display()));
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(config)
    }
}

fn webpki_roots_anchors() -> impl Iterator<Item = rustls_pki_types::TrustAnchor<'static>> {
    webpki_roots::TLS_SERVER_ROOTS.iter().cloned()
}

/// The verifier behind `-*-tls-insecure-skip-verify`: signatures are still checked (so the
/// handshake is sound), the certificate's identity is not.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
