//! `kiln-sim`: a fleet of simulated Redfish BMCs on loopback, until Ctrl-C
//! or SIGTERM. Writes the BMCs' URLs (one a line) and, with `--tls`, the CA
//! certificate to files, then prints one "ready" line.
//!
//! The password every BMC accepts comes from `KILN_SIM_PASSWORD` (default
//! `password`), not from the command line.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kiln_sim::{BmcSpec, Faults, SimConfig};

#[derive(Debug, Parser)]
#[command(version, about = "Simulated Redfish BMCs on loopback, one port each")]
struct Args {
    /// How many BMCs.
    #[arg(long, default_value_t = 1)]
    bmcs: usize,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    ip: IpAddr,
    /// BMC i listens on BASE_PORT + i; 0: ports chosen by the OS.
    #[arg(long, default_value_t = 0)]
    base_port: u16,
    /// Serve HTTPS (certificate signed by a CA made at start; see --ca).
    #[arg(long)]
    tls: bool,
    /// The user every BMC accepts.
    #[arg(long, default_value = "admin")]
    user: String,
    /// Systems behind each BMC.
    #[arg(long, default_value_t = 1)]
    systems: usize,
    /// No SessionService: basic auth only.
    #[arg(long)]
    no_sessions: bool,
    /// Systems start powered on.
    #[arg(long)]
    powered_on: bool,
    /// How long a power change takes to show, in milliseconds.
    #[arg(long, default_value_t = 0)]
    power_delay_ms: u64,
    /// Added before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// The first N requests to each BMC answer 503.
    #[arg(long, default_value_t = 0)]
    error_burst: u32,
    /// Write the BMCs' URLs here, one a line.
    #[arg(long)]
    urls: Option<PathBuf>,
    /// With --tls: write the CA certificate (PEM) here.
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let cfg = SimConfig {
        bmcs: a.bmcs,
        ip: a.ip,
        base_port: a.base_port,
        tls: a.tls,
        username: a.user,
        password: std::env::var("KILN_SIM_PASSWORD").unwrap_or_else(|_| "password".into()),
        spec: BmcSpec {
            systems: a.systems,
            sessions: !a.no_sessions,
            power_delay: Duration::from_millis(a.power_delay_ms),
            latency: Duration::from_millis(a.latency_ms),
            powered_on: a.powered_on,
            faults: Faults {
                error_burst: a.error_burst,
                ..Faults::default()
            },
            ..BmcSpec::default()
        },
    };
    let sim = kiln_sim::start(cfg).await?;
    if let Some(path) = &a.urls {
        let text: String = sim.bmcs().iter().map(|b| format!("{}\n", b.url())).collect();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let (Some(path), Some(pem)) = (&a.ca, sim.ca_pem()) {
        std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
    }
    let first = sim.bmcs().first().map(|b| b.url().to_string()).unwrap_or_default();
    println!("kiln-sim: {} BMCs ready (first {first})", sim.bmcs().len());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    sim.shutdown().await;
    Ok(())
}
