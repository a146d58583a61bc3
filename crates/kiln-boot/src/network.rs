//! A machine's network as the new OS and the installers take it: cloud-init
//! network-config version 2 (netplan's schema; the NoCloud seed's
//! `network-config` file), and the static settings of the install NIC that
//! the preseed (`netcfg/*`) and kickstart (`network --bootproto=static`)
//! carry. Pure functions over the inventory's types.
//!
//! Written for the cloud-init that distributions ship today, not only the
//! newest: Debian 12's cloud-init 22.4 refuses `to: default` in a route when
//! it renders ifupdown or networkd files, so the default route is written
//! `to: 0.0.0.0/0` (or `::/0`), which every version reads.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kiln_types::MacAddr;
use kiln_types::network::{AddressSpec, DynamicPool, IpFamily, IpRange, MachineNetwork, Subnet};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// kiln's own DHCP pools from the server config, for the disjointness rule.
pub fn kiln_pools(subnets: &[crate::dhcp::Subnet]) -> Vec<DynamicPool> {
    subnets
        .iter()
        .filter_map(|s| {
            let [first, last] = s.pool?;
            Some(DynamicPool {
                range: IpRange::new(first.into(), last.into()),
                what: format!("kiln's DHCP pool of [[dhcp.subnet]] {}", s.network),
            })
        })
        .collect()
}

/// What one link's addresses say, resolved against their subnets.
#[derive(Default)]
struct LinkConfig {
    addresses: Vec<String>,
    dhcp4: bool,
    dhcp6: bool,
    routes: Vec<Value>,
    dns: Vec<String>,
    search: Vec<String>,
    mtu: Option<u16>,
}

fn link_config(addrs: &[AddressSpec], subnets: &BTreeMap<String, Subnet>) -> LinkConfig {
    let mut c = LinkConfig::default();
    for a in addrs {
        match a.dhcp {
            Some(IpFamily::V4) => c.dhcp4 = true,
            Some(IpFamily::V6) => c.dhcp6 = true,
            None => {}
        }
        let Some(subnet) = a.subnet.as_ref().and_then(|s| subnets.get(s)) else {
            continue;
        };
        if let Some(ip) = a.address {
            c.addresses.push(format!("{ip}/{}", subnet.prefix.prefix_len()));
        }
        if a.default_route
            && let Some(gw) = subnet.gateway
        {
            let to = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            c.routes.push(json!({"to": to, "via": gw.to_string()}));
        }
        if a.dhcp.is_none() {
            for d in &subnet.dns {
                let d = d.to_string();
                if !c.dns.contains(&d) {
                    c.dns.push(d);
                }
            }
            for s in &subnet.search {
                if !c.search.contains(s) {
                    c.search.push(s.clone());
                }
            }
        }
        c.mtu = c.mtu.or(subnet.mtu);
    }
    c
}

/// The keys a link's addresses add to its network-config entry.
fn fill(entry: &mut Map<String, Value>, c: LinkConfig, mtu: Option<u16>) {
    if let Some(m) = mtu.or(c.mtu) {
        entry.insert("mtu".into(), json!(m));
    }
    if c.dhcp4 {
        entry.insert("dhcp4".into(), json!(true));
    }
    if c.dhcp6 {
        entry.insert("dhcp6".into(), json!(true));
    }
    if !c.addresses.is_empty() {
        entry.insert("addresses".into(), json!(c.addresses));
    }
    if !c.routes.is_empty() {
        entry.insert("routes".into(), json!(c.routes));
    }
    if !c.dns.is_empty() || !c.search.is_empty() {
        let mut ns = Map::new();
        if !c.dns.is_empty() {
            ns.insert("addresses".into(), json!(c.dns));
        }
        if !c.search.is_empty() {
            ns.insert("search".into(), json!(c.search));
        }
        entry.insert("nameservers".into(), Value::Object(ns));
    }
}

