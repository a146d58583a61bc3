//! A power-status sweep over many Redfish BMCs, for `bench/bmc-sweep.sh`:
//! one `RedfishDriver` per BMC (each call logs in, finds the system, reads
//! it and logs out, as the power-state reconciler would), at most
//! `--concurrency` calls at once. Prints wall time, per-call latency, the
//! process's peak resident memory and the counts.
//!
//! `redfish_sweep URLS_FILE [--concurrency N] [--ca CA_PEM_FILE] [--user U]`;
//! the password comes from `KILN_SIM_PASSWORD` (default `password`).

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use kiln_bmc::redfish::{RedfishConfig, RedfishDriver};
use kiln_bmc::{BmcDriver, Password, PowerState};

fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut urls_file = None;
    let mut concurrency = 256usize;
    let mut ca = None;
    let mut user = "admin".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--concurrency" => concurrency = args.next().unwrap_or_default().parse()?,
            "--ca" => ca = Some(std::fs::read_to_string(args.next().unwrap_or_default())?),
            "--user" => user = args.next().unwrap_or_default(),
            f => urls_file = Some(f.to_string()),
        }
    }
    let urls_file =
        urls_file.ok_or_else(|| anyhow::anyhow!("usage: redfish_sweep URLS_FILE [--concurrency N] [--ca PEM]"))?;
    let password = std::env::var("KILN_SIM_PASSWORD").unwrap_or_else(|_| "password".into());
    let urls: Vec<String> = std::fs::read_to_string(&urls_file)?
        .lines()
        .map(str::to_string)
        .collect();
    let drivers = urls
        .iter()
        .map(|u| {
            let mut c = RedfishConfig::new(u, &user, Password::new(password.clone()));
            c.ca_pem = ca.clone();
            c.request_timeout = Duration::from_secs(10);
            c.deadline = Duration::from_secs(30);
            RedfishDriver::new(c)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let start = Instant::now();
    let results: Vec<(Duration, Result<PowerState, kiln_bmc::BmcError>)> = futures::stream::iter(drivers.iter())
        .map(|d| async move {
            let t = Instant::now();
            let r = d.power_status().await;
            (t.elapsed(), r)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = start.elapsed();

    let mut lat: Vec<Duration> = results.iter().map(|r| r.0).collect();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let on = results.iter().filter(|r| matches!(r.1, Ok(PowerState::On))).count();
    let off = results.iter().filter(|r| matches!(r.1, Ok(PowerState::Off))).count();
    let failed: Vec<_> = results.iter().filter_map(|r| r.1.as_ref().err()).collect();
    println!("bmcs:        {}", results.len());
    println!("concurrency: {concurrency}");
    println!("wall:        {:.2} s", wall.as_secs_f64());
    println!("rate:        {:.0} BMCs/s", results.len() as f64 / wall.as_secs_f64());
    println!(
        "per call:    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
    println!(
        "peak RSS:    {} MiB (sweeping process)",
        peak_rss_kib().unwrap_or(0) / 1024
    );
    println!("answers:     {on} on, {off} off, {} failed", failed.len());
    if let Some(e) = failed.first() {
        println!("first error: {e}");
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
