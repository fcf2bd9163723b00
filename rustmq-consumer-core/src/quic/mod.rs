//! The QUIC transport to a RustMQ broker (feature `quic`).
//!
//! [`QuicTransport`] implements the driver's [`Transport`] over one quinn connection: every
//! request gets its own bidirectional stream (the stream is the correlation, as PROTOCOL.md
//! says), so any number of requests are in flight at once. The frame is
//! [`codec::encode_request`]'s, the send side is finished after it, and the response is read to
//! its end under the [`MAX_RESPONSE_FRAME`] cap and decoded with [`codec::decode_response_bytes`].
//!
//! The transport is runtime-agnostic: it takes quinn's runtime as a value
//! (`Arc<dyn quinn::Runtime>`: `quinn::TokioRuntime` with feature `quic-tokio`,
//! `quinn::SmolRuntime` with feature `quic-smol`). TLS always uses rustls' `ring` provider,
//! passed explicitly, and TLS 1.3.
//!
//! # Connection life cycle
//!
//! Nothing touches the network until the first request (or [`QuicTransport::connect`]): the
//! UDP endpoint and the connection are made lazily, inside the runtime. A request that finds
//! the connection closed starts a new handshake, which concurrent requests share. After a
//! failed attempt the next one waits a backoff (doubling from
//! [`QuicConfig::reconnect_backoff_min`] to [`QuicConfig::reconnect_backoff_max`]); requests in
//! that window fail at once, with the last attempt's error. A handshake refused over TLS (the
//! broker's certificate rejected, with the rustls reason, or a TLS alert from the broker) is
//! [`TransportError::Tls`], permanent; a handshake nothing answered in time or the peer refused
//! is [`TransportError::Connect`]; every later connection or stream failure is
//! [`TransportError::ConnectionLost`]. The core's circuit breaker counts them all.
//!
//! A broker that dies without closing the connection (killed, its host gone) is noticed by
//! silence: the transport sends a keep-alive every [`QuicConfig::keep_alive_interval`] and
//! quinn closes a connection that received nothing for [`QuicConfig::idle_timeout`] (3 s by
//! default), failing the requests in flight on it with [`TransportError::ConnectionLost`].
//! Without it a broker restarted on the same port would stay unnoticed until each request's
//! deadline: it answers the old connection's packets with stateless resets the client cannot
//! authenticate (they come from a different reset key), so they are ignored, as they must be.
//!
//! # Absences
//!
//! No lock is held across an `.await`; the transport never retries a request (the core owns
//! retries and deadlines); it never logs at a level above `debug!` per request.

// This module is I/O glue beside the sans-IO machine, not part of it: one `std::sync::Mutex`
// guards the connection handle, and it is never held across an `.await`.
#![allow(clippy::disallowed_types)]

mod config;
mod tls;

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{
    ClientConfig, Connection, ConnectionError, Endpoint, EndpointConfig, IdleTimeout, ReadError,
    TransportConfig, TransportErrorCode, VarInt, WriteError,
};
use thiserror::Error;
use tracing::{debug, info, trace, warn};

use crate::codec::{self, MAX_RESPONSE_FRAME};
use crate::driver::Transport;
use crate::error::TransportError;
use crate::protocol::{Request, Response};

pub use config::{QuicConfig, RootCerts, TlsMode, DEFAULT_UDP_RECEIVE_BUFFER};
/// The quinn this transport is built on, for its runtimes (`quinn::TokioRuntime`,
/// `quinn::SmolRuntime`) without a second dependency on it.
pub use quinn;

/// Why a [`QuicTransport`] could not be built. Nothing touched the network.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum QuicError {
    /// A trust-anchor certificate could not be parsed or used.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// rustls or quinn refused the TLS configuration.
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
    /// A timer or timeout is out of range.
    #[error("invalid transport configuration: {0}")]
    Config(String),
}

/// The round trip assumed before the first is measured (quinn's default is RFC 9002's 333 ms).
/// It paces the handshake's retransmissions: with 100 ms the first Initial is sent again after
/// about 0.3 s, 0.9 s and 2.1 s, so a broker back during a handshake attempt is found within
/// about a second instead of waiting out the attempt.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// The application error code the client closes its connection with (QUIC "no error").
const CLOSE_CODE: u32 = 0;
/// The code a response stream is stopped with when it exceeds the size cap.
const STOP_TOO_LARGE: u32 = 1;

