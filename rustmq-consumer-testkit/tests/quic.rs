//! The QUIC transport against the embedded loopback broker, over real UDP on 127.0.0.1.
//!
//! Every scenario is a generic async fn run on tokio and on smol (the client, the server and
//! the consumer all on the same runtime). Servers bind port 0 and are stopped by the test.
//! Nothing asserts a duration; the only waits are bounded waits for real I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rustmq_consumer_core::codec::MAX_RESPONSE_FRAME;
use rustmq_consumer_core::protocol::{
    AcknowledgmentLevel, CommitOffsetRequest, ConsumerHeartbeatRequest, FetchOffsetRequest,
    FetchRequest, FindCoordinatorRequest, JoinGroupRequest, LeaveGroupRequest, MetadataRequest,
    ProduceRequest, Record, Request, RequestKind, Response, TopicPartition, MAX_REQUEST_FRAME,
};
use rustmq_consumer_core::quic::{QuicConfig, QuicTransport, RootCerts, TlsMode};
use rustmq_consumer_core::{
    sleep, timeout, ConsumerBuilder, ConsumerConfig, Runtime, Transport, TransportError,
};
use rustmq_consumer_testkit::{
    Fault, LoopbackBroker, SharedBroker, SimBroker, INJECTED_ERROR, LOOPBACK_SERVER_NAME,
};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
/// Longest any single step may take before the test fails instead of hanging.
const GUARD: Duration = Duration::from_secs(60);

/// Logs to the test output when `RUST_LOG` is set.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A broker with `TOPIC` (one partition holding `messages` values `m<i>`) and `GROUP`.
fn broker(messages: usize) -> SharedBroker {
    let mut broker = SimBroker::new();
    broker.create_topic(TOPIC, 1);
    broker.ensure_group(GROUP);
    if messages > 0 {
        broker
            .produce_values(TOPIC, 0, (0..messages).map(|i| format!("m{i}")))
            .expect("topic exists");
    }
    SharedBroker::new(broker)
}

async fn within<R: Runtime, F: Future>(rt: &R, future: F) -> F::Output {
    timeout(rt, GUARD, future)
        .await
        .expect("step did not finish in time")
}

fn fetch(offset: u64) -> Request {
    FetchRequest {
        topic: TOPIC.to_owned(),
        partition_id: 0,
        fetch_offset: offset,
        max_bytes: 1 << 20,
        timeout_ms: 100,
    }
    .into()
}

fn metadata() -> Request {
    MetadataRequest {
        topics: vec![TOPIC.to_owned()],
    }
    .into()
}

fn produce(partition: u32, value: Vec<u8>) -> Request {
    ProduceRequest {
        topic: TOPIC.to_owned(),
        partition_id: partition,
        records: vec![Record::from_value(value)],
        acks: AcknowledgmentLevel::Leader,
        timeout_ms: 1000,
    }
    .into()
}

/// What the broker answers `request` with if handled in memory right now, as a transport
/// result: the golden answer the QUIC round trip must reproduce.
fn golden(broker: &SharedBroker, request: &Request) -> Result<Response, TransportError> {
    let mut reference = broker.lock().clone();
    reference
        .handle(Instant::now(), request.clone())
        .map_err(|e| TransportError::Broker(e.0))
}

fn transport(config: QuicConfig, quic: &Arc<dyn quinn::Runtime>) -> QuicTransport {
    QuicTransport::new(config, quic.clone()).expect("valid QUIC config")
}

// ------------------------------------------------------------------ scenarios

