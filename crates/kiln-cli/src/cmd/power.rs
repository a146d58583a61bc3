//! `kiln power status|on|off|cycle|reset|soft-off HOST…`, `kiln bootdev
//! pxe|disk|cdrom|http [--once] [--uefi] HOST…` and `kiln bmc check HOST…`.
//!
//! Hosts are named, picked with the selectors of `machine list` (`--tag`,
//! `--rack`, `--site`, `--state`, `--owner`), or both. Calls run several at
//! a time (the server bounds BMC calls again); each host gets a row, and
//! the command exits non-zero when any host failed.

use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use kiln_client::Client;
use kiln_types::power::{BootDevice, BootDeviceRequest, PowerAction};
use serde::Serialize;

use crate::Ctx;
use crate::cmd::error_message as message;
use crate::cmd::machine::{MachineSelectors, resolve_hosts};
use crate::output::{Out, opt};

/// Which machines: named hosts and/or the `machine list` filters.
#[derive(Debug, clap::Args)]
pub struct Selector {
    /// Hostnames or machine ids.
    hosts: Vec<String>,
    #[command(flatten)]
    select: MachineSelectors,
    /// Hosts asked at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
}

impl Selector {
    async fn resolve(&self, client: &Client) -> anyhow::Result<Vec<String>> {
        resolve_hosts(client, &self.hosts, &self.select).await
    }
}

#[derive(Debug, Subcommand)]
pub enum PowerCmd {
    /// Read the power state from each BMC.
    Status(Selector),
    On(Selector),
    /// Hard power off.
    Off(Selector),
    /// Off, then on again (sent once; never repeated blindly).
    Cycle(Selector),
    /// Hard reset (sent once).
    Reset(Selector),
    /// ACPI power button: the OS shuts down if it listens (sent once).
    SoftOff(Selector),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BootTarget {
    /// Network (PXE).
    Pxe,
    Disk,
    Cdrom,
    /// UEFI HTTP boot (implies --uefi; redfish and command drivers only).
    Http,
}

#[derive(Debug, clap::Args)]
pub struct BootdevArgs {
    device: BootTarget,
    /// For the next boot only (default: until changed).
    #[arg(long)]
    once: bool,
    /// The override is for UEFI boot (default: legacy BIOS).
    #[arg(long)]
    uefi: bool,
    #[command(flatten)]
    sel: Selector,
}

#[derive(Debug, Subcommand)]
pub enum BmcCmd {
    /// Reachability, credentials, cipher suite (IPMI), power and identity.
    Check(Selector),
}

/// One host's result, as the table and JSON show it.
#[derive(Debug, Serialize)]
struct HostResult {
    hostname: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Runs `f` on every selected host, `parallel` at a time, in host order.
async fn each<F, Fut, T>(ctx: &Ctx, sel: &Selector, f: F) -> anyhow::Result<Vec<(String, Result<T, String>)>>
where
    F: Fn(Client, String) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let client = ctx.client()?;
    let hosts = sel.resolve(&client).await?;
    let results = futures::stream::iter(hosts.into_iter().map(|h| {
        let fut = f(client.clone(), h.clone());
        async move { (h, fut.await) }
    }))
    .buffered(sel.parallel.max(1))
    .collect::<Vec<_>>()
    .await;
    Ok(results)
}

/// The table rows and JSON results, host by host.
#[derive(Default)]
struct Report {
    rows: Vec<Vec<String>>,
    json: Vec<HostResult>,
}

impl Report {
    /// A host that answered: its table cells after the hostname.
    fn answered(&mut self, host: String, cells: Vec<String>, result: &impl Serialize, ok: bool, error: Option<String>) {
        self.rows.push(std::iter::once(host.clone()).chain(cells).collect());
        self.json.push(HostResult {
            hostname: host,
            ok,
            result: serde_json::to_value(result).ok(),
            error,
        });
    }

    /// A host whose request failed: `blank` cells after the hostname, then
    /// the error.
    fn failed(&mut self, host: String, blank: Vec<String>, error: String) {
        self.rows.push(
            std::iter::once(host.clone())
                .chain(blank)
                .chain([error.clone()])
                .collect(),
        );
        self.json.push(HostResult {
            hostname: host,
            ok: false,
            result: None,
            error: Some(error),
        });
    }

