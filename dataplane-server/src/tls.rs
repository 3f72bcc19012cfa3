//! TLS for data-plane connections (rustls): server and client configuration from PEM files,
//! the transports the server and the client speak through, and certificate generation for
//! `deltavol-dataplane tls init`.
//!
//! * The server loads a [`ServerTls`] once and runs [`ServerTls::accept`] on every accepted
//!   socket (tokio, on the accepting shard). The handshake frames run over the resulting
//!   [`tokio_rustls::server::TlsStream`]; for the hand-off to the owner shard,
//!   `TlsStream::into_inner` gives the socket and the [`rustls::ServerConnection`] (which keeps
//!   any plaintext and ciphertext already received), and the owner serves them as
//!   [`ServerTransport::Tls`] ([`UringTls`]: rustls driven over completion-based tokio-uring
//!   I/O with owned buffers).
//! * The client loads a [`ClientTls`] and wraps each connected blocking socket with
//!   [`ClientTls::connect`], which completes the handshake at once; it then reads and writes
//!   through a [`ClientStream`].
//! * [`generate`] writes a private CA, a server certificate and client certificates
//!   (ECDSA P-256) for deployments without a PKI of their own.
//!
//! Only the aws-lc-rs provider is used, named explicitly: no process-wide default provider
//! needs to be installed.

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::filewatch::{stamp, FileStamp};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConnection, RootCertStore, ServerConnection, StreamOwned};

/// Failure to load TLS files or to generate certificates. Each message is a full sentence
/// naming the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (missing, unreadable, a directory, ...).
    #[error("cannot read the TLS {what} file {}: {source}", path.display())]
    Read {
        /// Which file: "certificate", "key", "CA", "client certificate", "client key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file that must hold certificates holds none.
    #[error("TLS {what} file {} holds no certificate", path.display())]
    NoCertificate {
        /// Which file: "certificate", "CA", "client certificate".
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error(
        "TLS {what} file {} holds no private key (a PEM PRIVATE KEY, RSA PRIVATE KEY or \
         EC PRIVATE KEY block is expected)",
        path.display()
    )]
    NoKey {
        /// Which file: "key", "client key".
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A file is not well-formed PEM.
    #[error("TLS {what} file {} is not valid PEM: {detail}", path.display())]
    BadPem {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A CA file holds a certificate that cannot serve as a trust anchor.
    #[error("TLS CA file {} cannot be used as a trust anchor: {detail}", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The private key cannot be used (not a key rustls can parse, or not the certificate's).
    #[error(
        "TLS key file {} is not a usable private key for the certificate in {}: {detail}",
        key.display(),
        cert.display()
    )]
    BadKey {
        /// The certificate (chain) file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the configuration for another reason.
    #[error("TLS configuration failed: {detail}")]
    Config {
        /// What rustls said.
        detail: String,
    },
    /// [`generate`] found one of the files it would write.
    #[error(
        "{} already exists: refusing to overwrite TLS files (move them away or pick another \
         directory)",
        path.display()
    )]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// [`generate`] could not create the directory or write a file.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A host or client name given to [`generate`] cannot be used.
    #[error("{what} {name:?} cannot be used: {why}")]
    InvalidName {
        /// "host" or "client name".
        what: &'static str,
        /// The name as given.
        name: String,
        /// Why.
        why: String,
    },
    /// Generating keys or certificates failed.
    #[error("generating TLS certificates failed: {detail}")]
    Generate {
        /// What rcgen said.
        detail: String,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn pem_error(what: &'static str, path: &Path, e: pem::Error) -> TlsError {
    let path = path.to_path_buf();
    match e {
        pem::Error::Io(source) => TlsError::Read { what, path, source },
        pem::Error::MissingSectionEnd { end_marker } => TlsError::BadPem {
            what,
            path,
            detail: format!(
                "a section has no end line {:?}",
                String::from_utf8_lossy(&end_marker)
            ),
        },
        pem::Error::IllegalSectionStart { line } => TlsError::BadPem {
            what,
            path,
            detail: format!(
                "malformed section start line {:?}",
                String::from_utf8_lossy(&line)
            ),
        },
        other => TlsError::BadPem {
            what,
            path,
            detail: other.to_string(),
        },
    }
}

/// Every certificate in the PEM file `path` (at least one).
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file `path`.
fn read_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            what,
            path: path.to_path_buf(),
        },
        e => pem_error(what, path, e),
    })
}

