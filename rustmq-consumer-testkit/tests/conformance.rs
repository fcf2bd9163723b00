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
                    super::init_tracing();
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
    a_steady_stream_leaves_the_timer_alone,
    acks_during_a_slow_fetch_commit_in_time,
    waiting_for_a_delivery_hands_over_the_acks,
    durations_too_long_for_an_instant,
    reject_to_dead_letter,
    update_config,
    pause_resume,
    pause_holds_queued_deliveries,
    seek,
    lag,
    commit,
    manual_commits_create_the_group,
    close_names_uncommitted_offsets,
    close,
    stream,
    one_driver_task,
    bounded_when_not_acking,
    bad_input,
    close_with_timeout,
    two_partitions,
    holding_more_than_fetch_size,
    batches,
    many_partitions,
    // Regression: a close during a revoke used to spin on the Revoking deadline.
    stale_after_rebalance,
    paused_through_a_rebalance,
    process_in_key_order,
    process_concurrency_bound,
    process_nacks,
    process_hot_key_bounded,
    process_through_a_seek,
    process_then_close,
    revoke_hook_acks_are_in_the_revoke_commit,
    assign_hook_seeks_before_the_first_delivery,
    failing_hook_is_reported_and_the_consumer_goes_on,
    event_stream_is_bounded_and_never_blocks,
);

/// The same seed gives the same application-visible run on every runtime.
mod differential {
    use super::suite::{scripted, Trace};
    use rustmq_consumer_smol::SmolRuntime;
    use rustmq_consumer_testkit::VirtualRuntime;
    use rustmq_consumer_tokio::TokioRuntime;

    fn on_virtual(seed: u64) -> Trace {
        let rt = VirtualRuntime::new();
        rt.block_on(scripted(rt.clone(), seed))
    }

    fn on_tokio(seed: u64) -> Trace {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("tokio runtime");
        rt.block_on(scripted(TokioRuntime, seed))
    }

    fn on_smol(seed: u64) -> Trace {
        smol::block_on(scripted(SmolRuntime, seed))
    }

    #[test]
    fn same_seed_same_events_on_every_runtime() {
        for seed in [1, 7, 0xdead_beef] {
            let reference = on_virtual(seed);
            assert!(reference.per_message.len() >= 40);
            // The virtual runtime is fully deterministic: even the interleaving repeats.
            assert_eq!(
                on_virtual(seed),
                reference,
                "seed {seed}: virtual replay differs"
            );
            // On real or paused clocks the interleaving of retries with fresh messages depends
            // on timing; what each message went through must not.
            assert_eq!(
                on_tokio(seed).canonical(),
                reference.canonical(),
                "seed {seed}: tokio"
            );
            assert_eq!(
                on_smol(seed).canonical(),
                reference.canonical(),
                "seed {seed}: smol"
            );
        }
    }

    #[test]
    fn different_seeds_differ() {
        assert_ne!(on_virtual(1).canonical(), on_virtual(2).canonical());
    }
}