/// Every request kind round-trips over QUIC to exactly the answer the broker gives in memory,
/// including the `0xFF` error frame (`Partition not found`) of a produce to an unknown
/// partition.
async fn every_request_kind_round_trips<R: Runtime>(rt: R, quic: Arc<dyn quinn::Runtime>) {
    let shared = broker(3);
    let loopback = LoopbackBroker::start(shared.clone(), quic.clone()).expect("start");
    let client = transport(loopback.client_config(), &quic);

    let mut requests = vec![
        produce(0, b"new".to_vec()),
        fetch(0),
        metadata(),
        FindCoordinatorRequest {
            group_id: GROUP.to_owned(),
        }
        .into(),
        JoinGroupRequest {
            group_id: GROUP.to_owned(),
            member_id: String::new(),
            session_timeout_ms: 30_000,
            topics: vec![TOPIC.to_owned()],
        }
        .into(),
    ];
    let mut kinds = Vec::new();
    for request in requests.drain(..) {
        let expected = golden(&shared, &request);
        kinds.push(request.kind());
        let got = within(&rt, client.request(request)).await;
        assert_eq!(got, expected);
    }
    // The member the QUIC join created is the broker's only member.
    let member = shared.lock().members(GROUP)[0].clone();
    let generation = shared.lock().generation(GROUP).expect("group exists");
    let tp = TopicPartition::new(TOPIC, 0);
    let requests: Vec<Request> = vec![
        ConsumerHeartbeatRequest {
            group_id: GROUP.to_owned(),
            member_id: member.clone(),
            generation_id: generation,
        }
        .into(),
        CommitOffsetRequest {
            group_id: GROUP.to_owned(),
            member_id: member.clone(),
            generation_id: generation,
            offsets: BTreeMap::from([(tp.clone(), 2)]),
        }
        .into(),
        FetchOffsetRequest {
            group_id: GROUP.to_owned(),
            topic_partitions: vec![tp.clone()],
        }
        .into(),
        LeaveGroupRequest {
            group_id: GROUP.to_owned(),
            member_id: member,
        }
        .into(),
        produce(7, b"nowhere".to_vec()),
    ];
    for request in requests {
        let expected = golden(&shared, &request);
        kinds.push(request.kind());
        let got = within(&rt, client.request(request)).await;
        assert_eq!(got, expected);
    }
    assert!(matches!(
        golden(&shared, &produce(7, vec![])),
        Err(TransportError::Broker(ref text)) if text.starts_with("Partition not found")
    ));
    assert_eq!(shared.lock().committed(GROUP, &tp), Some(2));
    assert_eq!(shared.lock().records(TOPIC, 0).len(), 4);
    let logged: Vec<RequestKind> = shared.lock().request_log().iter().map(|e| e.kind).collect();
    assert_eq!(logged, kinds);
    assert_eq!(kinds.len(), 10, "all nine kinds, produce twice");
    assert_eq!(loopback.connections_accepted(), 1);
    client.close();
    loopback.stop().await;
}

/// Hundreds of requests in flight at once share one connection, one stream each, and each
/// gets its own answer.
async fn many_requests_pipelined_on_one_connection<R: Runtime>(
    rt: R,
    quic: Arc<dyn quinn::Runtime>,
) {
    const N: u64 = 300;
    let shared = broker(N as usize);
    let loopback = LoopbackBroker::start(shared.clone(), quic.clone()).expect("start");
    let client = transport(loopback.client_config(), &quic);
    let requests = (0..N).map(|offset| {
        let client = client.clone();
        async move { (offset, client.request(fetch(offset)).await) }
    });
    let answers = within(&rt, join_all(requests)).await;
    for (offset, answer) in answers {
        let Ok(Response::Fetch(fetched)) = answer else {
            panic!("fetch at {offset}: {answer:?}");
        };
        let first = fetched.records.first().expect("records exist");
        assert_eq!(&first.value[..], format!("m{offset}").as_bytes());
        assert_eq!(fetched.high_watermark, N);
    }
    assert_eq!(loopback.requests_served(), N);
    assert_eq!(loopback.connections_accepted(), 1);
    client.close();
    loopback.stop().await;
}

