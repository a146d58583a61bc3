//! `kiln site|rack|tenant|token|events`.

use std::path::PathBuf;

use clap::Subcommand;
use kiln_server::{Config, Settings};
use kiln_types::auth::{Role, TenantCreate, TokenCreate, TokenCreated};
use kiln_types::event::EventFilter;
use kiln_types::site::{RackCreate, SiteCreate};

use crate::Ctx;
use crate::output::{Format, Out, opt};

#[derive(Debug, Subcommand)]
pub enum SiteCmd {
    /// Add a site.
    Add {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// List sites.
    List,
    /// Remove an empty site.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum RackCmd {
    /// Add a rack to a site.
    Add {
        name: String,
        #[arg(long)]
        site: String,
        #[arg(long)]
        row: Option<String>,
        #[arg(long)]
        node_group: Option<String>,
    },
    /// List racks.
    List {
        #[arg(long)]
        site: Option<String>,
    },
    /// Remove an empty rack.
    Rm {
        name: String,
        #[arg(long)]
        site: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Add a tenant.
    Add {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// List tenants.
    List,
    /// Remove a tenant that owns nothing.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token and print it (only the token, on stdout). With
    /// --data-dir (or --database-url / --config) it is written straight to
    /// the database, without a server: how a fresh install gets its first
    /// admin token.
    Create {
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Tenant of a `tenant` token.
        #[arg(long)]
        tenant: Option<String>,
        /// A label for the audit log.
        #[arg(long)]
        name: Option<String>,
        /// When the token stops working: a duration from now (`90m`, `12h`,
        /// `30d`, `8w`) or a time (`2027-01-01T00:00:00Z`). Default, and
        /// longest: the server's `[auth] max_token_lifetime_days` (365).
        #[arg(long, value_parser = parse_expires)]
        expires: Option<Expires>,
        /// Server config file, for offline creation.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory, for offline creation.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// PostgreSQL URL, for offline creation.
        #[arg(long, hide_env_values = true)]
        database_url: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id or name.
    Revoke { key: String },
}

/// `--expires`: in a while, or at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    In(chrono::Duration),
    At(chrono::DateTime<chrono::Utc>),
}

impl Expires {
    pub fn at(self, now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
        match self {
            Expires::In(d) => now + d,
            Expires::At(t) => t,
        }
    }
}

/// Parses `30d`-style durations (m, h, d, w) and RFC 3339 times.
pub fn parse_expires(s: &str) -> Result<Expires, String> {
    let bad = || {
        format!(
            "`{s}` is neither a duration (a whole number and m, h, d or w: 90m, 12h, 30d, 8w) \
             nor a time in RFC 3339 (2027-01-01T00:00:00Z)"
        )
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(Expires::At(t.with_timezone(&chrono::Utc)));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "m" => chrono::Duration::try_minutes(n),
        "h" => chrono::Duration::try_hours(n),
        "d" => chrono::Duration::try_days(n),
        "w" => chrono::Duration::try_weeks(n),
        _ => None,
    }
    .ok_or_else(bad)?;
    if n == 0 {
        return Err(format!("`{s}` is no time at all: a token must live a while (say 30d)"));
    }
    if d > chrono::Duration::days(36_500) {
        return Err(format!("`{s}` is more than a century: ask for less (say 365d)"));
    }
    Ok(Expires::In(d))
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    Admin,
    Operator,
    Tenant,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Operator => Role::Operator,
            RoleArg::Tenant => Role::Tenant,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Machine hostname, or any target id or name.
    #[arg(long)]
    target: Option<String>,
    /// Target kind: machine, tenant, token, site, rack, os_image, task.
    #[arg(long)]
    kind: Option<String>,
    /// Action or its prefix (`machine.`, `token.revoke`).
    #[arg(long)]
    action: Option<String>,
    /// Part of the actor's name.
    #[arg(long)]
    actor: Option<String>,
    /// Only since this time (RFC 3339, e.g. 2026-11-21T00:00:00Z).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// How many events (newest first).
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

pub async fn run_site(c: SiteCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    match c {
        SiteCmd::Add { name, description } => {
            let s = client.create_site(&SiteCreate { name, description }).await?;
            out.record(&s, vec![("site", s.name.clone()), ("id", s.id.to_string())])
        }
        SiteCmd::List => {
            let sites = client.list_sites().await?;
            let rows = sites
                .iter()
                .map(|s| vec![s.name.clone(), opt(&s.description)])
                .collect();
            out.table(&sites, &["SITE", "DESCRIPTION"], rows)
        }
        SiteCmd::Rm { name } => {
            client.delete_site(&name).await?;
            out.line(format!("removed site {name}"))
        }
    }
}

pub async fn run_rack(c: RackCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    match c {
        RackCmd::Add {
            name,
            site,
            row,
            node_group,
        } => {
            let r = client
                .create_rack(&RackCreate {
                    name,
                    site,
                    row,
                    node_group,
                })
                .await?;
            out.record(
                &r,
                vec![
                    ("rack", r.name.clone()),
                    ("site", r.site.clone()),
                    ("id", r.id.to_string()),
                ],
            )
        }
        RackCmd::List { site } => {
            let racks = client.list_racks(site.as_deref()).await?;
            let rows = racks
                .iter()
                .map(|r| vec![r.site.clone(), r.name.clone(), opt(&r.row), opt(&r.node_group)])
                .collect();
            out.table(&racks, &["SITE", "RACK", "ROW", "NODE GROUP"], rows)
        }
        RackCmd::Rm { name, site } => {
            client.delete_rack(&name, site.as_deref()).await?;
            out.line(format!("removed rack {name}"))
        }
    }
}

pub async fn run_tenant(c: TenantCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    match c {
        TenantCmd::Add { name, description } => {
            let t = client.create_tenant(&TenantCreate { name, description }).await?;
            out.record(&t, vec![("tenant", t.name.clone()), ("id", t.id.to_string())])
        }
        TenantCmd::List => {
            let tenants = client.list_tenants().await?;
            let rows = tenants
                .iter()
                .map(|t| vec![t.name.clone(), opt(&t.description)])
                .collect();
            out.table(&tenants, &["TENANT", "DESCRIPTION"], rows)
        }
        TenantCmd::Rm { name } => {
            client.delete_tenant(&name).await?;
            out.line(format!("removed tenant {name}"))
        }
    }
}

fn print_created(created: &TokenCreated, out: &mut Out) -> anyhow::Result<()> {
    match out.format {
        Format::Json => out.json(created),
        // Only the token on stdout, so `export KILN_TOKEN=$(kiln token create …)` works.
        Format::Table => out.line(&created.token),
    }
}

fn minute(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M").to_string()
}

/// An expiry in the token table: a past one says so.
fn when(t: chrono::DateTime<chrono::Utc>, now: chrono::DateTime<chrono::Utc>) -> String {
    if t <= now {
        format!("{} (expired)", minute(t))
    } else {
        minute(t)
    }
}

pub async fn run_token(c: TokenCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    match c {
        TokenCmd::Create {
            role,
            tenant,
            name,
            expires,
            config,
            data_dir,
            database_url,
        } => {
            let expires_at = expires.map(|e| e.at(chrono::Utc::now()));
            if config.is_some() || data_dir.is_some() || database_url.is_some() {
                let config = Config::load(
                    config.as_deref(),
                    Settings {
                        data_dir,
                        database_url,
                        ..Default::default()
                    },
                )?;
                let created =
                    kiln_server::bootstrap_token(&config, role.into(), tenant.as_deref(), name.as_deref(), expires_at)
                        .await?;
                eprintln!(
                    "created {} token `{}`; it is shown only now",
                    created.info.role, created.info.name
                );
                // On stderr, beside the token on stdout: what the CLI
                // needs to trust this server's certificate.
                if let Ok(Some((fp, _))) = kiln_server::tls::configured_fingerprint(&config) {
                    eprintln!("the server's TLS certificate: export KILN_FINGERPRINT={fp}");
                }
                return print_created(&created, out);
            }
            let created = ctx
                .client()?
                .create_token(&TokenCreate {
                    role: role.into(),
                    tenant,
                    name,
                    expires_at,
                })
                .await?;
            print_created(&created, out)
        }
        TokenCmd::List => {
            let tokens = ctx.client()?.list_tokens().await?;
            let now = chrono::Utc::now();
            let rows = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.role.to_string(),
                        opt(&t.tenant),
                        minute(t.created_at),
                        t.expires_at.map_or("never".into(), |r| when(r, now)),
                        t.revoked_at.map_or("-".into(), minute),
                        t.last_used_at.map_or("never".into(), minute),
                        opt(&t.last_used_from),
                        t.id.to_string(),
                    ]
                })
                .collect();
            out.table(
                &tokens,
                &[
                    "NAME",
                    "ROLE",
                    "TENANT",
                    "CREATED",
                    "EXPIRES",
                    "REVOKED",
                    "LAST USED",
                    "FROM",
                    "ID",
                ],
                rows,
            )
        }
        TokenCmd::Revoke { key } => {
            let t = ctx.client()?.revoke_token(&key).await?;
            out.record(&t, vec![("revoked", t.name.clone()), ("id", t.id.to_string())])
        }
    }
}

pub async fn events(a: EventsArgs, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let filter = EventFilter {
        target_kind: a.kind,
        target: a.target,
        action: a.action,
        actor: a.actor,
        since: a.since,
        limit: Some(a.limit),
        cursor: None,
    };
    let page = ctx.client()?.list_events(&filter).await?;
    let rows = page
        .items
        .iter()
        .map(|e| {
            vec![
                e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                e.actor.clone(),
                e.action.clone(),
                e.target_name.clone(),
                change_summary(e.before.as_ref(), e.after.as_ref()),
            ]
        })
        .collect();
    out.table(&page.items, &["WHEN (UTC)", "WHO", "WHAT", "TARGET", "CHANGED"], rows)
}

/// The top-level fields that differ between `before` and `after`.
fn change_summary(before: Option<&serde_json::Value>, after: Option<&serde_json::Value>) -> String {
    match (before.and_then(|b| b.as_object()), after.and_then(|a| a.as_object())) {
        (Some(b), Some(a)) => {
            let changed: Vec<String> = a
                .iter()
                .filter(|(k, v)| k.as_str() != "updated_at" && b.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("{k}={}", short(v)))
                .chain(
                    b.keys()
                        .filter(|k| !a.contains_key(k.as_str()))
                        .map(|k| format!("-{k}")),
                )
                .collect();
            changed.join(" ")
        }
        _ => String::new(),
    }
}

fn short(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(39).collect::<String>())
    } else {
        s
    }
}

