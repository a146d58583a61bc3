//! Test fixtures: a fresh, migrated database per test on SQLite and on
//! PostgreSQL, the `store_test!` macro that runs one test body on both, and
//! a kiln server on port 0.
//!
//! PostgreSQL is found at `KILN_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, trust auth). Each test
//! creates its own database there and drops it afterwards, also when the test
//! body panics. There is no silent skip: without PostgreSQL the PostgreSQL
//! half of each test fails, and `scripts/test` is what starts a throwaway
//! cluster on a machine that has none.

mod server;

use std::future::Future;

use futures::FutureExt;
use kiln_store::Store;
use sqlx::Connection;

pub use server::{TestServer, run_server_on, run_server_with};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server URL tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("KILN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A fresh database, removed by `cleanup`.
#[derive(Debug)]
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    /// Holds the SQLite file (and the server's data directory) alive.
    pub dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}?mode=rwc", dir.path().join("kiln.db").display()),
                backend,
                dir,
                pg_name: None,
            },
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("kiln_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
                    panic!(
                        "cannot reach PostgreSQL at {admin}: {e}\n\
                         run the tests with scripts/test, which starts a throwaway PostgreSQL \
                         when none runs, or set KILN_TEST_POSTGRES_URL"
                    )
                });
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("creating the test database");
                conn.close().await.ok();
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                TestDb {
                    url: format!("{base}/{name}"),
                    backend,
                    dir,
                    pg_name: Some(name),
                }
            }
        }
    }

    /// Opens (and migrates) the store on this database.
    pub async fn store(&self) -> Store {
        Store::connect(&self.url).await.expect("opening the test store")
    }

    /// Drops the PostgreSQL database (the SQLite file goes with `dir`).
    pub async fn cleanup(self) {
        if let Some(name) = &self.pg_name {
            let mut conn = sqlx::PgConnection::connect(&postgres_admin_url())
                .await
                .expect("reconnecting to drop the test database");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .expect("dropping the test database");
            conn.close().await.ok();
        }
    }
}

/// Runs `body` against a fresh store on `backend`, then removes the
/// database whether the body passed or panicked.
pub async fn run_on<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let outcome = std::panic::AssertUnwindSafe(body(store.clone())).catch_unwind().await;
    store.close().await;
    db.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Declares a test that runs the same body on SQLite and on PostgreSQL:
/// `store_test!(name, |store| { ... });` makes `name::sqlite` and
/// `name::postgres`.
#[macro_export]
macro_rules! store_test {
    ($name:ident, |$store:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::run_on($crate::Backend::Sqlite, |$store| async move { $body }).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::run_on($crate::Backend::Postgres, |$store| async move { $body }).await
            }
        }
    };
}
