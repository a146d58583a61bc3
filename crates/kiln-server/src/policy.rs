//! Who may call what: the role rules on request *fields* (the rules on
//! routes are in each handler, and [`ROUTES`] states them all in one table
//! that a test walks for every path, method and role).
//!
//! A tenant's token reaches only its own machines and their jobs; some
//! fields of a request it may make are still operator tools, because they
//! skip a safety check or reach past the tenant's machine (`no_hooks`
//! skips the operator's downtime and depool hooks, `new` the hardware
//! checks, `no_pxe` the install itself). Such a field, set by a tenant, is
//! refused with 403 naming the field, and the request changes nothing.

use kiln_types::auth::Role;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

/// Refuses the request if `caller` is a tenant and sets any of `fields`
/// (`(name, is_set)`); every such field is named.
pub fn operator_fields(caller: &Caller, fields: &[(&str, bool)]) -> ApiResult<()> {
    if caller.token.role != Role::Tenant {
        return Ok(());
    }
    let set: Vec<String> = fields
        .iter()
        .filter(|(_, is_set)| *is_set)
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    if set.is_empty() {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "{} {} for operators: a tenant token cannot set {}; leave {} out",
        set.join(", "),
        if set.len() == 1 { "is a field" } else { "are fields" },
        if set.len() == 1 { "it" } else { "them" },
        if set.len() == 1 { "it" } else { "them" },
    )))
}

/// How a route authenticates its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anyone who can reach the listener: what firmware fetches, and the
    /// API's own description. Nothing behind it changes state.
    Public,
    /// An API token of at least this role.
    Token(MinRole),
    /// The job's own token (its agent, installer or new OS), only while
    /// the job runs; API tokens are refused.
    JobToken,
    /// The discovery token `/boot/ipxe` gave the machine's boot NIC.
    DiscoveryToken,
}

/// The least role a route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MinRole {
    Tenant,
    Operator,
    Admin,
}

/// One route's policy, as [`ROUTES`] states it and the route-table test
/// (crates/kiln-server/tests/api/policy.rs) checks it for every role.
#[derive(Debug, Clone, Copy)]
pub struct RoutePolicy {
    pub method: &'static str,
    pub path: &'static str,
    pub auth: Auth,
    /// The route names one machine or job, which a tenant sees only if it
    /// owns it: another tenant's is "not found" (404), even where the
    /// route's role would refuse the owner (403), so that a refusal never
    /// tells a tenant that another's object exists.
    pub owned: bool,
    /// Request fields a tenant may not set (403 naming the field).
    pub operator_fields: &'static [&'static str],
}

const fn route(method: &'static str, path: &'static str, auth: Auth, owned: bool) -> RoutePolicy {
    RoutePolicy {
        method,
        path,
        auth,
        owned,
        operator_fields: &[],
    }
}

const TENANT: Auth = Auth::Token(MinRole::Tenant);
const OPERATOR: Auth = Auth::Token(MinRole::Operator);
const ADMIN: Auth = Auth::Token(MinRole::Admin);