/// A root store of every certificate in the CA file `path`.
fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, c) in read_certs("CA", path)?.into_iter().enumerate() {
        roots.add(c).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            detail: format!("certificate {} of the file: {e}", i + 1),
        })?;
    }
    Ok(roots)
}

/// Why rustls refused a certificate and key pair.
fn key_detail(e: rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "it is not the key of that certificate".to_string()
        }
        e => e.to_string(),
    }
}

fn config_error(e: rustls::Error) -> TlsError {
    TlsError::Config {
        detail: e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Error messages for handshake and record failures
// ---------------------------------------------------------------------------------------

/// An I/O error's inner error with a message of ours; keeps rustls's error as the source.
#[derive(Debug)]
struct TlsIoError {
    msg: String,
    source: Option<rustls::Error>,
}

impl fmt::Display for TlsIoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for TlsIoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

fn tls_io_error(kind: io::ErrorKind, msg: String, source: Option<rustls::Error>) -> io::Error {
    io::Error::new(kind, TlsIoError { msg, source })
}

/// The rustls error an I/O error from rustls carries, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

fn alert_means_untrusted(a: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        a,
        A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied
            | A::DecryptError
    )
}

/// The client's view of a failed handshake (`during_handshake`) or of a TLS failure on an
/// established session.
fn client_error(e: io::Error, during_handshake: bool) -> io::Error {
    let what = if during_handshake {
        "TLS handshake with the data plane"
    } else {
        "TLS session with the data plane"
    };
    let Some(re) = rustls_error(&e).cloned() else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof if during_handshake => tls_io_error(
                io::ErrorKind::UnexpectedEof,
                "the data plane closed the connection during the TLS handshake (does it serve \
                 TLS on this port?)"
                    .to_string(),
                None,
            ),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut if during_handshake => {
                tls_io_error(
                    io::ErrorKind::TimedOut,
                    format!("{what} timed out: the data plane did not answer ({e})"),
                    None,
                )
            }
            _ if during_handshake => tls_io_error(e.kind(), format!("{what} failed: {e}"), None),
            _ => e,
        };
    };
    let msg = match &re {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "the data plane's certificate is not trusted: UnknownIssuer (no CA in the client's \
             CA file signed it)"
                .to_string()
        }
        rustls::Error::InvalidCertificate(c) => {
            format!("the data plane's certificate is not trusted: {c}")
        }
        rustls::Error::AlertReceived(a) if *a == rustls::AlertDescription::CertificateRequired => {
            format!("the data plane refused this client: it requires a client certificate (alert {a:?})")
        }
        rustls::Error::AlertReceived(a) if alert_means_untrusted(*a) => format!(
            "the data plane refused this client: it does not accept the client certificate \
             (alert {a:?})"
        ),
        rustls::Error::AlertReceived(a) => {
            format!("the data plane ended the {what} (alert {a:?})")
        }
        rustls::Error::InvalidMessage(_) if during_handshake => {
            format!("{what} failed: {re} (does the data plane serve TLS on this port?)")
        }
        _ => format!("{what} failed: {re}"),
    };
    tls_io_error(io::ErrorKind::InvalidData, msg, Some(re))
}

