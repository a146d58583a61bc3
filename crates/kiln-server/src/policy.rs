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
