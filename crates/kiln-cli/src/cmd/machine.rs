//! `kiln machine add|list|show|edit|rm|import|offer`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::Subcommand;
use kiln_types::machine::{
    BmcDriver, BmcInput, BootPolicy, Firmware, FirmwareMode, Machine, MachineCreate, MachineFilter, MachineKind,
    MachinePatch, MachineState, Nic,
};
use kiln_types::{Fqdn, Hostname, MacAddr, Secret, Tag};

use crate::Ctx;
use crate::import::{self, ImportFormat};
use crate::output::{Out, opt};

#[derive(Debug, Subcommand)]
pub enum MachineCmd {
    /// Enroll one machine.
    Add(AddArgs),
    /// List machines, filtered.
    List(ListArgs),
    /// Show one machine in full.
    Show { host: String },
    /// Change fields of a machine; what is not given is kept.
    Edit(EditArgs),
    /// Remove machines (protected ones are refused).
    Rm {
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// Enroll many machines from a CSV or YAML file, all or none.
    Import {
        file: PathBuf,
        /// File format (default: from the extension).
        #[arg(long, value_enum)]
        format: Option<ImportFormat>,
        /// Check the file and stop before sending it.
        #[arg(long)]
        dry_run: bool,
    },
    /// The OS images, tasks and storage layouts that fit a machine.
    Offer { host: String },
    /// Inventory a machine: its BMC net-boots kiln's discovery agent on it,
    /// whose report fills in its hardware and NICs (the machine becomes
    /// `ready`). Works for a machine enrolled with only its BMC.
    Discover { host: String },
    /// Accept the MAC a flagged switch port showed (the server behind it
    /// was swapped on purpose): the NIC on that port takes it, and the
    /// machine may be installed again. Operators only.
    ConfirmPort { host: String },
}

/// A NIC's switch-port identity as `--add-port` / `--remove-port` take it:
/// `circuit-id=C`, `remote-id=R`, or both, comma-separated (the values as
/// the DHCP relay sends them in option 82).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    circuit_id: Option<String>,
    remote_id: Option<String>,
}

