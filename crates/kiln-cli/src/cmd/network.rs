//! `kiln subnet add|list|show|edit|rm` and `kiln network show|set|config`:
//! subnets, and each machine's interfaces, bonds, VLANs and addresses.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Subcommand;
use kiln_types::network::{IpRange, MachineNetwork, Subnet, SubnetCreate, SubnetPatch};

use crate::Ctx;
use crate::output::{Out, opt};

#[derive(Debug, Subcommand)]
pub enum SubnetCmd {
    /// Add a subnet.
    Add {
        name: String,
        /// `10.0.0.0/24` or `2001:db8:1::/64`.
        #[arg(long)]
        prefix: ipnet::IpNet,
        #[arg(long)]
        gateway: Option<IpAddr>,
        /// A DNS server (repeatable).
        #[arg(long)]
        dns: Vec<IpAddr>,
        /// A DNS search domain (repeatable).
        #[arg(long)]
        search: Vec<String>,
        #[arg(long)]
        vlan: Option<u16>,
        #[arg(long)]
        mtu: Option<u16>,
        /// Where kiln assigns static addresses: FIRST-LAST.
        #[arg(long = "static", value_name = "FIRST-LAST")]
        static_range: Option<IpRange>,
        /// What a DHCP server hands out dynamically: FIRST-LAST (must not
        /// meet the static range).
        #[arg(long = "dynamic", value_name = "FIRST-LAST")]
        dynamic_range: Option<IpRange>,
    },
    /// List subnets.
    List,
    /// Show a subnet and the addresses assigned in it.
    Show { key: String },
    /// Change a subnet; what is not given is kept.
    Edit {
        key: String,
        #[arg(long, conflicts_with = "no_gateway")]
        gateway: Option<IpAddr>,
        #[arg(long)]
        no_gateway: bool,
        /// Replaces the DNS servers (repeatable).
        #[arg(long)]
        dns: Vec<IpAddr>,
        /// Replaces the search domains (repeatable).
        #[arg(long)]
        search: Vec<String>,
        #[arg(long)]
        vlan: Option<u16>,
        #[arg(long)]
        mtu: Option<u16>,
        #[arg(long = "static", value_name = "FIRST-LAST", conflicts_with = "no_static")]
        static_range: Option<IpRange>,
        #[arg(long)]
        no_static: bool,
        #[arg(long = "dynamic", value_name = "FIRST-LAST", conflicts_with = "no_dynamic")]
        dynamic_range: Option<IpRange>,
        #[arg(long)]
        no_dynamic: bool,
    },
    /// Remove a subnet no machine has an address in.
    Rm { key: String },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// A machine's interfaces, bonds, VLANs and addresses.
    Show { host: String },
    /// Replace a machine's network from a JSON or YAML file (the shape
    /// `kiln network show -o json` prints; leave `address` out for the
    /// subnet's next free one).
    Set {
        host: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// The cloud-init network-config the machine's new OS gets.
    Config { host: String },
}

fn range(r: &Option<IpRange>) -> String {
    r.map(|r| r.to_string()).unwrap_or_else(|| "-".into())
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
    }
}

fn fields(s: &Subnet) -> Vec<(&'static str, String)> {
    vec![
        ("name", s.name.clone()),
        ("prefix", s.prefix.to_string()),
        ("gateway", opt(&s.gateway)),
        ("dns", list(&s.dns)),
        ("search", list(&s.search)),
        ("vlan", opt(&s.vlan)),
        ("mtu", opt(&s.mtu)),
        ("static", range(&s.static_range)),
        ("dynamic", range(&s.dynamic_range)),
        ("id", s.id.to_string()),
    ]
}

