//! An enhanced consumer against an embedded broker that speaks RustMQ's wire protocol over QUIC
//! on loopback, or against a real RustMQ broker.
//!
//! By default it produces 10,000 messages (some of them poison) into the embedded broker,
//! consumes them in a consumer group with retries and a dead-letter topic, shows live progress
//! on one line and ends with a summary.
//!
//! ```text
//! cargo run --example enhanced_consumer -- --help                  # every option, its default
//! cargo run --example enhanced_consumer                            # on tokio, over QUIC
//! cargo run --example enhanced_consumer -- --runtime smol --messages 1000
//! cargo run --example enhanced_consumer -- --in-memory             # no network
//! # a real broker (it shows a throwaway self-signed certificate: the opt-in is explicit)
//! cargo run --example enhanced_consumer -- --broker 127.0.0.1:9092 --accept-any-certificate \
//!     --topic orders --group billing --dead-letter-topic orders.dead
//! cargo run --example enhanced_consumer -- --broker HOST:PORT --ca ca.pem --server-name NAME
//! # Prometheus metrics and health probes while it runs
//! cargo run --example enhanced_consumer -- --metrics-addr 127.0.0.1:9898
//! curl 127.0.0.1:9898/metrics; curl 127.0.0.1:9898/ready; curl 127.0.0.1:9898/live
//! ```
//!
//! Against a real broker it consumes until nothing arrives for `--idle-secs`, acking every
//! message whose value does not start with `poison`. A bad or unknown option exits with
//! status 2 and a message; a consumer failure with status 1.
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
// The embedded broker's server side runs on quinn directly; the consumer never does.
use futures_lite::StreamExt;
use rustmq_consumer_core::quic::quinn;
use rustmq_consumer_core::{
    async_trait, timeout, ConsumerBuilder, Event, ListenerError, RebalanceListener,
};
use rustmq_consumer_testkit::{LoopbackBroker, SharedBroker, SimBroker, SimTransport};
use rustmq_consumer_tokio::{
    protocol::TopicPartition, BreakerState, Consumer, ConsumerConfig, ConsumerError, Health,
    HealthIssue, Metrics, Probe, QuicConfig, QuicError, QuicTransport, RootCerts, Runtime, TlsMode,
};

/// Consume a RustMQ topic with retries, a dead-letter topic and live progress: from a broker
/// embedded in this process (the default) or from a real one (`--broker`).
#[derive(Debug, Parser)]
#[command(name = "enhanced_consumer", version)]
struct Cli {
    /// The async runtime the consumer runs on.
    #[arg(long, value_enum, default_value_t = RuntimeChoice::Tokio)]
    runtime: RuntimeChoice,
    /// The topic to consume.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// The consumer group.
    #[arg(long, default_value = "billing")]
    group: String,
    /// Where poison messages go (after the retries, or when rejected).
    #[arg(long, default_value = "dead_letter_queue")]
    dead_letter_topic: String,
    /// Retries before a message is poison (it is delivered at most this plus one times).
    #[arg(long, default_value_t = 3)]
    max_retries: u32,
    /// Embedded broker: messages produced before consuming (every 97th one poison).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..),
          conflicts_with = "broker")]
    messages: u64,
    /// Embedded broker: an in-memory transport instead of QUIC on 127.0.0.1.
    #[arg(long, conflicts_with = "broker")]
    in_memory: bool,
    /// A real RustMQ broker, HOST:PORT (needs --ca or --accept-any-certificate).
    #[arg(long, value_name = "HOST:PORT", value_parser = resolve, requires = "trust")]
    broker: Option<SocketAddr>,
    /// Verify the broker's certificate against these PEM roots.
    #[arg(long, value_name = "FILE.pem", group = "trust", requires = "broker")]
    ca: Option<PathBuf>,
    /// Accept any broker certificate (today's broker presents a throwaway self-signed one).
    #[arg(long, group = "trust", requires = "broker")]
    accept_any_certificate: bool,
    /// The name the broker's certificate is checked against.
    #[arg(long, default_value = "localhost", requires = "broker")]
    server_name: String,
    /// Real broker: stop once nothing arrived for this many seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..),
          requires = "broker")]
    idle_secs: u64,
    /// Serve Prometheus metrics (`/metrics`) and health probes (`/ready`, `/live`) over HTTP
    /// on this address while the consumer runs.
    #[arg(long, value_name = "HOST:PORT", value_parser = resolve)]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuntimeChoice {
    Tokio,
    Smol,
}

