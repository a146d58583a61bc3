//! Machines with their tags and NICs: bulk create (all or nothing, every bad
//! row reported), filtered cursor listing, partial update, delete.

use std::collections::{HashMap, HashSet};

use kiln_types::error::ErrorDetail;
use kiln_types::machine::{Bmc, BmcInput, Machine, MachineCreate, MachineFilter, MachinePatch, Nic};
use kiln_types::page::Page;
use kiln_types::site::Rack;
use kiln_types::{MachineId, RackId, Tag, TenantId};
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row};

use crate::events::{Change, escape_like, record, record_many, snapshot};
use crate::org::resolve_rack;
use crate::{
    Actor, Backend, Params, Result, Store, StoreError, built, decode_cursor, encode_cursor, now, page_limit, parse_col,
    parse_ts, placeholders, ts, values,
};

/// Imports at least this large refresh PostgreSQL's planner statistics.
const ANALYZE_AFTER: usize = 500;

/// A BMC password as the server sealed (encrypted) it. The store never sees
/// the plaintext.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedPassword(pub String);

impl std::fmt::Debug for SealedPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedPassword(..)")
    }
}

/// A machine to create: the request with its BMC password already sealed
/// (`spec.bmc.password` is ignored).
#[derive(Debug, Clone)]
pub struct NewMachine {
    pub spec: MachineCreate,
    pub sealed_password: Option<SealedPassword>,
}

/// The full stored form of a machine, before or after a change.
struct Row_ {
    id: MachineId,
    spec: MachineCreate,
    rack_id: Option<RackId>,
    owner_id: Option<TenantId>,
    sealed_password: Option<SealedPassword>,
}

/// The joins filters refer to: `m` machines, `t` owner, `r` rack, `s` site.
const MACHINE_FROM: &str = "FROM machines m \
     LEFT JOIN tenants t ON t.id = m.owner_id \
     LEFT JOIN racks r ON r.id = m.rack_id \
     LEFT JOIN sites s ON s.id = r.site_id";

/// A query for full machine rows — owner, rack and site names, tags
/// (comma-joined, sorted) and NICs (a JSON array in port order) — of the
/// machines `page` selects. `page` is `SELECT m.id, m.hostname {MACHINE_FROM}
/// WHERE … ORDER BY … LIMIT …`: the tags and NICs are gathered by
/// correlated subqueries on primary-key indexes for the rows of the page
/// only (computed before the LIMIT, they cost a subquery per *matching*
/// machine on PostgreSQL), in one round trip.
fn machine_rows(backend: Backend, page: &str) -> String {
    let (tags, nics) = match backend {
        Backend::Sqlite => (
            "(SELECT group_concat(tag, ',') FROM (SELECT tag FROM machine_tags mt WHERE mt.machine_id = m.id ORDER BY tag))",
            "(SELECT json_group_array(json_object('mac', mac, 'name', name, 'switch', switch, 'port', port, 'vlan', vlan, \
               'circuit_id', circuit_id, 'remote_id', remote_id)) \
              FROM (SELECT * FROM nics n WHERE n.machine_id = m.id ORDER BY position))",
        ),
        Backend::Postgres => (
            "(SELECT string_agg(tag, ',' ORDER BY tag) FROM machine_tags mt WHERE mt.machine_id = m.id)",
            "(SELECT json_agg(json_build_object('mac', mac, 'name', name, 'switch', switch, 'port', port, 'vlan', vlan, \
               'circuit_id', circuit_id, 'remote_id', remote_id) ORDER BY position)::text \
              FROM nics n WHERE n.machine_id = m.id)",
        ),
    };
    format!(
        "SELECT m.*, t.name AS owner_name, r.name AS rack_name, s.name AS site_name, \
         {tags} AS tag_list, {nics} AS nic_list \
         FROM ({page}) page JOIN machines m ON m.id = page.id \
         LEFT JOIN tenants t ON t.id = m.owner_id \
         LEFT JOIN racks r ON r.id = m.rack_id \
         LEFT JOIN sites s ON s.id = r.site_id \
         ORDER BY m.hostname"
    )
}

/// Racks and tenants by name, to resolve the names a request uses.
struct Names {
    racks: Vec<Rack>,
    tenants: HashMap<String, TenantId>,
}

impl Names {
    async fn load(store: &Store) -> Result<Names> {
        let racks = store.list_racks(None).await?;
        let tenants = store
            .list_tenants()
            .await?
            .into_iter()
            .map(|t| (t.name, t.id))
            .collect();
        Ok(Names { racks, tenants })
    }