/// The server's view of a failed handshake.
fn server_accept_error(e: io::Error) -> io::Error {
    let Some(re) = rustls_error(&e).cloned() else {
        let msg = match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                "the client closed the connection during the TLS handshake".to_string()
            }
            _ => format!("TLS handshake failed: {e}"),
        };
        return tls_io_error(e.kind(), msg, None);
    };
    let msg = match &re {
        rustls::Error::InvalidCertificate(c) => {
            format!("the client's certificate is not trusted: {c}")
        }
        rustls::Error::NoCertificatesPresented => {
            "the client presented no certificate; this data plane requires one signed by its \
             client CA"
                .to_string()
        }
        rustls::Error::AlertReceived(a) if alert_means_untrusted(*a) => format!(
            "the client aborted the TLS handshake: it does not trust this server's certificate \
             (alert {a:?})"
        ),
        rustls::Error::AlertReceived(a) => {
            format!("the client aborted the TLS handshake (alert {a:?})")
        }
        rustls::Error::InvalidMessage(_) => {
            format!("TLS handshake failed: {re} (a client speaking plain TCP?)")
        }
        _ => format!("TLS handshake failed: {re}"),
    };
    tls_io_error(io::ErrorKind::InvalidData, msg, Some(re))
}

// ---------------------------------------------------------------------------------------
// Server configuration
// ---------------------------------------------------------------------------------------

/// The server's TLS configuration: its certificate chain and key and, for mutual TLS, the CA
/// its clients' certificates must chain to. Cheap to clone (shared).
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    acceptor: tokio_rustls::TlsAcceptor,
    requires_client_cert: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("requires_client_cert", &self.requires_client_cert)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the server's configuration. `cert`: PEM certificate chain (the server's
    /// certificate first); `key`: its PEM private key (PKCS#8, PKCS#1 or SEC1); `client_ca`:
    /// when `Some`, every client must present a certificate signed by a CA in this PEM file
    /// (mutual TLS). TLS 1.3 and 1.2, aws-lc-rs cryptography.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls, TlsError> {
        let chain = read_certs("certificate", cert)?;
        let key_der = read_key("key", key)?;
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = match client_ca {
            Some(ca) => {
                let roots = read_roots(ca)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| TlsError::BadCa {
                    path: ca.to_path_buf(),
                    detail: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key_der)
            .map_err(|e| TlsError::BadKey {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                detail: key_detail(e),
            })?;
        let config = Arc::new(config);
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::clone(&config)),
            config,
            requires_client_cert: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn requires_client_cert(&self) -> bool {
        self.requires_client_cert
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<rustls::ServerConfig> {
        &self.config
    }

    /// Runs the TLS handshake on an accepted socket (bound it with a timeout: a client that
    /// stalls stalls this). A refused handshake is an error whose message says why (an
    /// untrusted or missing client certificate, a client that does not trust this server, a
    /// client speaking plain TCP, ...).
    pub async fn accept(
        &self,
        stream: tokio::net::TcpStream,
    ) -> io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        self.acceptor
            .accept(stream)
            .await
            .map_err(server_accept_error)
    }
}

/// The server's TLS read from its files, and read again when they change: a renewed
/// certificate (a new `server.pem` and `server.key`, e.g. from cert-manager or an ACME client)
/// is served to every new connection within [`RELOAD_INTERVAL`], without a restart; sessions
/// already open go on with the old one. A change that does not load (a key replaced before its
/// certificate, a broken file) keeps the configuration that works, logs why once, and is tried
/// again at the next look.
pub struct ServerTlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    current: std::sync::RwLock<Arc<ServerTls>>,
    /// The files as last loaded, and as last refused (to log a refusal once).
    stamps: std::sync::Mutex<(Stamps, Stamps)>,
}

/// The state of each file (missing: `None`).
type Stamps = Vec<Option<FileStamp>>;

/// How often [`ServerTlsFiles::watch`] looks at the files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

impl fmt::Debug for ServerTlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTlsFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("client_ca", &self.client_ca)
            .finish_non_exhaustive()
    }
}

impl ServerTlsFiles {
    /// Loads the files ([`ServerTls::load`]); an error here stops the server's start.
    pub fn open(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Arc<ServerTlsFiles>, TlsError> {
        let files = ServerTlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
            current: std::sync::RwLock::new(Arc::new(ServerTls::load(cert, key, client_ca)?)),
            stamps: std::sync::Mutex::new((Vec::new(), Vec::new())),
        };
        let now = files.stamps_now();
        files.stamps.lock().unwrap_or_else(|p| p.into_inner()).0 = now;
        Ok(Arc::new(files))
    }