/// A request frame over the broker's 8 KiB read buffer is refused before anything is sent
/// (not even a connection is made); one just under the limit goes through.
async fn request_over_8_kib_refused_before_sending<R: Runtime>(
    rt: R,
    quic: Arc<dyn quinn::Runtime>,
) {
    let shared = broker(0);
    let loopback = LoopbackBroker::start(shared.clone(), quic.clone()).expect("start");
    let client = transport(loopback.client_config(), &quic);
    let too_big = within(
        &rt,
        client.request(produce(0, vec![b'x'; MAX_REQUEST_FRAME])),
    )
    .await
    .expect_err("refused");
    let TransportError::RequestTooLarge(size) = too_big else {
        panic!("wrong error: {too_big:?}");
    };
    assert!(size > MAX_REQUEST_FRAME);
    assert_eq!(loopback.connections_accepted(), 0);
    assert_eq!(loopback.requests_served(), 0);
    assert!(!client.is_connected());

    let fits = within(&rt, client.request(produce(0, vec![b'x'; 8000]))).await;
    assert!(matches!(fits, Ok(Response::Produce(_))), "{fits:?}");
    assert_eq!(shared.lock().records(TOPIC, 0).len(), 1);
    client.close();
    loopback.stop().await;
}

/// Garbage, truncated, error and empty frames become the matching `TransportError`, and the
/// connection goes on serving afterwards.
async fn bad_frames_map_to_transport_errors<R: Runtime>(rt: R, quic: Arc<dyn quinn::Runtime>) {
    let shared = broker(1);
    let loopback = LoopbackBroker::start(shared.clone(), quic.clone()).expect("start");
    let client = transport(loopback.client_config(), &quic);
    loopback.inject(Fault::Garbage, 1);
    loopback.inject(Fault::Truncated, 2);
    loopback.inject(Fault::ErrorFrame, 1);
    loopback.inject(Fault::Empty, 1);

    let garbage = within(&rt, client.request(metadata())).await;
    assert!(
        matches!(garbage, Err(TransportError::Malformed(_))),
        "{garbage:?}"
    );
    let truncated = within(&rt, client.request(metadata())).await;
    assert!(
        matches!(truncated, Err(TransportError::Malformed(_))),
        "{truncated:?}"
    );
    let truncated = within(&rt, client.request(fetch(0))).await;
    assert!(
        matches!(truncated, Err(TransportError::Malformed(_))),
        "{truncated:?}"
    );
    let error = within(&rt, client.request(metadata())).await;
    assert_eq!(
        error,
        Err(TransportError::Broker(INJECTED_ERROR.to_owned()))
    );
    let empty = within(&rt, client.request(metadata())).await;
    assert_eq!(empty, Err(TransportError::EmptyResponse));

    let healthy = within(&rt, client.request(fetch(0))).await;
    assert!(matches!(healthy, Ok(Response::Fetch(_))), "{healthy:?}");
    assert_eq!(loopback.connections_accepted(), 1);
    assert_eq!(loopback.requests_served(), 6);
    client.close();
    loopback.stop().await;
}

/// The loopback broker's own framing quirks, seen with a raw QUIC stream: a request frame over
/// 8192 bytes gets the `0xFF` error frame (the real broker's single 8 KiB read cannot decode
/// it), an unknown type byte gets a FIN with zero bytes.
async fn raw_frames_get_the_real_brokers_answers<R: Runtime>(rt: R, quic: Arc<dyn quinn::Runtime>) {
    let loopback = LoopbackBroker::start(broker(0), quic.clone()).expect("start");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(loopback.certificate_der().to_vec().into())
        .expect("valid certificate");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC-capable");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, quic.clone())
            .expect("endpoint");
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            loopback.addr(),
            LOOPBACK_SERVER_NAME,
        )
        .expect("connect");
    let connection = within(&rt, connecting).await.expect("handshake");

    let exchange = |frame: Vec<u8>| {
        let connection = connection.clone();
        async move {
            let (mut send, mut recv) = connection.open_bi().await.expect("stream");
            send.write_all(&frame).await.expect("write");
            send.finish().expect("finish");
            recv.read_to_end(MAX_RESPONSE_FRAME).await.expect("read")
        }
    };
    let mut oversized = vec![RequestKind::Fetch as u8];
    oversized.resize(12_350, 0);
    let answer = within(&rt, exchange(oversized)).await;
    assert_eq!(answer.first(), Some(&0xFF));
    assert!(answer[1..].starts_with(b"Error: Serialization error"));

    let answer = within(&rt, exchange(vec![0x0A, 1, 2, 3])).await;
    assert!(answer.is_empty(), "unknown type gets zero bytes");
    assert_eq!(
        loopback.requests_served(),
        1,
        "the oversized frame is not served"
    );

    connection.close(0u32.into(), b"done");
    endpoint.close(0u32.into(), b"done");
    loopback.stop().await;
}