/// A [`Transport`] to one RustMQ broker over QUIC. Cheap to clone; clones share the
/// connection.
///
/// ```no_run
/// # use std::net::SocketAddr;
/// # use std::sync::Arc;
/// # use rustmq_consumer_core::quic::{quinn, QuicConfig, QuicTransport, RootCerts, TlsMode};
/// # use rustmq_consumer_core::{ConsumerBuilder, Runtime};
/// # async fn run<R: Runtime + Default>(
/// #     addr: SocketAddr,
/// #     ca_pem: &[u8],
/// #     quic_runtime: Arc<dyn quinn::Runtime>, // e.g. `Arc::new(quinn::TokioRuntime)`
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// let config = QuicConfig::new(addr, "localhost")
///     .with_tls(TlsMode::Verify { roots: RootCerts::from_pem(ca_pem)? });
/// let transport = QuicTransport::new(config, quic_runtime)?;
/// let consumer = ConsumerBuilder::<R>::new()
///     .topic("orders")
///     .consumer_group("billing")
///     .client(transport)
///     .build()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct QuicTransport {
    inner: Arc<Inner>,
}

struct Inner {
    server_addr: SocketAddr,
    server_name: String,
    bind_addr: SocketAddr,
    /// `SO_RCVBUF` asked for the endpoint's socket (0: the system's default).
    udp_receive_buffer: usize,
    connect_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    client_config: ClientConfig,
    runtime: Arc<dyn quinn::Runtime>,
    state: Mutex<State>,
}

type ConnectFuture = Shared<BoxFuture<'static, Result<Connection, TransportError>>>;

struct State {
    endpoint: Option<Endpoint>,
    link: Link,
    /// Numbers connection attempts, so a late finisher cannot overwrite a newer attempt.
    attempt: u64,
    closed: bool,
}

enum Link {
    /// No connection. `retry_at` is set after a failed attempt.
    Idle {
        failures: u32,
        retry_at: Option<Instant>,
        last_error: Option<TransportError>,
    },
    /// A handshake is in progress; requests wait for it together.
    Connecting {
        attempt: u64,
        failures: u32,
        future: ConnectFuture,
    },
    /// Connected (maybe closed since: checked on use).
    Connected(Connection),
}

/// See [`Inner::next_step`].
enum Step {
    Ready(Connection),
    Wait(u64, ConnectFuture),
}

impl fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTransport")
            .field("server_addr", &self.inner.server_addr)
            .field("server_name", &self.inner.server_name)
            .finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// A transport for `config` on quinn's `runtime`. Validates the configuration; touches no
    /// socket (the endpoint is made by the first request, which must run inside `runtime`).
    pub fn new(config: QuicConfig, runtime: Arc<dyn quinn::Runtime>) -> Result<Self, QuicError> {
        let tls = tls::client_config(&config)?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(format!("{e:?}")))?;
        let mut transport = TransportConfig::default();
        transport.initial_rtt(INITIAL_RTT);
        if config.keep_alive_interval.is_zero() || config.keep_alive_interval >= config.idle_timeout
        {
            return Err(QuicError::Config(format!(
                "keep-alive interval {:?} must be non-zero and shorter than the idle timeout {:?}",
                config.keep_alive_interval, config.idle_timeout
            )));
        }
        transport.keep_alive_interval(Some(config.keep_alive_interval));
        let idle = IdleTimeout::try_from(config.idle_timeout)
            .map_err(|_| QuicError::Config("idle timeout out of range".to_owned()))?;
        transport.max_idle_timeout(Some(idle));
        let mut client_config = ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(Arc::new(transport));
        let bind_addr = config.bind_addr.unwrap_or(match config.server_addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        });
        debug!(
            server = %config.server_addr,
            server_name = %config.server_name,
            alpn = config.alpn.len(),
            "QUIC transport configured"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                server_addr: config.server_addr,
                server_name: config.server_name,
                bind_addr,
                udp_receive_buffer: config.udp_receive_buffer,
                connect_timeout: config.connect_timeout,
                backoff_min: config.reconnect_backoff_min,
                backoff_max: config
                    .reconnect_backoff_max
                    .max(config.reconnect_backoff_min),
                client_config,
                runtime,
                state: Mutex::new(State {
                    endpoint: None,
                    link: Link::Idle {
                        failures: 0,
                        retry_at: None,
                        last_error: None,
                    },
                    attempt: 0,
                    closed: false,
                }),
            }),
        })
    }

    /// The broker's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.inner.server_addr
    }

    /// Connects now instead of at the first request (subject to the same backoff). Useful to
    /// surface a TLS or address problem at start-up.
    pub async fn connect(&self) -> Result<(), TransportError> {
        self.inner.connection().await.map(drop)
    }

    /// Whether a connection is currently established and open.
    pub fn is_connected(&self) -> bool {
        matches!(&self.inner.lock().link, Link::Connected(c) if c.close_reason().is_none())
    }

    /// Closes the connection and the endpoint. Later requests fail with
    /// [`TransportError::ConnectionLost`]. Idempotent.
    pub fn close(&self) {
        let mut state = self.inner.lock();
        state.closed = true;
        if let Link::Connected(connection) = &state.link {
            connection.close(VarInt::from_u32(CLOSE_CODE), b"client closed");
        }
        state.link = Link::Idle {
            failures: 0,
            retry_at: None,
            last_error: None,
        };
        if let Some(endpoint) = state.endpoint.take() {
            endpoint.close(VarInt::from_u32(CLOSE_CODE), b"client closed");
        }
        debug!(server = %self.inner.server_addr, "QUIC transport closed");
    }
}