    fn rack(&self, site: Option<&str>, name: &str) -> Result<RackId, String> {
        let matching = self
            .racks
            .iter()
            .filter(|r| r.name == name && site.is_none_or(|s| r.site == s))
            .cloned()
            .collect();
        resolve_rack(matching, site, name).map(|r| r.id).map_err(|e| match e {
            StoreError::NotFound { key, .. } => {
                format!("rack `{key}` does not exist: create it first (kiln rack add)")
            }
            e => e.to_string(),
        })
    }

    fn tenant(&self, name: &str) -> Result<TenantId, String> {
        self.tenants
            .get(name)
            .copied()
            .ok_or_else(|| format!("tenant `{name}` does not exist: create it first (kiln tenant add {name})"))
    }
}

fn detail(index: usize, field: &str, message: String) -> ErrorDetail {
    ErrorDetail {
        index: Some(index),
        field: Some(field.to_string()),
        message,
    }
}

/// The unique values one machine claims, by kind, for conflict checks.
fn claims(spec: &MachineCreate) -> Vec<(&'static str, String, String)> {
    // (kind, field, value)
    let mut out = vec![("hostname", "hostname".to_string(), spec.hostname.to_string())];
    if let Some(f) = &spec.fqdn {
        out.push(("fqdn", "fqdn".into(), f.to_string()));
    }
    if let Some(b) = &spec.bmc {
        out.push(("bmc_address", "bmc.address".into(), b.address.clone()));
    }
    if let Some(ip) = spec.ipv4 {
        out.push(("ipv4", "ipv4".into(), ip.to_string()));
    }
    if let Some(ip) = spec.ipv6 {
        out.push(("ipv6", "ipv6".into(), ip.to_string()));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        out.push(("mac", format!("nics[{i}].mac"), nic.mac.to_string()));
        if let (Some(sw), Some(port)) = (&nic.switch, &nic.port) {
            out.push(("switch_port", format!("nics[{i}].port"), format!("{sw}\t{port}")));
        }
        if let (Some(r), Some(c)) = (&nic.remote_id, &nic.circuit_id) {
            out.push(("option82", format!("nics[{i}].circuit_id"), format!("{r}\t{c}")));
        }
    }
    out
}

fn describe(kind: &str, value: &str) -> String {
    let pair = value.split_once('\t');
    match (kind, pair) {
        ("hostname", _) => format!("hostname `{value}`"),
        ("fqdn", _) => format!("FQDN `{value}`"),
        ("bmc_address", _) => format!("BMC address `{value}`"),
        ("ipv4" | "ipv6", _) => format!("IP address {value}"),
        ("mac", _) => format!("MAC {value}"),
        ("switch_port", Some((sw, p))) => format!("switch port {sw} {p}"),
        ("option82", Some((r, c))) => format!("option 82 remote-id `{r}` circuit-id `{c}`"),
        _ => value.to_string(),
    }
}

/// SQL giving (value, holder hostname, holder id) for each kind of claim.
fn claim_sql(kind: &str) -> &'static str {
    match kind {
        "hostname" => {
            "SELECT m.hostname AS v, m.hostname AS holder, m.id AS holder_id FROM machines m WHERE m.hostname IN"
        }
        "fqdn" => "SELECT m.fqdn AS v, m.hostname AS holder, m.id AS holder_id FROM machines m WHERE m.fqdn IN",
        "bmc_address" => {
            "SELECT m.bmc_address AS v, m.hostname AS holder, m.id AS holder_id FROM machines m WHERE m.bmc_address IN"
        }
        "ipv4" => "SELECT m.ipv4 AS v, m.hostname AS holder, m.id AS holder_id FROM machines m WHERE m.ipv4 IN",
        "ipv6" => "SELECT m.ipv6 AS v, m.hostname AS holder, m.id AS holder_id FROM machines m WHERE m.ipv6 IN",
        "mac" => {
            "SELECT n.mac AS v, m.hostname AS holder, m.id AS holder_id FROM nics n JOIN machines m ON m.id = n.machine_id WHERE n.mac IN"
        }
        "switch_port" => {
            "SELECT n.switch || '\t' || n.port AS v, m.hostname AS holder, m.id AS holder_id FROM nics n JOIN machines m ON m.id = n.machine_id WHERE n.switch || '\t' || n.port IN"
        }
        "option82" => {
            "SELECT n.remote_id || '\t' || n.circuit_id AS v, m.hostname AS holder, m.id AS holder_id FROM nics n JOIN machines m ON m.id = n.machine_id WHERE n.remote_id || '\t' || n.circuit_id IN"
        }
        _ => unreachable!("unknown claim kind {kind}"),
    }
}

