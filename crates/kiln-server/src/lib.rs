//! kiln server: wiring of the store, secrets, auth and the REST API.
//! `run(state, listener, shutdown)` serves on an already-bound listener so
//! tests use port 0 (`run_tls` the same over TLS, `run_boot` the boot
//! listener); `serve(config, shutdown)` is what `kiln server` calls.

pub mod api;
pub mod auth;
pub mod bmc;
pub mod boot_files;
pub mod boot_http;
pub mod config;
pub mod dhcp;
pub mod discovery;
pub mod error;
pub mod failure_limit;
pub mod first_stage;
pub mod jobs;
pub mod outbound;
pub mod peer;
pub mod policy;
pub mod refusals;
pub mod secrets;
pub mod tftp;
pub mod tls;

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
    /// The outbound rules for URLs callers give (checked when given).
    pub outbound: std::sync::Arc<outbound::OutboundClient>,
    /// `[api] trusted_proxies`, for [`peer::client_ip`].
    pub trusted_proxies: peer::TrustedProxies,
    /// Token lifetimes and the failed-authentication limit (`[auth]`).
    pub auth: std::sync::Arc<auth::AuthGuard>,
    /// kiln's own DHCP pools (`[[dhcp.subnet]] pool`): no subnet's static
    /// range or static address may meet them.
    pub dhcp_pools: std::sync::Arc<Vec<kiln_types::network::DynamicPool>>,
}

/// Largest request body: a bulk import of `MAX_BULK` machines fits.
const BODY_LIMIT: usize = 64 << 20;

impl AppState {
    /// Opens the store (SQLite under the data directory unless a PostgreSQL
    /// URL is configured) and the secret key (created on first start).
    pub async fn open(config: &Config) -> anyhow::Result<AppState> {
        // One TLS provider for the process (ring): the BMC drivers' HTTPS
        // and everything else that speaks TLS use it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
        let store = open_store(config).await?;
        let dhcp_pools = kiln_boot::network::kiln_pools(config.dhcp.as_ref().map_or(&[][..], |d| &d.subnets));
        check_subnets(&store, &dhcp_pools).await?;
        let secrets = SecretBox::load_or_create(&config.secret_key_file)?;
        let artifacts = config.artifacts_dir();
        std::fs::create_dir_all(&artifacts)
            .with_context(|| format!("cannot create the artifacts directory {}", artifacts.display()))?;
        let files = boot_files::Artifacts::new(&artifacts, config.boot.file_cache_limits())?
            .with_fallback(first_stage::fallback_files(config));
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
        let outbound = std::sync::Arc::new(outbound::OutboundClient::from_config(config).context("[outbound]")?);
        Ok(AppState {
            store,
            secrets,
            boot,
            bmc,
            engine,
            outbound,
            trusted_proxies: peer::TrustedProxies(std::sync::Arc::new(config.api.trusted_proxies.clone())),
            auth: std::sync::Arc::new(auth::AuthGuard::new(config.auth.clone())),
            dhcp_pools: std::sync::Arc::new(dhcp_pools),
        })
    }
}

/// Refuses to start when a subnet in the inventory meets one of kiln's DHCP
/// pools (the config changed since the subnet was checked): a dynamic
/// lease could take a machine's static address.
async fn check_subnets(store: &Store, pools: &[kiln_types::network::DynamicPool]) -> anyhow::Result<()> {
    let mut why = vec![];
    for subnet in store.list_subnets().await.context("cannot read the subnets")? {
        why.extend(subnet.problems(pools));
        for a in store.subnet_assignments(&subnet.id.to_string()).await? {
            if let Some(e) = subnet.refuses_static(a.address, pools) {
                why.push(format!("machine {} has {}, but {e}", a.hostname, a.address));
            }
        }
    }
    if !why.is_empty() {
        anyhow::bail!(
            "the inventory's subnets and [dhcp] do not agree: {}; change the [[dhcp.subnet]] pool or the subnet (kiln subnet edit)",
            why.join("; ")
        );
    }
    Ok(())
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
    let routes = api::router().route("/healthz", get(healthz)).merge(boot_routes());
    finish(
        routes,
        "no such endpoint: the API lives under /api/v1 (see /api/v1/openapi.json)",
        state,
    )
}

/// What firmware fetches: iPXE scripts, boot files, a job's installer files.
fn boot_routes() -> Router<AppState> {
    Router::new()
        .route("/boot/ipxe", get(boot_http::ipxe_script))
        .route("/boot/file/{*path}", get(boot_files::serve))
        .route("/boot/job/{id}/{file}", get(boot_http::job_file))
}

/// The boot listener's routes: the boot routes and the endpoints agents
/// call with their own token ([`api::agent_routes`]); nothing that takes
/// an API token, so plain HTTP on the provisioning network carries none.
pub fn boot_router(state: AppState) -> Router {
    finish(
        boot_routes().merge(api::agent_routes()),
        "no such endpoint on the boot listener, which serves only /boot/ and the agents' endpoints: \
         the API is on kiln's API listener (`listen`)",
        state,
    )
}

/// The layers every listener's router has.
fn finish(routes: Router<AppState>, not_found: &'static str, state: AppState) -> Router {
    routes
        .fallback(move || async move { ApiError::not_found(not_found) })
        // Around every route, so routes added later are covered too.
        .layer(axum::middleware::from_fn_with_state(state.clone(), refusals::audit))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Paths only: a query may hold a job token (`/boot/job/…?token=`).
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<axum::body::Body>| {
            tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
        }))
        .layer(axum::Extension(state.trusted_proxies.clone()))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
    }
}

