//! The network model: subnets as inventory objects, and per machine its
//! interfaces, bonds and VLANs with their addresses — what kiln renders
//! into the new OS's cloud-init `network-config` (and the installers'
//! static network lines).
//!
//! The rules here are pure (no store, no I/O): a subnet's ranges, the
//! shape of a machine's network, and the next free address. The store
//! calls them inside the transaction that writes, so that what it checks
//! is what it commits.
//!
//! Why static and dynamic ranges must be disjoint: until DHCP leases live in
//! the database, nothing else stops a dynamic lease (kiln's own pool, or
//! another DHCP server's) from handing out an address kiln has assigned to
//! a machine as static. Two ranges that never meet make that impossible by
//! construction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::{MacAddr, SubnetId, string_enum};

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpRange {
    #[schema(value_type = String)]
    pub first: IpAddr,
    #[schema(value_type = String)]
    pub last: IpAddr,
}

impl IpRange {
    pub fn new(first: IpAddr, last: IpAddr) -> IpRange {
        IpRange { first, last }
    }

    /// Both ends of one family, in order.
    pub fn check(&self) -> Result<(), String> {
        if self.first.is_ipv4() != self.last.is_ipv4() {
            return Err(format!("range {self} mixes IPv4 and IPv6"));
        }
        if num(self.first) > num(self.last) {
            return Err(format!("range {self} ends before it starts: give FIRST-LAST in order"));
        }
        Ok(())
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.first.is_ipv4() && (num(self.first)..=num(self.last)).contains(&num(a))
    }

    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.first.is_ipv4() == other.first.is_ipv4()
            && num(self.first) <= num(other.last)
            && num(other.first) <= num(self.last)
    }

    /// Whether the whole range lies inside `net`.
    pub fn inside(&self, net: &IpNet) -> bool {
        net.contains(&self.first) && net.contains(&self.last)
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for IpRange {
    type Err = String;

    /// `FIRST-LAST` (`10.0.0.10-10.0.0.99`, `2001:db8::10-2001:db8::ff`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a range: give FIRST-LAST, e.g. 10.0.0.10-10.0.0.99");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let r = IpRange::new(
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        r.check()?;
        Ok(r)
    }
}

/// An address as a number, for ordering and stepping (IPv4 in the low bits).
fn num(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr(v4: bool, n: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(std::net::Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(n))
    }
}

/// A range some other party hands out dynamically: one of kiln's own DHCP
/// pools (`[[dhcp.subnet]] pool` in the server config), named for errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicPool {
    pub range: IpRange,
    /// Where it is configured, e.g. `kiln's DHCP pool of [[dhcp.subnet]] 10.0.0.0/24`.
    pub what: String,
}

/// A subnet in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Subnet {
    pub id: SubnetId,
    pub name: String,
    /// `10.0.0.0/24` or `2001:db8:1::/64`.
    #[schema(value_type = String)]
    pub prefix: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<IpAddr>,
    /// DNS search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// The 802.1Q VLAN the subnet lives on (informative; a machine's VLAN
    /// links say where it is tagged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Where kiln assigns static addresses from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_range: Option<IpRange>,
    /// The range a DHCP server hands out dynamically; never meets
    /// `static_range` or kiln's own DHCP pools' complement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_range: Option<IpRange>,
    pub created_at: DateTime<Utc>,
}

/// A static address assigned in a subnet, and the machine it is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubnetAssignment {
    #[schema(value_type = String)]
    pub address: IpAddr,
    /// The machine's hostname.
    pub machine: String,
}

/// `GET /api/v1/subnets/{key}`: the subnet and its assigned addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubnetDetail {
    #[serde(flatten)]
    pub subnet: Subnet,
    pub assignments: Vec<SubnetAssignment>,
}

/// `POST /api/v1/subnets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubnetCreate {
    pub name: String,
    #[schema(value_type = String)]
    pub prefix: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_range: Option<IpRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_range: Option<IpRange>,
}

fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /api/v1/subnets/{key}`: absent fields are kept, `null` clears.
/// The prefix is not changed in place (its machines' addresses would move):
/// make a new subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubnetPatch {
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub gateway: Option<Option<IpAddr>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    pub dns: Option<Vec<IpAddr>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u16>)]
    pub vlan: Option<Option<u16>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u16>)]
    pub mtu: Option<Option<u16>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<IpRange>)]
    pub static_range: Option<Option<IpRange>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<IpRange>)]
    pub dynamic_range: Option<Option<IpRange>>,
}

impl SubnetPatch {
    pub fn apply(&self, s: &Subnet) -> Subnet {
        let mut s = s.clone();
        if let Some(v) = self.gateway {
            s.gateway = v;
        }
        if let Some(v) = &self.dns {
            s.dns = v.clone();
        }
        if let Some(v) = &self.search {
            s.search = v.clone();
        }
        if let Some(v) = self.vlan {
            s.vlan = v;
        }
        if let Some(v) = self.mtu {
            s.mtu = v;
        }
        if let Some(v) = self.static_range {
            s.static_range = v;
        }
        if let Some(v) = self.dynamic_range {
            s.dynamic_range = v;
        }
        s
    }
}

impl Subnet {
    pub fn from_create(c: &SubnetCreate, id: SubnetId, created_at: DateTime<Utc>) -> Subnet {
        Subnet {
            id,
            name: c.name.trim().to_string(),
            prefix: c.prefix.trunc(),
            gateway: c.gateway,
            dns: c.dns.clone(),
            search: c.search.clone(),
            vlan: c.vlan,
            mtu: c.mtu,
            static_range: c.static_range,
            dynamic_range: c.dynamic_range,
            created_at,
        }
    }

    /// Every problem with the subnet on its own and against `pools` (kiln's
    /// DHCP pools): each message names the ranges involved and how to fix.
    pub fn problems(&self, pools: &[DynamicPool]) -> Vec<String> {
        let mut why = vec![];
        if !valid_name(&self.name) {
            why.push(format!(
                "subnet name `{}` is not valid: use 1-63 letters, digits, `-`, `_` or `.`",
                self.name
            ));
        }
        let p = &self.prefix;
        if let Some(g) = self.gateway
            && !p.contains(&g)
        {
            why.push(format!("gateway {g} is outside the subnet's prefix {p}"));
        }
        if let Some(v) = self.vlan
            && !(1..=4094).contains(&v)
        {
            why.push(format!("VLAN {v} is outside 1-4094"));
        }
        if let Some(m) = self.mtu
            && !(576..=9216).contains(&m)
        {
            why.push(format!("MTU {m} is outside 576-9216"));
        }
        for d in &self.search {
            if d.is_empty()
                || d.len() > 253
                || !d
                    .split('.')
                    .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            {
                why.push(format!("search domain `{d}` is not a DNS name"));
            }
        }
        for (what, r) in [
            ("static range", self.static_range),
            ("dynamic range", self.dynamic_range),
        ] {
            if let Some(r) = r {
                if let Err(e) = r.check() {
                    why.push(format!("{what}: {e}"));
                } else if !r.inside(p) {
                    why.push(format!("{what} {r} is not inside the subnet's prefix {p}"));
                }
            }
        }
        if let (Some(s), Some(d)) = (self.static_range, self.dynamic_range)
            && s.overlaps(&d)
        {
            why.push(format!(
                "static range {s} overlaps dynamic range {d} of subnet {}: a dynamic lease could take a \
                 static address; make them disjoint",
                self.name
            ));
        }
        if let Some(s) = self.static_range {
            for pool in pools.iter().filter(|pool| pool.range.overlaps(&s)) {
                why.push(format!(
                    "static range {s} of subnet {} overlaps {} {}: a dynamic lease could take a static \
                     address; move one of them",
                    self.name, pool.what, pool.range
                ));
            }
        }
        why
    }

    /// Why `a` cannot be a static address here, if it cannot: outside the
    /// prefix, the network or broadcast address, the gateway, outside the
    /// static range, or inside a dynamic range.
    pub fn refuses_static(&self, a: IpAddr, pools: &[DynamicPool]) -> Option<String> {
        let p = &self.prefix;
        if !p.contains(&a) {
            return Some(format!("{a} is outside subnet {} ({p})", self.name));
        }
        if a.is_ipv4() && p.prefix_len() < 31 && (a == p.network() || a == p.broadcast()) {
            return Some(format!(
                "{a} is the network or broadcast address of subnet {}",
                self.name
            ));
        }
        if Some(a) == self.gateway {
            return Some(format!("{a} is the gateway of subnet {}", self.name));
        }
        if let Some(s) = self.static_range
            && !s.contains(a)
        {
            return Some(format!("{a} is outside the static range {s} of subnet {}", self.name));
        }
        if let Some(d) = self.dynamic_range
            && d.contains(a)
        {
            return Some(format!("{a} is inside the dynamic range {d} of subnet {}", self.name));
        }
        if let Some(pool) = pools.iter().find(|pool| pool.range.contains(a)) {
            return Some(format!("{a} is inside {} {}", pool.what, pool.range));
        }
        None
    }

    /// The lowest address kiln may assign that is not in `taken`: from the
    /// static range (else the prefix's hosts), skipping the gateway, the
    /// dynamic range and `pools`. Steps over excluded ranges whole, so an
    /// IPv6 /64 costs no more than an IPv4 /24.
    pub fn next_free(&self, taken: &BTreeSet<IpAddr>, pools: &[DynamicPool]) -> Option<IpAddr> {
        let p = &self.prefix;
        let v4 = p.addr().is_ipv4();
        let (mut lo, hi) = match self.static_range {
            Some(r) => (num(r.first), num(r.last)),
            None if v4 && p.prefix_len() < 31 => (num(p.network()) + 1, num(p.broadcast()) - 1),
            // IPv6: skip the subnet-router anycast address (the prefix itself).
            None if !v4 => (num(p.network()) + 1, num(p.broadcast())),
            None => (num(p.network()), num(p.broadcast())),
        };
        let mut skip: Vec<(u128, u128)> = pools
            .iter()
            .map(|x| x.range)
            .chain(self.dynamic_range)
            .filter(|r| r.first.is_ipv4() == v4)
            .map(|r| (num(r.first), num(r.last)))
            .collect();
        skip.extend(self.gateway.filter(|g| g.is_ipv4() == v4).map(|g| (num(g), num(g))));
        skip.extend(taken.iter().filter(|t| t.is_ipv4() == v4).map(|t| (num(*t), num(*t))));
        skip.sort();
        for (a, b) in skip {
            if lo > hi {
                return None;
            }
            if b < lo {
                continue;
            }
            if a > lo {
                break;
            }
            lo = b.checked_add(1)?;
        }
        (lo <= hi).then(|| addr(v4, lo))
    }
}

fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

string_enum!(
    /// IP family of a DHCP address.
    IpFamily { V4 = "v4", V6 = "v6" }
);

/// One address of a link: static from a subnet (given, or the next free one
/// when `address` is left out), or DHCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressSpec {
    /// The subnet, by name: required for a static address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The static address; absent: kiln assigns the subnet's next free one
    /// (and stores it, so it stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub address: Option<IpAddr>,
    /// DHCP for this family instead of a static address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<IpFamily>,
    /// This address's subnet gateway is the machine's default route (at
    /// most one per family).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default_route: bool,
}

/// A physical interface, matched by MAC (and renamed to `name`) or, without
/// a MAC, by its kernel name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetInterface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<AddressSpec>,
}

string_enum!(
    /// Linux bonding mode.
    BondMode {
        BalanceRr = "balance-rr",
        ActiveBackup = "active-backup",
        BalanceXor = "balance-xor",
        Broadcast = "broadcast",
        Lacp = "802.3ad",
        BalanceTlb = "balance-tlb",
        BalanceAlb = "balance-alb",
    }
);

string_enum!(
    /// LACPDU rate of an 802.3ad bond.
    LacpRate { Slow = "slow", Fast = "fast" }
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Bond {
    pub name: String,
    /// Member interfaces, by name.
    pub interfaces: Vec<String>,
    pub mode: BondMode,
    /// 802.3ad only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lacp_rate: Option<LacpRate>,
    /// MII link monitoring interval, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miimon: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<AddressSpec>,
}

/// An 802.1Q VLAN on a parent link (an interface or a bond).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Vlan {
    pub name: String,
    pub id: u16,
    pub link: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<AddressSpec>,
}

/// A machine's network: `PUT` and `GET /api/v1/machines/{key}/network`.
/// As returned, every static address is filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineNetwork {
    #[serde(default)]
    pub interfaces: Vec<NetInterface>,
    #[serde(default)]
    pub bonds: Vec<Bond>,
    #[serde(default)]
    pub vlans: Vec<Vlan>,
}

impl MachineNetwork {
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty() && self.bonds.is_empty() && self.vlans.is_empty()
    }

    /// Every link's name and addresses, interfaces first.
    pub fn links(&self) -> impl Iterator<Item = (&str, &[AddressSpec])> {
        self.interfaces
            .iter()
            .map(|i| (i.name.as_str(), i.addresses.as_slice()))
            .chain(self.bonds.iter().map(|b| (b.name.as_str(), b.addresses.as_slice())))
            .chain(self.vlans.iter().map(|v| (v.name.as_str(), v.addresses.as_slice())))
    }

    fn links_mut(&mut self) -> impl Iterator<Item = &mut Vec<AddressSpec>> {
        self.interfaces
            .iter_mut()
            .map(|i| &mut i.addresses)
            .chain(self.bonds.iter_mut().map(|b| &mut b.addresses))
            .chain(self.vlans.iter_mut().map(|v| &mut v.addresses))
    }

    /// Problems of the shape alone (no subnets needed): names, members,
    /// parents, VLAN ids, address specs, default routes.
    pub fn shape_problems(&self) -> Vec<String> {
        let mut why = vec![];
        let mut names = BTreeSet::new();
        for (name, _) in self.links() {
            if !(1..=15).contains(&name.len())
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                why.push(format!(
                    "link name `{name}` is not a Linux interface name: 1-15 letters, digits, `-`, `_` or `.`"
                ));
            }
            if !names.insert(name) {
                why.push(format!("link name `{name}` is used twice"));
            }
        }
        let mut macs = BTreeMap::new();
        for i in &self.interfaces {
            if let Some(m) = i.mac
                && let Some(other) = macs.insert(m, &i.name)
            {
                why.push(format!("MAC {m} is given to both {other} and {}", i.name));
            }
        }
        let ifaces: BTreeMap<&str, &NetInterface> = self.interfaces.iter().map(|i| (i.name.as_str(), i)).collect();
        let mut enslaved = BTreeMap::new();
        for b in &self.bonds {
            if b.interfaces.is_empty() {
                why.push(format!("bond {} has no member interfaces", b.name));
            }
            for m in &b.interfaces {
                match ifaces.get(m.as_str()) {
                    None => why.push(format!(
                        "bond {} names member `{m}`, which is not one of the machine's interfaces",
                        b.name
                    )),
                    Some(i) if !i.addresses.is_empty() => why.push(format!(
                        "interface {m} is a member of bond {} and cannot have addresses of its own",
                        b.name
                    )),
                    Some(_) => {}
                }
                if let Some(other) = enslaved.insert(m.as_str(), b.name.as_str()) {
                    why.push(format!("interface {m} is a member of both {other} and {}", b.name));
                }
            }
            if b.lacp_rate.is_some() && b.mode != BondMode::Lacp {
                why.push(format!("bond {}: lacp_rate applies to mode 802.3ad only", b.name));
            }
        }
        for v in &self.vlans {
            if !(1..=4094).contains(&v.id) {
                why.push(format!("VLAN {} has id {}, outside 1-4094", v.name, v.id));
            }
            let parent_ok = ifaces.contains_key(v.link.as_str()) || self.bonds.iter().any(|b| b.name == v.link);
            if !parent_ok {
                why.push(format!(
                    "VLAN {} is on `{}`, which is neither an interface nor a bond of the machine",
                    v.name, v.link
                ));
            } else if let Some(bond) = enslaved.get(v.link.as_str()) {
                why.push(format!(
                    "VLAN {} is on {}, a member of bond {bond}: put it on the bond",
                    v.name, v.link
                ));
            }
        }
        for (name, addrs) in self.links() {
            for a in addrs {
                match (&a.subnet, a.dhcp) {
                    (_, Some(_)) if a.address.is_some() => why.push(format!(
                        "{name}: an address is either static (`address`) or `dhcp`, not both"
                    )),
                    (None, None) => why.push(format!(
                        "{name}: a static address needs its `subnet` (or give `dhcp`: v4 or v6)"
                    )),
                    _ => {}
                }
                // One default route per family is counted in
                // `address_problems`, once the subnets give the family.
                if a.default_route && a.dhcp.is_some() {
                    why.push(format!(
                        "{name}: a DHCP address takes its default route from DHCP; set default_route on a static one"
                    ));
                }
            }
        }
        why
    }

    /// Problems of the addresses against their subnets: each static address
    /// inside its subnet and allowed there, no address twice, at most one
    /// default route per family, and a gateway behind each.
    pub fn address_problems(&self, subnets: &BTreeMap<String, Subnet>, pools: &[DynamicPool]) -> Vec<String> {
        let mut why = vec![];
        let mut seen = BTreeSet::new();
        let mut defaults: BTreeMap<bool, Vec<String>> = BTreeMap::new();
        for (name, addrs) in self.links() {
            for a in addrs {
                let Some(subnet_name) = &a.subnet else { continue };
                let Some(subnet) = subnets.get(subnet_name) else {
                    why.push(format!(
                        "{name}: no subnet named `{subnet_name}` (see `kiln subnet list`)"
                    ));
                    continue;
                };
                if let Some(ip) = a.address {
                    if let Some(e) = subnet.refuses_static(ip, pools) {
                        why.push(format!("{name}: {e}"));
                    }
                    if !seen.insert(ip) {
                        why.push(format!("{name}: address {ip} is given twice"));
                    }
                }
                if let Some(fam) = a.dhcp
                    && (fam == IpFamily::V4) != subnet.prefix.addr().is_ipv4()
                {
                    why.push(format!(
                        "{name}: dhcp {fam} on subnet {subnet_name} ({}) of the other family",
                        subnet.prefix
                    ));
                }
                if a.default_route {
                    if subnet.gateway.is_none() {
                        why.push(format!(
                            "{name}: default_route on subnet {subnet_name}, which has no gateway: set one with `kiln subnet edit`"
                        ));
                    }
                    defaults
                        .entry(subnet.prefix.addr().is_ipv4())
                        .or_default()
                        .push(name.to_string());
                }
            }
        }
        for (v4, links) in defaults {
            if links.len() > 1 {
                why.push(format!(
                    "more than one {} default route ({}): mark one address only",
                    if v4 { "IPv4" } else { "IPv6" },
                    links.join(", ")
                ));
            }
        }
        why
    }

    /// Fills every static address left out with its subnet's next free one,
    /// given the addresses `taken` (by other machines, and by this one's
    /// given addresses). `Err` names the subnet that is full.
    pub fn allocate(
        &mut self,
        subnets: &BTreeMap<String, Subnet>,
        taken: &mut BTreeSet<IpAddr>,
        pools: &[DynamicPool],
    ) -> Result<(), String> {
        taken.extend(self.links().flat_map(|(_, a)| a.iter().filter_map(|a| a.address)));
        for addrs in self.links_mut() {
            for a in addrs.iter_mut().filter(|a| a.address.is_none() && a.dhcp.is_none()) {
                let Some(subnet) = a.subnet.as_ref().and_then(|s| subnets.get(s)) else {
                    continue;
                };
                let ip = subnet.next_free(taken, pools).ok_or_else(|| {
                    format!(
                        "subnet {} has no free address left in {}: widen its static range or give an address",
                        subnet.name,
                        subnet
                            .static_range
                            .map(|r| r.to_string())
                            .unwrap_or_else(|| subnet.prefix.to_string())
                    )
                })?;
                taken.insert(ip);
                a.address = Some(ip);
            }
        }
        Ok(())
    }

    /// Every static address with its subnet name.
    pub fn static_addresses(&self) -> Vec<(String, IpAddr)> {
        self.links()
            .flat_map(|(_, addrs)| addrs.iter())
            .filter_map(|a| Some((a.subnet.clone()?, a.address?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(prefix: &str, s: Option<&str>, d: Option<&str>) -> Subnet {
        Subnet {
            id: SubnetId::new(),
            name: "prod".into(),
            prefix: prefix.parse().unwrap(),
            // The first address after the network's.
            gateway: Some({
                let net: IpNet = prefix.parse().unwrap();
                addr(net.addr().is_ipv4(), num(net.network()) + 1)
            }),
            dns: vec![],
            search: vec![],
            vlan: None,
            mtu: None,
            static_range: s.map(|s| s.parse().unwrap()),
            dynamic_range: d.map(|s| s.parse().unwrap()),
            created_at: Utc::now(),
        }
    }

    fn pool(r: &str) -> DynamicPool {
        DynamicPool {
            range: r.parse().unwrap(),
            what: "kiln's DHCP pool of [[dhcp.subnet]] 10.0.0.0/24".into(),
        }
    }

    #[test]
    fn static_and_dynamic_ranges_must_be_disjoint_and_errors_name_both() {
        let s = subnet("10.0.0.0/24", Some("10.0.0.10-10.0.0.99"), Some("10.0.0.90-10.0.0.200"));
        let why = s.problems(&[]);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(
            why[0].contains("10.0.0.10-10.0.0.99") && why[0].contains("10.0.0.90-10.0.0.200"),
            "{why:?}"
        );

        let ok = subnet(
            "10.0.0.0/24",
            Some("10.0.0.10-10.0.0.99"),
            Some("10.0.0.100-10.0.0.200"),
        );
        assert!(ok.problems(&[]).is_empty());
        let why = ok.problems(&[pool("10.0.0.50-10.0.0.60")]);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(
            why[0].contains("10.0.0.10-10.0.0.99") && why[0].contains("10.0.0.50-10.0.0.60"),
            "{why:?}"
        );
        assert!(why[0].contains("[[dhcp.subnet]]"), "{why:?}");
        // Adjacent is not overlapping.
        assert!(ok.problems(&[pool("10.0.0.100-10.0.0.110")]).is_empty());
    }

    #[test]
    fn ranges_must_lie_in_the_prefix_and_be_ordered() {
        let s = subnet("10.0.0.0/24", Some("10.0.0.10-10.0.1.5"), None);
        assert!(s.problems(&[])[0].contains("not inside"), "{:?}", s.problems(&[]));
        assert!(
            "10.0.0.9-10.0.0.1"
                .parse::<IpRange>()
                .unwrap_err()
                .contains("ends before")
        );
        assert!("10.0.0.1-2001:db8::1".parse::<IpRange>().unwrap_err().contains("mixes"));
        assert!("10.0.0.1".parse::<IpRange>().is_err());
    }

    #[test]
    fn next_free_skips_gateway_taken_and_dynamic_addresses() {
        let s = subnet("10.0.0.0/29", None, Some("10.0.0.3-10.0.0.4"));
        // hosts .1-.6; .1 gateway, .3-.4 dynamic.
        let mut taken = BTreeSet::new();
        assert_eq!(s.next_free(&taken, &[]), Some("10.0.0.2".parse().unwrap()));
        taken.insert("10.0.0.2".parse().unwrap());
        assert_eq!(s.next_free(&taken, &[]), Some("10.0.0.5".parse().unwrap()));
        taken.insert("10.0.0.5".parse().unwrap());
        assert_eq!(s.next_free(&taken, &[pool("10.0.0.6-10.0.0.6")]), None);
        assert_eq!(s.next_free(&taken, &[]), Some("10.0.0.6".parse().unwrap()));
        taken.insert("10.0.0.6".parse().unwrap());
        assert_eq!(s.next_free(&taken, &[]), None, "the broadcast address is never given");
    }

    #[test]
    fn next_free_in_a_static_range_and_in_ipv6() {
        let s = subnet("10.0.0.0/24", Some("10.0.0.10-10.0.0.11"), None);
        let taken: BTreeSet<IpAddr> = ["10.0.0.10".parse().unwrap()].into();
        assert_eq!(s.next_free(&taken, &[]), Some("10.0.0.11".parse().unwrap()));
        let v6 = subnet("2001:db8:1::/64", None, Some("2001:db8:1::1000-2001:db8:1::ffff"));
        let taken: BTreeSet<IpAddr> = ["2001:db8:1::2".parse().unwrap()].into();
        // ::1 is the gateway (first host), ::2 taken.
        assert_eq!(v6.next_free(&taken, &[]), Some("2001:db8:1::3".parse().unwrap()));
    }

    #[test]
    fn refuses_static_addresses_outside_or_in_dynamic_ranges() {
        let s = subnet(
            "10.0.0.0/24",
            Some("10.0.0.10-10.0.0.99"),
            Some("10.0.0.100-10.0.0.200"),
        );
        assert!(s.refuses_static("10.0.0.20".parse().unwrap(), &[]).is_none());
        assert!(
            s.refuses_static("10.0.1.20".parse().unwrap(), &[])
                .unwrap()
                .contains("outside subnet")
        );
        assert!(
            s.refuses_static("10.0.0.150".parse().unwrap(), &[])
                .unwrap()
                .contains("static range")
        );
        let open = subnet("10.0.0.0/24", None, Some("10.0.0.100-10.0.0.200"));
        assert!(
            open.refuses_static("10.0.0.150".parse().unwrap(), &[])
                .unwrap()
                .contains("dynamic range")
        );
        assert!(
            open.refuses_static("10.0.0.1".parse().unwrap(), &[])
                .unwrap()
                .contains("gateway")
        );
        assert!(
            open.refuses_static("10.0.0.255".parse().unwrap(), &[])
                .unwrap()
                .contains("broadcast")
        );
        assert!(
            open.refuses_static("10.0.0.30".parse().unwrap(), &[pool("10.0.0.20-10.0.0.40")])
                .unwrap()
                .contains("kiln's DHCP pool")
        );
    }

    fn net(v: serde_json::Value) -> MachineNetwork {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn shape_rules_members_parents_and_names() {
        let good = net(serde_json::json!({
            "interfaces": [{"name": "eno1", "mac": "52:54:00:00:00:01"}, {"name": "eno2", "mac": "52:54:00:00:00:02"}],
            "bonds": [{"name": "bond0", "interfaces": ["eno1", "eno2"], "mode": "802.3ad", "lacp_rate": "fast", "miimon": 100,
                       "addresses": [{"subnet": "prod", "default_route": true}]}],
            "vlans": [{"name": "bond0.20", "id": 20, "link": "bond0", "addresses": [{"dhcp": "v4"}]}]
        }));
        assert!(good.shape_problems().is_empty(), "{:?}", good.shape_problems());

        let bad = net(serde_json::json!({
            "interfaces": [{"name": "eno1", "mac": "52:54:00:00:00:01"},
                           {"name": "eno1", "mac": "52:54:00:00:00:01", "addresses": [{"subnet": "prod"}]}],
            "bonds": [{"name": "bond0", "interfaces": ["eno1", "eno9"], "mode": "active-backup", "lacp_rate": "fast"}],
            "vlans": [{"name": "v5000", "id": 5000, "link": "eth7"}, {"name": "averyveryverylongname", "id": 3, "link": "eno1",
                       "addresses": [{"address": "10.0.0.5"}]}]
        }));
        let why = bad.shape_problems().join("\n");
        for needle in [
            "`eno1` is used twice",
            "MAC 52:54:00:00:00:01 is given to both",
            "`eno9`, which is not one of",
            "cannot have addresses of its own",
            "lacp_rate applies to mode 802.3ad only",
            "outside 1-4094",
            "neither an interface nor a bond",
            "not a Linux interface name",
            "needs its `subnet`",
            "put it on the bond",
        ] {
            assert!(why.contains(needle), "missing `{needle}` in:\n{why}");
        }
    }

    #[test]
    fn addresses_in_their_subnet_one_default_route_and_allocation() {
        let mut subnets = BTreeMap::new();
        subnets.insert(
            "prod".to_string(),
            subnet("10.0.0.0/24", Some("10.0.0.10-10.0.0.12"), None),
        );
        let mut two_defaults = net(serde_json::json!({
            "interfaces": [
                {"name": "eno1", "addresses": [{"subnet": "prod", "default_route": true}]},
                {"name": "eno2", "addresses": [{"subnet": "prod", "address": "10.0.0.50", "default_route": true}]},
                {"name": "eno3", "addresses": [{"subnet": "nope"}]}
            ]
        }));
        let why = two_defaults.address_problems(&subnets, &[]).join("\n");
        assert!(why.contains("outside the static range 10.0.0.10-10.0.0.12"), "{why}");
        assert!(why.contains("more than one IPv4 default route (eno1, eno2)"), "{why}");
        assert!(why.contains("no subnet named `nope`"), "{why}");

        two_defaults.interfaces.truncate(1);
        let mut taken: BTreeSet<IpAddr> = ["10.0.0.10".parse().unwrap()].into();
        two_defaults.allocate(&subnets, &mut taken, &[]).unwrap();
        assert_eq!(
            two_defaults.interfaces[0].addresses[0].address,
            Some("10.0.0.11".parse().unwrap())
        );
        assert_eq!(
            two_defaults.static_addresses(),
            vec![("prod".to_string(), "10.0.0.11".parse().unwrap())]
        );

        let mut full = net(
            serde_json::json!({"interfaces": [{"name": "eno1", "addresses": [{"subnet": "prod"}, {"subnet": "prod"}]}]}),
        );
        let e = full.allocate(&subnets, &mut taken, &[]).unwrap_err();
        assert!(e.contains("no free address left in 10.0.0.10-10.0.0.12"), "{e}");
    }
}
