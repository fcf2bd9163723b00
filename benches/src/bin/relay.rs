//! A UDP relay that passes a client's datagrams to the broker one by one, `GAP_US` apart, as a
//! network delivers the packets of a burst; answers go back at once.
//!
//! ```text
//! cargo run --release -p rustmq-consumer-benches --bin relay -- 127.0.0.1:9192 127.0.0.1:9092 300
//! cargo run --release -p rustmq-consumer-benches --bin broker_check -- 127.0.0.1:9192 1 1000
//! ```
//!
//! On 127.0.0.1 the packets of a request arrive together, so the real broker's single read of a
//! request (PROTOCOL.md) nearly always gets the whole frame; through this relay it gets the
//! first packet of a multi-packet request only, as over a network. A bench tool, not part of
//! the consumer: it runs until killed.
#![allow(clippy::print_stdout)]

use std::collections::hash_map::{Entry, HashMap};
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Datagrams a client may have waiting for their turn.
const QUEUE: usize = 4_096;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: relay LISTEN_ADDR BROKER_ADDR GAP_US";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let broker: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let gap = Duration::from_micros(args.next().ok_or(usage)?.parse()?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(relay(listen, broker, gap))
}

async fn relay(listen: SocketAddr, broker: SocketAddr, gap: Duration) -> Result<()> {
    let front = Arc::new(UdpSocket::bind(listen).await?);
    println!("relaying {listen} -> {broker}, client datagrams {gap:?} apart");
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, client) = front.recv_from(&mut buf).await?;
        let tx = match clients.entry(client) {
            Entry::Occupied(tx) => tx.into_mut(),
            Entry::Vacant(vacant) => {
                let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
                upstream.connect(broker).await?;
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(spaced(Arc::clone(&upstream), rx, gap));
                tokio::spawn(answers(upstream, Arc::clone(&front), client));
                vacant.insert(tx)
            }
        };
        // A full queue drops the datagram, as a congested link would.
        let _ = tx.try_send(buf[..len].to_vec());
    }
}

/// Sends the client's datagrams to the broker, each `gap` after the one before.
async fn spaced(upstream: Arc<UdpSocket>, mut rx: mpsc::Receiver<Vec<u8>>, gap: Duration) {
    let mut next = Instant::now();
    while let Some(datagram) = rx.recv().await {
        sleep_until(next).await;
        if upstream.send(&datagram).await.is_err() {
            return;
        }
        next = Instant::now().max(next) + gap;
    }
}

/// Passes the broker's datagrams back to the client at once.
async fn answers(upstream: Arc<UdpSocket>, front: Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(len) = upstream.recv(&mut buf).await {
        if front.send_to(&buf[..len], client).await.is_err() {
            return;
        }
    }
}
