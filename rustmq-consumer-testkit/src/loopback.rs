//! [`LoopbackBroker`]: a [`SharedBroker`] served over real QUIC on 127.0.0.1 (feature `quic`).
//!
//! It speaks the wire protocol of PROTOCOL.md the way the real broker does: one bidirectional
//! stream per request; the request is read to its end but never past 8192 bytes (a bigger frame
//! gets the `0xFF` error frame, as the real broker's single 8 KiB read fails to decode it); an
//! unknown type byte gets a FIN with zero bytes; a [`BrokerError`](crate::BrokerError) becomes
//! the `0xFF` error frame. It presents a freshly generated self-signed certificate for
//! `localhost`, configures no ALPN, allows 1000 concurrent bidirectional streams and has a 30 s
//! idle timeout with no keep-alive of its own.
//!
//! Unlike the real broker, its certificate can be trusted ([`LoopbackBroker::certificate_der`],
//! [`LoopbackBroker::client_config`]), so tests run with verification on, and a failed
//! handshake does not end its accept loop.
//!
//! The server is runtime-agnostic: it runs on the `quinn::Runtime` it is given (tokio or smol),
//! reading time from it and spawning its tasks on it.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{
    AsyncUdpSocket, Endpoint, EndpointConfig, IdleTimeout, ReadToEndError, TransportConfig,
    UdpPoller, VarInt,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustmq_consumer_core::codec::{self, CodecError};
use rustmq_consumer_core::protocol::MAX_REQUEST_FRAME;
use rustmq_consumer_core::quic::{QuicConfig, RootCerts, TlsMode};
use thiserror::Error;
use tracing::{debug, info, trace};

use crate::broker::REAPER_INTERVAL;
use crate::transport::SharedBroker;

/// The name the loopback broker's certificate is valid for.
pub const LOOPBACK_SERVER_NAME: &str = "localhost";

/// Why the loopback broker could not start.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LoopbackError {
    /// The certificate could not be generated.
    #[error("cannot generate the certificate: {0}")]
    Certificate(String),
    /// rustls or quinn refused the server configuration.
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
    /// The UDP socket could not be bound or served.
    #[error("cannot serve on {addr}: {message}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        message: String,
    },
}

/// A fault the next requests get instead of (or on top of) a faithful answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The request is handled, but the answer is bytes that are no RustMQ frame at all.
    Garbage,
    /// The request is handled, but only the first half of its response frame is sent.
    Truncated,
    /// The request is not handled; the answer is the `0xFF` error frame `Error: injected fault`.
    ErrorFrame,
    /// The request is not handled; the answer is a FIN with zero bytes (as for an unknown
    /// request type).
    Empty,
}

/// The text of the error frame [`Fault::ErrorFrame`] sends (after `Error: `).
pub const INJECTED_ERROR: &str = "injected fault";

/// The longest [`LoopbackBroker::stop`] waits for connections to drain.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);

const GARBAGE: &[u8] = b"\x7fthis is not a RustMQ frame";

/// A [`SharedBroker`] served over QUIC on `127.0.0.1`, on a port of its own.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use rustmq_consumer_core::quic::{quinn, QuicTransport};
/// # use rustmq_consumer_testkit::{LoopbackBroker, SharedBroker};
/// # fn run(broker: SharedBroker) -> Result<(), Box<dyn std::error::Error>> {
/// let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
/// let loopback = LoopbackBroker::start(broker.clone(), Arc::clone(&runtime))?;
/// let transport = QuicTransport::new(loopback.client_config(), runtime)?;
/// # Ok(())
/// # }
/// ```
///
/// [`stop`](Self::stop) and [`restart`](Self::restart) take the server down and bring it back
/// on the same port (the broker's state is kept: call [`SimBroker::restart`] on it to lose
/// groups and commits as the real broker does); [`kill`](Self::kill) takes it down without a
/// word, like `kill -9`. Dropping it stops the server.
///
/// [`SimBroker::restart`]: crate::SimBroker::restart
pub struct LoopbackBroker {
    shared: Arc<Shared>,
    runtime: Arc<dyn quinn::Runtime>,
    server_config: quinn::ServerConfig,
    certificate: Vec<u8>,
    addr: SocketAddr,
    server: Mutex<Option<Server>>,
}

