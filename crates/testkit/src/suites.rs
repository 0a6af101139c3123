//! The scenarios run on both engines: each listed scenario becomes a test on SQLite and one on
//! Postgres (skipped, saying so, without `DATABASE_URL`).

/// Runs each listed `async fn(Harness) -> Harness` against SQLite and Postgres, ending each with
/// [`Harness::finish`] (the ledger must verify).
#[macro_export]
macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let h = $crate::Harness::new(false).await.expect("sqlite harness");
                    let h = super::$name(h).await;
                    h.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(h) = $crate::Harness::new(true).await else { return };
                    let h = super::$name(h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

/// Runs each listed `async fn(Stack)` against a stack on SQLite and one on Postgres, each with
/// the pricing given: `name: Pricing::free()`.
/// The scenario ends the stack itself (`Stack::finish`).
#[macro_export]
macro_rules! stack_suite {
    ($($name:ident: $pricing:expr),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Stack::start($pricing).await).await;
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::Db::postgres().await else {
                        return;
                    };
                    super::$name($crate::Stack::start_on(db, $pricing).await).await;
                }
            )*
        }
    };
}

/// Runs each listed `async fn(Db)` on a fresh SQLite database and, where one is available, on a
/// fresh Postgres one (the scenario starts what it needs on it).
#[macro_export]
macro_rules! db_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Db::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::Db::postgres().await else {
                        return;
                    };
                    super::$name(db).await;
                }
            )*
        }
    };
}