/// Every uniqueness clash of `specs` among themselves and with stored
/// machines other than `exclude`, as row details.
async fn find_conflicts(
    conn: &mut AnyConnection,
    specs: &[&MachineCreate],
    exclude: Option<MachineId>,
) -> Result<Vec<ErrorDetail>> {
    let mut problems = vec![];
    let mut seen: HashMap<(&'static str, String), usize> = HashMap::new();
    let mut by_kind: HashMap<&'static str, Vec<(usize, String, String)>> = HashMap::new();
    for (index, spec) in specs.iter().enumerate() {
        for (kind, field, value) in claims(spec) {
            if let Some(first) = seen.get(&(kind, value.clone())) {
                if *first != index {
                    problems.push(detail(
                        index,
                        &field,
                        format!(
                            "{} is also used by row {} of this request",
                            describe(kind, &value),
                            first
                        ),
                    ));
                } else {
                    problems.push(detail(
                        index,
                        &field,
                        format!("{} appears twice in this machine", describe(kind, &value)),
                    ));
                }
                continue;
            }
            seen.insert((kind, value.clone()), index);
            by_kind.entry(kind).or_default().push((index, field, value));
        }
    }
    let exclude = exclude.map(|id| id.to_string());
    for (kind, claims) in by_kind {
        for chunk in claims.chunks(500) {
            let mut sql = format!("{} ({})", claim_sql(kind), placeholders(1, chunk.len()));
            if exclude.is_some() {
                sql.push_str(&format!(" AND m.id <> ${}", chunk.len() + 1));
            }
            let mut q = sqlx::query::<Any>(built(sql));
            for (_, _, value) in chunk {
                q = q.bind(value);
            }
            if let Some(id) = &exclude {
                q = q.bind(id);
            }
            let rows = q.fetch_all(&mut *conn).await?;
            let mut holders: HashMap<String, String> = HashMap::new();
            for row in rows {
                holders.insert(row.try_get("v")?, row.try_get("holder")?);
            }
            for (index, field, value) in chunk {
                if let Some(holder) = holders.get(value) {
                    problems.push(detail(
                        *index,
                        field,
                        format!("{} is already used by machine {holder}", describe(kind, value)),
                    ));
                }
            }
        }
    }
    problems.sort_by_key(|p| p.index);
    Ok(problems)
}

type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>;

/// Binds a machine's 19 stored columns — `id` to `hardware` in table
/// order, then `bmc_insecure` and `bmc_ca_cert` (added by migration 0004) —
/// the shared part of its INSERT and UPDATE.
fn bind_row<'q>(q: AnyQuery<'q>, row: &Row_) -> Result<AnyQuery<'q>> {
    let s = &row.spec;
    Ok(q.bind(row.id.to_string())
        .bind(s.hostname.to_string())
        .bind(s.fqdn.as_ref().map(|f| f.to_string()))
        .bind(s.kind.as_str())
        .bind(s.state.as_str())
        .bind(row.owner_id.map(|t| t.to_string()))
        .bind(row.rack_id.map(|r| r.to_string()))
        .bind(s.protected)
        .bind(s.maintenance)
        .bind(s.maintenance_reason.clone())
        .bind(s.bmc.as_ref().map(|b| b.driver.as_str()))
        .bind(s.bmc.as_ref().map(|b| b.address.clone()))
        .bind(s.bmc.as_ref().and_then(|b| b.username.clone()))
        .bind(row.sealed_password.as_ref().map(|p| p.0.clone()))
        .bind(s.ipv4.map(|ip| ip.to_string()))
        .bind(s.ipv6.map(|ip| ip.to_string()))
        .bind(hardware_json(s)?)
        .bind(s.bmc.as_ref().is_some_and(|b| b.insecure))
        .bind(s.bmc.as_ref().and_then(|b| b.ca_cert.clone())))
}

