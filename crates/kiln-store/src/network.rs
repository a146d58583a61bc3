//! Subnets, and each machine's interfaces, bonds and VLANs with their
//! addresses. The rules are kiln_types::network's pure functions, run here
//! inside the write transaction so that what is checked is what commits;
//! `ip_assignments`' primary key makes an address one machine's even when
//! two servers on one PostgreSQL assign at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kiln_types::error::ErrorDetail;
use kiln_types::network::{DynamicPool, MachineNetwork, Subnet, SubnetCreate, SubnetPatch};
use kiln_types::{MachineId, SubnetId, TenantId};
use sqlx::{Any, AnyConnection, Row};

use crate::events::{Change, record, snapshot};
use crate::machines::load as load_machine;
use crate::{Actor, Result, Store, StoreError, now, parse_col, ts};

/// How often a machine's network write picks addresses again after another
/// server took one of them first.
const ALLOCATE_ATTEMPTS: usize = 3;

fn invalid(problems: Vec<String>) -> StoreError {
    StoreError::Rows {
        conflict: false,
        details: problems
            .into_iter()
            .map(|message| ErrorDetail {
                index: None,
                field: None,
                message,
            })
            .collect(),
    }
}

fn subnet_from_doc(doc: &str) -> Result<Subnet> {
    serde_json::from_str(doc).map_err(|e| StoreError::Corrupt(format!("subnet: {e}")))
}

async fn all_subnets(conn: &mut AnyConnection) -> Result<Vec<Subnet>> {
    let rows = sqlx::query::<Any>("SELECT doc FROM subnets ORDER BY name")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| subnet_from_doc(&r.try_get::<String, _>("doc")?))
        .collect()
}

fn find<'a>(all: &'a [Subnet], key: &str) -> Result<&'a Subnet> {
    all.iter()
        .find(|s| s.name == key || s.id.to_string() == key)
        .ok_or_else(|| StoreError::NotFound {
            kind: "subnet",
            key: key.to_string(),
        })
}

/// Addresses assigned in `subnet`, with the hostname of the machine each is on.
async fn assigned_in(conn: &mut AnyConnection, subnet: SubnetId) -> Result<Vec<(IpAddr, String)>> {
    let rows = sqlx::query::<Any>(
        "SELECT a.address, m.hostname FROM ip_assignments a JOIN machines m ON m.id = a.machine_id \
         WHERE a.subnet_id = $1 ORDER BY a.address",
    )
    .bind(subnet.to_string())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                parse_col("address", &r.try_get::<String, _>("address")?)?,
                r.try_get::<String, _>("hostname")?,
            ))
        })
        .collect()
}

/// Takes the subnet's row lock until the transaction ends (a no-op write).
async fn lock_subnet(conn: &mut AnyConnection, column: &str, value: &str) -> Result<()> {
    let sql = if column == "id" {
        "UPDATE subnets SET doc = doc WHERE id = $1"
    } else {
        "UPDATE subnets SET doc = doc WHERE name = $1"
    };
    sqlx::query::<Any>(sql).bind(value).execute(&mut *conn).await?;
    Ok(())
}

fn overlapping(a: &ipnet::IpNet, b: &ipnet::IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// One static address and where it is, for `kiln subnet show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub address: IpAddr,
    pub hostname: String,
}