/// Certificate verification is on by default: a client that does not trust the loopback
/// broker's certificate (or expects another name) fails the handshake with a clear
/// `ConnectionLost`; trusting the certificate connects, and so does the explicit dangerous
/// opt-in (the only way to reach today's real broker).
async fn tls_verification_on_by_default<R: Runtime>(rt: R, quic: Arc<dyn quinn::Runtime>) {
    assert!(matches!(
        QuicConfig::new("127.0.0.1:1".parse().expect("addr"), "x").tls,
        TlsMode::Verify {
            roots: RootCerts::WebPki
        }
    ));
    let loopback = LoopbackBroker::start(broker(0), quic.clone()).expect("start");

    let default = transport(
        QuicConfig::new(loopback.addr(), LOOPBACK_SERVER_NAME),
        &quic,
    );
    let refused = within(&rt, default.request(metadata())).await;
    let Err(TransportError::ConnectionLost(message)) = refused else {
        panic!("untrusted certificate accepted: {refused:?}");
    };
    assert!(message.contains("certificate"), "unclear error: {message}");
    assert!(
        message.contains("UnknownIssuer"),
        "unclear error: {message}"
    );

    let mut wrong_name = loopback.client_config();
    wrong_name.server_name = "broker.example".to_owned();
    let wrong_name = transport(wrong_name, &quic);
    let refused = within(&rt, wrong_name.request(metadata())).await;
    let Err(TransportError::ConnectionLost(message)) = refused else {
        panic!("certificate for the wrong name accepted: {refused:?}");
    };
    assert!(message.contains("certificate"), "unclear error: {message}");
    assert_eq!(loopback.connections_accepted(), 0);

    let trusting = transport(loopback.client_config(), &quic);
    let ok = within(&rt, trusting.request(metadata())).await;
    assert!(matches!(ok, Ok(Response::Metadata(_))), "{ok:?}");

    let dangerous = transport(
        QuicConfig::new(loopback.addr(), "any-name-at-all")
            .with_tls(TlsMode::DangerousAcceptAnyCertificate),
        &quic,
    );
    let ok = within(&rt, dangerous.request(metadata())).await;
    assert!(matches!(ok, Ok(Response::Metadata(_))), "{ok:?}");
    assert_eq!(loopback.connections_accepted(), 2);

    for client in [default, wrong_name, trusting, dangerous] {
        client.close();
    }
    loopback.stop().await;
}

/// The server is stopped and restarted on the same port: requests fail with
/// `ConnectionLost` (which the core's breaker counts), then succeed again once the transport
/// has reconnected by itself.
async fn reconnects_after_server_restart<R: Runtime>(rt: R, quic: Arc<dyn quinn::Runtime>) {
    let shared = broker(1);
    let loopback = LoopbackBroker::start(shared.clone(), quic.clone()).expect("start");
    let addr = loopback.addr();
    let client = transport(
        loopback
            .client_config()
            .with_connect_timeout(Duration::from_secs(1))
            .with_reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100)),
        &quic,
    );
    let ok = within(&rt, client.request(fetch(0))).await;
    assert!(ok.is_ok(), "{ok:?}");

    within(&rt, loopback.stop()).await;
    let lost = within(&rt, client.request(fetch(0))).await;
    assert!(
        matches!(lost, Err(TransportError::ConnectionLost(_))),
        "{lost:?}"
    );

    within(&rt, loopback.restart()).await.expect("restart");
    assert_eq!(loopback.addr(), addr);
    // Bounded wait for the transport's backoff and the new handshake (real I/O).
    let mut attempts = 0;
    loop {
        match within(&rt, client.request(fetch(0))).await {
            Ok(response) => {
                assert!(matches!(response, Response::Fetch(_)));
                break;
            }
            Err(TransportError::ConnectionLost(message)) => {
                attempts += 1;
                assert!(attempts < 200, "never reconnected: {message}");
                sleep(&rt, Duration::from_millis(20)).await;
            }
            Err(other) => panic!("unexpected error while reconnecting: {other}"),
        }
    }
    assert!(client.is_connected());
    assert_eq!(loopback.connections_accepted(), 2);
    client.close();
    loopback.stop().await;
}

