//! `kiln server`: load the config, set up logging, serve until SIGINT/SIGTERM;
//! `kiln server fingerprint`: the API certificate's fingerprint, read on the
//! server, for clients to pin.

use std::path::PathBuf;

use kiln_server::{Config, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    /// TOML config file (docs/config.md).
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<ServerCmd>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ServerCmd {
    /// Print the SHA-256 fingerprint of the API's TLS certificate (what
    /// clients pin with KILN_FINGERPRINT), read from the config or the data
    /// directory.
    Fingerprint {
        /// TOML config file of the server.
        #[arg(long, env = "KILN_CONFIG")]
        config: Option<PathBuf>,
        /// The server's data directory (where a generated certificate is).
        #[arg(long, env = "KILN_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// The fingerprint line `kiln server fingerprint` prints.
pub fn fingerprint(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> anyhow::Result<String> {
    let config = Config::load(
        config.as_deref(),
        Settings {
            data_dir,
            ..Default::default()
        },
    )?;
    match kiln_server::tls::configured_fingerprint(&config)? {
        Some((fp, _)) => Ok(fp),
        None => anyhow::bail!(
            "the server in {} has no TLS certificate: it serves plain HTTP (kiln makes one at the first \
             start with `tls = true` under [api])",
            config.data_dir.display()
        ),
    }
}

pub fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    if let Some(ServerCmd::Fingerprint { config, data_dir }) = args.command {
        println!("{}", fingerprint(config, data_dir)?);
        return Ok(());
    }
    let config = Config::load(args.config.as_deref(), args.settings)?;
    init_logging(&config.log);
    kiln_server::serve(config, shutdown_on_signal()).await
}