/// Serves the API over plain HTTP on `listener` until `shutdown` is
/// cancelled.
pub async fn run(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    serve_plain(listener, router(state), shutdown)
        .await
        .context("the API server failed")
}

/// Serves `app` over plain HTTP, with each request's peer address
/// (`ConnectInfo`), until `shutdown`.
async fn serve_plain(listener: TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// [`run`] over TLS.
pub async fn run_tls(
    state: AppState,
    listener: TcpListener,
    tls: std::sync::Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    // `tap_io` is how axum gives a listener of its own the peer's
    // `ConnectInfo<SocketAddr>` (it is implemented for TcpListener only).
    let listener = tls::TlsListener::new(listener, tls)?.tap_io(|_| ());
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
    .context("the API server failed")
}

/// Serves the boot listener ([`boot_router`], plain HTTP) on `listener`.
pub async fn run_boot(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    serve_plain(listener, boot_router(state), shutdown)
        .await
        .context("the boot HTTP server failed")
}

/// The HTTP listeners a server runs on, bound beforehand.
#[derive(Debug)]
pub struct Listeners {
    pub api: TcpListener,
    /// `None`: the API is plain HTTP.
    pub api_tls: Option<tls::ServerTls>,
    /// The plain-HTTP boot listener (`[boot] listen`).
    pub boot: Option<TcpListener>,
}

impl Listeners {
    /// The API over plain HTTP, and no boot listener.
    pub fn plain(api: TcpListener) -> Listeners {
        Listeners {
            api,
            api_tls: None,
            boot: None,
        }
    }

    /// Binds what `config` asks for, after loading (or generating) the TLS
    /// certificate, so that a bad certificate fails before any port opens.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let api_tls = match &config.api.tls {
            Some(source) => Some(tls::load(source, config.listen)?),
            None => None,
        };
        let api = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let boot = match config.boot.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} ([boot] listen)"))?,
            ),
            None => None,
        };
        Ok(Listeners { api, api_tls, boot })
    }
}

/// Opens everything `config` names, binds its listen addresses (and DHCP's
/// sockets) and serves.
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Before anything opens: a DHCP that offers a file nothing serves is
    // a configuration error, not a fleet that silently fails to boot.
    first_stage::check(&config)?;
    let state = AppState::open(&config).await?;
    let listeners = Listeners::bind(&config).await?;
    let dhcp = match &config.dhcp {
        Some(d) => dhcp::bind_interfaces(d).context("cannot start the DHCP service")?,
        None => vec![],
    };
    serve_on(state, &config, listeners, dhcp, shutdown).await
}

/// Runs every service `config` asks for on listeners bound beforehand —
/// the API and boot HTTP on `listeners`, DHCP on `dhcp` (from
/// [`dhcp::bind_interfaces`]; empty: no DHCP) — until `shutdown` or until
/// one of them fails.
pub async fn serve_on(
    state: AppState,
    config: &Config,
    listeners: Listeners,
    dhcp: Vec<dhcp::BoundInterface>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let backend = match config.database_url {
        Some(_) => "postgresql",
        None => "sqlite",
    };
    let Listeners { api, api_tls, boot } = listeners;
    let api_addr = api.local_addr()?;
    let boot_addr = boot.as_ref().map(|b| b.local_addr()).transpose()?;
    match &api_tls {
        Some(t) => tracing::info!(
            url = %format!("https://{api_addr}"),
            fingerprint = %t.fingerprint,
            cert = %t.cert_path.display(),
            "the API is served over TLS; clients pin this fingerprint (KILN_FINGERPRINT)"
        ),
        None => tracing::info!(url = %format!("http://{api_addr}"), "the API is served over plain HTTP"),
    }
    if let Some(b) = boot_addr {
        tracing::info!(url = %format!("http://{b}"), "boot HTTP listener (boot files and agents only)");
    }
    tracing::info!(listen = %api_addr, data_dir = %config.data_dir.display(), backend, "kiln server started");
    // The API and the boot services live and die together: when one stops
    // (or fails), all stop.
    let mut services: tokio::task::JoinSet<(&'static str, anyhow::Result<()>)> = tokio::task::JoinSet::new();
    if let Some(settings) = config.dhcp.clone()
        && !dhcp.is_empty()
    {
        let (store, boot, stop) = (state.store.clone(), config.boot.clone(), shutdown.clone());
        // Boot file URLs name the port firmware can fetch from: the boot
        // listener's, else the API's (plain HTTP then, as config checks).
        let port = boot_addr.unwrap_or(api_addr).port();
        services.spawn(async move { ("DHCP", dhcp::run_on(store, settings, dhcp, boot, port, stop).await) });
    }
    if let Some(t) = config.tftp.clone() {
        let (stop, fallback) = (shutdown.clone(), first_stage::fallback_files(config));
        services.spawn(async move { ("TFTP", tftp::run(t, fallback, stop).await) });
    }
    if config.bmc.sync_interval_secs > 0 {
        let (bmc, stop) = (state.bmc.clone(), shutdown.clone());
        services.spawn(async move { ("power sync", bmc::run_sync(bmc, stop).await) });
    }
    let bmc = state.bmc.clone();
    let (engine, stop) = (state.engine.clone(), shutdown.clone());
    services.spawn(async move { ("job engine", engine.run(stop).await) });
    if let Some(listener) = boot {
        let (state, stop) = (state.clone(), shutdown.clone());
        services.spawn(async move { ("boot HTTP", run_boot(state, listener, stop).await) });
    }
    let stop = shutdown.clone();
    match api_tls {
        Some(t) => services.spawn(async move { ("API", run_tls(state, api, t.config, stop).await) }),
        None => services.spawn(async move { ("API", run(state, api, stop).await) }),
    };
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
