//! kiln server: wiring of the store, secrets, auth and the REST API.
//! `run(state, listener, shutdown)` serves on an already-bound listener so
//! tests use port 0; `serve(config, shutdown)` is what `kiln server` calls.

pub mod api;
pub mod auth;
pub mod bmc;
pub mod boot_files;
pub mod boot_http;
pub mod config;
pub mod dhcp;
pub mod error;
pub mod failure_limit;
pub mod jobs;
pub mod peer;
pub mod refusals;
pub mod secrets;
pub mod tftp;

use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use kiln_store::{Actor, Store};
use kiln_types::auth::{Role, TokenCreated};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

pub use config::{Config, Settings};
use error::ApiError;
use secrets::SecretBox;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub secrets: SecretBox,
    pub boot: std::sync::Arc<boot_http::BootContext>,
    /// Every BMC call goes through it (API, power sync, the job engine).
    pub bmc: std::sync::Arc<bmc::BmcService>,
    /// Runs jobs (`serve` starts its loop); the API wakes it.
    pub engine: std::sync::Arc<jobs::Engine>,
    /// Token lifetimes and the failed-authentication limit (`[auth]`).
    pub auth: std::sync::Arc<auth::AuthGuard>,
}

/// Largest request body: a bulk import of `MAX_BULK` machines fits.
const BODY_LIMIT: usize = 64 << 20;

impl AppState {
    /// Opens the store (SQLite under the data directory unless a PostgreSQL
    /// URL is configured) and the secret key (created on first start).
    pub async fn open(config: &Config) -> anyhow::Result<AppState> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
        let store = open_store(config).await?;
        let secrets = SecretBox::load_or_create(&config.secret_key_file)?;
        let artifacts = config.artifacts_dir();
        std::fs::create_dir_all(&artifacts)
            .with_context(|| format!("cannot create the artifacts directory {}", artifacts.display()))?;
        let files = boot_files::Artifacts::new(&artifacts, config.boot.file_cache_limits())?;
        let boot = std::sync::Arc::new(boot_http::BootContext {
            settings: config.boot.clone(),
            artifacts,
            files: std::sync::Arc::new(files),
        });
        let bmc = std::sync::Arc::new(bmc::BmcService::new(store.clone(), secrets.clone(), config.bmc.clone()));
        let effects = std::sync::Arc::new(jobs::ServerEffects::new(
            store.clone(),
            bmc.clone(),
            boot.clone(),
            config,
        )?);
        let engine = kiln_workflow::Engine::new(store.clone(), effects, config.jobs.clone(), jobs::server_name());
        Ok(AppState {
            store,
            secrets,
            boot,
            bmc,
            engine,
            auth: std::sync::Arc::new(auth::AuthGuard::new(config.auth.clone())),
        })
    }
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(match &config.database_url {
        Some(url) => Store::connect(url)
            .await
            .context("cannot open the PostgreSQL database")?,
        None => Store::open_data_dir(&config.data_dir)
            .await
            .with_context(|| format!("cannot open the database in {}", config.data_dir.display()))?,
    })
}

pub fn router(state: AppState) -> Router {
    api::router()
        .route("/healthz", get(healthz))
        .route("/boot/ipxe", get(boot_http::ipxe_script))
        .route("/boot/file/{*path}", get(boot_files::serve))
        .route("/boot/job/{id}/{file}", get(boot_http::job_file))
        .fallback(|| async {
            ApiError::not_found("no such endpoint: the API lives under /api/v1 (see /api/v1/openapi.json)")
        })
        // Around every route, so routes added later are covered too.
        .layer(axum::middleware::from_fn_with_state(state.clone(), refusals::audit))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Paths only: a query may hold a job token (`/boot/job/…?token=`).
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<axum::body::Body>| {
            tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
        }))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
    }
}

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn run(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
    .context("the API server failed")
}

/// Opens everything `config` names, binds its listen address (and DHCP's
/// sockets) and serves.
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = AppState::open(&config).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let dhcp = match &config.dhcp {
        Some(d) => dhcp::bind_interfaces(d).context("cannot start the DHCP service")?,
        None => vec![],
    };
    serve_on(state, &config, listener, dhcp, shutdown).await
}

/// Runs every service `config` asks for on listeners bound beforehand —
/// the API on `listener`, DHCP on `dhcp` (from [`dhcp::bind_interfaces`];
/// empty: no DHCP) — until `shutdown` or until one of them fails.
pub async fn serve_on(
    state: AppState,
    config: &Config,
    listener: TcpListener,
    dhcp: Vec<dhcp::BoundInterface>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let backend = match config.database_url {
        Some(_) => "postgresql",
        None => "sqlite",
    };
    let api_addr = listener.local_addr()?;
    tracing::info!(listen = %api_addr, data_dir = %config.data_dir.display(), backend, "kiln server started");
    // The API and the boot services live and die together: when one stops
    // (or fails), all stop.
    let mut services: tokio::task::JoinSet<(&'static str, anyhow::Result<()>)> = tokio::task::JoinSet::new();
    if let Some(settings) = config.dhcp.clone()
        && !dhcp.is_empty()
    {
        let (store, boot, stop) = (state.store.clone(), config.boot.clone(), shutdown.clone());
        // Boot file URLs name the port the API really listens on.
        let port = api_addr.port();
        services.spawn(async move { ("DHCP", dhcp::run_on(store, settings, dhcp, boot, port, stop).await) });
    }
    if let Some(t) = config.tftp.clone() {
        let stop = shutdown.clone();
        services.spawn(async move { ("TFTP", tftp::run(t, stop).await) });
    }
    if config.bmc.sync_interval_secs > 0 {
        let (bmc, stop) = (state.bmc.clone(), shutdown.clone());
        services.spawn(async move { ("power sync", bmc::run_sync(bmc, stop).await) });
    }
    let bmc = state.bmc.clone();
    let (engine, stop) = (state.engine.clone(), shutdown.clone());
    services.spawn(async move { ("job engine", engine.run(stop).await) });
    let stop = shutdown.clone();
    services.spawn(async move { ("API", run(state, listener, stop).await) });
    let mut result = Ok(());
    while let Some(done) = services.join_next().await {
        shutdown.cancel();
        let (name, r) = done.context("a service task panicked")?;
        if let Err(e) = r
            && result.is_ok()
        {
            result = Err(e.context(format!("the {name} service stopped")));
        }
    }
    // Kept sessions would hold the BMCs' few session slots until they
    // time out (a restart opens new ones).
    bmc.close_sessions(std::time::Duration::from_secs(5)).await;
    result
}

/// Creates a token straight in the database, without a running server: how
/// a fresh install gets its first admin token. Its expiry follows `[auth]`
/// like a token made through the API.
pub async fn bootstrap_token(
    config: &Config,
    role: Role,
    tenant: Option<&str>,
    name: Option<&str>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<TokenCreated> {
    let expires_at = auth::resolve_expiry(expires_at, chrono::Utc::now(), config.auth.max_token_lifetime_days)
        .map_err(|e| anyhow::anyhow!(e))?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
    let store = open_store(config).await?;
    let (token, hash) = auth::new_token();
    let info = store
        .create_token(
            &Actor::new("bootstrap (offline)"),
            name,
            role,
            tenant,
            &hash,
            expires_at,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    store.close().await;
    Ok(TokenCreated { info, token })
}
