//! DHCP leases: durable before acknowledged, loaded at start with bad rows
//! quarantined rather than fatal. Leases are not in the audit log (they
//! change every few minutes per client); their table is their history.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use kiln_types::MacAddr;
use kiln_types::lease::{Lease, LeaseState};
use kiln_types::machine::Machine;
use sqlx::any::AnyRow;
use sqlx::{Any, Row};

use crate::{Result, Store, StoreError, now, parse_col, parse_ts, placeholders, ts, values};

/// One change to the lease table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseWrite {
    /// The lease's address now belongs to its client, whose other bound
    /// leases end (one address per client).
    Commit(Lease),
    /// `mac` gives `ip` back (nothing happens if another client holds it).
    Release { ip: Ipv4Addr, mac: MacAddr },
}

/// Rows per multi-row statement. Small enough that binding stays cheap:
/// sqlx's SQLite driver looks each parameter up by name, which grows with
/// the parameters in the statement (a 500-row upsert spent more time there
/// than in SQLite itself, bench/dhcp).
const ROWS_PER_STATEMENT: usize = 64;

/// What a batch of lease writes does to the table, worked out in memory so
/// that it takes a few multi-row statements: the same end state as applying
/// the writes one by one.
#[derive(Debug, Default, PartialEq)]
struct LeasePlan {
    /// Clients that committed a lease: their bound rows elsewhere end.
    clear_macs: Vec<MacAddr>,
    /// Releases of addresses no other write in the batch touched: they
    /// depend on what the table holds (`mac` must hold `ip`).
    releases: Vec<(Ipv4Addr, MacAddr)>,
    /// Addresses whose row ends.
    delete_ips: Vec<Ipv4Addr>,
    /// Rows as they end up (one per address).
    upserts: Vec<Lease>,
}

fn plan(writes: &[LeaseWrite]) -> LeasePlan {
    // The end state of every address the batch commits, in first-touch order.
    let mut rows: Vec<(Ipv4Addr, Option<Lease>)> = vec![];
    let mut clear_macs: Vec<MacAddr> = vec![];
    let mut releases: Vec<(Ipv4Addr, MacAddr)> = vec![];
    for w in writes {
        match w {
            LeaseWrite::Commit(lease) => {
                for (ip, row) in rows.iter_mut() {
                    if *ip != lease.ip
                        && row
                            .as_ref()
                            .is_some_and(|r| r.mac == lease.mac && r.state == LeaseState::Bound)
                    {
                        *row = None;
                    }
                }
                if !clear_macs.contains(&lease.mac) {
                    clear_macs.push(lease.mac);
                }
                match rows.iter_mut().find(|(ip, _)| *ip == lease.ip) {
                    Some((_, row)) => *row = Some(lease.clone()),
                    None => rows.push((lease.ip, Some(lease.clone()))),
                }
            }
            LeaseWrite::Release { ip, mac } => match rows.iter_mut().find(|(i, _)| i == ip) {
                Some((_, row)) => {
                    if row
                        .as_ref()
                        .is_some_and(|r| r.mac == *mac && r.state == LeaseState::Bound)
                    {
                        *row = None;
                    }
                }
                None => releases.push((*ip, *mac)),
            },
        }
    }
    let mut p = LeasePlan {
        clear_macs,
        releases,
        ..LeasePlan::default()
    };
    for (ip, row) in rows {
        match row {
            Some(l) => p.upserts.push(l),
            None => p.delete_ips.push(ip),
        }
    }
    p
}

/// How a statement's parameters are written: `$1, $2, …` (PostgreSQL), or
/// `?` (SQLite), which sqlx binds in order across the statements of one
/// query, so that statements can be joined, and which SQLite binds without
/// looking a name up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Params {
    Numbered = 0,
    Anonymous = 1,
}