#[async_trait]
impl Transport for QuicTransport {
    async fn request(&self, request: Request) -> Result<Response, TransportError> {
        let kind = request.kind();
        // Refuses a frame over the broker's 8 KiB read buffer before anything is sent.
        let frame = codec::encode_request(&request)?;
        drop(request);
        let connection = self.inner.connection().await?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(connection_lost)?;
        trace!(kind = ?kind, bytes = frame.len(), stream = %send.id(), "sending request");
        send.write_all(&frame).await.map_err(write_error)?;
        send.finish()
            .map_err(|e| TransportError::ConnectionLost(format!("cannot finish stream: {e}")))?;
        let response = read_capped(&mut recv, MAX_RESPONSE_FRAME).await?;
        trace!(kind = ?kind, bytes = response.len(), "response received");
        // Zero copy: the records' bytes are slices of this buffer.
        codec::decode_response_bytes(kind, response.into())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves `State` consistent before anything can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The open connection, after a (shared) handshake if need be.
    async fn connection(&self) -> Result<Connection, TransportError> {
        // Decided under the lock, waited for without it.
        let (attempt, future) = match self.next_step()? {
            Step::Ready(connection) => return Ok(connection),
            Step::Wait(attempt, future) => (attempt, future),
        };
        self.wait(attempt, future).await
    }

    /// What [`connection`](Self::connection) does next: use the open connection, or wait for
    /// a handshake (joining the one in progress, or starting one).
    fn next_step(&self) -> Result<Step, TransportError> {
        let mut state = self.lock();
        if state.closed {
            return Err(TransportError::ConnectionLost(
                "transport closed".to_owned(),
            ));
        }
        let now = self.runtime.now();
        let failures = match &state.link {
            Link::Connecting {
                attempt, future, ..
            } => return Ok(Step::Wait(*attempt, future.clone())),
            Link::Connected(connection) => match connection.close_reason() {
                None => return Ok(Step::Ready(connection.clone())),
                Some(reason) => {
                    warn!(
                        server = %self.server_addr,
                        error = %reason,
                        "QUIC connection lost; reconnecting"
                    );
                    0
                }
            },
            Link::Idle {
                retry_at: Some(at),
                last_error,
                ..
            } if now < *at => {
                // The last attempt's error, so its kind (a refused certificate) carries over.
                return Err(last_error.clone().unwrap_or_else(|| {
                    TransportError::ConnectionLost(format!(
                        "not connected to {} (next attempt in {:?})",
                        self.server_addr,
                        at.saturating_duration_since(now),
                    ))
                }));
            }
            Link::Idle { failures, .. } => *failures,
        };
        let (attempt, future) = self.start_connecting(&mut state, failures)?;
        Ok(Step::Wait(attempt, future))
    }

    /// Waits for connection attempt `attempt` and records its outcome.
    async fn wait(
        &self,
        attempt: u64,
        future: ConnectFuture,
    ) -> Result<Connection, TransportError> {
        let result = future.await;
        let mut state = self.lock();
        let failures = match &state.link {
            Link::Connecting {
                attempt: current,
                failures,
                ..
            } if *current == attempt => *failures,
            // Someone else already recorded this attempt's outcome (or a newer one started).
            _ => return result,
        };
        state.link = match &result {
            Ok(connection) => {
                info!(server = %self.server_addr, remote = %connection.remote_address(), "QUIC connection established");
                Link::Connected(connection.clone())
            }
            Err(error) => {
                let failures = failures.saturating_add(1);
                let delay = self.backoff(failures);
                warn!(
                    server = %self.server_addr,
                    failures,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %error,
                    "QUIC connection attempt failed"
                );
                Link::Idle {
                    failures,
                    retry_at: Some(crate::backoff::later(self.runtime.now(), delay)),
                    last_error: Some(error.clone()),
                }
            }
        };
        result
    }

    /// Starts a handshake (making the endpoint first if need be) and records it in `state`.
    fn start_connecting(
        &self,
        state: &mut State,
        failures: u32,
    ) -> Result<(u64, ConnectFuture), TransportError> {
        let endpoint = match &state.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                let endpoint = self.make_endpoint()?;
                state.endpoint = Some(endpoint.clone());
                endpoint
            }
        };
        state.attempt += 1;
        let attempt = state.attempt;
        debug!(server = %self.server_addr, server_name = %self.server_name, attempt, "QUIC connecting");
        let connecting = endpoint.connect_with(
            self.client_config.clone(),
            self.server_addr,
            &self.server_name,
        );
        let future: BoxFuture<'static, Result<Connection, TransportError>> = match connecting {
            Err(error) => {
                let error = TransportError::Connect(format!(
                    "cannot connect to {}: {error}",
                    self.server_addr
                ));
                async move { Err(error) }.boxed()
            }
            Ok(connecting) => {
                let runtime = self.runtime.clone();
                let timeout = self.connect_timeout;
                let server = self.server_addr;
                async move {
                    let mut timer =
                        runtime.new_timer(crate::backoff::later(runtime.now(), timeout));
                    let expired = std::future::poll_fn(move |cx| timer.as_mut().poll(cx));
                    let handshake =
                        async { connecting.await.map_err(|e| handshake_error(server, e)) };
                    futures_lite::future::or(handshake, async move {
                        expired.await;
                        Err(TransportError::Connect(format!(
                            "no answer from {server} within {timeout:?} (handshake timed out)"
                        )))
                    })
                    .await
                }
                .boxed()
            }
        };
        let future = future.shared();
        state.link = Link::Connecting {
            attempt,
            failures,
            future: future.clone(),
        };
        Ok((attempt, future))
    }

    fn make_endpoint(&self) -> Result<Endpoint, TransportError> {
        let socket = UdpSocket::bind(self.bind_addr).map_err(|e| {
            TransportError::ConnectionLost(format!(
                "cannot bind a UDP socket on {}: {e}",
                self.bind_addr
            ))
        })?;
        grow_receive_buffer(&socket, self.udp_receive_buffer);
        Endpoint::new(
            EndpointConfig::default(),
            None,
            socket,
            self.runtime.clone(),
        )
        .map_err(|e| TransportError::ConnectionLost(format!("cannot start the QUIC endpoint: {e}")))
    }

    /// The wait before attempt `failures + 1`: `min * 2^(failures - 1)`, capped at `max`.
    fn backoff(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        self.backoff_min
            .saturating_mul(1u32 << exponent)
            .min(self.backoff_max)
    }
}

