//! [`QuicConfig`]: where the broker is, how to trust it, and the connection's timers.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::QuicError;

/// How a [`QuicTransport`](super::QuicTransport) reaches one broker.
///
/// Build it with [`QuicConfig::new`] and the `with_*` methods; the defaults verify the broker's
/// certificate against the bundled Mozilla roots, offer no ALPN, send a keep-alive every
/// second and give a broker up after 3 s without a packet from it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QuicConfig {
    /// The broker's UDP address.
    pub server_addr: SocketAddr,
    /// The name the broker's certificate must be valid for (also sent as SNI).
    pub server_name: String,
    /// How the broker's certificate is checked. Default: [`TlsMode::Verify`] with
    /// [`RootCerts::WebPki`].
    pub tls: TlsMode,
    /// ALPN protocols to offer, in preference order. Default: none. Today's RustMQ broker
    /// configures no ALPN and fails the handshake of any client that offers one, after which its
    /// accept loop stops; leave this empty for it.
    pub alpn: Vec<Vec<u8>>,
    /// Interval between QUIC keep-alive pings. Default 1 s. The broker sends no keep-alives of
    /// its own and closes a connection idle for 30 s; the pings keep it open, and their
    /// acknowledgements are what tells a live broker from a dead one while no request is
    /// answered (see [`idle_timeout`](Self::idle_timeout)). Must be shorter than the idle
    /// timeout.
    pub keep_alive_interval: Duration,
    /// How long the connection may go without receiving any packet from the broker before it is
    /// considered dead: it is then closed, the requests in flight on it fail with
    /// [`TransportError::ConnectionLost`](crate::TransportError::ConnectionLost) (which the
    /// core's breaker counts and its owners retry) and the next request connects anew.
    /// Default 3 s.
    ///
    /// This is the only way to notice a broker that died without closing the connection
    /// (killed, host gone, network cut): a restarted broker does not know the old connection
    /// and its stateless resets cannot be authenticated, so without it every request sent on
    /// the dead connection waits out its deadline. With the default keep-alive a live broker
    /// acknowledges a ping every second even while it is slow to answer requests
    /// (acknowledgements come from its QUIC stack, not from request handling), so 3 s without
    /// a packet means about three keep-alives in a row went unanswered. QUIC applies the smaller of both peers' values (the broker's is
    /// 30 s) and never less than three probe timeouts (a few round trips), so a slow link is
    /// not cut short.
    pub idle_timeout: Duration,
    /// How long a handshake may take before the attempt counts as failed. Default 2.5 s: well
    /// within the consumer's default `request_timeout` (an unreachable broker is reported as
    /// such, not as a request deadline), and short enough that a broker back during an outage
    /// is found by the next attempt rather than after a long wait.
    pub connect_timeout: Duration,
    /// Wait after the first failed connection attempt before the next one. Doubles with each
    /// consecutive failure up to [`reconnect_backoff_max`](Self::reconnect_backoff_max).
    /// Default 100 ms.
    pub reconnect_backoff_min: Duration,
    /// Longest wait between connection attempts. Default 5 s.
    pub reconnect_backoff_max: Duration,
    /// Local address of the client's UDP socket. Default: the unspecified address of the
    /// server's family, port 0.
    pub bind_addr: Option<SocketAddr>,
    /// Receive buffer asked for the client's UDP socket (`SO_RCVBUF`), in bytes; 0 keeps the
    /// operating system's default. Default 2 MiB ([`DEFAULT_UDP_RECEIVE_BUFFER`]).
    ///
    /// Fetch answers arrive in bursts (two 1 MiB fetches in flight per partition are a few
    /// hundred kilobytes on the wire), and Linux's default buffer (208 KiB) overflows when the
    /// runtime is slow to read it for a moment: the packets it drops are the tail of an answer,
    /// which the broker resends only after a probe timeout, tens of milliseconds later.
    /// Measured against the real broker on loopback: 9-24 datagrams dropped per six to eight
    /// runs of 200,000 records with Linux's default, none with 2 MiB. Linux caps the buffer at
    /// `net.core.rmem_max`; the transport logs the size granted at `debug`, and at `info` when
    /// it is less than asked.
    pub udp_receive_buffer: usize,
}

/// The default of [`QuicConfig::udp_receive_buffer`]: 2 MiB.
pub const DEFAULT_UDP_RECEIVE_BUFFER: usize = 2 * 1024 * 1024;