struct Shared {
    broker: SharedBroker,
    faults: Mutex<VecDeque<Fault>>,
    requests: AtomicU64,
    connections: AtomicU64,
}

struct Server {
    endpoint: Endpoint,
    socket: Arc<KillableSocket>,
    /// Dropping it stops the reaper task.
    _stop: async_channel::Sender<()>,
}

impl fmt::Debug for LoopbackBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopbackBroker")
            .field("addr", &self.addr)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl LoopbackBroker {
    /// Serves `broker` on `127.0.0.1` (a free port) over `runtime`. Call it from inside that
    /// runtime (quinn's tokio runtime needs a tokio context to wrap the socket).
    pub fn start(
        broker: SharedBroker,
        runtime: Arc<dyn quinn::Runtime>,
    ) -> Result<Self, LoopbackError> {
        let (server_config, certificate) = server_config()?;
        let any_port: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        let bind_error = |e: std::io::Error| LoopbackError::Bind {
            addr: any_port,
            message: e.to_string(),
        };
        let socket = UdpSocket::bind(any_port).map_err(bind_error)?;
        let addr = socket.local_addr().map_err(bind_error)?;
        let this = Self {
            shared: Arc::new(Shared {
                broker,
                faults: Mutex::new(VecDeque::new()),
                requests: AtomicU64::new(0),
                connections: AtomicU64::new(0),
            }),
            runtime,
            server_config,
            certificate,
            addr,
            server: Mutex::new(None),
        };
        this.serve(socket)?;
        Ok(this)
    }

    /// The server's address (`127.0.0.1:<port>`; the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server certificate (DER), self-signed for [`LOOPBACK_SERVER_NAME`]; trust it to
    /// connect with verification on.
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate
    }

    /// A client config for this server that verifies its certificate.
    pub fn client_config(&self) -> QuicConfig {
        QuicConfig::new(self.addr, LOOPBACK_SERVER_NAME).with_tls(TlsMode::Verify {
            roots: RootCerts::from_der([self.certificate.clone()]),
        })
    }

    /// The broker behind the server.
    pub fn broker(&self) -> &SharedBroker {
        &self.shared.broker
    }

    /// Whether the server is running (not stopped or shut down).
    pub fn is_running(&self) -> bool {
        self.lock_server().is_some()
    }

    /// Request streams read so far (faulted ones included; refused oversize frames excluded).
    pub fn requests_served(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Connections whose handshake succeeded so far, over every restart.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The next `count` requests get `fault` (after any faults already queued).
    pub fn inject(&self, fault: Fault, count: usize) {
        let mut faults = lock(&self.shared.faults);
        faults.extend(std::iter::repeat_n(fault, count));
        debug!(?fault, count, queued = faults.len(), "faults injected");
    }

    /// Closes the server at once: connections are closed, the port is released soon after.
    /// Idempotent. [`restart`](Self::restart) serves again on the same port.
    pub fn shutdown(&self) {
        if let Some(server) = self.lock_server().take() {
            server
                .endpoint
                .close(VarInt::from_u32(0), b"broker shutting down");
            info!(addr = %self.addr, "loopback broker stopped");
        }
    }

    /// Takes the server down the way `kill -9` does: from now on it sends nothing (no
    /// `CONNECTION_CLOSE`, no acknowledgement) and reads nothing, and its socket is released
    /// soon after, so clients learn of it only by silence. Idempotent.
    /// [`restart`](Self::restart) serves again on the same port.
    pub fn kill(&self) {
        if let Some(server) = self.lock_server().take() {
            server.socket.kill();
            // Releases the connections' state and then the socket; what it sends is lost.
            server.endpoint.close(VarInt::from_u32(0), b"killed");
            info!(addr = %self.addr, "loopback broker killed");
        }
    }

    /// Like [`shutdown`](Self::shutdown), then waits until the connections have drained, for
    /// at most [`DRAIN_GRACE`] of real time (quinn keeps a connection whose handshake the peer
    /// aborted until its idle timeout, 30 s, and that is no reason to hold a test up).
    pub async fn stop(&self) {
        let endpoint = self.lock_server().as_ref().map(|s| s.endpoint.clone());
        self.shutdown();
        if let Some(endpoint) = endpoint {
            let drained = async {
                endpoint.wait_idle().await;
                true
            };
            let grace = async {
                sleep(&*self.runtime, DRAIN_GRACE).await;
                false
            };
            if !futures_lite::future::or(drained, grace).await {
                debug!(addr = %self.addr, "connections still draining after the grace period");
            }
        }
    }

    /// Serves again on the same port after [`stop`](Self::stop), [`shutdown`](Self::shutdown)
    /// or [`kill`](Self::kill) (a no-op while running).
    /// Waits, boundedly, for the old socket to release the port.
    pub async fn restart(&self) -> Result<(), LoopbackError> {
        if self.is_running() {
            return Ok(());
        }
        // The old endpoint's driver releases the socket asynchronously once its last handle
        // is gone: retry the bind for up to ~5 s of real time.
        let mut attempts = 0;
        let socket = loop {
            match UdpSocket::bind(self.addr) {
                Ok(socket) => break socket,
                Err(e) if attempts < 500 => {
                    trace!(addr = %self.addr, error = %e, "port still busy");
                    attempts += 1;
                    sleep(&*self.runtime, Duration::from_millis(10)).await;
                }
                Err(e) => {
                    return Err(LoopbackError::Bind {
                        addr: self.addr,
                        message: e.to_string(),
                    })
                }
            }
        };
        self.serve(socket)?;
        info!(addr = %self.addr, "loopback broker restarted");
        Ok(())
    }

    fn lock_server(&self) -> MutexGuard<'_, Option<Server>> {
        lock(&self.server)
    }

    /// Starts the endpoint, its accept loop and the reaper on `socket`.
    fn serve(&self, socket: UdpSocket) -> Result<(), LoopbackError> {
        let bind_error = |e: io::Error| LoopbackError::Bind {
            addr: self.addr,
            message: e.to_string(),
        };
        let socket = Arc::new(KillableSocket {
            inner: self.runtime.wrap_udp_socket(socket).map_err(bind_error)?,
            killed: AtomicBool::new(false),
        });
        let endpoint = Endpoint::new_with_abstract_socket(
            EndpointConfig::default(),
            Some(self.server_config.clone()),
            socket.clone(),
            self.runtime.clone(),
        )
        .map_err(bind_error)?;
        let (stop, stopped) = async_channel::bounded::<()>(1);
        self.runtime.spawn(Box::pin(accept_loop(
            endpoint.clone(),
            self.shared.clone(),
            self.runtime.clone(),
        )));
        self.runtime.spawn(Box::pin(reaper(
            self.shared.clone(),
            self.runtime.clone(),
            stopped,
        )));
        *self.lock_server() = Some(Server {
            endpoint,
            socket,
            _stop: stop,
        });
        info!(addr = %self.addr, "loopback broker serving");
        Ok(())
    }
}