/// Asks for a receive buffer of `asked` bytes on `socket` (0: leaves it as it is) and returns
/// the size the kernel reports after. A refusal is not an error: the socket works with its
/// default, only with more packets lost in bursts; it is logged.
fn grow_receive_buffer(socket: &UdpSocket, asked: usize) -> Option<usize> {
    let socket = socket2::SockRef::from(socket);
    if asked > 0 {
        if let Err(error) = socket.set_recv_buffer_size(asked) {
            info!(asked, %error, "cannot set the UDP receive buffer");
        }
    }
    let got = socket.recv_buffer_size().ok()?;
    // Linux reports twice what it grants (the rest is its bookkeeping), and caps the grant at
    // net.core.rmem_max.
    let granted = if cfg!(target_os = "linux") {
        got / 2
    } else {
        got
    };
    if granted < asked {
        info!(
            asked,
            granted, "the UDP receive buffer is smaller than asked (raise net.core.rmem_max)"
        );
    } else {
        debug!(asked, granted, "UDP receive buffer");
    }
    Some(got)
}

/// Reads a response to the end of its stream, refusing more than `cap` bytes. The chunks are
/// kept as quinn hands them over and joined once at the end, into a buffer of the frame's
/// size: a buffer grown as they came would copy a large answer about twice.
async fn read_capped(recv: &mut quinn::RecvStream, cap: usize) -> Result<Vec<u8>, TransportError> {
    let mut chunks = Vec::new();
    let mut total = 0usize;
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                total = total.saturating_add(chunk.bytes.len());
                if total > cap {
                    // Tell the broker to stop sending; the stream is abandoned either way.
                    let _ = recv.stop(VarInt::from_u32(STOP_TOO_LARGE));
                    return Err(TransportError::ResponseTooLarge(total));
                }
                chunks.push(chunk.bytes);
            }
            Ok(None) => break,
            Err(error) => return Err(read_error(error)),
        }
    }
    let mut frame = Vec::with_capacity(total);
    for chunk in &chunks {
        frame.extend_from_slice(chunk);
    }
    Ok(frame)
}