/// Marks the machines table changed, inside the change's transaction.
pub(crate) async fn bump_machines_generation(conn: &mut AnyConnection) -> Result<()> {
    sqlx::query::<Any>("UPDATE generations SET value = value + 1 WHERE name = 'machines'")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts machines with their tags and NICs in multi-row statements: a
/// 10,000-machine import is a few dozen round trips, not 40,000.
async fn insert_machines(conn: &mut AnyConnection, rows: &[Row_], at: &str) -> Result<()> {
    for chunk in rows.chunks(400) {
        let sql = format!(
            "INSERT INTO machines (id, hostname, fqdn, kind, state, owner_id, rack_id, protected, maintenance, \
             maintenance_reason, bmc_driver, bmc_address, bmc_username, bmc_password, ipv4, ipv6, hardware, \
             bmc_insecure, bmc_ca_cert, created_at, updated_at) VALUES {}",
            values(chunk.len(), 21)
        );
        let mut q = sqlx::query::<Any>(built(sql));
        for row in chunk {
            q = bind_row(q, row)?.bind(at.to_string()).bind(at.to_string());
        }
        q.execute(&mut *conn).await?;
    }
    let tags: Vec<(MachineId, &Tag)> = rows
        .iter()
        .flat_map(|r| unique_tags(&r.spec.tags).map(move |t| (r.id, t)))
        .collect();
    let nics: Vec<(MachineId, usize, &Nic)> = rows
        .iter()
        .flat_map(|r| r.spec.nics.iter().enumerate().map(move |(i, n)| (r.id, i, n)))
        .collect();
    insert_tags(conn, &tags).await?;
    insert_nics(conn, &nics).await
}

fn unique_tags(tags: &[Tag]) -> impl Iterator<Item = &Tag> {
    let mut seen = HashSet::new();
    tags.iter().filter(move |t| seen.insert(t.as_str()))
}

async fn insert_tags(conn: &mut AnyConnection, tags: &[(MachineId, &Tag)]) -> Result<()> {
    for chunk in tags.chunks(2000) {
        let sql = format!(
            "INSERT INTO machine_tags (machine_id, tag) VALUES {}",
            values(chunk.len(), 2)
        );
        let mut q = sqlx::query::<Any>(built(sql));
        for (id, tag) in chunk {
            q = q.bind(id.to_string()).bind(tag.as_str());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn insert_nics(conn: &mut AnyConnection, nics: &[(MachineId, usize, &Nic)]) -> Result<()> {
    for chunk in nics.chunks(800) {
        let sql = format!(
            "INSERT INTO nics (mac, machine_id, position, name, switch, port, vlan, circuit_id, remote_id) VALUES {}",
            values(chunk.len(), 9)
        );
        let mut q = sqlx::query::<Any>(built(sql));
        for (id, position, nic) in chunk {
            q = q
                .bind(nic.mac.to_string())
                .bind(id.to_string())
                .bind(*position as i64)
                .bind(nic.name.clone())
                .bind(nic.switch.clone())
                .bind(nic.port.clone())
                .bind(nic.vlan.map(i64::from))
                .bind(nic.circuit_id.clone())
                .bind(nic.remote_id.clone());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

fn hardware_json(s: &MachineCreate) -> Result<Option<String>> {
    s.hardware
        .as_ref()
        .map(|h| serde_json::to_string(h).map_err(|e| StoreError::Invalid(format!("hardware: {e}"))))
        .transpose()
}

fn machine_from_row(row: &AnyRow) -> Result<Machine> {
    let opt = |col: &str| -> Result<Option<String>> { Ok(row.try_get::<Option<String>, _>(col)?) };
    let tags = match opt("tag_list")? {
        Some(list) if !list.is_empty() => list.split(',').map(|t| parse_col("tag", t)).collect::<Result<_>>()?,
        _ => vec![],
    };
    let nics: Vec<Nic> = match opt("nic_list")? {
        Some(json) => serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("nics: {e}")))?,
        None => vec![],
    };
    let bmc = match opt("bmc_driver")? {
        Some(driver) => Some(Bmc {
            driver: parse_col("bmc driver", &driver)?,
            address: opt("bmc_address")?.unwrap_or_default(),
            username: opt("bmc_username")?,
            password_set: opt("bmc_password")?.is_some(),
            insecure: get_bool(row, "bmc_insecure")?,
            ca_cert: opt("bmc_ca_cert")?,
        }),
        None => None,
    };
    Ok(Machine {
        id: parse_col("machine id", &row.try_get::<String, _>("id")?)?,
        hostname: parse_col("hostname", &row.try_get::<String, _>("hostname")?)?,
        fqdn: opt("fqdn")?.map(|f| parse_col("fqdn", &f)).transpose()?,
        kind: parse_col("kind", &row.try_get::<String, _>("kind")?)?,
        state: parse_col("state", &row.try_get::<String, _>("state")?)?,
        tags,
        owner: opt("owner_name")?,
        site: opt("site_name")?,
        rack: opt("rack_name")?,
        rack_id: opt("rack_id")?.map(|r| parse_col("rack id", &r)).transpose()?,
        protected: get_bool(row, "protected")?,
        maintenance: get_bool(row, "maintenance")?,
        maintenance_reason: opt("maintenance_reason")?,
        bmc,
        nics,
        ipv4: opt("ipv4")?.map(|ip| parse_col("ipv4", &ip)).transpose()?,
        ipv6: opt("ipv6")?.map(|ip| parse_col("ipv6", &ip)).transpose()?,
        hardware: opt("hardware")?
            .map(|h| serde_json::from_str(&h).map_err(|e| StoreError::Corrupt(format!("hardware: {e}"))))
            .transpose()?,
        created_at: parse_ts(&row.try_get::<String, _>("created_at")?)?,
        updated_at: parse_ts(&row.try_get::<String, _>("updated_at")?)?,
    })
}

/// A flag column: BOOLEAN on PostgreSQL, INTEGER 0/1 on SQLite (whose
/// BOOLEAN the `Any` driver cannot decode).
pub(crate) fn get_bool(row: &AnyRow, col: &str) -> Result<bool> {
    match row.try_get::<bool, _>(col) {
        Ok(b) => Ok(b),
        Err(_) => Ok(row.try_get::<i64, _>(col)? != 0),
    }
}

/// The machine with id or hostname `key`, visible in `scope` (a tenant's
/// machines only, when given).
pub(crate) async fn load(
    conn: &mut AnyConnection,
    backend: Backend,
    key: &str,
    scope: Option<TenantId>,
) -> Result<(Machine, Option<SealedPassword>, Option<TenantId>)> {
    let mut page = format!("SELECT m.id, m.hostname {MACHINE_FROM} WHERE (m.id = $1 OR m.hostname = $1)");
    if scope.is_some() {
        page.push_str(" AND m.owner_id = $2");
    }
    let sql = machine_rows(backend, &page);
    let mut q = sqlx::query::<Any>(built(sql)).bind(key.to_ascii_lowercase());
    if let Some(t) = scope {
        q = q.bind(t.to_string());
    }
    let Some(row) = q.fetch_optional(&mut *conn).await? else {
        return Err(StoreError::NotFound {
            kind: "machine",
            key: key.to_string(),
        });
    };
    let sealed: Option<String> = row.try_get("bmc_password")?;
    let owner: Option<String> = row.try_get("owner_id")?;
    let machine = machine_from_row(&row)?;
    Ok((
        machine,
        sealed.map(SealedPassword),
        owner.map(|o| parse_col("tenant id", &o)).transpose()?,
    ))
}

/// The request form of a stored machine (the BMC password stays sealed).
fn to_spec(m: &Machine) -> MachineCreate {
    MachineCreate {
        hostname: m.hostname.clone(),
        fqdn: m.fqdn.clone(),
        kind: m.kind,
        state: m.state,
        tags: m.tags.clone(),
        owner: m.owner.clone(),
        site: m.site.clone(),
        rack: m.rack.clone(),
        protected: m.protected,
        maintenance: m.maintenance,
        maintenance_reason: m.maintenance_reason.clone(),
        bmc: m.bmc.as_ref().map(|b| BmcInput {
            driver: b.driver,
            address: b.address.clone(),
            username: b.username.clone(),
            password: None,
            insecure: b.insecure,
            ca_cert: b.ca_cert.clone(),
        }),
        nics: m.nics.clone(),
        ipv4: m.ipv4,
        ipv6: m.ipv6,
        hardware: m.hardware.clone(),
    }
}

/// The API view of a stored row, built without reading it back.
fn view(
    row: &Row_,
    names: &Names,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
) -> Machine {
    let s = &row.spec;
    let rack = row.rack_id.and_then(|id| names.racks.iter().find(|r| r.id == id));
    let owner = row
        .owner_id
        .and_then(|id| names.tenants.iter().find(|(_, t)| **t == id).map(|(n, _)| n.clone()));
    let mut tags: Vec<Tag> = s.tags.clone();
    tags.sort();
    tags.dedup();
    Machine {
        id: row.id,
        hostname: s.hostname.clone(),
        fqdn: s.fqdn.clone(),
        kind: s.kind,
        state: s.state,
        tags,
        owner,
        site: rack.map(|r| r.site.clone()),
        rack: rack.map(|r| r.name.clone()),
        rack_id: row.rack_id,
        protected: s.protected,
        maintenance: s.maintenance,
        maintenance_reason: s.maintenance_reason.clone(),
        bmc: s.bmc.as_ref().map(|b| Bmc {
            driver: b.driver,
            address: b.address.clone(),
            username: b.username.clone(),
            password_set: row.sealed_password.is_some(),
            insecure: b.insecure,
            ca_cert: b.ca_cert.clone(),
        }),
        nics: s.nics.clone(),
        ipv4: s.ipv4,
        ipv6: s.ipv6,
        hardware: s.hardware.clone(),
        created_at,
        updated_at,
    }
}

impl Store {
    /// Creates all `machines` in one transaction, or none: every bad row
    /// (unknown rack or tenant, a value already in use) is reported.
    pub async fn create_machines(&self, actor: &Actor, machines: Vec<NewMachine>) -> Result<Vec<Machine>> {
        let names = Names::load(self).await?;
        let mut problems = vec![];
        let mut rows = Vec::with_capacity(machines.len());
        for (index, m) in machines.into_iter().enumerate() {
            let rack_id = match &m.spec.rack {
                Some(rack) => match names.rack(m.spec.site.as_deref(), rack) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        problems.push(detail(index, "rack", e));
                        None
                    }
                },
                None => None,
            };
            let owner_id = match &m.spec.owner {
                Some(owner) => match names.tenant(owner) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        problems.push(detail(index, "owner", e));
                        None
                    }
                },
                None => None,
            };
            let mut spec = m.spec;
            if let Some(b) = &mut spec.bmc {
                b.password = None;
            }
            rows.push(Row_ {
                id: MachineId::new(),
                spec,
                rack_id,
                owner_id,
                sealed_password: m.sealed_password,
            });
        }
        let mut tx = self.write_tx().await?;
        let specs: Vec<&MachineCreate> = rows.iter().map(|r| &r.spec).collect();
        let conflicts = find_conflicts(&mut tx, &specs, None).await?;
        if !problems.is_empty() || !conflicts.is_empty() {
            let conflict = problems.is_empty();
            problems.extend(conflicts);
            problems.sort_by_key(|p| p.index);
            return Err(StoreError::Rows {
                conflict,
                details: problems,
            });
        }
        let at = now();
        insert_machines(&mut tx, &rows, &ts(at)).await?;
        let out: Vec<Machine> = rows.iter().map(|row| view(row, &names, at, at)).collect();
        let changes = out
            .iter()
            .map(|machine| Change {
                action: "machine.create",
                target_kind: "machine",
                target_id: machine.id.to_string(),
                target_name: machine.hostname.to_string(),
                before: None,
                after: snapshot(machine),
            })
            .collect();
        record_many(&mut tx, actor, changes).await?;
        bump_machines_generation(&mut tx).await?;
        tx.commit().await?;
        self.note_machine_change();
        if out.len() >= ANALYZE_AFTER && self.backend == Backend::Postgres {
            // Fresh statistics for the planner: without them, PostgreSQL
            // plans lists over a just-imported fleet as if it were empty
            // (seen in bench/inventory: 70 ms instead of 1 ms per page).
            // Autovacuum would get there, but later, and may be off.
            sqlx::query::<Any>("ANALYZE machines, machine_tags, nics, racks, sites, tenants")
                .execute(&self.pool)
                .await?;
        }
        Ok(out)
    }

    /// The machine with id or hostname `key`; with `scope`, only if that
    /// tenant owns it (else not found, so other tenants' machines stay unseen).
    pub async fn get_machine(&self, key: &str, scope: Option<TenantId>) -> Result<Machine> {
        let mut conn = self.pool.acquire().await?;
        Ok(load(&mut conn, self.backend, key, scope).await?.0)
    }

    /// The sealed BMC password of a machine, for the BMC drivers.
    pub async fn machine_bmc_password(&self, id: MachineId) -> Result<Option<SealedPassword>> {
        Ok(self.machine_with_bmc_password(id).await?.1)
    }

    /// A machine and its sealed BMC password, read together (one read
    /// where a BMC call needs both).
    pub async fn machine_with_bmc_password(&self, id: MachineId) -> Result<(Machine, Option<SealedPassword>)> {
        let mut conn = self.pool.acquire().await?;
        let (machine, sealed, _) = load(&mut conn, self.backend, &id.to_string(), None).await?;
        Ok((machine, sealed))
    }

    /// Machines matching `filter` (within `scope`), by hostname, one page.
    pub async fn list_machines(&self, filter: &MachineFilter, scope: Option<TenantId>) -> Result<Page<Machine>> {
        let limit = page_limit(filter.limit)?;
        let mut sql = format!("SELECT m.id, m.hostname {MACHINE_FROM} WHERE 1 = 1");
        let mut params = Params::default();
        if let Some(tags) = &filter.tag {
            for t in tags.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let tag: Tag = t
                    .parse()
                    .map_err(|e: kiln_types::ValidationError| StoreError::Invalid(e.to_string()))?;
                let p = params.add(tag.to_string());
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM machine_tags mt WHERE mt.machine_id = m.id AND mt.tag = {p})"
                ));
            }
        }
        if let Some(rack) = &filter.rack {
            let p = params.add(rack.clone());
            sql.push_str(&format!(" AND r.name = {p}"));
        }
        if let Some(site) = &filter.site {
            let p = params.add(site.clone());
            sql.push_str(&format!(" AND s.name = {p}"));
        }
        if let Some(state) = filter.state {
            let p = params.add(state.to_string());
            sql.push_str(&format!(" AND m.state = {p}"));
        }
        if let Some(owner) = &filter.owner {
            let p = params.add(owner.clone());
            sql.push_str(&format!(" AND t.name = {p}"));
        }
        if let Some(q) = &filter.q {
            let p = params.add(format!("%{}%", escape_like(&q.to_ascii_lowercase())));
            sql.push_str(&format!(" AND m.hostname LIKE {p} ESCAPE '\\'"));
        }
        if let Some(scope) = scope {
            let p = params.add(scope.to_string());
            sql.push_str(&format!(" AND m.owner_id = {p}"));
        }
        if let Some(cursor) = &filter.cursor {
            let p = params.add(decode_cursor(cursor)?);
            sql.push_str(&format!(" AND m.hostname > {p}"));
        }
        sql.push_str(&format!(" ORDER BY m.hostname LIMIT {}", limit + 1));
        let q = params.bind_all(sqlx::query::<Any>(built(machine_rows(self.backend, &sql))));
        let mut conn = self.pool.acquire().await?;
        let mut rows = q.fetch_all(&mut *conn).await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let items = rows.iter().map(machine_from_row).collect::<Result<Vec<_>>>()?;
        let next_cursor = if more {
            items.last().map(|m| encode_cursor(m.hostname.as_str()))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    /// Every machine, by hostname, read page by page: for in-process
    /// indexes such as the DHCP listener's. Not one snapshot: read
    /// `machines_generation` first, and reload when it has moved since.
    pub async fn all_machines(&self) -> Result<Vec<Machine>> {
        let mut all = vec![];
        let mut filter = MachineFilter {
            limit: Some(1000),
            ..MachineFilter::default()
        };
        loop {
            let page = self.list_machines(&filter, None).await?;
            all.extend(page.items);
            match page.next_cursor {
                Some(c) => filter.cursor = Some(c),
                None => return Ok(all),
            }
        }
    }

    /// Applies `patch` to the machine `key`. A new BMC password comes sealed
    /// in `sealed_password`; a BMC given without one keeps the stored one.
    pub async fn update_machine(
        &self,
        actor: &Actor,
        key: &str,
        patch: MachinePatch,
        sealed_password: Option<SealedPassword>,
        scope: Option<TenantId>,
    ) -> Result<Machine> {
        self.update_machine_if(actor, key, patch, sealed_password, scope, &|_| Ok(()))
            .await
    }

    /// `update_machine`, only if `guard` accepts the machine as it is inside
    /// the write's transaction (row locked on PostgreSQL, the one writer on
    /// SQLite): a rule checked before the write cannot be raced by a change
    /// made between the check and the write. `guard`'s refusal is
    /// `StoreError::Refused` with its words; nothing is written.
    pub async fn update_machine_if(
        &self,
        actor: &Actor,
        key: &str,
        patch: MachinePatch,
        sealed_password: Option<SealedPassword>,
        scope: Option<TenantId>,
        guard: &(dyn Fn(&Machine) -> std::result::Result<(), String> + Send + Sync),
    ) -> Result<Machine> {
        let names = Names::load(self).await?;
        let mut tx = self.write_tx().await?;
        if self.backend == Backend::Postgres {
            sqlx::query::<Any>("SELECT id FROM machines WHERE id = $1 OR hostname = $1 FOR UPDATE")
                .bind(key)
                .fetch_all(&mut *tx)
                .await?;
        }
        let (before, old_sealed, old_owner) = load(&mut tx, self.backend, key, scope).await?;
        guard(&before).map_err(StoreError::Refused)?;
        let mut spec = to_spec(&before);
        let mut rack_id = before.rack_id;
        let mut owner_id = old_owner;
        let bad = |field: &str, message: String| StoreError::Rows {
            conflict: false,
            details: vec![ErrorDetail {
                index: None,
                field: Some(field.into()),
                message,
            }],
        };
        if let Some(h) = patch.hostname {
            spec.hostname = h;
        }
        if let Some(f) = patch.fqdn {
            spec.fqdn = f;
        }
        if let Some(k) = patch.kind {
            spec.kind = k;
        }
        if let Some(s) = patch.state {
            spec.state = s;
        }
        if let Some(t) = patch.tags {
            spec.tags = t;
        }
        if let Some(owner) = patch.owner {
            owner_id = owner
                .as_deref()
                .map(|o| names.tenant(o))
                .transpose()
                .map_err(|e| bad("owner", e))?;
            spec.owner = owner;
        }
        match (patch.rack, patch.site) {
            (Some(rack), site) => {
                rack_id = rack
                    .as_deref()
                    .map(|r| names.rack(site.as_deref(), r))
                    .transpose()
                    .map_err(|e| bad("rack", e))?;
            }
            (None, Some(_)) => {
                return Err(bad(
                    "site",
                    "`site` only selects among racks of the same name: give `rack` too".into(),
                ));
            }
            (None, None) => {}
        }
        if let Some(p) = patch.protected {
            spec.protected = p;
        }
        if let Some(m) = patch.maintenance {
            spec.maintenance = m;
            if !m {
                spec.maintenance_reason = None;
            }
        }
        if let Some(r) = patch.maintenance_reason {
            spec.maintenance_reason = r;
        }
        let mut sealed = old_sealed;
        if let Some(bmc) = patch.bmc {
            match bmc {
                None => sealed = None,
                Some(_) if sealed_password.is_some() => sealed = sealed_password,
                Some(_) => {}
            }
            spec.bmc = bmc.map(|mut b| {
                b.password = None;
                b
            });
        }
        let nics_changed = patch.nics.is_some();
        if let Some(nics) = patch.nics {
            spec.nics = nics;
        }
        if let Some(ip) = patch.ipv4 {
            spec.ipv4 = ip;
        }
        if let Some(ip) = patch.ipv6 {
            spec.ipv6 = ip;
        }
        if let Some(hw) = patch.hardware {
            spec.hardware = hw;
        }
        let problems = spec.validate();
        if !problems.is_empty() {
            return Err(StoreError::Rows {
                conflict: false,
                details: problems
                    .into_iter()
                    .map(|message| ErrorDetail {
                        index: None,
                        field: None,
                        message,
                    })
                    .collect(),
            });
        }
        let mut conflicts = find_conflicts(&mut tx, &[&spec], Some(before.id)).await?;
        if !conflicts.is_empty() {
            for c in &mut conflicts {
                c.index = None;
            }
            return Err(StoreError::Rows {
                conflict: true,
                details: conflicts,
            });
        }
        let updated_at = now();
        let row = Row_ {
            id: before.id,
            spec,
            rack_id,
            owner_id,
            sealed_password: sealed,
        };
        let s = &row.spec;
        // NICs go first: their unique indexes must not see the old and new
        // rows of this machine at once.
        if nics_changed {
            sqlx::query::<Any>("DELETE FROM nics WHERE machine_id = $1")
                .bind(row.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query::<Any>("DELETE FROM machine_tags WHERE machine_id = $1")
            .bind(row.id.to_string())
            .execute(&mut *tx)
            .await?;
        let q = sqlx::query::<Any>(
            "UPDATE machines SET hostname = $2, fqdn = $3, kind = $4, state = $5, owner_id = $6, rack_id = $7, \
             protected = $8, maintenance = $9, maintenance_reason = $10, bmc_driver = $11, bmc_address = $12, \
             bmc_username = $13, bmc_password = $14, ipv4 = $15, ipv6 = $16, hardware = $17, bmc_insecure = $18, \
             bmc_ca_cert = $19, updated_at = $20 WHERE id = $1",
        );
        bind_row(q, &row)?.bind(ts(updated_at)).execute(&mut *tx).await?;
        let tags: Vec<(MachineId, &Tag)> = unique_tags(&s.tags).map(|t| (row.id, t)).collect();
        insert_tags(&mut tx, &tags).await?;
        if nics_changed {
            let nics: Vec<(MachineId, usize, &Nic)> = s.nics.iter().enumerate().map(|(i, n)| (row.id, i, n)).collect();
            insert_nics(&mut tx, &nics).await?;
        }
        let after = view(&row, &names, before.created_at, updated_at);
        record(
            &mut tx,
            actor,
            Change {
                action: "machine.update",
                target_kind: "machine",
                target_id: after.id.to_string(),
                target_name: after.hostname.to_string(),
                before: snapshot(&before),
                after: snapshot(&after),
            },
        )
        .await?;
        bump_machines_generation(&mut tx).await?;
        tx.commit().await?;
        self.note_machine_change();
        Ok(after)
    }

    /// Deletes machine `key`, unless it is protected.
    pub async fn delete_machine(&self, actor: &Actor, key: &str, scope: Option<TenantId>) -> Result<Machine> {
        let mut tx = self.write_tx().await?;
        let (machine, _, _) = load(&mut tx, self.backend, key, scope).await?;
        if machine.protected {
            return Err(StoreError::Refused(format!(
                "machine {} is protected: clear the flag first (kiln machine edit {} --protected false)",
                machine.hostname, machine.hostname
            )));
        }
        if let Some(row) = sqlx::query::<Any>("SELECT id FROM jobs WHERE machine_id = $1 AND finished_at IS NULL")
            .bind(machine.id.to_string())
            .fetch_optional(&mut *tx)
            .await?
        {
            let job: String = row.try_get(0)?;
            return Err(StoreError::Refused(format!(
                "machine {} has an active job ({job}): cancel it first (kiln job cancel {job})",
                machine.hostname
            )));
        }
        sqlx::query::<Any>("DELETE FROM machines WHERE id = $1")
            .bind(machine.id.to_string())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "machine.delete",
                target_kind: "machine",
                target_id: machine.id.to_string(),
                target_name: machine.hostname.to_string(),
                before: snapshot(&machine),
                after: None,
            },
        )
        .await?;
        bump_machines_generation(&mut tx).await?;
        tx.commit().await?;
        self.note_machine_change();
        Ok(machine)
    }
}