    /// Prints the rows and fails when any host failed.
    fn finish(self, out: &mut Out, header: &[&str]) -> anyhow::Result<()> {
        out.table(&self.json, header, self.rows)?;
        let failed = self.json.iter().filter(|r| !r.ok).count();
        if failed > 0 {
            anyhow::bail!("{failed} of {} machines failed", self.json.len());
        }
        Ok(())
    }
}

pub async fn power(c: PowerCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let (action, sel) = match c {
        PowerCmd::Status(sel) => return status(sel, ctx, out).await,
        PowerCmd::On(s) => (PowerAction::On, s),
        PowerCmd::Off(s) => (PowerAction::Off, s),
        PowerCmd::Cycle(s) => (PowerAction::Cycle, s),
        PowerCmd::Reset(s) => (PowerAction::Reset, s),
        PowerCmd::SoftOff(s) => (PowerAction::SoftOff, s),
    };
    let results = each(ctx, &sel, |client, host| async move {
        client.power(&host, action).await.map_err(|e| message(&e))
    })
    .await?;
    let mut report = Report::default();
    for (host, r) in results {
        match r {
            Ok(done) => {
                let cells = vec![format!("power {action}: done"), format!("{} ms", done.elapsed_ms)];
                report.answered(host, cells, &done, true, None);
            }
            Err(e) => report.failed(host, vec!["FAILED".into()], e),
        }
    }
    report.finish(out, &["HOSTNAME", "RESULT", "DETAIL"])
}

async fn status(sel: Selector, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let results = each(ctx, &sel, |client, host| async move {
        client.power_status(&host).await.map_err(|e| message(&e))
    })
    .await?;
    let mut report = Report::default();
    for (host, r) in results {
        match r {
            Ok(st) => report.answered(host, vec![st.state.to_string(), String::new()], &st, true, None),
            Err(e) => report.failed(host, vec!["?".into()], e),
        }
    }
    report.finish(out, &["HOSTNAME", "POWER", "ERROR"])
}

pub async fn bootdev(a: BootdevArgs, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let req = BootDeviceRequest {
        device: match a.device {
            BootTarget::Pxe => BootDevice::Network,
            BootTarget::Disk => BootDevice::Disk,
            BootTarget::Cdrom => BootDevice::Cdrom,
            BootTarget::Http => BootDevice::UefiHttp,
        },
        once: a.once,
        // UEFI HTTP boot exists in UEFI mode only: no need to say --uefi.
        uefi: a.uefi || matches!(a.device, BootTarget::Http),
    };
    let when = if a.once { "next boot" } else { "until changed" };
    let results = each(ctx, &a.sel, |client, host| {
        let req = req.clone();
        async move { client.set_boot_device(&host, &req).await.map_err(|e| message(&e)) }
    })
    .await?;
    let mut report = Report::default();
    for (host, r) in results {
        match r {
            Ok(done) => {
                let next = format!("{} ({when}{})", done.device, if done.uefi { ", UEFI" } else { "" });
                report.answered(host, vec![next, String::new()], &done, true, None);
            }
            Err(e) => report.failed(host, vec!["FAILED".into()], e),
        }
    }
    report.finish(out, &["HOSTNAME", "NEXT BOOT", "ERROR"])
}

pub async fn bmc(c: BmcCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let BmcCmd::Check(sel) = c;
    let results = each(ctx, &sel, |client, host| async move {
        client.bmc_check(&host).await.map_err(|e| message(&e))
    })
    .await?;
    let mut report = Report::default();
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    for (host, r) in results {
        match r {
            Ok(c) => {
                let cells = vec![
                    format!("{} {}", c.driver, c.address),
                    yes(c.reachable),
                    yes(c.authenticated),
                    opt(&c.cipher_suite),
                    opt(&c.power),
                    opt(&c.serial),
                    opt(&c.uuid),
                    c.error.clone().unwrap_or_default(),
                ];
                report.answered(host, cells, &c, c.ok, c.error.clone());
            }
            Err(e) => report.failed(host, vec!["-".into(); 7], e),
        }
    }
    report.finish(
        out,
        &[
            "HOSTNAME",
            "BMC",
            "REACHABLE",
            "AUTH",
            "SUITE",
            "POWER",
            "SERIAL",
            "UUID",
            "ERROR",
        ],
    )
}