impl Drop for LoopbackBroker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The server's UDP socket, which [`LoopbackBroker::kill`] turns into a black hole: once
/// killed, every datagram sent is dropped (reported as sent) and every datagram received is
/// discarded. The OS socket is closed when quinn lets go of it.
#[derive(Debug)]
struct KillableSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    killed: AtomicBool,
}

impl KillableSocket {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
    }

    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

impl AsyncUdpSocket for KillableSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.is_killed() {
            trace!(to = %transmit.destination, "killed: datagram dropped");
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(_)) if self.is_killed() => {
                    trace!("killed: datagrams discarded");
                }
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent: a panic elsewhere is no reason
    // to stop serving.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn sleep(runtime: &dyn quinn::Runtime, duration: Duration) {
    sleep_until(runtime, runtime.now() + duration).await;
}

async fn sleep_until(runtime: &dyn quinn::Runtime, deadline: Instant) {
    let mut timer = runtime.new_timer(deadline);
    poll_fn(|cx| timer.as_mut().poll(cx)).await;
}

/// A fresh self-signed certificate for `localhost` and the server config presenting it.
fn server_config() -> Result<(quinn::ServerConfig, Vec<u8>), LoopbackError> {
    let certified = rcgen::generate_simple_self_signed(vec![LOOPBACK_SERVER_NAME.to_owned()])
        .map_err(|e| LoopbackError::Certificate(e.to_string()))?;
    let certificate = certified.cert.der().to_vec();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LoopbackError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(certificate.clone())], key)
        .map_err(|e| LoopbackError::Tls(e.to_string()))?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| LoopbackError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = TransportConfig::default();
    transport.max_concurrent_bidi_streams(VarInt::from_u32(1000));
    transport.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(30_000))));
    transport.keep_alive_interval(None);
    config.transport_config(Arc::new(transport));
    Ok((config, certificate))
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>, runtime: Arc<dyn quinn::Runtime>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        let rt = runtime.clone();
        runtime.spawn(Box::pin(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    debug!(%remote, %error, "handshake failed");
                    return;
                }
            };
            shared.connections.fetch_add(1, Ordering::SeqCst);
            debug!(%remote, "connection accepted");
            loop {
                match connection.accept_bi().await {
                    Ok((send, recv)) => {
                        rt.spawn(Box::pin(serve_stream(
                            shared.clone(),
                            rt.clone(),
                            send,
                            recv,
                        )));
                    }
                    Err(error) => {
                        debug!(%remote, %error, "connection ended");
                        return;
                    }
                }
            }
        }));
    }
    debug!("accept loop ended");
}