/// The network-config (v2) of `net`, whose static addresses are all filled
/// in (as the store returns it), with its subnets by name. `None` when the
/// machine has no network in the inventory: the OS then keeps its own
/// default (cloud-init: DHCP on the first NIC).
pub fn network_config(net: &MachineNetwork, subnets: &BTreeMap<String, Subnet>) -> Option<String> {
    if net.is_empty() {
        return None;
    }
    let mut ethernets = Map::new();
    for i in &net.interfaces {
        let mut e = Map::new();
        if let Some(mac) = i.mac {
            e.insert("match".into(), json!({"macaddress": mac.to_string()}));
            e.insert("set-name".into(), json!(i.name));
        }
        fill(&mut e, link_config(&i.addresses, subnets), i.mtu);
        ethernets.insert(i.name.clone(), Value::Object(e));
    }
    let mut bonds = Map::new();
    for b in &net.bonds {
        let mut e = Map::new();
        e.insert("interfaces".into(), json!(b.interfaces));
        let mut p = Map::new();
        p.insert("mode".into(), json!(b.mode.as_str()));
        if let Some(r) = b.lacp_rate {
            p.insert("lacp-rate".into(), json!(r.as_str()));
        }
        if let Some(m) = b.miimon {
            p.insert("mii-monitor-interval".into(), json!(m));
        }
        e.insert("parameters".into(), Value::Object(p));
        fill(&mut e, link_config(&b.addresses, subnets), b.mtu);
        bonds.insert(b.name.clone(), Value::Object(e));
    }
    let mut vlans = Map::new();
    for v in &net.vlans {
        let mut e = Map::new();
        e.insert("id".into(), json!(v.id));
        e.insert("link".into(), json!(v.link));
        fill(&mut e, link_config(&v.addresses, subnets), v.mtu);
        vlans.insert(v.name.clone(), Value::Object(e));
    }
    let mut doc = Map::new();
    doc.insert("version".into(), json!(2));
    for (key, map) in [("ethernets", ethernets), ("bonds", bonds), ("vlans", vlans)] {
        if !map.is_empty() {
            doc.insert(key.into(), Value::Object(map));
        }
    }
    let mut yaml = String::from("# network-config (cloud-init v2), written by kiln from its inventory\n");
    emit(&mut yaml, &Value::Object(doc), 0);
    Some(yaml)
}

/// Block-style YAML in which every string value is double-quoted (JSON's
/// escaping is YAML's): cloud-init reads YAML 1.1, where an unquoted MAC
/// such as `52:54:00:12:34:56` is a base-60 integer and `on` a boolean.
/// Keys (link names, schema keys) are quoted unless plainly a name.
fn emit(out: &mut String, v: &Value, indent: usize) {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                out.push_str(&pad);
                out.push_str(&key(k));
                out.push(':');
                match v {
                    Value::Object(m) if !m.is_empty() => {
                        out.push('\n');
                        emit(out, v, indent + 1);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        emit(out, v, indent + 1);
                    }
                    _ => {
                        out.push(' ');
                        out.push_str(&scalar(v));
                        out.push('\n');
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                out.push_str(&pad);
                out.push_str("- ");
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        // The first key on the dash's line, the rest under it.
                        let mut first = String::new();
                        emit(&mut first, item, indent + 1);
                        out.push_str(first.trim_start());
                    }
                    _ => {
                        out.push_str(&scalar(item));
                        out.push('\n');
                    }
                }
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        // Strings JSON-quoted; numbers and booleans as they are.
        other => other.to_string(),
    }
}

