//! The conformance suite (`suite/mod.rs`) run unchanged on tokio, smol and the virtual runtime.

mod suite;

/// Logs to the test output when `RUST_LOG` is set.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

macro_rules! conformance {
    ($($(#[$meta:meta])* $name:ident),* $(,)?) => {
        mod on_tokio {
            use rustmq_consumer_tokio::TokioRuntime;
            $(
                $(#[$meta])*
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    super::suite::$name(TokioRuntime).await;
                }
            )*
        }
        mod on_smol {
            use rustmq_consumer_smol::SmolRuntime;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    smol::block_on(super::suite::$name(SmolRuntime));
                }
            )*
        }
        mod on_virtual {
            use rustmq_consumer_testkit::VirtualRuntime;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    super::init_tracing();
                    let rt = VirtualRuntime::new();
                    rt.block_on(super::suite::$name(rt.clone()));
                }
            )*
        }
    };
}

conformance!(
    receive,
    out_of_order_acks,
    nack_and_retry,
    reject_to_dead_letter,
    pause_resume,
    seek,
    lag,
    commit,
    close,
    stream,
    one_driver_task,
    bounded_when_not_acking,
    bad_input,
    close_with_timeout,
    two_partitions,
    #[ignore = "machine bug: poll_work runs send_work before deliver, so no fetch follows a fully delivered buffer until the next input"]
    holding_more_than_fetch_size,
);