impl QuicConfig {
    /// A config for the broker at `server_addr` whose certificate is valid for `server_name`,
    /// with every other field at its default.
    pub fn new(server_addr: SocketAddr, server_name: impl Into<String>) -> Self {
        Self {
            server_addr,
            server_name: server_name.into(),
            tls: TlsMode::default(),
            alpn: Vec::new(),
            keep_alive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_millis(2500),
            reconnect_backoff_min: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(5),
            bind_addr: None,
            udp_receive_buffer: DEFAULT_UDP_RECEIVE_BUFFER,
        }
    }

    /// Sets how the broker's certificate is checked.
    pub fn with_tls(mut self, tls: TlsMode) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the ALPN protocols to offer (none by default; see [`alpn`](Self::alpn)).
    pub fn with_alpn(mut self, alpn: Vec<Vec<u8>>) -> Self {
        self.alpn = alpn;
        self
    }

    /// Sets the keep-alive interval (shorter than the idle timeout; see
    /// [`keep_alive_interval`](Self::keep_alive_interval)).
    pub fn with_keep_alive_interval(mut self, interval: Duration) -> Self {
        self.keep_alive_interval = interval;
        self
    }

    /// Sets how long the connection may receive nothing before it is considered dead (see
    /// [`idle_timeout`](Self::idle_timeout)).
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the handshake timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the reconnect backoff range.
    pub fn with_reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_backoff_min = min;
        self.reconnect_backoff_max = max.max(min);
        self
    }

    /// Sets the local address of the client's UDP socket.
    pub fn with_bind_addr(mut self, addr: SocketAddr) -> Self {
        self.bind_addr = Some(addr);
        self
    }

    /// Sets the receive buffer asked for the client's UDP socket (0: the system's default).
    pub fn with_udp_receive_buffer(mut self, bytes: usize) -> Self {
        self.udp_receive_buffer = bytes;
        self
    }
}

/// How the broker's certificate is checked.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TlsMode {
    /// Verify the certificate chain against `roots` and the name against
    /// [`QuicConfig::server_name`]. The default.
    Verify {
        /// The trust anchors.
        roots: RootCerts,
    },
    /// Accept **any** certificate for any name (the handshake signature is still checked, so
    /// the peer holds the key of the certificate it showed, whoever it is).
    ///
    /// This exists for today's RustMQ broker, which presents a self-signed certificate that it
    /// regenerates at every start and never writes to disk: no client can pin or trust it. It
    /// gives no protection against an active attacker on the path; use it only on networks you
    /// trust, and prefer [`TlsMode::Verify`] with the broker's CA as soon as the broker has a
    /// stable certificate. A warning is logged when a transport is built with it.
    DangerousAcceptAnyCertificate,
}

impl Default for TlsMode {
    /// [`TlsMode::Verify`] against [`RootCerts::WebPki`].
    fn default() -> Self {
        Self::Verify {
            roots: RootCerts::default(),
        }
    }
}

/// Trust anchors for [`TlsMode::Verify`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum RootCerts {
    /// The Mozilla root program, bundled at build time by `webpki-roots` (works offline and
    /// identically on every machine). The default.
    #[default]
    WebPki,
    /// These DER-encoded certificates (a private CA, or a broker's own self-signed
    /// certificate).
    Certificates(Vec<Vec<u8>>),
}

impl RootCerts {
    /// Trust exactly these DER-encoded certificates.
    pub fn from_der<I, C>(certificates: I) -> Self
    where
        I: IntoIterator<Item = C>,
        C: Into<Vec<u8>>,
    {
        Self::Certificates(certificates.into_iter().map(Into::into).collect())
    }

    /// Trust every `CERTIFICATE` in this PEM text (other PEM sections are skipped).
    pub fn from_pem(pem: &[u8]) -> Result<Self, QuicError> {
        let mut certificates = Vec::new();
        for certificate in CertificateDer::pem_slice_iter(pem) {
            let certificate =
                certificate.map_err(|e| QuicError::InvalidCertificate(e.to_string()))?;
            certificates.push(certificate.as_ref().to_vec());
        }
        if certificates.is_empty() {
            return Err(QuicError::InvalidCertificate(
                "no CERTIFICATE section in the PEM text".to_owned(),
            ));
        }
        Ok(Self::Certificates(certificates))
    }
}