impl std::str::FromStr for PortSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = PortSpec {
            circuit_id: None,
            remote_id: None,
        };
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("circuit-id", v)) if !v.is_empty() => spec.circuit_id = Some(v.to_string()),
                Some(("remote-id", v)) if !v.is_empty() => spec.remote_id = Some(v.to_string()),
                _ => {
                    return Err(format!(
                        "`{part}`: give circuit-id=ID and/or remote-id=ID, comma-separated (e.g. circuit-id=ge-0/0/1,remote-id=asw1)"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

impl PortSpec {
    fn is(&self, nic: &Nic) -> bool {
        nic.circuit_id == self.circuit_id && nic.remote_id == self.remote_id
    }
}

#[derive(Debug, clap::Args)]
pub struct BmcArgs {
    /// BMC driver.
    #[arg(long, value_enum)]
    bmc_driver: Option<BmcDriverArg>,
    /// BMC address: HOST[:PORT] for ipmi, an https:// URL for redfish.
    #[arg(long, requires = "bmc_driver")]
    bmc_address: Option<String>,
    #[arg(long, requires = "bmc_driver")]
    bmc_user: Option<String>,
    /// BMC password (or KILN_BMC_PASSWORD, which keeps it out of `ps`).
    #[arg(long, env = "KILN_BMC_PASSWORD", hide_env_values = true, requires = "bmc_driver")]
    bmc_password: Option<String>,
    /// Redfish: accept the BMC's TLS certificate without checking it
    /// (recorded in the audit log); `--bmc-insecure=false` checks it again.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    bmc_insecure: Option<bool>,
    /// Redfish: a CA certificate file (PEM) to trust for this BMC, e.g. the
    /// site CA that signed the BMCs' certificates; `-` removes it.
    #[arg(long, value_name = "PATH")]
    bmc_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BmcDriverArg {
    Ipmi,
    Redfish,
    Command,
}

impl From<BmcDriverArg> for BmcDriver {
    fn from(d: BmcDriverArg) -> BmcDriver {
        match d {
            BmcDriverArg::Ipmi => BmcDriver::Ipmi,
            BmcDriverArg::Redfish => BmcDriver::Redfish,
            BmcDriverArg::Command => BmcDriver::Command,
        }
    }
}

impl BmcArgs {
    /// The BMC the flags describe, for `machine add`; TLS settings not
    /// given are off.
    fn to_input(&self) -> anyhow::Result<Option<BmcInput>> {
        let Some(driver) = self.bmc_driver else {
            if self.tls_given() {
                anyhow::bail!("--bmc-insecure and --bmc-ca-file need --bmc-driver redfish and --bmc-address");
            }
            return Ok(None);
        };
        let Some(address) = self.bmc_address.clone() else {
            anyhow::bail!("--bmc-driver needs --bmc-address");
        };
        Ok(Some(BmcInput {
            driver: driver.into(),
            address,
            username: self.bmc_user.clone(),
            password: self.bmc_password.clone().map(Secret::new),
            insecure: self.bmc_insecure.unwrap_or(false),
            ca_cert: self.ca_cert()?.flatten(),
        }))
    }

    fn tls_given(&self) -> bool {
        self.bmc_insecure.is_some() || self.bmc_ca_file.is_some()
    }

    /// `--bmc-ca-file`: not given (`None`), `-` to remove (`Some(None)`),
    /// or the file's PEM text.
    fn ca_cert(&self) -> anyhow::Result<Option<Option<String>>> {
        match &self.bmc_ca_file {
            None => Ok(None),
            Some(p) if p.as_os_str() == "-" => Ok(Some(None)),
            Some(p) => std::fs::read_to_string(p)
                .map(|pem| Some(Some(pem)))
                .map_err(|e| anyhow::anyhow!("cannot read the BMC CA certificate {}: {e}", p.display())),
        }
    }

    /// The BMC for `machine edit`: with `--bmc-driver`, the one the flags
    /// describe; with only TLS flags, the current one with them changed.
    /// TLS settings not given are kept while the BMC stays redfish (a new
    /// password must not silently drop the BMC's CA).
    fn to_patch(&self, current: Option<&Machine>) -> anyhow::Result<Option<BmcInput>> {
        if self.bmc_driver.is_none() && !self.tls_given() {
            return Ok(None);
        }
        let now = current.and_then(|m| m.bmc.as_ref());
        let given = if self.bmc_driver.is_some() {
            self.to_input()?
        } else {
            None
        };
        let mut bmc = match (given, now) {
            (Some(b), _) => b,
            (None, Some(b)) => BmcInput {
                username: b.username.clone(),
                ..BmcInput::new(b.driver, &b.address)
            },
            (None, None) => anyhow::bail!(
                "{} has no BMC to change the TLS settings of: give --bmc-driver and --bmc-address",
                current.map_or("the machine".into(), |m| m.hostname.to_string())
            ),
        };
        if let Some(b) = now.filter(|b| b.driver == BmcDriver::Redfish && bmc.driver == BmcDriver::Redfish) {
            bmc.insecure = b.insecure;
            bmc.ca_cert = b.ca_cert.clone();
        }
        if let Some(i) = self.bmc_insecure {
            bmc.insecure = i;
        }
        if let Some(ca) = self.ca_cert()? {
            bmc.ca_cert = ca;
        }
        Ok(Some(bmc))
    }
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    #[arg(long)]
    hostname: Hostname,
    /// MAC of a NIC (repeat for more; the first is the boot NIC). Without
    /// one, `--circuit-id`/`--remote-id` enroll the NIC by its switch port
    /// and kiln learns its MAC from its first relayed DHCP request.
    #[arg(long)]
    mac: Vec<MacAddr>,
    /// Tag (repeat for more).
    #[arg(long)]
    tag: Vec<Tag>,
    /// Owning tenant.
    #[arg(long)]
    owner: Option<String>,
    #[arg(long)]
    fqdn: Option<Fqdn>,
    #[arg(long, default_value = "physical")]
    kind: MachineKind,
    #[arg(long, default_value = "new")]
    state: MachineState,
    #[arg(long)]
    rack: Option<String>,
    /// Site of the rack, when rack names repeat across sites.
    #[arg(long)]
    site: Option<String>,
    /// Switch the first NIC is cabled to.
    #[arg(long)]
    switch: Option<String>,
    /// Switch port of the first NIC.
    #[arg(long, requires = "switch")]
    port: Option<String>,
    #[arg(long)]
    vlan: Option<u16>,
    /// Option 82 circuit-id of the first NIC's port.
    #[arg(long)]
    circuit_id: Option<String>,
    /// Option 82 remote-id of the first NIC's port.
    #[arg(long)]
    remote_id: Option<String>,
    #[arg(long)]
    ipv4: Option<Ipv4Addr>,
    #[arg(long)]
    ipv6: Option<Ipv6Addr>,
    /// Never reprovision or delete this machine until the flag is cleared.
    #[arg(long)]
    protected: bool,
    #[command(flatten)]
    bmc: BmcArgs,
    #[command(flatten)]
    boot: BootArgs,
}

/// Firmware and boot policy flags of `machine add` and `machine edit`.
#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// Firmware mode, for a machine never inventoried (the agent's report
    /// replaces it): uefi or bios; `-` forgets it (edit).
    #[arg(long, value_name = "uefi|bios|-")]
    firmware: Option<String>,
    /// With --firmware uefi: Secure Boot is on.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    secure_boot: Option<bool>,
    /// disk (boots its disk; a reimage sets a one-time network boot) or
    /// always-netboot (always boots from the network; kiln's answer
    /// decides; a reimage only powers it). Operators only.
    #[arg(long)]
    boot_policy: Option<BootPolicy>,
}

impl BootArgs {
    /// `--firmware`/`--secure-boot`: not given (`None`), forget (`Some(None)`),
    /// or set. Secure Boot alone changes the current mode's flag.
    fn firmware(&self, current: Option<&Machine>) -> anyhow::Result<Option<Option<Firmware>>> {
        let mode = match self.firmware.as_deref() {
            None => None,
            Some("-") => {
                if self.secure_boot.is_some() {
                    anyhow::bail!("--secure-boot needs a firmware mode: leave it out with --firmware -");
                }
                return Ok(Some(None));
            }
            Some(m) => Some(
                m.parse::<FirmwareMode>()
                    .map_err(|e| anyhow::anyhow!("--firmware: {e}"))?,
            ),
        };
        let Some(mode) = mode.or_else(|| self.secure_boot.and(current.and_then(|m| m.firmware).map(|f| f.mode))) else {
            if self.secure_boot.is_some() {
                anyhow::bail!("--secure-boot needs --firmware uefi: the machine's firmware mode is not known");
            }
            return Ok(None);
        };
        let secure_boot = self
            .secure_boot
            .or_else(|| {
                current
                    .and_then(|m| m.firmware)
                    .filter(|f| f.mode == mode)
                    .map(|f| f.secure_boot)
            })
            .unwrap_or(false);
        let fw = Firmware { mode, secure_boot };
        fw.validate().map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(Some(fw)))
    }
}

/// The selectors `machine list` and the BMC verbs share.
#[derive(Debug, clap::Args)]
pub struct MachineSelectors {
    /// Only machines with this tag (repeat: all of them).
    #[arg(long)]
    tag: Vec<Tag>,
    /// Only machines in this rack.
    #[arg(long)]
    rack: Option<String>,
    /// Only machines at this site.
    #[arg(long)]
    site: Option<String>,
    /// Only machines in this state (new, ready, deployed, failed, …).
    #[arg(long)]
    state: Option<MachineState>,
    /// Only machines of this tenant.
    #[arg(long)]
    owner: Option<String>,
    /// Only machines of this firmware mode (uefi, bios).
    #[arg(long)]
    firmware: Option<FirmwareMode>,
    /// Only machines whose last reimage installed this OS: NAME or
    /// NAME:VERSION (e.g. `debian:12`). Not `--os`, which `kiln reimage`
    /// (whose selectors these are too) uses for the image to install.
    #[arg(long, value_name = "NAME[:VERSION]")]
    installed_os: Option<String>,
}

impl MachineSelectors {
    /// Whether any selector was given.
    pub fn any(&self) -> bool {
        !self.tag.is_empty()
            || self.rack.is_some()
            || self.site.is_some()
            || self.state.is_some()
            || self.owner.is_some()
            || self.firmware.is_some()
            || self.installed_os.is_some()
    }

    /// The API filter for these selectors (no search, default page).
    pub fn filter(&self) -> MachineFilter {
        MachineFilter {
            tag: (!self.tag.is_empty()).then(|| self.tag.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")),
            rack: self.rack.clone(),
            site: self.site.clone(),
            state: self.state,
            owner: self.owner.clone(),
            firmware: self.firmware,
            os: self.installed_os.clone(),
            ..MachineFilter::default()
        }
    }
}

/// The hosts to act on: the `named` ones first, then those the selectors
/// match, without duplicates. Fails when this comes to no host at all.
pub async fn resolve_hosts(
    client: &kiln_client::Client,
    named: &[String],
    select: &MachineSelectors,
) -> anyhow::Result<Vec<String>> {
    let mut hosts = named.to_vec();
    if select.any() {
        let filter = MachineFilter {
            limit: Some(1000),
            ..select.filter()
        };
        let found = client.list_all_machines(&filter).await?;
        if found.is_empty() && hosts.is_empty() {
            anyhow::bail!("no machine matches the selectors");
        }
        hosts.extend(found.into_iter().map(|m| m.hostname.to_string()));
    }
    if hosts.is_empty() {
        anyhow::bail!(
            "name at least one host, or select machines with --tag, --rack, --site, --state, --owner, --firmware \
             or --os"
        );
    }
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    Ok(hosts)
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    select: MachineSelectors,
    /// Hostname contains this.
    #[arg(long, short = 'q')]
    search: Option<String>,
    /// Page size (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Follow the pages to the end.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, clap::Args)]
pub struct EditArgs {
    host: String,
    #[arg(long)]
    hostname: Option<Hostname>,
    #[arg(long)]
    fqdn: Option<Fqdn>,
    #[arg(long)]
    state: Option<MachineState>,
    #[arg(long)]
    kind: Option<MachineKind>,
    #[arg(long)]
    add_tag: Vec<Tag>,
    #[arg(long)]
    remove_tag: Vec<Tag>,
    /// Add a NIC by MAC (its switch port can be set with the API or an import).
    #[arg(long)]
    add_mac: Vec<MacAddr>,
    /// Remove the NIC with this MAC.
    #[arg(long)]
    remove_mac: Vec<MacAddr>,
    /// Add a NIC by its switch port, with no MAC (kiln learns it from the
    /// first relayed DHCP request): `circuit-id=ID[,remote-id=ID]`.
    #[arg(long, value_name = "PORT")]
    add_port: Vec<PortSpec>,
    /// Remove the NIC enrolled on this port (same form as `--add-port`).
    #[arg(long, value_name = "PORT")]
    remove_port: Vec<PortSpec>,
    /// New owner (`-` for none).
    #[arg(long)]
    owner: Option<String>,
    /// New rack (`-` for none).
    #[arg(long)]
    rack: Option<String>,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    protected: Option<bool>,
    #[arg(long)]
    maintenance: Option<bool>,
    /// Why the machine is in maintenance.
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    ipv4: Option<Ipv4Addr>,
    #[arg(long)]
    ipv6: Option<Ipv6Addr>,
    #[command(flatten)]
    bmc: BmcArgs,
    #[command(flatten)]
    boot: BootArgs,
    /// The disk `flat` and `lvm_hba` put the OS on, by serial or WWN (`-`
    /// for none: the layout's default, the first or the smallest disk).
    #[arg(long, value_name = "SERIAL|WWN")]
    system_disk: Option<String>,
}

fn dash_none(v: Option<String>) -> Option<Option<String>> {
    v.map(|s| if s == "-" { None } else { Some(s) })
}

pub async fn run(c: MachineCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    match c {
        MachineCmd::Add(a) => {
            let mut nics: Vec<Nic> = a.mac.iter().map(|mac| Nic::with_mac(*mac)).collect();
            let port_given = a.switch.is_some() || a.vlan.is_some() || a.circuit_id.is_some() || a.remote_id.is_some();
            if nics.is_empty() && port_given {
                // Enrolled by switch port: the MAC is learned later.
                nics.push(Nic::by_port(None, None));
            }
            if let Some(first) = nics.first_mut() {
                first.switch = a.switch.clone();
                first.port = a.port.clone();
                first.vlan = a.vlan;
                first.circuit_id = a.circuit_id.clone();
                first.remote_id = a.remote_id.clone();
            }
            let spec = MachineCreate {
                fqdn: a.fqdn,
                kind: a.kind,
                state: a.state,
                tags: a.tag,
                owner: a.owner,
                site: a.site,
                rack: a.rack,
                protected: a.protected,
                bmc: a.bmc.to_input()?,
                nics,
                ipv4: a.ipv4,
                ipv6: a.ipv6,
                firmware: a.boot.firmware(None)?.flatten(),
                boot_policy: a.boot.boot_policy.unwrap_or_default(),
                ..MachineCreate::new(a.hostname)
            };
            let problems = spec.validate();
            if !problems.is_empty() {
                anyhow::bail!("{}", problems.join("; "));
            }
            let m = ctx.client()?.create_machine(&spec).await?;
            show(&m, out)
        }
        MachineCmd::List(a) => {
            let filter = MachineFilter {
                q: a.search,
                limit: Some(a.limit),
                ..a.select.filter()
            };
            let client = ctx.client()?;
            let (machines, more) = if a.all {
                (client.list_all_machines(&filter).await?, false)
            } else {
                let page = client.list_machines(&filter).await?;
                (page.items, page.next_cursor.is_some())
            };
            let rows = machines.iter().map(row).collect();
            out.table(
                &machines,
                &[
                    "HOSTNAME",
                    "STATE",
                    "KIND",
                    "SITE/RACK",
                    "OWNER",
                    "IPV4",
                    "MAC",
                    "FLAGS",
                    "TAGS",
                ],
                rows,
            )?;
            if more && out.format == crate::output::Format::Table {
                eprintln!("(more machines match: use --all, or --limit up to 1000)");
            }
            Ok(())
        }
        MachineCmd::Show { host } => {
            let m = ctx.client()?.get_machine(&host).await?;
            show(&m, out)
        }
        MachineCmd::Edit(a) => {
            let client = ctx.client()?;
            let nics_edited =
                !(a.add_mac.is_empty() && a.remove_mac.is_empty() && a.add_port.is_empty() && a.remove_port.is_empty());
            let needs_current = !(a.add_tag.is_empty() && a.remove_tag.is_empty())
                || nics_edited
                || a.bmc.bmc_driver.is_some()
                || a.bmc.tls_given()
                || a.boot.secure_boot.is_some();
            let current = if needs_current {
                Some(client.get_machine(&a.host).await?)
            } else {
                None
            };
            let tags = match &current {
                Some(c) if !(a.add_tag.is_empty() && a.remove_tag.is_empty()) => {
                    let mut tags: Vec<Tag> = c.tags.iter().filter(|t| !a.remove_tag.contains(t)).cloned().collect();
                    for t in a.add_tag {
                        if !tags.contains(&t) {
                            tags.push(t);
                        }
                    }
                    Some(tags)
                }
                _ => None,
            };
            let nics = match &current {
                Some(c) if nics_edited => {
                    if let Some(missing) = a.remove_mac.iter().find(|m| !c.nics.iter().any(|n| n.mac == Some(**m))) {
                        anyhow::bail!("{} has no NIC {missing}", c.hostname);
                    }
                    if let Some(missing) = a.remove_port.iter().find(|p| !c.nics.iter().any(|n| p.is(n))) {
                        anyhow::bail!("{} has no NIC on port {missing:?}", c.hostname);
                    }
                    let mut nics: Vec<Nic> = c
                        .nics
                        .iter()
                        .filter(|n| !n.mac.is_some_and(|m| a.remove_mac.contains(&m)))
                        .filter(|n| !a.remove_port.iter().any(|p| p.is(n)))
                        .cloned()
                        .collect();
                    for mac in a.add_mac {
                        if !nics.iter().any(|n| n.mac == Some(mac)) {
                            nics.push(Nic::with_mac(mac));
                        }
                    }
                    for p in a.add_port {
                        if !nics.iter().any(|n| p.is(n)) {
                            nics.push(Nic::by_port(p.circuit_id, p.remote_id));
                        }
                    }
                    Some(nics)
                }
                _ => None,
            };
            let patch = MachinePatch {
                hostname: a.hostname,
                fqdn: a.fqdn.map(Some),
                kind: a.kind,
                state: a.state,
                tags,
                owner: dash_none(a.owner),
                site: a.site,
                rack: dash_none(a.rack),
                protected: a.protected,
                maintenance: a.maintenance,
                maintenance_reason: a.reason.map(Some),
                bmc: a.bmc.to_patch(current.as_ref())?.map(Some),
                nics,
                ipv4: a.ipv4.map(Some),
                ipv6: a.ipv6.map(Some),
                hardware: None,
                firmware: a.boot.firmware(current.as_ref())?,
                boot_policy: a.boot.boot_policy,
                system_disk: dash_none(a.system_disk),
            };
            let m = client.update_machine(&a.host, &patch).await?;
            show(&m, out)
        }
        MachineCmd::Rm { hosts } => {
            let client = ctx.client()?;
            for h in hosts {
                client.delete_machine(&h).await?;
                out.line(format!("removed {h}"))?;
            }
            Ok(())
        }
        MachineCmd::Import { file, format, dry_run } => import::run(&file, format, dry_run, ctx, out).await,
        MachineCmd::ConfirmPort { host } => {
            let m = ctx.client()?.confirm_port(&host).await?;
            out.line(format!(
                "{}: port confirmed; its NICs are now {}",
                m.hostname,
                m.nics.iter().map(|n| n.label()).collect::<Vec<_>>().join(", ")
            ))
        }
        MachineCmd::Discover { host } => {
            let m = ctx.client()?.discover_machine(&host).await?;
            out.line(format!(
                "{} is discovering: its BMC is net-booting kiln's agent; `kiln machine show {}` shows the \
                 inventory once it reported",
                m.hostname, m.hostname
            ))
        }
        MachineCmd::Offer { host } => {
            let offer = ctx.client()?.machine_offer(&host).await?;
            if out.format == crate::output::Format::Json {
                return out.json(&offer);
            }
            let images: Vec<String> = offer
                .os_images
                .iter()
                .map(|i| format!("{}-{} ({})", i.name, i.version, i.kind))
                .collect();
            let tasks: Vec<String> = offer.tasks.iter().map(|t| t.name.clone()).collect();
            let layouts: Vec<String> = offer.layouts.iter().map(|l| l.name.to_string()).collect();
            out.record(
                &offer,
                vec![
                    (
                        "os images",
                        if images.is_empty() {
                            "-".into()
                        } else {
                            images.join(", ")
                        },
                    ),
                    ("tasks", if tasks.is_empty() { "-".into() } else { tasks.join(", ") }),
                    (
                        "layouts",
                        if layouts.is_empty() {
                            "-".into()
                        } else {
                            layouts.join(", ")
                        },
                    ),
                ],
            )
        }
    }
}

fn flags(m: &Machine) -> String {
    let mut f = String::new();
    if m.protected {
        f.push('P');
    }
    if m.maintenance {
        f.push('M');
    }
    // A switch port showed another MAC: `kiln machine confirm-port`.
    if m.port_alert.is_some() {
        f.push('S');
    }
    if f.is_empty() { "-".into() } else { f }
}

fn row(m: &Machine) -> Vec<String> {
    vec![
        m.hostname.to_string(),
        m.state.to_string(),
        m.kind.to_string(),
        match (&m.site, &m.rack) {
            (Some(s), Some(r)) => format!("{s}/{r}"),
            _ => "-".into(),
        },
        opt(&m.owner),
        opt(&m.ipv4),
        m.nics.first().map_or("-".into(), |n| n.label()),
        flags(m),
        m.tags.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
    ]
}

/// `uefi, secure boot on`, or why it is not known.
fn firmware_text(m: &Machine) -> String {
    match m.firmware {
        Some(f) if f.mode == FirmwareMode::Uefi => {
            format!("uefi, secure boot {}", if f.secure_boot { "on" } else { "off" })
        }
        Some(f) => f.mode.to_string(),
        None => "- (unknown until discovered: boot devices are set in legacy BIOS mode)".into(),
    }
}

/// What the last reimage installed, from which job and when.
fn installed_os_text(m: &Machine) -> String {
    m.installed_os.as_ref().map_or("-".into(), |os| {
        format!(
            "{} {} (image {}{}), job {}, {}",
            os.name,
            os.version,
            os.os_image,
            os.sha256.as_ref().map_or(String::new(), |d| format!(", sha256 {d}")),
            os.job_id,
            os.installed_at.format("%Y-%m-%d %H:%M:%S UTC")
        )
    })
}

fn show(m: &Machine, out: &mut Out) -> anyhow::Result<()> {
    let nics = m
        .nics
        .iter()
        .map(|n| {
            let mut s = match n.mac {
                Some(mac) => mac.to_string(),
                None => "MAC not seen yet".into(),
            };
            if n.has_port_identity() {
                s.push_str(&format!(
                    " ({})",
                    kiln_types::machine::port_label(n.circuit_id.as_deref(), n.remote_id.as_deref())
                ));
            }
            if let (Some(sw), Some(p)) = (&n.switch, &n.port) {
                s.push_str(&format!(" @ {sw} {p}"));
            }
            if let Some(v) = n.vlan {
                s.push_str(&format!(" vlan {v}"));
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ");
    let bmc = m.bmc.as_ref().map_or("-".to_string(), |b| {
        format!(
            "{} {}{}{}",
            b.driver,
            b.address,
            b.username.as_ref().map_or(String::new(), |u| format!(" user {u}")),
            if b.password_set { " (password set)" } else { "" }
        ) + if b.insecure {
            " (TLS certificate NOT checked: insecure)"
        } else if b.ca_cert.is_some() {
            " (TLS checked against its own CA too)"
        } else {
            ""
        }
    });
    let hw = m.hardware.as_ref().map_or("- (not discovered yet)".to_string(), |h| {
        format!(
            "{} cores, {} RAM, {} disks, {} GPUs",
            h.cpu_cores,
            kiln_types::fit::human_bytes(h.memory_bytes),
            h.disks.len(),
            h.gpus.len()
        )
    });
    out.record(
        m,
        vec![
            ("hostname", m.hostname.to_string()),
            ("id", m.id.to_string()),
            ("fqdn", opt(&m.fqdn)),
            ("state", m.state.to_string()),
            ("kind", m.kind.to_string()),
            ("site", opt(&m.site)),
            ("rack", opt(&m.rack)),
            ("owner", opt(&m.owner)),
            (
                "tags",
                m.tags.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
            ),
            ("protected", m.protected.to_string()),
            (
                "maintenance",
                match (&m.maintenance, &m.maintenance_reason) {
                    (true, Some(r)) => format!("true ({r})"),
                    (b, _) => b.to_string(),
                },
            ),
            ("ipv4", opt(&m.ipv4)),
            ("ipv6", opt(&m.ipv6)),
            ("nics", if nics.is_empty() { "-".into() } else { nics }),
            ("port alert", m.port_alert.as_ref().map_or("-".into(), |a| a.reason())),
            ("bmc", bmc),
            ("hardware", hw),
            ("firmware", firmware_text(m)),
            ("boot policy", m.boot_policy.to_string()),
            ("os", installed_os_text(m)),
            ("system disk", opt(&m.system_disk)),
            ("updated", m.updated_at.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(firmware: Option<&str>, secure_boot: Option<bool>) -> BootArgs {
        BootArgs {
            firmware: firmware.map(str::to_string),
            secure_boot,
            boot_policy: None,
        }
    }

    fn with_firmware(mode: FirmwareMode, secure_boot: bool) -> Machine {
        let mut m = Machine::sketch("m1", MachineKind::Physical, MachineState::Ready);
        m.firmware = Some(Firmware { mode, secure_boot });
        m
    }

    #[test]
    fn firmware_flags() {
        let fw = |mode, secure_boot| Some(Some(Firmware { mode, secure_boot }));
        assert_eq!(args(None, None).firmware(None).unwrap(), None, "not given: kept");
        assert_eq!(args(Some("-"), None).firmware(None).unwrap(), Some(None), "forgotten");
        assert_eq!(
            args(Some("uefi"), Some(true)).firmware(None).unwrap(),
            fw(FirmwareMode::Uefi, true)
        );
        // Secure Boot alone changes the recorded mode's flag; a new mode
        // alone keeps the flag only if the mode stays.
        let uefi_sb = with_firmware(FirmwareMode::Uefi, true);
        assert_eq!(
            args(None, Some(false)).firmware(Some(&uefi_sb)).unwrap(),
            fw(FirmwareMode::Uefi, false)
        );
        assert_eq!(
            args(Some("uefi"), None).firmware(Some(&uefi_sb)).unwrap(),
            fw(FirmwareMode::Uefi, true)
        );
        assert_eq!(
            args(Some("bios"), None).firmware(Some(&uefi_sb)).unwrap(),
            fw(FirmwareMode::Bios, false)
        );
        for (a, says) in [
            (args(Some("bios"), Some(true)), "BIOS has no Secure Boot"),
            (args(None, Some(true)), "needs --firmware uefi"),
            (args(Some("-"), Some(true)), "needs a firmware mode"),
            (args(Some("efi"), None), "expected one of uefi, bios"),
        ] {
            let e = a.firmware(None).unwrap_err().to_string();
            assert!(e.contains(says), "{e} does not say {says}");
        }
    }
}