fn key(k: &str) -> String {
    let plain = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !matches!(
            k.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null"
        );
    if plain {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

/// The static IPv4 settings of the NIC an installer configures: what the
/// preseed's `netcfg/*` and the kickstart's `network` line say. Strings,
/// to go through the templates' escaping filters like every value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstallNetwork {
    pub mac: String,
    /// The name the inventory gives the interface (the installed OS's
    /// name for it, once cloud-init has renamed it).
    pub interface: String,
    pub address: String,
    pub prefix_len: u8,
    pub netmask: String,
    pub gateway: Option<String>,
    /// Space-separated, as netcfg takes them.
    pub nameservers: Option<String>,
    /// Comma-separated, as kickstart takes them.
    pub nameservers_csv: Option<String>,
}

/// The install NIC's static settings: the interface with a MAC and a static
/// IPv4 address of its own, the one with `boot_mac` first. `None` when no
/// such interface exists (an address only on a bond or a VLAN, which d-i
/// and anaconda cannot build before the install): the installer then uses
/// DHCP and the installed OS gets its full network from cloud-init or its
/// own configuration.
pub fn install_network(
    net: &MachineNetwork,
    subnets: &BTreeMap<String, Subnet>,
    boot_mac: Option<MacAddr>,
) -> Option<InstallNetwork> {
    let candidates = net.interfaces.iter().filter_map(|i| {
        let mac = i.mac?;
        let (subnet, ip) = i.addresses.iter().find_map(|a| {
            let s = subnets.get(a.subnet.as_ref()?)?;
            let ip = a.address.filter(IpAddr::is_ipv4)?;
            Some((s, ip))
        })?;
        Some((mac, i, subnet, ip))
    });
    let mut all: Vec<_> = candidates.collect();
    all.sort_by_key(|(mac, ..)| Some(*mac) != boot_mac);
    let (mac, iface, subnet, ip) = all.into_iter().next()?;
    let dns: Vec<String> = subnet
        .dns
        .iter()
        .filter(|d| d.is_ipv4())
        .map(|d| d.to_string())
        .collect();
    Some(InstallNetwork {
        mac: mac.to_string(),
        interface: iface.name.clone(),
        address: ip.to_string(),
        prefix_len: subnet.prefix.prefix_len(),
        netmask: subnet.prefix.netmask().to_string(),
        gateway: subnet.gateway.map(|g| g.to_string()),
        nameservers: (!dns.is_empty()).then(|| dns.join(" ")),
        nameservers_csv: (!dns.is_empty()).then(|| dns.join(",")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use kiln_types::SubnetId;

    pub(crate) fn subnets() -> BTreeMap<String, Subnet> {
        let mk = |name: &str, prefix: &str, gw: Option<&str>| Subnet {
            id: SubnetId::new(),
            name: name.into(),
            prefix: prefix.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
            dns: vec!["10.0.0.53".parse().unwrap()],
            search: vec!["example.net".into()],
            vlan: None,
            mtu: None,
            static_range: None,
            dynamic_range: None,
            created_at: Utc::now(),
        };
        [
            mk("prod", "10.0.0.0/24", Some("10.0.0.1")),
            mk("storage", "10.20.0.0/24", None),
            mk("prod6", "2001:db8::/64", Some("2001:db8::1")),
        ]
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect()
    }

    pub(crate) fn bonded() -> MachineNetwork {
        serde_json::from_value(serde_json::json!({
            "interfaces": [
                {"name": "eno1", "mac": "52:54:00:12:34:01"},
                {"name": "eno2", "mac": "52:54:00:12:34:02"},
                {"name": "eno3", "addresses": [{"dhcp": "v4"}]}
            ],
            "bonds": [{"name": "bond0", "interfaces": ["eno1", "eno2"], "mode": "802.3ad", "lacp_rate": "fast", "miimon": 100,
                       "addresses": [{"subnet": "prod", "address": "10.0.0.5", "default_route": true},
                                     {"subnet": "prod6", "address": "2001:db8::5", "default_route": true}]}],
            "vlans": [{"name": "bond0.20", "id": 20, "link": "bond0", "mtu": 9000,
                       "addresses": [{"subnet": "storage", "address": "10.20.0.5"}]}]
        }))
        .unwrap()
    }

    #[test]
    fn renders_ethernets_bonds_vlans_routes_and_nameservers() {
        let text = network_config(&bonded(), &subnets()).unwrap();
        let doc: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(doc["version"], 2);
        assert_eq!(doc["ethernets"]["eno1"]["match"]["macaddress"], "52:54:00:12:34:01");
        assert_eq!(doc["ethernets"]["eno1"]["set-name"], "eno1");
        assert!(doc["ethernets"]["eno1"].get("addresses").is_none());
        assert!(
            doc["ethernets"]["eno3"].get("match").is_none(),
            "no MAC: matched by its name"
        );
        assert_eq!(doc["ethernets"]["eno3"]["dhcp4"], true);
        let bond = &doc["bonds"]["bond0"];
        assert_eq!(bond["interfaces"], json!(["eno1", "eno2"]));
        assert_eq!(
            bond["parameters"],
            json!({"mode": "802.3ad", "lacp-rate": "fast", "mii-monitor-interval": 100})
        );
        assert_eq!(bond["addresses"], json!(["10.0.0.5/24", "2001:db8::5/64"]));
        assert_eq!(
            bond["routes"],
            json!([{"to": "0.0.0.0/0", "via": "10.0.0.1"}, {"to": "::/0", "via": "2001:db8::1"}])
        );
        assert_eq!(
            bond["nameservers"],
            json!({"addresses": ["10.0.0.53"], "search": ["example.net"]})
        );
        let vlan = &doc["vlans"]["bond0.20"];
        assert_eq!(vlan["id"], 20);
        assert_eq!(vlan["link"], "bond0");
        assert_eq!(vlan["mtu"], 9000);
        assert_eq!(vlan["addresses"], json!(["10.20.0.5/24"]));
        assert!(
            vlan.get("routes").is_none(),
            "only the marked address routes by default"
        );
    }

    #[test]
    fn strings_are_quoted_so_yaml_1_1_reads_them_as_strings() {
        let net: MachineNetwork = serde_json::from_value(json!({
            "interfaces": [{"name": "on", "mac": "52:54:00:12:34:56", "addresses": [{"dhcp": "v4"}]}]
        }))
        .unwrap();
        let text = network_config(&net, &subnets()).unwrap();
        assert!(text.contains("macaddress: \"52:54:00:12:34:56\""), "{text}");
        assert!(text.contains("\"on\":"), "{text}");
        let back: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(back["ethernets"]["on"]["match"]["macaddress"], "52:54:00:12:34:56");
    }

    #[test]
    fn no_network_no_file() {
        assert_eq!(network_config(&MachineNetwork::default(), &subnets()), None);
    }

    #[test]
    fn install_network_takes_a_nic_with_its_own_address_boot_mac_first() {
        // Only the bond has the address: installers cannot build bonds.
        assert_eq!(install_network(&bonded(), &subnets(), None), None);
        let net: MachineNetwork = serde_json::from_value(serde_json::json!({
            "interfaces": [
                {"name": "eno1", "mac": "52:54:00:12:34:01", "addresses": [{"subnet": "prod", "address": "10.0.0.7"}]},
                {"name": "eno2", "mac": "52:54:00:12:34:02", "addresses": [{"subnet": "prod", "address": "10.0.0.8"}]}
            ]
        }))
        .unwrap();
        let first = install_network(&net, &subnets(), None).unwrap();
        assert_eq!(first.address, "10.0.0.7");
        let boot: MacAddr = "52:54:00:12:34:02".parse().unwrap();
        let chosen = install_network(&net, &subnets(), Some(boot)).unwrap();
        assert_eq!(
            chosen,
            InstallNetwork {
                mac: "52:54:00:12:34:02".into(),
                interface: "eno2".into(),
                address: "10.0.0.8".into(),
                prefix_len: 24,
                netmask: "255.255.255.0".into(),
                gateway: Some("10.0.0.1".into()),
                nameservers: Some("10.0.0.53".into()),
                nameservers_csv: Some("10.0.0.53".into()),
            }
        );
    }

    #[test]
    fn kiln_pools_name_their_config_section() {
        let s: crate::dhcp::Subnet =
            serde_json::from_value(json!({"network": "10.0.0.0/24", "pool": ["10.0.0.100", "10.0.0.200"]})).unwrap();
        let pools = kiln_pools(&[s]);
        assert_eq!(pools[0].range.to_string(), "10.0.0.100-10.0.0.200");
        assert!(pools[0].what.contains("[[dhcp.subnet]] 10.0.0.0/24"));
    }

    /// Runs Debian's cloud-init converter on `config`, rendering for
    /// `kind` (eni, networkd, netplan); every file it wrote, by path.
    fn cloud_init_convert(config: &str, kind: &str) -> BTreeMap<String, String> {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("network-config");
        std::fs::write(&input, config).unwrap();
        let out = dir.path().join("out");
        let run = std::process::Command::new("cloud-init")
            .args(["devel", "net-convert", "-k", "yaml", "-D", "debian", "-O", kind, "-p"])
            .arg(&input)
            .arg("-d")
            .arg(&out)
            .output()
            .unwrap_or_else(|e| {
                panic!("cloud-init (Debian package cloud-init) cannot run ({e}): run the tests with scripts/test, which installs it")
            });
        assert!(
            run.status.success(),
            "cloud-init refused kiln's network-config:\n{config}\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let mut files = BTreeMap::new();
        let mut todo = vec![out.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    let rel = p.strip_prefix(&out).unwrap().display().to_string();
                    files.insert(rel, std::fs::read_to_string(&p).unwrap());
                }
            }
        }
        files
    }

    /// The real consumer: Debian 12's cloud-init reads kiln's file and
    /// writes the bond, the VLAN, the static addresses on the right links
    /// and the default route — as ifupdown (Debian's default) and as
    /// systemd-networkd files.
    #[test]
    fn debians_cloud_init_renders_it_as_meant() {
        let start = std::time::Instant::now();
        let config = network_config(&bonded(), &subnets()).unwrap();
        let eni = cloud_init_convert(&config, "eni");
        let interfaces = &eni["etc/network/interfaces.d/50-cloud-init"];
        let stanza = |name: &str| -> String {
            let head = format!("iface {name} inet");
            let at = interfaces
                .find(&head)
                .unwrap_or_else(|| panic!("no {head} in:\n{interfaces}"));
            interfaces[at..].split("\n\n").next().unwrap().to_string()
        };
        let bond = stanza("bond0");
        for line in [
            "inet static",
            "address 10.0.0.5/24",
            "bond-mode 802.3ad",
            "bond-lacp-rate fast",
            "bond-miimon 100",
            "dns-nameservers 10.0.0.53",
            "dns-search example.net",
            "route add default gw 10.0.0.1",
        ] {
            assert!(bond.contains(line), "bond0 lacks `{line}`:\n{bond}");
        }
        for member in ["eno1", "eno2"] {
            let s = stanza(member);
            assert!(s.contains("inet manual") && s.contains("bond-master bond0"), "{s}");
        }
        let vlan = stanza("bond0.20");
        for line in [
            "inet static",
            "address 10.20.0.5/24",
            "vlan-raw-device bond0",
            "vlan_id 20",
            "mtu 9000",
        ] {
            assert!(vlan.contains(line), "bond0.20 lacks `{line}`:\n{vlan}");
        }
        assert!(!vlan.contains("default"), "one default route only:\n{vlan}");
        assert!(
            interfaces.contains("iface bond0 inet6 static") && interfaces.contains("address 2001:db8::5/64"),
            "{interfaces}"
        );
        assert!(stanza("eno3").contains("inet dhcp"), "{interfaces}");
        let udev = &eni["etc/udev/rules.d/70-persistent-net.rules"];
        assert!(
            udev.contains(r#"ATTR{address}=="52:54:00:12:34:01", NAME="eno1""#),
            "{udev}"
        );

        // One NIC with a static address (the QEMU check's shape), as
        // systemd-networkd files: matched by MAC, renamed, addressed, routed.
        let single: MachineNetwork = serde_json::from_value(json!({
            "interfaces": [{"name": "lan0", "mac": "52:54:00:12:34:56",
                            "addresses": [{"subnet": "prod", "address": "10.0.0.7", "default_route": true}]}]
        }))
        .unwrap();
        let networkd = cloud_init_convert(&network_config(&single, &subnets()).unwrap(), "networkd");
        let lan0 = &networkd["etc/systemd/network/10-cloud-init-lan0.network"];
        for line in [
            "MACAddress=52:54:00:12:34:56",
            "Name=lan0",
            "Address=10.0.0.7/24",
            "Gateway=10.0.0.1",
            "DNS=10.0.0.53",
            "Domains=example.net",
        ] {
            assert!(lan0.contains(line), "lan0 lacks `{line}`:\n{lan0}");
        }
        println!("cloud-init net-convert checks: {:.1} s", start.elapsed().as_secs_f64());
    }
}
