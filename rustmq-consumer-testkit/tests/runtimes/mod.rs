//! Shared by the QUIC test files: each scenario, an async fn over the consumer's runtime and
//! quinn's, run once on tokio and once on smol.

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// `on_both_runtimes!(a, b)`: tests `on_tokio::a`, `on_smol::a`, ... calling `a(runtime,
/// quinn runtime)` of the including file.
macro_rules! on_both_runtimes {
    ($($name:ident),* $(,)?) => {
        mod on_tokio {
            use std::sync::Arc;
            use rustmq_consumer_tokio::TokioRuntime;
            $(
                #[tokio::test]
                async fn $name() {
                    crate::runtimes::init_tracing();
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
                    crate::runtimes::init_tracing();
                    smol::block_on(super::$name(SmolRuntime, Arc::new(quinn::SmolRuntime)));
                }
            )*
        }
    };
}
