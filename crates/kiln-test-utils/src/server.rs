//! A kiln server (API and job engine, and DHCP when the settings have a
//! `[dhcp]`) on 127.0.0.1:0 over a fresh test database, with an admin token
//! ready, and `api_test!` to run one body against both backends. Settings
//! with `[api] tls = true` serve the API over TLS (clients pinned to its
//! generated certificate); with `[boot] listen`, a boot listener runs too
//! (on 127.0.0.1:0 whatever address they name).

use std::future::Future;

use futures::FutureExt;
use kiln_client::Client;
use kiln_server::{AppState, Config, Settings};
use kiln_store::Actor;
use kiln_types::auth::Role;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Backend, TestDb};

/// A running server; stop it with `stop` (the `api_test!` macro does).
#[derive(Debug)]
pub struct TestServer {
    pub url: String,
    /// The API certificate's `sha256:HEX` when the API is served over TLS.
    pub fingerprint: Option<String>,
    /// The boot listener's URL, when the settings have a `[boot] listen`.
    pub boot_url: Option<String>,
    pub admin_token: String,
    pub state: AppState,
    pub config: Config,
    /// Where DHCP listens, when the settings have a `[dhcp]` (give it
    /// `port = 0` and `interfaces = ["lo"]`: no privileges needed).
    pub dhcp_addr: Option<std::net::SocketAddrV4>,
    db: TestDb,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    boot: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    engine: tokio::task::JoinHandle<anyhow::Result<()>>,
    dhcp: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, Settings::default()).await
    }

    /// A server with `settings` (data directory, listen address and
    /// database are the test's own).
    pub async fn start_with(backend: Backend, settings: Settings) -> TestServer {
        // Tests also build plain reqwest clients (see install_tls_provider).
        kiln_client::install_tls_provider();
        let db = TestDb::new(backend).await;
        let settings = Settings {
            data_dir: Some(db.dir.path().to_path_buf()),
            listen: Some("127.0.0.1:0".into()),
            database_url: (backend == Backend::Postgres).then(|| db.url.clone()),
            ..settings
        };
        let config = Config::from_settings(settings).expect("test config");
        let state = AppState::open(&config).await.expect("opening the server state");
        let (admin_token, hash) = kiln_server::auth::new_token();
        state
            .store
            .create_token(
                &Actor::new("test-setup"),
                Some("test-admin"),
                Role::Admin,
                None,
                &hash,
                None,
            )
            .await
            .expect("creating the admin token");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding port 0");
        let tls = config.api.tls.as_ref().map(|source| {
            kiln_server::tls::load(source, listener.local_addr().unwrap()).expect("loading the API certificate")
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let (boot_url, boot) = match config.boot.listen {
            Some(_) => {
                let boot = TcpListener::bind("127.0.0.1:0").await.expect("binding port 0");
                let url = format!("http://{}", boot.local_addr().unwrap());
                let task = tokio::spawn(kiln_server::run_boot(state.clone(), boot, shutdown.clone()));
                (Some(url), Some(task))
            }
            None => (None, None),
        };
        let (dhcp_addr, dhcp) = match config.dhcp.clone() {
            Some(settings) => {
                let sockets = kiln_server::dhcp::bind_interfaces(&settings).expect("binding the DHCP sockets");
                let addr = sockets[0].local_addr().expect("the DHCP socket's address");
                let port = listener.local_addr().unwrap().port();
                let task = tokio::spawn(kiln_server::dhcp::run_on(
                    state.store.clone(),
                    settings,
                    sockets,
                    config.boot.clone(),
                    port,
                    shutdown.clone(),
                ));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };
        let fingerprint = tls.as_ref().map(|t| t.fingerprint.clone());
        let task = match tls {
            Some(t) => tokio::spawn(kiln_server::run_tls(
                state.clone(),
                listener,
                t.config,
                shutdown.clone(),
            )),
            None => tokio::spawn(kiln_server::run(state.clone(), listener, shutdown.clone())),
        };
        let engine = tokio::spawn(state.engine.clone().run(shutdown.clone()));
        TestServer {
            url,
            fingerprint,
            boot_url,
            boot,
            admin_token,
            state,
            config,
            dhcp_addr,
            db,
            shutdown,
            task,
            engine,
            dhcp,
        }
    }

    /// A client with the admin token.
    pub fn admin(&self) -> Client {
        self.client(Some(&self.admin_token))
    }

    /// A client with `token` (or none); over TLS, pinned to the server's
    /// certificate.
    pub fn client(&self, token: Option<&str>) -> Client {
        Client::with_trust(&self.url, token.map(str::to_string), &self.trust()).expect("building the client")
    }

    /// How a client trusts this server: its fingerprint over TLS.
    pub fn trust(&self) -> kiln_client::Trust {
        match &self.fingerprint {
            Some(fp) => kiln_client::Trust::Fingerprint(kiln_client::parse_fingerprint(fp).expect("the fingerprint")),
            None => kiln_client::Trust::System,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        if let Some(boot) = self.boot {
            let _ = boot.await;
        }
        let _ = self.engine.await;
        if let Some(dhcp) = self.dhcp {
            let _ = dhcp.await;
        }
        self.state.store.close().await;
        self.db.cleanup().await;
    }
}

/// Runs `body` against a fresh server on `backend`, then stops it and drops
/// its database whether the body passed or panicked.
pub async fn run_server_on<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(std::sync::Arc<TestServer>) -> Fut,
    Fut: Future<Output = ()>,
{
    run_server_with(backend, Settings::default(), body).await
}

/// [`run_server_on`] with `settings` (data directory, listen address and
/// database are still the test's own).
pub async fn run_server_with<F, Fut>(backend: Backend, settings: Settings, body: F)
where
    F: FnOnce(std::sync::Arc<TestServer>) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = std::sync::Arc::new(TestServer::start_with(backend, settings).await);
    let outcome = std::panic::AssertUnwindSafe(body(server.clone())).catch_unwind().await;
    match std::sync::Arc::try_unwrap(server) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("the test kept a reference to its TestServer"),
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// `api_test!(name, |srv| { ... })`: one body against a server on SQLite
/// (`name::sqlite`) and one on PostgreSQL (`name::postgres`).
/// `api_test!(name, settings = EXPR, |srv| { ... })` starts the servers with
/// the `Settings` EXPR gives.
#[macro_export]
macro_rules! api_test {
    ($name:ident, settings = $settings:expr, |$srv:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::run_server_with($crate::Backend::Sqlite, $settings, |$srv| async move { $body }).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::run_server_with($crate::Backend::Postgres, $settings, |$srv| async move { $body }).await
            }
        }
    };
    ($name:ident, |$srv:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::run_server_on($crate::Backend::Sqlite, |$srv| async move { $body }).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::run_server_on($crate::Backend::Postgres, |$srv| async move { $body }).await
            }
        }
    };
}
