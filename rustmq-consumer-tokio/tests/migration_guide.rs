//! The snippets of the enhancements document (the old SDK's "RustMQ Consumer Enhancements"
//! migration guide), pasted as a user would: only the imports and the client differ (the client
//! is the testkit's in-memory broker instead of a QUIC connection). If one of them stops
//! compiling or behaving as the document says, this test fails.
//!
//! One line of the document never compiled, against the old SDK either: its
//! `let message = consumer.receive().await?; message.ack().await?;` acks an `Option`
//! (`receive()` returns `Ok(None)` once the consumer is closed, in the old SDK and here). Its
//! working form, `if let Some(message) = ...`, is what is tested.

use std::collections::HashMap;
use std::time::Duration;

use rustmq_consumer_testkit::{SharedBroker, SimBroker, SimTransport};
use rustmq_consumer_tokio::{ConsumerBuilder, ConsumerConfig, TokioRuntime};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A broker with `my-topic` (two partitions, three messages in each); consumers create
/// `my-group`.
fn broker() -> SharedBroker {
    let mut broker = SimBroker::new();
    broker.create_topic("my-topic", 2);
    broker.create_topic("dlq", 1);
    for partition in 0..2 {
        broker
            .produce_values("my-topic", partition, (0..3).map(|i| format!("m{i}")))
            .expect("the topic exists");
    }
    SharedBroker::new(broker)
}

/// "Enhanced Consumer Configuration": the old SDK's struct literal, with the
/// `..Default::default()` the document's "Existing options..." comment stands for. Its
/// comments are the documented defaults; each is checked.
#[test]
fn enhanced_consumer_configuration() {
    let consumer_config = ConsumerConfig {
        // Existing options...
        fetch_size: 100,       // Cache size = fetch_size * 10
        max_retry_attempts: 3, // With exponential backoff
        dead_letter_queue: Some("dlq".to_string()),
        // Circuit breaker: 5 failures, 60s recovery
        // Batch processing: 100 acks, 100ms timeout
        ..Default::default()
    };
    assert_eq!(consumer_config.cache_entries(), 1_000);
    assert!(consumer_config.retry_backoff_max > consumer_config.retry_backoff_base);
    assert_eq!(consumer_config.failure_threshold, 5);
    assert_eq!(consumer_config.recovery_timeout, Duration::from_secs(60));
    assert_eq!(consumer_config.ack_batch_size, 100);
    assert_eq!(
        consumer_config.ack_batch_timeout,
        Duration::from_millis(100)
    );
    // The default names no topic or group: the builder (or the literal) gives them.
    assert!(consumer_config.topic.is_empty() && consumer_config.consumer_group.is_empty());
}

/// "For Existing Users" and "New Features Available", in one run. The region between the
/// markers is README.md's quick start, word for word (`readme_quick_start_is_tested`).
async fn migration_guide(client: SimTransport) -> Result<(HashMap<u32, u64>, Vec<u32>)> {
    // README quick start: begin
    // Existing code continues to work
    let consumer = ConsumerBuilder::new()
        .topic("my-topic")
        .consumer_group("my-group")
        .client(client)
        .build()
        .await?;

    // Enhanced features work automatically
    if let Some(message) = consumer.receive().await? {
        message.ack().await?; // Now batched automatically
    }

    // Access enhanced capabilities
    let lag = consumer.get_lag().await?;
    let partitions = consumer.assigned_partitions().await;
    consumer.pause_partitions(vec![0, 1]).await?;
    consumer.resume_partitions(vec![0, 1]).await?;

    // Graceful shutdown with cleanup
    consumer.close().await?; // Now with proper resource cleanup
                             // README quick start: end
    Ok((lag, partitions))
}

#[tokio::test(start_paused = true)]
async fn migration_guide_runs_unchanged() {
    let broker = broker();
    let client = SimTransport::new(broker.clone(), TokioRuntime);
    let (lag, partitions) = migration_guide(client)
        .await
        .expect("the guide's code runs");
    assert_eq!(partitions, vec![0, 1]);
    // Six messages, one acked: lag counts from the settle point until a commit.
    assert_eq!(lag.len(), 2, "{lag:?}");
    assert_eq!(lag.values().sum::<u64>(), 5, "{lag:?}");
    // The acked message was committed by the close.
    let committed: Vec<Option<u64>> = (0..2)
        .map(|p| {
            let tp = rustmq_consumer_tokio::protocol::TopicPartition::new("my-topic", p);
            broker.lock().committed("my-group", &tp)
        })
        .collect();
    assert!(
        committed.contains(&Some(1)),
        "the acked message was not committed: {committed:?}"
    );
}

/// The lines between `// README quick start: begin` and `end` in `source`, without their
/// indentation.
fn quick_start_region(source: &str) -> String {
    let mut region = Vec::new();
    let mut inside = false;
    for line in source.lines() {
        match line.trim() {
            "// README quick start: begin" => inside = true,
            "// README quick start: end" => inside = false,
            _ if inside => region.push(line.strip_prefix("    ").unwrap_or(line)),
            _ => {}
        }
    }
    region.join("\n")
}

#[test]
fn readme_quick_start_is_tested() {
    let region = quick_start_region(include_str!("migration_guide.rs"));
    assert!(region.lines().count() > 10, "markers not found");
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(&region),
        "README.md's quick start differs from the tested code; paste this:\n{region}"
    );
}
