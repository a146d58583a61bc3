//! `kiln server`: load the config, set up logging, serve until SIGINT/SIGTERM.

use std::path::PathBuf;

use kiln_server::{Config, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// TOML config file (keys: data_dir, listen, database_url, secret_key_file, log).
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
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
    let config = Config::load(args.config.as_deref(), args.settings)?;
    init_logging(&config.log);
    kiln_server::serve(config, shutdown_on_signal()).await
}