async fn serve_stream(
    shared: Arc<Shared>,
    runtime: Arc<dyn quinn::Runtime>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let stream = send.id();
    let answer = match recv.read_to_end(MAX_REQUEST_FRAME).await {
        Ok(frame) => {
            shared.requests.fetch_add(1, Ordering::SeqCst);
            let fault = lock(&shared.faults).pop_front();
            answer(&shared, &*runtime, &frame, fault)
        }
        Err(ReadToEndError::TooLong) => codec::encode_error_frame(&format!(
            "Serialization error: request exceeds the {MAX_REQUEST_FRAME}-byte read buffer"
        )),
        Err(ReadToEndError::Read(error)) => {
            debug!(%stream, %error, "request stream failed");
            return;
        }
    };
    trace!(%stream, bytes = answer.len(), "answering");
    if let Err(error) = send.write_all(&answer).await {
        debug!(%stream, %error, "cannot write the response");
        return;
    }
    if let Err(error) = send.finish() {
        debug!(%stream, %error, "cannot finish the response");
    }
}

/// The bytes the broker answers `frame` with, under `fault`.
fn answer(
    shared: &Shared,
    runtime: &dyn quinn::Runtime,
    frame: &[u8],
    fault: Option<Fault>,
) -> Bytes {
    let request = match codec::decode_request(frame) {
        Ok(request) => request,
        Err(CodecError::UnknownType(byte)) => {
            debug!(type_byte = byte, "unknown request type: empty answer");
            return Bytes::new();
        }
        Err(error) => {
            debug!(%error, "undecodable request");
            return codec::encode_error_frame(&format!("Serialization error: {error}"));
        }
    };
    match fault {
        Some(Fault::ErrorFrame) => return codec::encode_error_frame(INJECTED_ERROR),
        Some(Fault::Empty) => return Bytes::new(),
        _ => {}
    }
    let now = runtime.now();
    let result = {
        let mut broker = shared.broker.lock();
        broker.handle_timeout(now);
        broker.handle(now, request)
    };
    let response = match result {
        Ok(response) => codec::encode_response(&response),
        Err(error) => codec::encode_error_frame(&error.0),
    };
    match fault {
        Some(Fault::Garbage) => Bytes::from_static(GARBAGE),
        Some(Fault::Truncated) => response.slice(..(response.len() / 2).max(1)),
        _ => response,
    }
}

/// Runs the broker's session reaper when due (at least every [`REAPER_INTERVAL`]) until
/// `stopped` closes.
async fn reaper(
    shared: Arc<Shared>,
    runtime: Arc<dyn quinn::Runtime>,
    stopped: async_channel::Receiver<()>,
) {
    loop {
        let now = runtime.now();
        let due = shared
            .broker
            .lock()
            .poll_timeout()
            .map_or(now + REAPER_INTERVAL, |due| due.min(now + REAPER_INTERVAL));
        let tick = async {
            sleep_until(&*runtime, due).await;
            true
        };
        let stop = async {
            let _ = stopped.recv().await;
            false
        };
        if !futures_lite::future::or(stop, tick).await {
            trace!("reaper stopped");
            return;
        }
        shared.broker.lock().handle_timeout(runtime.now());
    }
}