impl Store {
    /// A new subnet. `pools` are kiln's own DHCP pools, which its static
    /// range must not meet.
    pub async fn create_subnet(&self, actor: &Actor, new: &SubnetCreate, pools: &[DynamicPool]) -> Result<Subnet> {
        let subnet = Subnet::from_create(new, SubnetId::new(), now());
        let mut problems = subnet.problems(pools);
        let mut tx = self.write_tx().await?;
        let others = all_subnets(&mut tx).await?;
        if let Some(o) = others.iter().find(|o| o.name == subnet.name) {
            return Err(StoreError::Conflict(format!(
                "subnet {} already exists ({})",
                o.name, o.prefix
            )));
        }
        for o in others.iter().filter(|o| overlapping(&o.prefix, &subnet.prefix)) {
            problems.push(format!(
                "prefix {} overlaps subnet {} ({}): an address must belong to one subnet",
                subnet.prefix, o.name, o.prefix
            ));
        }
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        sqlx::query::<Any>("INSERT INTO subnets (id, name, prefix, doc, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(subnet.id.to_string())
            .bind(&subnet.name)
            .bind(subnet.prefix.to_string())
            .bind(serde_json::to_string(&subnet).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            .bind(ts(subnet.created_at))
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "subnet.create",
                target_kind: "subnet",
                target_id: subnet.id.to_string(),
                target_name: subnet.name.clone(),
                before: None,
                after: snapshot(&subnet),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(subnet)
    }

    pub async fn list_subnets(&self) -> Result<Vec<Subnet>> {
        let mut conn = self.pool.acquire().await?;
        all_subnets(&mut conn).await
    }

    /// A subnet by name or id.
    pub async fn get_subnet(&self, key: &str) -> Result<Subnet> {
        let all = self.list_subnets().await?;
        find(&all, key).cloned()
    }

    /// The static addresses assigned in a subnet, lowest first.
    pub async fn subnet_assignments(&self, key: &str) -> Result<Vec<Assignment>> {
        let subnet = self.get_subnet(key).await?;
        let mut conn = self.pool.acquire().await?;
        let mut out: Vec<Assignment> = assigned_in(&mut conn, subnet.id)
            .await?
            .into_iter()
            .map(|(address, hostname)| Assignment { address, hostname })
            .collect();
        out.sort_by_key(|a| a.address);
        Ok(out)
    }

    /// Changes a subnet: its ranges are checked again against each other,
    /// `pools`, and every address already assigned in it.
    pub async fn update_subnet(
        &self,
        actor: &Actor,
        key: &str,
        patch: &SubnetPatch,
        pools: &[DynamicPool],
    ) -> Result<Subnet> {
        let mut tx = self.write_tx().await?;
        // Lock first (the key is a name or an id), then read: the checks
        // below see what no allocation or other change can move meanwhile.
        lock_subnet(&mut tx, "name", key).await?;
        lock_subnet(&mut tx, "id", key).await?;
        let all = all_subnets(&mut tx).await?;
        let before = find(&all, key)?.clone();
        let after = patch.apply(&before);
        let mut problems = after.problems(pools);
        for (ip, host) in assigned_in(&mut tx, after.id).await? {
            if let Some(why) = after.refuses_static(ip, pools) {
                problems.push(format!("machine {host} has {ip}, and then {why}: move it first"));
            }
        }
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        sqlx::query::<Any>("UPDATE subnets SET doc = $2 WHERE id = $1")
            .bind(after.id.to_string())
            .bind(serde_json::to_string(&after).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "subnet.update",
                target_kind: "subnet",
                target_id: after.id.to_string(),
                target_name: after.name.clone(),
                before: snapshot(&before),
                after: snapshot(&after),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    /// Deletes a subnet no machine has an address in.
    pub async fn delete_subnet(&self, actor: &Actor, key: &str) -> Result<Subnet> {
        let mut tx = self.write_tx().await?;
        let all = all_subnets(&mut tx).await?;
        let subnet = find(&all, key)?.clone();
        let used = assigned_in(&mut tx, subnet.id).await?;
        if let Some((ip, host)) = used.first() {
            return Err(StoreError::Refused(format!(
                "subnet {} has {} assigned address(es), e.g. {ip} on {host}: change those machines' networks first",
                subnet.name,
                used.len()
            )));
        }
        sqlx::query::<Any>("DELETE FROM subnets WHERE id = $1")
            .bind(subnet.id.to_string())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "subnet.delete",
                target_kind: "subnet",
                target_id: subnet.id.to_string(),
                target_name: subnet.name.clone(),
                before: snapshot(&subnet),
                after: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(subnet)
    }

    /// A machine's network (empty if none was set), and the subnets it
    /// names, by name.
    pub async fn get_machine_network(&self, machine: MachineId) -> Result<(MachineNetwork, BTreeMap<String, Subnet>)> {
        let mut conn = self.pool.acquire().await?;
        let net = match sqlx::query::<Any>("SELECT doc FROM machine_networks WHERE machine_id = $1")
            .bind(machine.to_string())
            .fetch_optional(&mut *conn)
            .await?
        {
            Some(row) => serde_json::from_str(&row.try_get::<String, _>("doc")?)
                .map_err(|e| StoreError::Corrupt(format!("machine network: {e}")))?,
            None => MachineNetwork::default(),
        };
        let used: BTreeSet<&str> = net
            .links()
            .flat_map(|(_, a)| a.iter().filter_map(|a| a.subnet.as_deref()))
            .collect();
        let subnets = all_subnets(&mut conn)
            .await?
            .into_iter()
            .filter(|s| used.contains(s.name.as_str()))
            .map(|s| (s.name.clone(), s))
            .collect();
        Ok((net, subnets))
    }

    /// Replaces a machine's network: checks its shape and addresses, gives
    /// each static address left out the next free one of its subnet, and
    /// records every static address as the machine's, all in one
    /// transaction. Returns the network as stored (addresses filled in).
    pub async fn set_machine_network(
        &self,
        actor: &Actor,
        key: &str,
        scope: Option<TenantId>,
        net: &MachineNetwork,
        pools: &[DynamicPool],
    ) -> Result<MachineNetwork> {
        let problems = net.shape_problems();
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let mut last = None;
        for _ in 0..ALLOCATE_ATTEMPTS {
            match self.try_set_machine_network(actor, key, scope, net, pools).await {
                Err(StoreError::Conflict(e)) => last = Some(e),
                other => return other,
            }
        }
        Err(StoreError::Conflict(last.unwrap_or_default()))
    }

    async fn try_set_machine_network(
        &self,
        actor: &Actor,
        key: &str,
        scope: Option<TenantId>,
        net: &MachineNetwork,
        pools: &[DynamicPool],
    ) -> Result<MachineNetwork> {
        let mut tx = self.write_tx().await?;
        let (machine, _, _) = load_machine(&mut tx, self.backend, key, scope).await?;
        // Writers that assign in the same subnets take turns: on PostgreSQL
        // this row lock orders them (SQLite holds its one write lock
        // already). In name order, so two writers never wait on each other.
        let named: BTreeSet<&str> = net
            .links()
            .flat_map(|(_, a)| a.iter().filter_map(|a| a.subnet.as_deref()))
            .collect();
        for name in named {
            lock_subnet(&mut tx, "name", name).await?;
        }
        let subnets: BTreeMap<String, Subnet> = all_subnets(&mut tx)
            .await?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let mut problems = net.address_problems(&subnets, pools);
        // Addresses of other machines: given ones must not be among them,
        // and the next free ones are picked around them.
        let rows = sqlx::query::<Any>(
            "SELECT a.address, m.hostname FROM ip_assignments a JOIN machines m ON m.id = a.machine_id \
             WHERE a.machine_id <> $1",
        )
        .bind(machine.id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let mut others = BTreeMap::new();
        for r in &rows {
            let ip: IpAddr = parse_col("address", &r.try_get::<String, _>("address")?)?;
            others.insert(ip, r.try_get::<String, _>("hostname")?);
        }
        for (subnet, ip) in net.static_addresses() {
            if let Some(host) = others.get(&ip) {
                problems.push(format!("{ip} (subnet {subnet}) is taken by machine {host}"));
            }
        }
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let mut filled = net.clone();
        let mut taken: BTreeSet<IpAddr> = others.keys().copied().collect();
        filled
            .allocate(&subnets, &mut taken, pools)
            .map_err(|e| invalid(vec![e]))?;

        let before = sqlx::query::<Any>("SELECT doc FROM machine_networks WHERE machine_id = $1")
            .bind(machine.id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get::<String, _>("doc"))
            .transpose()?
            .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok());
        sqlx::query::<Any>("DELETE FROM ip_assignments WHERE machine_id = $1")
            .bind(machine.id.to_string())
            .execute(&mut *tx)
            .await?;
        for (subnet, ip) in filled.static_addresses() {
            let inserted =
                sqlx::query::<Any>("INSERT INTO ip_assignments (address, subnet_id, machine_id) VALUES ($1, $2, $3)")
                    .bind(ip.to_string())
                    .bind(subnets[&subnet].id.to_string())
                    .bind(machine.id.to_string())
                    .execute(&mut *tx)
                    .await;
            if let Err(e) = inserted {
                return Err(match StoreError::from(e) {
                    StoreError::Conflict(_) => {
                        StoreError::Conflict(format!("{ip} (subnet {subnet}) was taken by another machine meanwhile"))
                    }
                    other => other,
                });
            }
        }
        sqlx::query::<Any>("DELETE FROM machine_networks WHERE machine_id = $1")
            .bind(machine.id.to_string())
            .execute(&mut *tx)
            .await?;
        if !filled.is_empty() {
            sqlx::query::<Any>("INSERT INTO machine_networks (machine_id, doc, updated_at) VALUES ($1, $2, $3)")
                .bind(machine.id.to_string())
                .bind(serde_json::to_string(&filled).map_err(|e| StoreError::Corrupt(e.to_string()))?)
                .bind(ts(now()))
                .execute(&mut *tx)
                .await?;
        }
        record(
            &mut tx,
            actor,
            Change {
                action: "machine.network",
                target_kind: "machine",
                target_id: machine.id.to_string(),
                target_name: machine.hostname.to_string(),
                before,
                after: snapshot(&filled),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(filled)
    }
}