    fn stamps_now(&self) -> Stamps {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| stamp(p))
            .collect()
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<ServerTls> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn requires_client_cert(&self) -> bool {
        self.client_ca.is_some()
    }

    /// Loads the files again if any of them changed since they last loaded; returns whether
    /// new connections now get a new configuration.
    pub fn refresh(&self) -> bool {
        let now = self.stamps_now();
        let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        if stamps.0 == now {
            return false;
        }
        match ServerTls::load(&self.cert, &self.key, self.client_ca.as_deref()) {
            Ok(tls) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls);
                stamps.0 = now;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded: new connections get it");
                true
            }
            Err(e) => {
                if stamps.1 != now {
                    tracing::warn!(error = %e, "TLS files changed but do not load: still serving the previous certificate (tried again every second)");
                    stamps.1 = now;
                }
                false
            }
        }
    }

    /// Looks at the files every [`RELOAD_INTERVAL`] on a thread of its own, until dropped.
    pub fn watch(self: &Arc<Self>) -> io::Result<()> {
        crate::filewatch::every("dp-tls-reload", RELOAD_INTERVAL, self, |s| {
            s.refresh();
        })
    }
}

// ---------------------------------------------------------------------------------------
// Client configuration and stream
// ---------------------------------------------------------------------------------------

/// The client's TLS configuration: the CA(s) the data plane's certificate must chain to and,
/// for mutual TLS, the client's own certificate. Cheap to clone (shared); sessions are
/// resumed across connections made with the same `ClientTls`.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "client_cert",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads the client's configuration. `ca`: PEM file of the CA(s) the server's certificate
    /// must chain to (only these; the system's roots are not used). `client`: optional
    /// (certificate chain, private key) PEM files presented for mutual TLS.
    pub fn load(ca: &Path, client: Option<(&Path, &Path)>) -> Result<ClientTls, TlsError> {
        let roots = read_roots(ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let chain = read_certs("client certificate", cert)?;
                let key_der = read_key("client key", key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| TlsError::BadKey {
                        cert: cert.to_path_buf(),
                        key: key.to_path_buf(),
                        detail: key_detail(e),
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<rustls::ClientConfig> {
        &self.config
    }

    /// Wraps a connected blocking socket and completes the handshake at once (within the
    /// socket's read/write timeouts), so a certificate the client does not trust is an error
    /// here, with rustls's reason in the message ("the data plane's certificate is not
    /// trusted: ..."). `server_name`: the DNS name or IP literal the server's certificate must
    /// name.
    ///
    /// With TLS 1.3 a server that refuses this client's certificate (or its lack of one) may
    /// only say so after the client finished its side of the handshake: that refusal is then
    /// the first read's error ("the data plane refused the TLS session with the data plane:
    /// it requires a client certificate ...").
    pub fn connect(
        &self,
        mut tcp: std::net::TcpStream,
        server_name: &str,
    ) -> io::Result<ClientStream> {
        let name = ServerName::try_from(server_name)
            .map(|n| n.to_owned())
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{server_name:?} is neither a DNS name nor an IP address a TLS \
                         certificate can name: {e}"
                    ),
                )
            })?;
        let mut conn = ClientConnection::new(Arc::clone(&self.config), name).map_err(|e| {
            tls_io_error(
                io::ErrorKind::Other,
                format!("TLS setup failed: {e}"),
                Some(e),
            )
        })?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(|e| client_error(e, true))?;
        }
        while conn.wants_write() {
            conn.write_tls(&mut tcp)
                .map_err(|e| client_error(e, true))?;
        }
        Ok(ClientStream::Tls(Box::new(StreamOwned::new(conn, tcp))))
    }
}

/// The client's byte stream: plain TCP or TLS. Implements [`std::io::Read`] and
/// [`std::io::Write`]; TLS failures are errors whose message says what went wrong.
pub enum ClientStream {
    /// Plain TCP.
    Plain(std::net::TcpStream),
    /// TLS over TCP (boxed: the connection state is large).
    Tls(Box<StreamOwned<ClientConnection, std::net::TcpStream>>),
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("tls", &self.is_tls())
            .field("tcp", self.tcp())
            .finish()
    }
}