/// `HOST:PORT` resolved to its first address.
fn resolve(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{e} (expected HOST:PORT, e.g. 127.0.0.1:9092)"))?
        .next()
        .ok_or_else(|| "no address".to_owned())
}

/// Exits with status 2 and `message` as a usage error of `kind`.
fn usage_error(kind: ErrorKind, message: impl std::fmt::Display) -> ! {
    Cli::command().error(kind, message).exit()
}

/// Where the messages come from.
enum Source {
    /// The embedded broker over QUIC on 127.0.0.1.
    Embedded,
    /// The embedded broker through an in-memory transport.
    InMemory,
    /// A real RustMQ broker: its QUIC config and the idle time that ends the run.
    Remote(Box<QuicConfig>, Duration),
}

impl Cli {
    fn source(&self) -> Source {
        let Some(addr) = self.broker else {
            return if self.in_memory {
                Source::InMemory
            } else {
                Source::Embedded
            };
        };
        let tls = match &self.ca {
            Some(path) => {
                let pem = std::fs::read(path).unwrap_or_else(|e| {
                    usage_error(ErrorKind::Io, format!("--ca {}: {e}", path.display()))
                });
                let roots = RootCerts::from_pem(&pem).unwrap_or_else(|e| {
                    usage_error(
                        ErrorKind::InvalidValue,
                        format!("--ca {}: {e}", path.display()),
                    )
                });
                TlsMode::Verify { roots }
            }
            // clap requires one of the two with --broker.
            None => TlsMode::DangerousAcceptAnyCertificate,
        };
        Source::Remote(
            Box::new(QuicConfig::new(addr, self.server_name.clone()).with_tls(tls)),
            Duration::from_secs(self.idle_secs),
        )
    }

    /// The consumer's configuration; refused values are usage errors.
    fn config(&self) -> ConsumerConfig {
        let config = ConsumerConfig {
            topic: self.topic.clone(),
            consumer_group: self.group.clone(),
            fetch_size: 500,
            max_unacked: 1000,
            ack_batch_size: 500,
            ack_batch_timeout: Duration::from_millis(50),
            max_retry_attempts: self.max_retries,
            retry_backoff_base: Duration::from_millis(1),
            retry_backoff_max: Duration::from_millis(20),
            empty_fetch_backoff_max: Duration::from_millis(50),
            dead_letter_queue: Some(self.dead_letter_topic.clone()),
            ..Default::default()
        };
        if let Err(error) = config.validate() {
            usage_error(ErrorKind::ValueValidation, error);
        }
        config
    }
}

fn main() {
    let cli = Cli::parse();
    let config = cli.config();
    let source = cli.source();
    let broker = embedded_broker(&cli);
    let result = match cli.runtime {
        RuntimeChoice::Smol => {
            println!("runtime: smol");
            smol::block_on(run(
                rustmq_consumer_smol::SmolRuntime,
                rustmq_consumer_smol::quic_transport,
                Arc::new(quinn::SmolRuntime),
                &cli,
                config,
                broker.clone(),
                source,
            ))
        }
        RuntimeChoice::Tokio => {
            println!("runtime: tokio");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|error| {
                    println!("cannot start tokio: {error}");
                    std::process::exit(1);
                });
            rt.block_on(run(
                rustmq_consumer_tokio::TokioRuntime,
                rustmq_consumer_tokio::quic_transport,
                Arc::new(quinn::TokioRuntime),
                &cli,
                config,
                broker.clone(),
                source,
            ))
        }
    };
    match result {
        Ok(summary) => summary.print(&cli, &broker),
        Err(error) => {
            println!("\nconsumer failed: {error}");
            std::process::exit(1);
        }
    }
}