/// A failed handshake: a TLS failure on either side (a crypto error code: our verifier refused
/// the certificate, or the broker sent a TLS alert) is [`TransportError::Tls`], with rustls'
/// reason; anything else is [`TransportError::Connect`].
fn handshake_error(server: SocketAddr, error: ConnectionError) -> TransportError {
    let tls = |code: TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match &error {
        ConnectionError::TransportError(e) if tls(e.code) => {
            TransportError::Tls(format!("{server}: {}", e.reason))
        }
        ConnectionError::ConnectionClosed(close) if tls(close.error_code) => {
            TransportError::Tls(format!("{server} refused the handshake: {close}"))
        }
        ConnectionError::TimedOut => {
            TransportError::Connect(format!("no answer from {server} (handshake timed out)"))
        }
        _ => TransportError::Connect(format!("handshake with {server} failed: {error}")),
    }
}

fn connection_lost(error: ConnectionError) -> TransportError {
    TransportError::ConnectionLost(error.to_string())
}

/// A write failure. A stream the broker stopped is not a lost connection, but the core has no
/// better name for "this request got no answer from the transport", and its breaker must count
/// it.
fn write_error(error: WriteError) -> TransportError {
    match error {
        WriteError::ConnectionLost(error) => connection_lost(error),
        other => TransportError::ConnectionLost(format!("request stream failed: {other}")),
    }
}

/// A read failure; see [`write_error`] for why a reset stream is `ConnectionLost` too.
fn read_error(error: ReadError) -> TransportError {
    match error {
        ReadError::ConnectionLost(error) => connection_lost(error),
        other => TransportError::ConnectionLost(format!("response stream failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> UdpSocket {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback UDP socket")
    }

    #[test]
    fn the_receive_buffer_grows_past_the_system_default() {
        let default = grow_receive_buffer(&socket(), 0).expect("a socket's buffer size");
        let grown = grow_receive_buffer(&socket(), DEFAULT_UDP_RECEIVE_BUFFER)
            .expect("a socket's buffer size");
        // Linux grants up to net.core.rmem_max and reports twice that: above its stock default
        // (208 KiB) even where rmem_max is the stock 208 KiB too.
        assert!(
            grown > default,
            "asked {DEFAULT_UDP_RECEIVE_BUFFER}, got {grown}; default {default}"
        );
    }

    #[test]
    fn zero_leaves_the_receive_buffer_as_it_is() {
        let plain = socket2::SockRef::from(&socket())
            .recv_buffer_size()
            .expect("a socket's buffer size");
        assert_eq!(grow_receive_buffer(&socket(), 0), Some(plain));
    }
}