impl ClientStream {
    /// The TCP socket underneath (to set timeouts or options; reading or writing it directly
    /// corrupts a TLS session).
    pub fn tcp(&self) -> &std::net::TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => &s.sock,
        }
    }

    /// Whether this is a TLS stream.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Closes the stream: a TLS close_notify first (when TLS), then a TCP shutdown of both
    /// directions. Errors are ignored.
    pub fn shutdown(&mut self) {
        match self {
            ClientStream::Plain(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            ClientStream::Tls(s) => {
                s.conn.send_close_notify();
                while s.conn.wants_write() {
                    if s.conn.write_tls(&mut s.sock).is_err() {
                        break;
                    }
                }
                let _ = s.sock.flush();
                let _ = s.sock.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(s) => s.read(buf).map_err(|e| client_error(e, false)),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(s) => s.write(buf).map_err(|e| client_error(e, false)),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write_vectored(bufs),
            ClientStream::Tls(s) => s.write_vectored(bufs).map_err(|e| client_error(e, false)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.flush(),
            ClientStream::Tls(s) => s.flush().map_err(|e| client_error(e, false)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server transport (owner shard, tokio-uring)
// ---------------------------------------------------------------------------------------

/// The error for a close part way through (or before) `n` bytes, `have` of them read.
fn eof_error(have: usize, n: usize) -> io::Error {
    if have == 0 {
        io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed")
    } else {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("truncated frame: {have} of {n} bytes"),
        )
    }
}

/// How long [`ServerTransport::shutdown`] waits for the peer to take the close_notify.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// Ciphertext read per socket read.
const TLS_READ_BYTES: usize = 64 * 1024;

/// rustls's buffer limit for outgoing ciphertext: how much is encrypted per socket write.
const TLS_WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// The owner shard's transport: plain TCP or TLS over a tokio-uring socket.
///
/// Dropping a `read_exact` or `write_all` future before it finishes (a timeout) leaves the
/// stream unusable: close it.
pub enum ServerTransport {
    /// Plain TCP.
    Plain(tokio_uring::net::TcpStream),
    /// TLS.
    Tls(UringTls),
}

impl fmt::Debug for ServerTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTransport")
            .field("tls", &self.is_tls())
            .finish_non_exhaustive()
    }
}

impl ServerTransport {
    /// Replaces `buf`'s contents with exactly `n` bytes read from the peer. A clean close
    /// before any byte is `UnexpectedEof` "peer closed"; a close part way is `UnexpectedEof`
    /// "truncated frame: {have} of {n} bytes". On error `buf` holds the bytes read so far
    /// (none: it is empty). A TLS failure (a record that does not decrypt, a protocol
    /// violation) is `InvalidData` naming it, after the alert was offered to the peer.
    pub async fn read_exact(&mut self, buf: Vec<u8>, n: usize) -> (io::Result<()>, Vec<u8>) {
        match self {
            ServerTransport::Plain(s) => plain_read_exact(s, buf, n).await,
            ServerTransport::Tls(t) => t.read_exact(buf, n).await,
        }
    }

    /// Writes all of `buf` (returned for reuse).
    pub async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            ServerTransport::Plain(s) => s.write_all(buf).await,
            ServerTransport::Tls(t) => t.write_all(buf).await,
        }
    }

    /// Sets `TCP_NODELAY` on the socket.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            ServerTransport::Plain(s) => s.set_nodelay(on),
            ServerTransport::Tls(t) => t.stream.set_nodelay(on),
        }
    }

    /// Closes the connection: a TLS close_notify first (when TLS; a peer that does not take
    /// it within a second is not waited for), then a TCP shutdown of both directions. Errors
    /// are ignored.
    pub async fn shutdown(&mut self) {
        match self {
            ServerTransport::Plain(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            ServerTransport::Tls(t) => t.shutdown().await,
        }
    }

    /// Whether this is a TLS transport.
    pub fn is_tls(&self) -> bool {
        matches!(self, ServerTransport::Tls(_))
    }
}

