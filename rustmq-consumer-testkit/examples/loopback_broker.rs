//! Serves the embedded broker over QUIC on 127.0.0.1 until killed: a stand-in for a real
//! RustMQ broker when trying `enhanced_consumer -- --broker`.
//!
//! ```text
//! cargo run -p rustmq-consumer-testkit --example loopback_broker -- 5000   # messages in `orders`
//! cargo run --example enhanced_consumer -- --broker 127.0.0.1:PORT --accept-any-certificate
//! ```
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use rustmq_consumer_core::quic::quinn;
use rustmq_consumer_testkit::{LoopbackBroker, SharedBroker, SimBroker};

fn main() {
    let messages: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000);
    let mut broker = SimBroker::new();
    broker.create_topic("orders", 1);
    broker.create_topic("dead_letter_queue", 1);
    let values = (0..messages).map(|i| format!("order-{i}"));
    if let Err(error) = broker.produce_values("orders", 0, values) {
        println!("cannot produce: {error}");
        std::process::exit(1);
    }
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::SmolRuntime);
    let server = match LoopbackBroker::start(SharedBroker::new(broker), runtime) {
        Ok(server) => server,
        Err(error) => {
            println!("cannot start: {error}");
            std::process::exit(1);
        }
    };
    println!(
        "serving {messages} messages in `orders` at {}",
        server.addr()
    );
    smol::block_on(async {
        loop {
            smol::Timer::after(Duration::from_secs(3600)).await;
        }
    });
}