/// One statement of a lease plan, with the values it binds.
#[derive(Debug, Clone, Copy)]
enum Step<'a> {
    ClearMacs(&'a [MacAddr]),
    Release(Ipv4Addr, MacAddr),
    DeleteIps(&'a [Ipv4Addr]),
    Upsert(&'a [Lease]),
}

/// The statements that carry out `plan`, in order, at most
/// `ROWS_PER_STATEMENT` rows each.
fn steps(plan: &LeasePlan) -> Vec<Step<'_>> {
    let mut steps: Vec<Step<'_>> = plan
        .clear_macs
        .chunks(ROWS_PER_STATEMENT)
        .map(Step::ClearMacs)
        .collect();
    steps.extend(plan.releases.iter().map(|&(ip, mac)| Step::Release(ip, mac)));
    steps.extend(plan.delete_ips.chunks(ROWS_PER_STATEMENT).map(Step::DeleteIps));
    steps.extend(plan.upserts.chunks(ROWS_PER_STATEMENT).map(Step::Upsert));
    steps
}

type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>;

impl Step<'_> {
    /// The statement's text, built once per kind, size and parameter style:
    /// assembling the placeholder lists anew cost as much as SQLite's work
    /// for small batches.
    fn text(self, params: Params) -> &'static str {
        static TEXTS: [[std::sync::OnceLock<Vec<String>>; 3]; 2] =
            [const { [const { std::sync::OnceLock::new() }; 3] }; 2];
        let (kind, rows) = match self {
            Step::Release(..) => {
                return match params {
                    Params::Numbered => "DELETE FROM dhcp_leases WHERE ip = $1 AND mac = $2 AND state = 'bound'",
                    Params::Anonymous => "DELETE FROM dhcp_leases WHERE ip = ? AND mac = ? AND state = 'bound'",
                };
            }
            Step::ClearMacs(macs) => (0, macs.len()),
            Step::DeleteIps(ips) => (1, ips.len()),
            Step::Upsert(leases) => (2, leases.len()),
        };
        TEXTS[params as usize][kind].get_or_init(|| {
            let list = |n: usize| match params {
                Params::Numbered => placeholders(1, n),
                Params::Anonymous => vec!["?"; n].join(", "),
            };
            (0..=ROWS_PER_STATEMENT)
                .map(|n| match kind {
                    0 => format!("DELETE FROM dhcp_leases WHERE state = 'bound' AND mac IN ({})", list(n)),
                    1 => format!("DELETE FROM dhcp_leases WHERE ip IN ({})", list(n)),
                    _ => format!(
                        "INSERT INTO dhcp_leases (ip, mac, state, machine_id, hostname, expires_at, updated_at) VALUES {} \
                         ON CONFLICT (ip) DO UPDATE SET mac = excluded.mac, state = excluded.state, \
                         machine_id = excluded.machine_id, hostname = excluded.hostname, \
                         expires_at = excluded.expires_at, updated_at = excluded.updated_at",
                        match params {
                            Params::Numbered => values(n, 7),
                            Params::Anonymous => vec!["(?, ?, ?, ?, ?, ?, ?)"; n].join(", "),
                        }
                    ),
                })
                .collect()
        })[rows]
            .as_str()
    }

    /// Binds the statement's values, in its parameters' order; `at` is the
    /// rows' `updated_at`.
    fn bind<'q>(self, mut q: AnyQuery<'q>, at: &str) -> AnyQuery<'q> {
        match self {
            Step::ClearMacs(macs) => {
                for mac in macs {
                    q = q.bind(mac.to_string());
                }
            }
            Step::Release(ip, mac) => q = q.bind(ip.to_string()).bind(mac.to_string()),
            Step::DeleteIps(ips) => {
                for ip in ips {
                    q = q.bind(ip.to_string());
                }
            }
            Step::Upsert(leases) => {
                for l in leases {
                    q = q
                        .bind(l.ip.to_string())
                        .bind(l.mac.to_string())
                        .bind(l.state.as_str())
                        .bind(l.machine_id.map(|m| m.to_string()))
                        .bind(l.hostname.clone())
                        .bind(ts(l.expires_at))
                        .bind(at.to_string());
                }
            }
        }
        q
    }
}