async fn plain_read_exact(
    stream: &tokio_uring::net::TcpStream,
    mut buf: Vec<u8>,
    n: usize,
) -> (io::Result<()>, Vec<u8>) {
    use tokio_uring::buf::BoundedBuf as _;
    buf.clear();
    buf.reserve(n);
    while buf.len() < n {
        let have = buf.len();
        let (res, slice) = stream.read(buf.slice(have..n)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => return (Err(eof_error(have, n)), buf),
            Ok(_) => {}
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}

/// A TLS server session over a tokio-uring socket: rustls fed from and drained into owned
/// buffers. Plaintext received beyond what a read asked for stays in the session for the
/// next read.
pub struct UringTls {
    stream: tokio_uring::net::TcpStream,
    /// Boxed: the session state is large, the transport is moved around.
    conn: Box<ServerConnection>,
    /// Ciphertext read from the socket; `rbuf[rpos..]` not yet given to rustls.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Ciphertext on its way to the socket (kept for its allocation).
    wbuf: Vec<u8>,
    /// The socket reached end of stream.
    eof: bool,
}

impl fmt::Debug for UringTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringTls")
            .field("protocol", &self.conn.protocol_version())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl UringTls {
    /// Continues the session `conn` (typically from
    /// `tokio_rustls::server::TlsStream::into_inner` after the handshake) over `stream` (the
    /// same socket, moved to tokio-uring). Whatever `conn` already holds — plaintext not yet
    /// read, records not yet processed, records not yet sent — is kept.
    pub fn new(stream: tokio_uring::net::TcpStream, mut conn: ServerConnection) -> UringTls {
        conn.set_buffer_limit(Some(TLS_WRITE_BUFFER_BYTES));
        UringTls {
            stream,
            conn: Box::new(conn),
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::new(),
            eof: false,
        }
    }

    /// The rustls session (the negotiated version, the client's certificate, ...).
    pub fn connection(&self) -> &ServerConnection {
        &self.conn
    }

    async fn read_exact(&mut self, mut buf: Vec<u8>, n: usize) -> (io::Result<()>, Vec<u8>) {
        buf.clear();
        buf.reserve(n);
        while buf.len() < n {
            // Plaintext rustls already holds: take only what was asked for.
            let want = n - buf.len();
            let taken = match self.conn.reader().into_first_chunk() {
                Ok([]) => return (Err(eof_error(buf.len(), n)), buf), // close_notify
                Ok(chunk) => {
                    let k = chunk.len().min(want);
                    buf.extend_from_slice(&chunk[..k]);
                    k
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                // TCP end of stream without close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return (Err(eof_error(buf.len(), n)), buf)
                }
                Err(e) => return (Err(e), buf),
            };
            if taken > 0 {
                self.conn.reader().consume(taken);
                continue;
            }
            // More ciphertext: what we hold first, else from the socket.
            if self.rpos < self.rbuf.len() {
                let mut rest = &self.rbuf[self.rpos..];
                match self.conn.read_tls(&mut rest) {
                    Ok(k) => self.rpos += k,
                    Err(e) => return (Err(e), buf),
                }
            } else {
                // Records handed over unprocessed, or a pending error, surface here.
                match self.conn.process_new_packets() {
                    Ok(st) if st.plaintext_bytes_to_read() > 0 || st.peer_has_closed() => continue,
                    Ok(_) => {}
                    Err(e) => return (Err(self.fail(e).await), buf),
                }
                if self.eof {
                    return (Err(eof_error(buf.len(), n)), buf);
                }
                // Whatever rustls wants to say (a key update's answer, tickets) goes first.
                if let Err(e) = self.flush_tls().await {
                    return (Err(e), buf);
                }
                let mut rbuf = std::mem::take(&mut self.rbuf);
                rbuf.clear();
                rbuf.reserve(TLS_READ_BYTES);
                let (res, rbuf) = self.stream.read(rbuf).await;
                self.rbuf = rbuf;
                self.rpos = 0;
                match res {
                    Ok(0) => {
                        self.eof = true;
                        return (Err(eof_error(buf.len(), n)), buf);
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        self.rbuf.clear();
                        return (Err(e), buf);
                    }
                }
            }
            if let Err(e) = self.conn.process_new_packets() {
                return (Err(self.fail(e).await), buf);
            }
        }
        (Ok(()), buf)
    }

    /// A TLS error: offers the alert rustls queued to the peer, returns `InvalidData`.
    async fn fail(&mut self, e: rustls::Error) -> io::Error {
        let _ = tokio::time::timeout(CLOSE_NOTIFY_WAIT, self.flush_tls()).await;
        tls_io_error(
            io::ErrorKind::InvalidData,
            format!("TLS error: {e}"),
            Some(e),
        )
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut off = 0;
        loop {
            let before = off;
            while off < buf.len() {
                match self.conn.writer().write(&buf[off..]) {
                    Ok(0) => break,
                    Ok(k) => off += k,
                    Err(e) => return (Err(e), buf),
                }
            }
            let pending = self.conn.wants_write();
            if let Err(e) = self.flush_tls().await {
                return (Err(e), buf);
            }
            if off == buf.len() {
                return (Ok(()), buf);
            }
            if off == before && !pending {
                return (
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the TLS session takes no more data (closed?)",
                    )),
                    buf,
                );
            }
        }
    }

    /// Sends every record rustls has queued.
    async fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut out = std::mem::take(&mut self.wbuf);
            out.clear();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut out)?;
            }
            let (res, out) = self.stream.write_all(out).await;
            self.wbuf = out;
            res?;
        }
        Ok(())
    }

    async fn shutdown(&mut self) {
        self.conn.send_close_notify();
        let _ = tokio::time::timeout(CLOSE_NOTIFY_WAIT, self.flush_tls()).await;
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------------------
// Certificate generation
// ---------------------------------------------------------------------------------------

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Every file written, in order: ca.pem, ca.key, server.pem, server.key, then
    /// client-<name>.pem and client-<name>.key per client.
    pub files: Vec<PathBuf>,
}