/// Every route the server answers, with its policy. A route missing here
/// fails the route-table test, which also renders this table into
/// docs/security.md.
pub const ROUTES: &[RoutePolicy] = &[
    route("GET", "/api/v1/openapi.json", Auth::Public, false),
    route("GET", "/api/v1/whoami", TENANT, false),
    // Inventory: tenants read their own machines; only operators change it.
    route("POST", "/api/v1/machines", OPERATOR, false),
    route("GET", "/api/v1/machines", TENANT, false),
    route("POST", "/api/v1/machines/bulk", OPERATOR, false),
    route("GET", "/api/v1/machines/{key}", TENANT, true),
    route("PATCH", "/api/v1/machines/{key}", OPERATOR, true),
    route("DELETE", "/api/v1/machines/{key}", OPERATOR, true),
    route("GET", "/api/v1/machines/{key}/offer", TENANT, true),
    // Issue 15: accepting a swapped server's MAC decides which hardware the
    // machine is, so operators only.
    route("POST", "/api/v1/machines/{key}/confirm-port", OPERATOR, true),
    // BMC: a tenant powers its machines and sets their next boot only.
    route("GET", "/api/v1/machines/{key}/power", TENANT, true),
    route("POST", "/api/v1/machines/{key}/power", TENANT, true),
    RoutePolicy {
        operator_fields: &["once"],
        ..route("PUT", "/api/v1/machines/{key}/bootdev", TENANT, true)
    },
    route("POST", "/api/v1/machines/{key}/bmc/check", OPERATOR, true),
    route("POST", "/api/v1/machines/{key}/discover", OPERATOR, true),
    // Network: operators describe subnets and set each machine's links and
    // addresses; a tenant reads its own machine's.
    route("GET", "/api/v1/machines/{key}/network", TENANT, true),
    route("PUT", "/api/v1/machines/{key}/network", OPERATOR, true),
    route("GET", "/api/v1/machines/{key}/network-config", TENANT, true),
    route("POST", "/api/v1/subnets", OPERATOR, false),
    route("GET", "/api/v1/subnets", OPERATOR, false),
    route("GET", "/api/v1/subnets/{key}", OPERATOR, false),
    route("PATCH", "/api/v1/subnets/{key}", OPERATOR, false),
    route("DELETE", "/api/v1/subnets/{key}", OPERATOR, false),
    // Sites, racks, tenants, tokens.
    route("POST", "/api/v1/sites", OPERATOR, false),
    route("GET", "/api/v1/sites", OPERATOR, false),
    route("DELETE", "/api/v1/sites/{name}", OPERATOR, false),
    route("POST", "/api/v1/racks", OPERATOR, false),
    route("GET", "/api/v1/racks", OPERATOR, false),
    route("DELETE", "/api/v1/racks/{name}", OPERATOR, false),
    route("POST", "/api/v1/tenants", ADMIN, false),
    route("GET", "/api/v1/tenants", OPERATOR, false),
    route("DELETE", "/api/v1/tenants/{name}", ADMIN, false),
    route("POST", "/api/v1/tokens", ADMIN, false),
    route("GET", "/api/v1/tokens", ADMIN, false),
    route("DELETE", "/api/v1/tokens/{key}", ADMIN, false),
    // The catalog: everyone reads it (a tenant's reinstall picks from
    // it); operators write it, since its tasks run on the kiln server.
    route("POST", "/api/v1/os-images", OPERATOR, false),
    route("GET", "/api/v1/os-images", TENANT, false),
    route("GET", "/api/v1/os-images/{key}", TENANT, false),
    route("PATCH", "/api/v1/os-images/{key}", OPERATOR, false),
    route("DELETE", "/api/v1/os-images/{key}", OPERATOR, false),
    route("POST", "/api/v1/tasks", OPERATOR, false),
    route("GET", "/api/v1/tasks", TENANT, false),
    route("GET", "/api/v1/tasks/{key}", TENANT, false),
    route("PATCH", "/api/v1/tasks/{key}", OPERATOR, false),
    route("DELETE", "/api/v1/tasks/{key}", OPERATOR, false),
    route("GET", "/api/v1/layouts", TENANT, false),
    // The audit log, leases and the boot decision show the whole fleet.
    route("GET", "/api/v1/events", OPERATOR, false),
    route("GET", "/api/v1/leases", OPERATOR, false),
    route("GET", "/api/v1/boot/explain", OPERATOR, false),
    // Jobs: a tenant reimages, follows, cancels and retries its own.
    RoutePolicy {
        operator_fields: &["no_hooks", "new", "no_pxe"],
        ..route("POST", "/api/v1/machines/{key}/reimage", TENANT, true)
    },
    route("GET", "/api/v1/jobs", TENANT, false),
    route("GET", "/api/v1/jobs/{id}", TENANT, true),
    route("POST", "/api/v1/jobs/{id}/cancel", TENANT, true),
    route("POST", "/api/v1/jobs/{id}/pause", OPERATOR, true),
    route("POST", "/api/v1/jobs/{id}/resume", OPERATOR, true),
    RoutePolicy {
        operator_fields: &["from_step"],
        ..route("POST", "/api/v1/jobs/{id}/retry", TENANT, true)
    },
    route("GET", "/api/v1/jobs/{id}/events", TENANT, true),
    // What the job's agent, installer and new OS call.
    route("POST", "/api/v1/jobs/{id}/stages/{n}", Auth::JobToken, false),
    route("POST", "/api/v1/jobs/{id}/failure", Auth::JobToken, false),
    route("GET", "/api/v1/jobs/{id}/plan", Auth::JobToken, false),
    route("POST", "/api/v1/discovery", Auth::DiscoveryToken, false),
    // Rollouts run health checks on the kiln server: operators only.
    route("POST", "/api/v1/rollouts", OPERATOR, false),
    route("GET", "/api/v1/rollouts", OPERATOR, false),
    route("GET", "/api/v1/rollouts/{id}", OPERATOR, false),
    route("POST", "/api/v1/rollouts/{id}/pause", OPERATOR, false),
    route("POST", "/api/v1/rollouts/{id}/resume", OPERATOR, false),
    route("POST", "/api/v1/rollouts/{id}/abort", OPERATOR, false),
    // The boot network: what firmware fetches; answers come from the boot
    // decision, job files need the job's token in the query.
    route("GET", "/healthz", Auth::Public, false),
    route("GET", "/boot/ipxe", Auth::Public, false),
    route("GET", "/boot/file/{*path}", Auth::Public, false),
    route("GET", "/boot/job/{id}/{file}", Auth::JobToken, false),
];

/// [`ROUTES`] as the Markdown table docs/security.md carries.
pub fn routes_markdown() -> String {
    let mut out = String::from(
        "| method | path | caller | another tenant's object | fields only operators set |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in ROUTES {
        let caller = match r.auth {
            Auth::Public => "anyone",
            Auth::Token(MinRole::Tenant) => "tenant, operator, admin",
            Auth::Token(MinRole::Operator) => "operator, admin",
            Auth::Token(MinRole::Admin) => "admin",
            Auth::JobToken => "the job's token",
            Auth::DiscoveryToken => "the boot NIC's discovery token",
        };
        let fields = r
            .operator_fields
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| {} | `{}` | {} | {} | {} |\n",
            r.method,
            r.path,
            caller,
            if r.owned { "404" } else { "" },
            fields
        ));
    }
    out
}