/// A broker with the topic, `--messages` messages (every 97th one poison) and the
/// dead-letter topic.
fn embedded_broker(cli: &Cli) -> SharedBroker {
    let mut broker = SimBroker::new();
    broker.create_topic(&cli.topic, 1);
    broker.create_topic(&cli.dead_letter_topic, 1);
    if cli.broker.is_none() {
        let values = (0..cli.messages).map(|i| {
            if i % 97 == 42 {
                format!("poison-{i}")
            } else {
                format!("order-{i}")
            }
        });
        if let Err(error) = broker.produce_values(&cli.topic, 0, values) {
            println!("cannot produce: {error}");
            std::process::exit(1);
        }
    }
    SharedBroker::new(broker)
}

struct Summary {
    elapsed: Duration,
    metrics: Metrics,
    health: Health,
    /// The probes' answers once closed.
    readiness: Probe,
    liveness: Probe,
}

impl Summary {
    fn print(&self, cli: &Cli, broker: &SharedBroker) {
        let m = &self.metrics;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        println!("\n\nsummary");
        println!("  elapsed          {:.2} s", self.elapsed.as_secs_f64());
        println!("  throughput       {:.0} messages/s", m.acked as f64 / secs);
        println!("  received         {}", m.received);
        println!("  delivered        {}", m.delivered);
        println!("  acked            {}", m.acked);
        println!("  retried          {}", m.retried);
        println!("  dead-lettered    {}", m.dead_lettered);
        println!(
            "  commits          {} (largest batch {})",
            m.commits_sent, m.max_batch
        );
        if cli.broker.is_none() {
            let broker = broker.lock();
            let committed = broker.committed(&cli.group, &TopicPartition::new(&cli.topic, 0));
            println!(
                "  dead-letter topic {} records in {}",
                broker.records(&cli.dead_letter_topic, 0).len(),
                cli.dead_letter_topic
            );
            println!("  committed offset {committed:?} of {}", cli.messages);
        }
        println!("  final health     {:?}", self.health);
        println!(
            "  probes           ready: {}, live: {}",
            self.readiness, self.liveness
        );
    }
}

/// Builds the consumer on runtime `R` (its QUIC transport from the runtime crate's
/// `quic_transport`) and consumes.
async fn run<R: Runtime + Clone + Default>(
    runtime: R,
    quic_transport: fn(QuicConfig) -> Result<QuicTransport, QuicError>,
    server_runtime: Arc<dyn quinn::Runtime>,
    cli: &Cli,
    config: ConsumerConfig,
    broker: SharedBroker,
    source: Source,
) -> Result<Summary, ConsumerError> {
    // The embedded broker serves the wire protocol on 127.0.0.1 until it is dropped.
    let mut _server = None;
    let (quic_config, idle) = match source {
        Source::InMemory => (None, None),
        Source::Remote(config, idle) => {
            println!("transport: QUIC to the broker at {}", config.server_addr);
            (Some(*config), Some(idle))
        }
        Source::Embedded => {
            let server =
                LoopbackBroker::start(broker.clone(), server_runtime).unwrap_or_else(|e| {
                    println!("cannot start the embedded broker: {e}");
                    std::process::exit(1);
                });
            println!(
                "transport: QUIC to the embedded broker at {}",
                server.addr()
            );
            let config = server.client_config();
            _server = Some(server);
            (Some(config), None)
        }
    };
    // The recorder goes in before `build()`: the consumer registers its series when it starts.
    let metrics = cli.metrics_addr.map(|addr| (addr, prometheus()));
    // On one runtime this is `rustmq_consumer_tokio::ConsumerBuilder::new()` (or smol's).
    // Fail fast: `build()` fails with the cause when the broker cannot be reached.
    let builder = ConsumerBuilder::<R>::new()
        .config(config)
        .fail_fast(true)
        .rebalance_listener(PrintRebalances);
    let consumer = match quic_config {
        None => {
            println!("transport: in memory");
            let client = SimTransport::new(broker, runtime.clone());
            builder.client(client).build().await?
        }
        Some(quic_config) => {
            let client = quic_transport(quic_config).unwrap_or_else(|e| {
                usage_error(
                    ErrorKind::InvalidValue,
                    format!("bad QUIC configuration: {e}"),
                )
            });
            builder.client(client).build().await?
        }
    };
    // Stopped when dropped, after the run.
    let _endpoint = match metrics {
        Some((addr, handle)) => {
            let endpoint = Endpoint::start(addr, handle, consumer.clone()).unwrap_or_else(|e| {
                println!("cannot serve metrics on {addr}: {e}");
                std::process::exit(1);
            });
            println!(
                "metrics: http://{0}/metrics, probes: http://{0}/ready, http://{0}/live",
                endpoint.addr
            );
            Some(endpoint)
        }
        None => None,
    };
    // What the consumer decides, as it happens (a reader that falls behind loses the oldest).
    let mut events = consumer.events();
    runtime.spawn(Box::pin(async move {
        while let Some(notice) = events.next().await {
            match notice.event {
                Event::BreakerChanged { from, to } => {
                    println!("\ncircuit breaker {from:?} -> {to:?}")
                }
                Event::CommitFailed { error, .. } => println!("\ncommit failed: {error}"),
                // A stall comes out of `receive()` too (printed there), and so does its end.
                Event::Recovered { partition } => println!("\npartition {partition} recovered"),
                _ => {}
            }
        }
    }));
    consume(&runtime, &consumer, cli, idle).await
}