pub async fn leases(all: bool, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let leases = ctx.client()?.list_leases(all).await?;
    let rows = leases
        .iter()
        .map(|l| {
            vec![
                l.ip.to_string(),
                l.mac.to_string(),
                l.state.to_string(),
                opt(&l.hostname),
                l.expires_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    out.table(&leases, &["IP", "MAC", "STATE", "MACHINE", "EXPIRES (UTC)"], rows)
}

#[derive(Debug, Subcommand)]
pub enum BootCmd {
    /// What a machine would be told if it net-booted now, and why.
    Explain {
        /// Hostname, machine id or MAC address.
        target: String,
        /// Firmware: `pcbios` (default) or `efi`.
        #[arg(long)]
        platform: Option<String>,
    },
}

pub async fn boot(c: BootCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    match c {
        BootCmd::Explain { target, platform } => {
            let e = ctx.client()?.boot_explain(&target, platform.as_deref()).await?;
            if out.format == Format::Json {
                return out.json(&e);
            }
            let field = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
            out.record(
                &e,
                vec![
                    ("target", field("target")),
                    ("machine", field("machine")),
                    ("answer", field("answer")),
                    ("because", field("reason")),
                ],
            )?;
            out.line("")?;
            out.line(field("script").trim_end())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_takes_durations_and_times() {
        let d = |s: &str| parse_expires(s).unwrap();
        assert_eq!(d("90m"), Expires::In(chrono::Duration::minutes(90)));
        assert_eq!(d("12h"), Expires::In(chrono::Duration::hours(12)));
        assert_eq!(d("30d"), Expires::In(chrono::Duration::days(30)));
        assert_eq!(d("8w"), Expires::In(chrono::Duration::weeks(8)));
        assert_eq!(
            d("2027-01-01T01:00:00+01:00"),
            Expires::At("2027-01-01T00:00:00Z".parse().unwrap())
        );
        for bad in ["", "30", "d", "-5d", "5x", "1.5d", "99999999999999999w", "2027-01-01"] {
            let e = parse_expires(bad).unwrap_err();
            assert!(e.contains("30d") && e.contains("RFC 3339"), "{bad}: {e}");
        }
        assert!(parse_expires("0d").unwrap_err().contains("no time at all"));
        assert!(parse_expires("99999999w").unwrap_err().contains("century"));
        assert_eq!(d("36500d"), Expires::In(chrono::Duration::days(36_500)));
    }
}