/// End to end: a `Consumer` over QUIC consumes 1,000 messages, each exactly once, and
/// commits them all.
async fn consume_1000_messages_exactly_once<R: Runtime + Clone>(
    rt: R,
    quic: Arc<dyn quinn::Runtime>,
) {
    const N: u64 = 1000;
    let shared = broker(N as usize);
    let loopback = LoopbackBroker::start(shared.clone(), quic.clone()).expect("start");
    let client = transport(loopback.client_config(), &quic);
    let mut config = ConsumerConfig::new(TOPIC, GROUP);
    config.fetch_size = 100;
    config.max_unacked = 200;
    config.ack_batch_size = 50;
    config.ack_batch_timeout = Duration::from_millis(5);
    config.empty_fetch_backoff_min = Duration::from_millis(1);
    config.empty_fetch_backoff_max = Duration::from_millis(5);
    config.request_timeout = Duration::from_secs(10);
    let consumer = within(
        &rt,
        ConsumerBuilder::with_runtime(rt.clone())
            .topic(TOPIC)
            .consumer_group(GROUP)
            .config(config)
            .client(client.clone())
            .build(),
    )
    .await
    .expect("consumer starts");

    let mut seen = BTreeSet::new();
    for _ in 0..N {
        let delivery = within(&rt, consumer.receive())
            .await
            .expect("receive")
            .expect("a delivery");
        assert_eq!(delivery.attempt(), 1, "nothing is redelivered");
        assert_eq!(
            delivery.value(),
            format!("m{}", delivery.offset()).as_bytes()
        );
        assert!(
            seen.insert(delivery.offset()),
            "offset {} twice",
            delivery.offset()
        );
        delivery.ack().await.expect("ack");
    }
    assert_eq!(seen, (0..N).collect::<BTreeSet<_>>());
    within(&rt, consumer.close()).await.expect("close");
    assert!(consumer.receive().await.expect("receive").is_none());
    assert_eq!(
        shared
            .lock()
            .committed(GROUP, &TopicPartition::new(TOPIC, 0)),
        Some(N)
    );
    assert_eq!(consumer.metrics().await.acked, N);
    assert_eq!(loopback.connections_accepted(), 1);
    client.close();
    loopback.stop().await;
}

// ------------------------------------------------------------------ runtimes

macro_rules! on_both_runtimes {
    ($($name:ident),* $(,)?) => {
        mod on_tokio {
            use std::sync::Arc;
            use rustmq_consumer_tokio::TokioRuntime;
            $(
                #[tokio::test]
                async fn $name() {
                    super::init_tracing();
                    super::$name(TokioRuntime, Arc::new(quinn::TokioRuntime)).await;
                }
            )*
        }
        mod on_smol {
            use std::sync::Arc;
            use rustmq_consumer_smol::SmolRuntime;
            $(
                #[test]
                fn $name() {
                    super::init_tracing();
                    smol::block_on(super::$name(SmolRuntime, Arc::new(quinn::SmolRuntime)));
                }
            )*
        }
    };
}

on_both_runtimes!(
    every_request_kind_round_trips,
    many_requests_pipelined_on_one_connection,
    request_over_8_kib_refused_before_sending,
    bad_frames_map_to_transport_errors,
    raw_frames_get_the_real_brokers_answers,
    tls_verification_on_by_default,
    reconnects_after_server_restart,
    consume_1000_messages_exactly_once,
);
