//! A served IPv4 subnet: prefix, dynamic pool, and the options given out.

use std::net::Ipv4Addr;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("subnet `{0}` is not ADDRESS/PREFIX (for example 10.0.0.0/24)")]
    Network(String),
    #[error("subnet {subnet}: pool {from}-{to} is not inside it, or runs backwards")]
    Pool {
        subnet: String,
        from: Ipv4Addr,
        to: Ipv4Addr,
    },
    #[error("subnet {subnet}: lease_time must be between 60 and 31536000 seconds")]
    LeaseTime { subnet: String },
}

/// One subnet as written in the config file (`[[dhcp.subnet]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subnet {
    /// `10.0.0.0/24`.
    pub network: String,
    /// First and last address handed out dynamically (discovery, unknown
    /// clients). Without a pool only machines with an inventory address get
    /// one.
    #[serde(default)]
    pub pool: Option<[Ipv4Addr; 2]>,
    #[serde(default)]
    pub routers: Vec<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    #[serde(default)]
    pub domain: Option<String>,
    /// Seconds.
    #[serde(default = "default_lease_time")]
    pub lease_time: u32,
}

fn default_lease_time() -> u32 {
    3600
}

impl Subnet {
    /// Network address and prefix length.
    pub fn parse_network(&self) -> Result<(Ipv4Addr, u8), SubnetError> {
        let bad = || SubnetError::Network(self.network.clone());
        let (addr, prefix) = self.network.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (1..=30).contains(p)).ok_or_else(bad)?;
        let mask = Self::mask_of(prefix);
        Ok((Ipv4Addr::from(u32::from(addr) & u32::from(mask)), prefix))
    }

    fn mask_of(prefix: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - prefix))
    }

    /// Checks the whole subnet; the error says what to fix.
    pub fn validate(&self) -> Result<(), SubnetError> {
        self.parse_network()?;
        if let Some([from, to]) = self.pool
            && (!self.contains(from) || !self.contains(to) || u32::from(from) > u32::from(to))
        {
            return Err(SubnetError::Pool {
                subnet: self.network.clone(),
                from,
                to,
            });
        }
        if !(60..=31_536_000).contains(&self.lease_time) {
            return Err(SubnetError::LeaseTime {
                subnet: self.network.clone(),
            });
        }
        Ok(())
    }

    pub fn mask(&self) -> Ipv4Addr {
        self.parse_network()
            .map(|(_, p)| Self::mask_of(p))
            .unwrap_or(Ipv4Addr::BROADCAST)
    }

    /// Whether `ip` is a host address of this subnet (not network or broadcast).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let Ok((net, prefix)) = self.parse_network() else {
            return false;
        };
        let mask = u32::from(Self::mask_of(prefix));
        let ip = u32::from(ip);
        ip & mask == u32::from(net) && ip != u32::from(net) && ip != u32::from(net) | !mask
    }

    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.pool
            .is_some_and(|[from, to]| (u32::from(from)..=u32::from(to)).contains(&u32::from(ip)))
    }

    /// Pool addresses from `start` (when inside the pool) to the end, then
    /// from the beginning: allocation resumes where it left off instead of
    /// rescanning every taken address (which made handing out n addresses
    /// cost n² checks).
    pub fn pool_addresses_from(&self, start: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> {
        let (from, to) = match self.pool {
            Some([f, t]) => (u32::from(f), u32::from(t)),
            None => (1, 0),
        };
        let s = start.map(u32::from).filter(|s| (from..=to).contains(s)).unwrap_or(from);
        (s..=to).chain(from..s).map(Ipv4Addr::from)
    }

    /// Pool addresses in order.
    pub fn pool_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let range = match self.pool {
            Some([from, to]) => u32::from(from)..=u32::from(to),
            #[allow(clippy::reversed_empty_ranges)]
            None => 1..=0,
        };
        range.map(Ipv4Addr::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(net: &str, pool: Option<[&str; 2]>) -> Subnet {
        Subnet {
            network: net.into(),
            pool: pool.map(|[a, b]| [a.parse().unwrap(), b.parse().unwrap()]),
            routers: vec![],
            dns: vec![],
            domain: None,
            lease_time: 3600,
        }
    }

    #[test]
    fn membership_and_pool() {
        let s = subnet("10.0.0.0/24", Some(["10.0.0.100", "10.0.0.102"]));
        s.validate().unwrap();
        assert!(s.contains("10.0.0.1".parse().unwrap()));
        assert!(!s.contains("10.0.0.0".parse().unwrap()));
        assert!(!s.contains("10.0.0.255".parse().unwrap()));
        assert!(!s.contains("10.0.1.1".parse().unwrap()));
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.pool_addresses().count(), 3);
        assert!(s.in_pool("10.0.0.101".parse().unwrap()));
        let from = |ip: &str| {
            s.pool_addresses_from(Some(ip.parse().unwrap()))
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(from("10.0.0.101"), ["10.0.0.101", "10.0.0.102", "10.0.0.100"]);
        assert_eq!(
            from("10.0.0.7"),
            ["10.0.0.100", "10.0.0.101", "10.0.0.102"],
            "outside the pool: from its start"
        );
    }

    #[test]
    fn bad_subnets_say_why() {
        assert!(matches!(
            subnet("10.0.0.0", None).validate(),
            Err(SubnetError::Network(_))
        ));
        assert!(matches!(
            subnet("10.0.0.0/33", None).validate(),
            Err(SubnetError::Network(_))
        ));
        assert!(matches!(
            subnet("10.0.0.0/24", Some(["10.0.1.1", "10.0.1.2"])).validate(),
            Err(SubnetError::Pool { .. })
        ));
        assert!(matches!(
            subnet("10.0.0.0/24", Some(["10.0.0.9", "10.0.0.2"])).validate(),
            Err(SubnetError::Pool { .. })
        ));
    }
}