/// Validity of the generated CA.
const CA_DAYS: u64 = 3650;
/// Validity of the generated server and client certificates (the most browsers and many
/// tools accept for a leaf).
const LEAF_DAYS: u64 = 825;
/// Certificates are valid from this long before their creation (clock skew).
const BACKDATE: Duration = Duration::from_secs(3600);

fn gen_error(e: rcgen::Error) -> TlsError {
    TlsError::Generate {
        detail: e.to_string(),
    }
}

fn valid_client_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("1 to 64 characters expected".to_string());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed (letters, digits, '.', '_' and '-' only)"
        ));
    }
    if name.starts_with('.') {
        return Err("must not start with '.'".to_string());
    }
    Ok(())
}

/// A leaf certificate's parameters: `base` (validity) with `common_name` and `usage`.
fn leaf_params(
    common_name: &str,
    usage: rcgen::ExtendedKeyUsagePurpose,
    base: &rcgen::CertificateParams,
) -> rcgen::CertificateParams {
    let mut p = base.clone();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "deltavol");
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p.use_authority_key_identifier_extension = true;
    p
}

/// Writes a CA, a server certificate for `hosts` (DNS names and/or IP literals, all as
/// subject alternative names) and one client certificate per name in `clients` into `dir`
/// (created, mode 0700, if missing): `ca.pem`, `ca.key`, `server.pem`, `server.key`,
/// `client-<name>.pem`, `client-<name>.key`. Keys are written with mode 0600. Refuses (an
/// error, nothing written) when any of those files exists. ECDSA P-256; the CA is valid for
/// 10 years, the others for 825 days (all from an hour ago).
///
/// The server loads `server.pem`/`server.key` (and `ca.pem` as its client CA for mutual TLS);
/// clients load `ca.pem` (and their `client-<name>` pair). `ca.key` signs further
/// certificates: keep it off the servers.
pub fn generate(dir: &Path, hosts: &[String], clients: &[String]) -> Result<Generated, TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::InvalidName {
            what: "host",
            name: String::new(),
            why: "the server certificate needs at least one DNS name or IP address".to_string(),
        });
    }
    for h in hosts {
        if h.parse::<std::net::IpAddr>().is_err() {
            ServerName::try_from(h.as_str()).map_err(|e| TlsError::InvalidName {
                what: "host",
                name: h.clone(),
                why: format!("neither an IP address nor a DNS name ({e})"),
            })?;
        }
    }
    for (i, c) in clients.iter().enumerate() {
        valid_client_name(c).map_err(|why| TlsError::InvalidName {
            what: "client name",
            name: c.clone(),
            why,
        })?;
        if clients[..i].contains(c) {
            return Err(TlsError::InvalidName {
                what: "client name",
                name: c.clone(),
                why: "given twice".to_string(),
            });
        }
    }

    let mut names = vec![
        "ca.pem".to_string(),
        "ca.key".to_string(),
        "server.pem".to_string(),
        "server.key".to_string(),
    ];
    for c in clients {
        names.push(format!("client-{c}.pem"));
        names.push(format!("client-{c}.key"));
    }
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    for p in &paths {
        if p.symlink_metadata().is_ok() {
            return Err(TlsError::Exists { path: p.clone() });
        }
    }

    // Everything in memory first.
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| TlsError::Generate {
            detail: format!("the clock is before 1970: {e}"),
        })?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    let day = Duration::from_secs(86_400);
    let mut base = rcgen::CertificateParams::default();
    base.not_before = now - BACKDATE;
    base.not_after = now + day * LEAF_DAYS as u32;

    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = rcgen::KeyPair::generate_for(alg).map_err(gen_error)?;
    let mut ca = base.clone();
    ca.not_after = now + day * CA_DAYS as u32;
    ca.distinguished_name = rcgen::DistinguishedName::new();
    // A name of its own per CA (from its key): a certificate of another `generate` run is
    // then "unknown issuer", not a bad signature from a CA of the same name.
    let ca_tag: String = {
        use sha2::Digest;
        sha2::Sha256::digest(ca_key.public_key_der())[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    ca.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("deltavol data plane CA {ca_tag}"),
    );
    ca.distinguished_name
        .push(rcgen::DnType::OrganizationName, "deltavol");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_error)?;

    let mut contents: Vec<String> = vec![ca_cert.pem(), ca_key.serialize_pem()];
    let server_key = rcgen::KeyPair::generate_for(alg).map_err(gen_error)?;
    let mut sp = leaf_params(&hosts[0], rcgen::ExtendedKeyUsagePurpose::ServerAuth, &base);
    sp.subject_alt_names = rcgen::CertificateParams::new(hosts.to_vec())
        .map_err(|e| TlsError::InvalidName {
            what: "host",
            name: hosts.join(", "),
            why: e.to_string(),
        })?
        .subject_alt_names;
    let server_cert = sp
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(gen_error)?;
    contents.push(server_cert.pem());
    contents.push(server_key.serialize_pem());
    for c in clients {
        let key = rcgen::KeyPair::generate_for(alg).map_err(gen_error)?;
        let p = leaf_params(c, rcgen::ExtendedKeyUsagePurpose::ClientAuth, &base);
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(gen_error)?;
        contents.push(cert.pem());
        contents.push(key.serialize_pem());
    }

    write_files(dir, &paths, &contents)?;
    Ok(Generated { files: paths })
}

/// Creates `dir` (0700) if missing and writes each file anew (`.key` files 0600, the others
/// 0644); on a failure removes what it wrote.
fn write_files(dir: &Path, paths: &[PathBuf], contents: &[String]) -> Result<(), TlsError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| TlsError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let write_one = |path: &Path, text: &str| -> io::Result<()> {
        let secret = path.extension().is_some_and(|e| e == "key");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    for (i, (path, text)) in paths.iter().zip(contents).enumerate() {
        if let Err(source) = write_one(path, text) {
            let created = if source.kind() == io::ErrorKind::AlreadyExists {
                i
            } else {
                i + 1
            };
            for p in &paths[..created] {
                let _ = std::fs::remove_file(p);
            }
            return Err(if source.kind() == io::ErrorKind::AlreadyExists {
                TlsError::Exists { path: path.clone() }
            } else {
                TlsError::Write {
                    path: path.clone(),
                    source,
                }
            });
        }
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