pub async fn run_subnet(c: SubnetCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    match c {
        SubnetCmd::Add {
            name,
            prefix,
            gateway,
            dns,
            search,
            vlan,
            mtu,
            static_range,
            dynamic_range,
        } => {
            let s = client
                .create_subnet(&SubnetCreate {
                    name,
                    prefix,
                    gateway,
                    dns,
                    search,
                    vlan,
                    mtu,
                    static_range,
                    dynamic_range,
                })
                .await?;
            out.record(&s, fields(&s))
        }
        SubnetCmd::List => {
            let all = client.list_subnets().await?;
            let rows = all
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.prefix.to_string(),
                        opt(&s.gateway),
                        opt(&s.vlan),
                        range(&s.static_range),
                        range(&s.dynamic_range),
                    ]
                })
                .collect();
            out.table(&all, &["NAME", "PREFIX", "GATEWAY", "VLAN", "STATIC", "DYNAMIC"], rows)
        }
        SubnetCmd::Show { key } => {
            let d = client.get_subnet(&key).await?;
            let mut f = fields(&d.subnet);
            f.push((
                "assigned",
                if d.assignments.is_empty() {
                    "-".into()
                } else {
                    d.assignments
                        .iter()
                        .map(|a| format!("{} {}", a.address, a.machine))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ));
            out.record(&d, f)
        }
        SubnetCmd::Edit {
            key,
            gateway,
            no_gateway,
            dns,
            search,
            vlan,
            mtu,
            static_range,
            no_static,
            dynamic_range,
            no_dynamic,
        } => {
            let pick = |v: Option<IpRange>, clear: bool| if clear { Some(None) } else { v.map(Some) };
            let patch = SubnetPatch {
                gateway: if no_gateway { Some(None) } else { gateway.map(Some) },
                dns: (!dns.is_empty()).then_some(dns),
                search: (!search.is_empty()).then_some(search),
                vlan: vlan.map(Some),
                mtu: mtu.map(Some),
                static_range: pick(static_range, no_static),
                dynamic_range: pick(dynamic_range, no_dynamic),
            };
            let s = client.update_subnet(&key, &patch).await?;
            out.record(&s, fields(&s))
        }
        SubnetCmd::Rm { key } => {
            client.delete_subnet(&key).await?;
            out.line(format!("removed subnet {key}"))
        }
    }
}

/// One row per address of each link: LINK KIND DETAIL ADDRESS.
fn network_rows(n: &MachineNetwork) -> Vec<Vec<String>> {
    let addr = |a: &kiln_types::network::AddressSpec| match (a.dhcp, a.address) {
        (Some(f), _) => format!("dhcp {f}"),
        (None, Some(ip)) => format!(
            "{ip} ({}){}",
            a.subnet.clone().unwrap_or_default(),
            if a.default_route { " default" } else { "" }
        ),
        (None, None) => format!("next free in {}", a.subnet.clone().unwrap_or_default()),
    };
    let mut rows = vec![];
    let mut push = |name: &str, kind: &str, detail: String, addrs: &[kiln_types::network::AddressSpec]| {
        if addrs.is_empty() {
            rows.push(vec![name.to_string(), kind.to_string(), detail.clone(), "-".into()]);
        }
        for a in addrs {
            rows.push(vec![name.to_string(), kind.to_string(), detail.clone(), addr(a)]);
        }
    };
    for i in &n.interfaces {
        push(
            &i.name,
            "ethernet",
            i.mac.map(|m| m.to_string()).unwrap_or_else(|| "by name".into()),
            &i.addresses,
        );
    }
    for b in &n.bonds {
        push(
            &b.name,
            "bond",
            format!("{} {}", b.mode, b.interfaces.join("+")),
            &b.addresses,
        );
    }
    for v in &n.vlans {
        push(&v.name, "vlan", format!("{} on {}", v.id, v.link), &v.addresses);
    }
    rows
}

pub async fn run_network(c: NetworkCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    match c {
        NetworkCmd::Show { host } => {
            let n = client.machine_network(&host).await?;
            out.table(&n, &["LINK", "KIND", "DETAIL", "ADDRESS"], network_rows(&n))
        }
        NetworkCmd::Set { host, file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            // YAML is a superset of JSON: one parser reads both.
            let net: MachineNetwork = serde_yaml_ng::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not a machine network: {e}", file.display()))?;
            let n = client.set_machine_network(&host, &net).await?;
            out.table(&n, &["LINK", "KIND", "DETAIL", "ADDRESS"], network_rows(&n))
        }
        NetworkCmd::Config { host } => out.line(client.machine_network_config(&host).await?.trim_end()),
    }
}