impl Store {
    /// Runs `plan` in one transaction, statement by statement.
    async fn apply_in_steps(&self, plan: &LeasePlan, at: &str) -> Result<()> {
        let mut tx = self.write_tx().await?;
        for step in steps(plan) {
            step.bind(sqlx::query::<Any>(step.text(Params::Numbered)), at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// SQLite: runs `plan` as one query — `BEGIN IMMEDIATE`, its statements,
    /// `COMMIT` — so the whole transaction is one trip to the connection's
    /// thread instead of one per statement (each trip is two thread wakes;
    /// the DHCP listener commits hundreds of batches a second, bench/dhcp).
    /// If a statement fails the transaction is rolled back on the spot, so
    /// the connection goes back to the pool with none open.
    async fn apply_in_one_query(&self, plan: &LeasePlan, at: &str) -> Result<()> {
        let steps = steps(plan);
        let mut sql = String::from("BEGIN IMMEDIATE;\n");
        for step in &steps {
            sql.push_str(step.text(Params::Anonymous));
            sql.push_str(";\n");
        }
        sql.push_str("COMMIT");
        let mut q = sqlx::query::<Any>(crate::built(sql));
        for step in &steps {
            q = step.bind(q, at);
        }
        let _turn = self.write_turn().await?;
        let mut conn = self.pool.acquire().await?;
        if let Err(e) = q.execute(&mut *conn).await {
            // Fails harmlessly when BEGIN or COMMIT was what failed.
            let _ = sqlx::query::<Any>("ROLLBACK").execute(&mut *conn).await;
            return Err(e.into());
        }
        Ok(())
    }
}

fn lease_from_row(row: &AnyRow) -> Result<Lease> {
    let machine_id: Option<String> = row.try_get("machine_id")?;
    Ok(Lease {
        ip: parse_col("lease ip", &row.try_get::<String, _>("ip")?)?,
        mac: parse_col("lease mac", &row.try_get::<String, _>("mac")?)?,
        state: parse_col("lease state", &row.try_get::<String, _>("state")?)?,
        machine_id: machine_id.as_deref().map(|m| parse_col("machine id", m)).transpose()?,
        hostname: row.try_get("hostname")?,
        expires_at: parse_ts(&row.try_get::<String, _>("expires_at")?)?,
    })
}

/// Leases loaded at start-up, and how many rows were quarantined.
#[derive(Debug)]
pub struct LoadedLeases {
    pub leases: Vec<Lease>,
    pub quarantined: usize,
}

impl Store {
    /// Makes `lease` durable: the row for its address now says this client,
    /// and the client's other bound leases are gone (one address per client).
    pub async fn commit_lease(&self, lease: &Lease) -> Result<()> {
        self.write_leases(&[LeaseWrite::Commit(lease.clone())]).await
    }

    /// Ends the lease of `ip` if `mac` holds it.
    pub async fn release_lease(&self, ip: Ipv4Addr, mac: MacAddr) -> Result<()> {
        self.write_leases(&[LeaseWrite::Release { ip, mac }]).await
    }

    /// Applies `writes` in order, in one transaction: all of them are
    /// durable when this returns, or none. The DHCP listener gathers the
    /// lease changes of many clients into one call (group commit), so a
    /// burst of clients costs a few transactions, not one each.
    pub async fn write_leases(&self, writes: &[LeaseWrite]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let plan = plan(writes);
        let at = ts(now());
        match self.backend {
            crate::Backend::Sqlite => self.apply_in_one_query(&plan, &at).await,
            crate::Backend::Postgres => self.apply_in_steps(&plan, &at).await,
        }
    }

    /// All lease rows; unreadable ones are moved to the quarantine table.
    pub async fn load_leases(&self) -> Result<LoadedLeases> {
        let rows = sqlx::query::<Any>("SELECT * FROM dhcp_leases ORDER BY ip")
            .fetch_all(&self.pool)
            .await?;
        let mut leases = vec![];
        let mut quarantined = 0;
        for row in &rows {
            match lease_from_row(row) {
                Ok(l) => leases.push(l),
                Err(e) => {
                    let ip: Option<String> = row.try_get("ip").ok();
                    let raw = serde_json::json!({
                        "ip": ip,
                        "mac": row.try_get::<Option<String>, _>("mac").ok().flatten(),
                        "state": row.try_get::<Option<String>, _>("state").ok().flatten(),
                        "expires_at": row.try_get::<Option<String>, _>("expires_at").ok().flatten(),
                    });
                    tracing::warn!(ip = ?ip, error = %e, "quarantining an unreadable DHCP lease");
                    let mut tx = self.write_tx().await?;
                    sqlx::query::<Any>(
                        "INSERT INTO dhcp_lease_quarantine (ip, row_json, reason, at) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(ip.clone())
                    .bind(raw.to_string())
                    .bind(e.to_string())
                    .bind(ts(now()))
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query::<Any>("DELETE FROM dhcp_leases WHERE ip = $1")
                        .bind(ip)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    quarantined += 1;
                }
            }
        }
        Ok(LoadedLeases { leases, quarantined })
    }

    /// Leases by address; `all` includes expired ones. Unreadable rows are
    /// left for the next start-up's quarantine: listing changes nothing.
    pub async fn list_leases(&self, all: bool, at: DateTime<Utc>) -> Result<Vec<Lease>> {
        let rows = sqlx::query::<Any>("SELECT * FROM dhcp_leases ORDER BY ip")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| lease_from_row(r).ok())
            .filter(|l| all || l.is_live(at))
            .collect())
    }

    /// The machine a DHCP request comes from: by the switch port a relay
    /// reported (option 82), else by MAC.
    pub async fn find_machine_by_nic(
        &self,
        mac: MacAddr,
        circuit_id: Option<&str>,
        remote_id: Option<&str>,
    ) -> Result<Option<Machine>> {
        // Every sub-option a NIC records must match (kiln_types::port).
        let mut by_port = None;
        for (c, r) in kiln_types::port::lookup_keys(circuit_id, remote_id) {
            let sql = match (&c, &r) {
                (Some(_), Some(_)) => "SELECT machine_id FROM nics WHERE circuit_id = $1 AND remote_id = $2",
                (Some(_), None) => "SELECT machine_id FROM nics WHERE circuit_id = $1 AND remote_id IS NULL",
                _ => "SELECT machine_id FROM nics WHERE remote_id = $1 AND circuit_id IS NULL",
            };
            let mut q = sqlx::query::<Any>(sql);
            for v in [c, r].into_iter().flatten() {
                q = q.bind(v);
            }
            by_port = q.fetch_optional(&self.pool).await?;
            if by_port.is_some() {
                break;
            }
        }
        let row = match by_port {
            Some(r) => Some(r),
            None => {
                sqlx::query::<Any>("SELECT machine_id FROM nics WHERE mac = $1")
                    .bind(mac.to_string())
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        match row {
            Some(r) => {
                let id: String = r.try_get("machine_id")?;
                match self.get_machine(&id, None).await {
                    Ok(m) => Ok(Some(m)),
                    Err(StoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            None => Ok(None),
        }
    }

    /// The machine whose hardware inventory (DMI, as its agent reported
    /// it) has this SMBIOS UUID (any case), else this serial number: how
    /// HTTP boot knows a machine whose MAC is not in the inventory. Not
    /// indexed (it reads every machine's inventory): it is asked only for
    /// MACs kiln does not know.
    pub async fn find_machine_by_dmi(&self, uuid: Option<&str>, serial: Option<&str>) -> Result<Option<Machine>> {
        let field = |name: &str| match self.backend {
            crate::Backend::Sqlite => format!("json_extract(hardware, '$.dmi.{name}')"),
            crate::Backend::Postgres => format!("(hardware::json -> 'dmi' ->> '{name}')"),
        };
        let mut row = None;
        if let Some(uuid) = uuid {
            row = sqlx::query::<Any>(crate::built(format!(
                "SELECT id FROM machines WHERE lower({}) = lower($1) ORDER BY id LIMIT 1",
                field("uuid")
            )))
            .bind(uuid)
            .fetch_optional(&self.pool)
            .await?;
        }
        if row.is_none()
            && let Some(serial) = serial
        {
            row = sqlx::query::<Any>(crate::built(format!(
                "SELECT id FROM machines WHERE {} = $1 ORDER BY id LIMIT 1",
                field("serial")
            )))
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?;
        }
        match row {
            Some(r) => {
                let id: String = r.try_get("id")?;
                match self.get_machine(&id, None).await {
                    Ok(m) => Ok(Some(m)),
                    Err(StoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            None => Ok(None),
        }
    }

    /// A number that changes whenever any machine is created, changed or
    /// deleted: one primary-key read tells a cache whether it is stale.
    pub async fn machines_generation(&self) -> Result<i64> {
        let row = sqlx::query::<Any>("SELECT value FROM generations WHERE name = 'machines'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    type Table = BTreeMap<Ipv4Addr, Lease>;

    fn lease(ip: u8, mac: u8, state: LeaseState) -> Lease {
        Lease {
            ip: Ipv4Addr::new(10, 0, 0, ip),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, mac]),
            state,
            machine_id: None,
            hostname: None,
            expires_at: DateTime::<Utc>::MIN_UTC,
        }
    }

    /// The writes one by one, as `commit_lease` and `release_lease` did.
    fn one_by_one(table: &mut Table, writes: &[LeaseWrite]) {
        for w in writes {
            match w {
                LeaseWrite::Commit(l) => {
                    table.retain(|ip, r| !(r.mac == l.mac && *ip != l.ip && r.state == LeaseState::Bound));
                    table.insert(l.ip, l.clone());
                }
                LeaseWrite::Release { ip, mac } => {
                    if table
                        .get(ip)
                        .is_some_and(|r| r.mac == *mac && r.state == LeaseState::Bound)
                    {
                        table.remove(ip);
                    }
                }
            }
        }
    }

    /// The plan's statements, in `steps`' order.
    fn planned(table: &mut Table, p: &LeasePlan) {
        table.retain(|_, r| !(r.state == LeaseState::Bound && p.clear_macs.contains(&r.mac)));
        for (ip, mac) in &p.releases {
            if table
                .get(ip)
                .is_some_and(|r| r.mac == *mac && r.state == LeaseState::Bound)
            {
                table.remove(ip);
            }
        }
        for ip in &p.delete_ips {
            table.remove(ip);
        }
        for l in &p.upserts {
            table.insert(l.ip, l.clone());
        }
    }

    #[test]
    fn a_planned_batch_ends_where_the_writes_one_by_one_end() {
        // Small address and client spaces, so that batches collide often.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as u8
        };
        for _ in 0..5_000 {
            let mut start = Table::new();
            for _ in 0..next(5) {
                let l = lease(
                    next(6),
                    next(4),
                    if next(4) == 0 {
                        LeaseState::Declined
                    } else {
                        LeaseState::Bound
                    },
                );
                start.insert(l.ip, l);
            }
            let writes: Vec<LeaseWrite> = (0..next(8))
                .map(|_| match next(3) {
                    0 => LeaseWrite::Release {
                        ip: Ipv4Addr::new(10, 0, 0, next(6)),
                        mac: MacAddr([0x52, 0x54, 0, 0, 0, next(4)]),
                    },
                    1 => LeaseWrite::Commit(lease(next(6), next(4), LeaseState::Declined)),
                    _ => LeaseWrite::Commit(lease(next(6), next(4), LeaseState::Bound)),
                })
                .collect();
            let (mut expected, mut got) = (start.clone(), start.clone());
            one_by_one(&mut expected, &writes);
            let p = plan(&writes);
            planned(&mut got, &p);
            assert_eq!(got, expected, "start {start:?}\nwrites {writes:?}\nplan {p:?}");
            let ips: Vec<_> = p.upserts.iter().map(|l| l.ip).collect();
            assert!(
                ips.iter().all(|ip| ips.iter().filter(|x| *x == ip).count() == 1),
                "a multi-row upsert may touch each row once"
            );
        }
    }
}