/// Prints assignments and revocations as the group protocol makes them.
struct PrintRebalances;

#[async_trait]
impl RebalanceListener for PrintRebalances {
    async fn on_partitions_assigned(
        &self,
        _consumer: &Consumer,
        partitions: &[u32],
    ) -> Result<(), ListenerError> {
        println!("assigned partitions {partitions:?}");
        Ok(())
    }

    async fn on_partitions_revoked(
        &self,
        _consumer: &Consumer,
        partitions: &[u32],
    ) -> Result<(), ListenerError> {
        println!("\nrevoked partitions {partitions:?}");
        Ok(())
    }
}

/// The process's Prometheus recorder, installed on first use.
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|error| {
                    println!("cannot install the metrics recorder: {error}");
                    std::process::exit(1);
                })
        })
        .clone()
}

/// A minimal HTTP endpoint on its own thread: `GET /metrics` renders the recorder, `GET
/// /ready` and `GET /live` answer the consumer's probes (200 `ok`, or 503 and why). Runs on any
/// async runtime: it blocks only its own thread. Stops when dropped.
struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    fn start(
        addr: SocketAddr,
        metrics: PrometheusHandle,
        consumer: Consumer,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    // A client that misbehaves only loses its own answer.
                    let _ = answer(stream, &metrics, &consumer);
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request.
fn answer(
    mut stream: TcpStream,
    metrics: &PrometheusHandle,
    consumer: &Consumer,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers are read (and ignored) so closing after the answer resets nothing.
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = match path {
        "/metrics" => (200, "text/plain; version=0.0.4", metrics.render()),
        "/ready" | "/live" => {
            let probe = smol::block_on(async {
                if path == "/ready" {
                    consumer.readiness().await
                } else {
                    consumer.liveness().await
                }
            });
            (probe.status_code(), "text/plain", format!("{probe}\n"))
        }
        _ => (404, "text/plain", "not found\n".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn consume<R: Runtime>(
    runtime: &R,
    consumer: &Consumer,
    cli: &Cli,
    idle: Option<Duration>,
) -> Result<Summary, ConsumerError> {
    let embedded = idle.is_none();
    let start = Instant::now();
    let mut last_report = start;
    let mut finished = 0;
    let mut last_delivery = start;
    while !embedded || finished < cli.messages {
        let received = match idle {
            Some(idle) => match timeout(runtime, idle, consumer.receive()).await {
                Some(received) => received,
                None => break, // nothing for `idle`: done
            },
            None => consumer.receive().await,
        };
        let received = match received {
            Ok(received) => received,
            // An outage after the broker had answered is not fatal: the consumer reconnects.
            Err(
                error @ ConsumerError::Unreachable {
                    ever_connected: true,
                    ..
                },
            ) if !error.is_permanent() => {
                println!("\n{error}: waiting for it");
                continue;
            }
            // One partition stuck; the others go on.
            Err(error @ ConsumerError::Stalled { .. }) => {
                println!("\n{error}");
                continue;
            }
            // Never connected, or a certificate that will never be accepted: give up.
            Err(error) => return Err(error),
        };
        let Some(delivery) = received else {
            break;
        };
        last_delivery = Instant::now();
        let value = String::from_utf8_lossy(delivery.value()).into_owned();
        // The embedded run also fails every 13th message once, to show retries.
        let transient_failure = embedded && delivery.offset() % 13 == 5 && delivery.attempt() == 1;
        if value.starts_with("poison") {
            let last = delivery.attempt() > cli.max_retries;
            delivery.nack().await?;
            if last {
                finished += 1;
            }
        } else if transient_failure {
            delivery.nack().await?;
        } else {
            delivery.ack().await?;
            finished += 1;
        }
        if last_report.elapsed() >= Duration::from_millis(100) {
            last_report = Instant::now();
            progress(consumer, start).await?;
        }
    }
    progress(consumer, start).await?;
    consumer.close().await?;
    Ok(Summary {
        // Up to the last message, not the idle wait that ended a run against a real broker.
        elapsed: last_delivery.duration_since(start),
        metrics: consumer.metrics().await,
        health: consumer.health().await,
        readiness: consumer.readiness().await,
        liveness: consumer.liveness().await,
    })
}

async fn progress(consumer: &Consumer, start: Instant) -> Result<(), ConsumerError> {
    let m = consumer.metrics().await;
    let lag: u64 = consumer.get_lag().await?.values().sum();
    let report = consumer.health_report().await;
    // The breaker's own state: health is degraded by a stalled partition too.
    let breaker = report
        .issues
        .iter()
        .find_map(|issue| match issue {
            HealthIssue::Breaker { state, .. } => Some(match state {
                BreakerState::Open => "open",
                _ => "half-open",
            }),
            _ => None,
        })
        .unwrap_or(if report.health == Health::Closed {
            "n/a"
        } else {
            "closed"
        });
    let ready = if report.readiness().passed {
        "ready"
    } else {
        "not ready"
    };
    let rate = m.acked as f64 / start.elapsed().as_secs_f64().max(1e-9);
    print!(
        "\r{rate:>8.0} msg/s | acked {:>6} | retried {:>5} | dead-lettered {:>4} | lag {:>6} | breaker {breaker:<9} | {ready:<9}",
        m.acked, m.retried, m.dead_lettered, lag
    );
    let _ = std::io::stdout().flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("enhanced_consumer").chain(args.iter().copied()))
    }

    #[test]
    fn help_lists_every_option_with_its_default() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for option in Cli::command().get_arguments() {
            let long = option.get_long().expect("every option is long");
            assert!(
                help.contains(&format!("--{long}")),
                "--{long} missing: {help}"
            );
            for default in option.get_default_values() {
                let shown = format!("[default: {}]", default.to_string_lossy());
                assert!(help.contains(&shown), "{shown} missing for --{long}");
            }
        }
        assert!(help.contains("[possible values: tokio, smol]"), "{help}");
        let error = parse(&["--help"]).expect_err("help is not a run");
        assert_eq!(
            (error.kind(), error.exit_code()),
            (ErrorKind::DisplayHelp, 0)
        );
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        let cases: &[(&[&str], ErrorKind)] = &[
            (&["--runtime", "smoll"], ErrorKind::InvalidValue),
            (&["--bogus"], ErrorKind::UnknownArgument),
            (&["--max-retries", "three"], ErrorKind::ValueValidation),
            (&["--messages", "0"], ErrorKind::ValueValidation),
            (&["--broker", "no port"], ErrorKind::ValueValidation),
            (
                &["--broker", "127.0.0.1:9092"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["--accept-any-certificate"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["--broker", "127.0.0.1:9092", "--in-memory", "--ca", "a.pem"],
                ErrorKind::ArgumentConflict,
            ),
        ];
        for (args, kind) in cases {
            let error = parse(args).expect_err("refused");
            assert_eq!(
                (error.kind(), error.exit_code()),
                (*kind, 2),
                "{args:?}: {error}"
            );
        }
    }

    #[test]
    fn defaults_and_flags_reach_the_config() {
        let cli = parse(&[]).expect("no arguments is the embedded run");
        assert_eq!(cli.runtime, RuntimeChoice::Tokio);
        assert!(matches!(cli.source(), Source::Embedded));
        let config = cli.config();
        assert_eq!(config.max_retry_attempts, 3);
        assert_eq!(
            config.dead_letter_queue.as_deref(),
            Some("dead_letter_queue")
        );
        let cli = parse(&[
            "--runtime",
            "smol",
            "--dead-letter-topic",
            "orders.dead",
            "--max-retries",
            "5",
            "--in-memory",
        ])
        .expect("valid");
        assert_eq!(cli.runtime, RuntimeChoice::Smol);
        assert!(matches!(cli.source(), Source::InMemory));
        let config = cli.config();
        assert_eq!(config.max_retry_attempts, 5);
        assert_eq!(config.dead_letter_queue.as_deref(), Some("orders.dead"));
    }

    /// One HTTP GET over loopback: status and body.
    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).expect("the endpoint accepts");
        let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("request");
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response).expect("response");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// `--metrics-addr`: the endpoint serves the consumer's metrics and probes on a free
    /// loopback port, and stops when dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_and_probes_are_served_over_loopback() {
        let cli = parse(&[
            "--in-memory",
            "--messages",
            "300",
            "--group",
            "scraped",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .expect("valid");
        let handle = prometheus();
        let consumer = ConsumerBuilder::<rustmq_consumer_tokio::TokioRuntime>::new()
            .config(cli.config())
            .client(SimTransport::new(
                embedded_broker(&cli),
                rustmq_consumer_tokio::TokioRuntime,
            ))
            .build()
            .await
            .expect("valid consumer");
        let addr = cli.metrics_addr.expect("given");
        let endpoint = Endpoint::start(addr, handle, consumer.clone()).expect("bind");
        let addr = endpoint.addr;
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        for _ in 0..100 {
            let delivery = consumer.receive().await.expect("receive").expect("open");
            delivery.ack().await.expect("ack");
        }
        consumer.commit().await.expect("commit");
        let acked = consumer.metrics().await.acked;

        let scrape = |path: &'static str| tokio::task::spawn_blocking(move || get(addr, path));
        let (status, body) = scrape("/metrics").await.expect("scrape");
        assert_eq!(status, 200);
        let line = body
            .lines()
            .find(|l| {
                l.starts_with("rustmq_consumer_acked_total{") && l.contains("group=\"scraped\"")
            })
            .unwrap_or_else(|| panic!("no acked counter in {body}"));
        let value: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a value");
        assert_eq!(value, acked);
        assert!(body.contains("# TYPE rustmq_consumer_lag gauge"), "{body}");
        assert!(
            body.contains("rustmq_consumer_commit_latency_seconds"),
            "{body}"
        );
        assert_eq!(scrape("/ready").await.expect("ready"), (200, "ok\n".into()));
        assert_eq!(scrape("/live").await.expect("live"), (200, "ok\n".into()));
        assert_eq!(scrape("/nope").await.expect("404").0, 404);

        consumer.close().await.expect("close");
        assert_eq!(
            scrape("/ready").await.expect("ready"),
            (503, "closed\n".into())
        );
        drop(endpoint);
        assert!(TcpStream::connect(addr).is_err(), "stopped");
    }

    /// The embedded run, in memory: every message acked or dead-lettered, and committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_run_settles_everything() {
        let cli =
            parse(&["--in-memory", "--messages", "300", "--max-retries", "1"]).expect("valid");
        let broker = embedded_broker(&cli);
        let summary = run(
            rustmq_consumer_tokio::TokioRuntime,
            rustmq_consumer_tokio::quic_transport,
            Arc::new(quinn::TokioRuntime),
            &cli,
            cli.config(),
            broker.clone(),
            cli.source(),
        )
        .await
        .expect("the run succeeds");
        // Offsets 42, 139 and 236 are poison: dead-lettered after two deliveries.
        assert_eq!(
            (summary.metrics.acked, summary.metrics.dead_lettered),
            (297, 3)
        );
        let broker = broker.lock();
        assert_eq!(broker.records("dead_letter_queue", 0).len(), 3);
        assert_eq!(
            broker.committed("billing", &TopicPartition::new("orders", 0)),
            Some(300)
        );
    }
}
