//! Shared by the test files whose scenarios run on the virtual runtime and on tokio with a
//! paused clock: `on_virtual_and_tokio!(a, b)` makes tests `on_virtual::a`, `on_tokio::a`, ...
//! calling `a(runtime)` of the including file.

macro_rules! on_virtual_and_tokio {
    ($($name:ident),* $(,)?) => {
        mod on_virtual {
            use rustmq_consumer_testkit::VirtualRuntime;
            $(
                #[test]
                fn $name() {
                    let rt = VirtualRuntime::new();
                    rt.block_on(super::$name(rt.clone()));
                }
            )*
        }
        mod on_tokio {
            use rustmq_consumer_tokio::TokioRuntime;
            $(
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    super::$name(TokioRuntime).await;
                }
            )*
        }
    };
}
