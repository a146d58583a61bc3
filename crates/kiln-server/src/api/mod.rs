//! The REST API under `/api/v1`: routes, and the OpenAPI document generated
//! from the handlers' annotations (committed as `openapi/kiln.json`; a test
//! fails when the two differ).

mod agent;
mod catalog;
mod events;
pub mod extract;
mod jobs;
mod machines;
mod network;
mod org;
mod power;
mod rollouts;

use axum::Router;
use axum::routing::{delete, get, post, put};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::AppState;

pub use machines::MAX_BULK;

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "kiln", description = "kiln control plane: inventory, boot, BMC, reimage workflows."),
    paths(
        machines::create, machines::bulk_create, machines::list, machines::get, machines::update,
        machines::delete, machines::offer, machines::confirm_port,
        power::status, power::power, power::bootdev, power::check, power::discover,
        org::whoami, org::create_site, org::list_sites, org::delete_site,
        org::create_rack, org::list_racks, org::delete_rack,
        org::create_tenant, org::list_tenants, org::delete_tenant,
        org::create_token, org::list_tokens, org::revoke_token,
        catalog::create_os_image, catalog::list_os_images, catalog::get_os_image, catalog::update_os_image, catalog::delete_os_image,
        catalog::create_task, catalog::list_tasks, catalog::get_task, catalog::update_task, catalog::delete_task,
        catalog::list_layouts,
        events::list, events::leases, crate::boot_http::explain,
        jobs::reimage, jobs::list, jobs::get, jobs::cancel, jobs::pause, jobs::resume, jobs::retry,
        jobs::report_stage, jobs::report_failure, jobs::events,
        agent::plan, agent::discovery,
        rollouts::create, rollouts::list, rollouts::get, rollouts::pause, rollouts::resume, rollouts::abort,
        network::create_subnet, network::list_subnets, network::get_subnet, network::update_subnet, network::delete_subnet,
        network::get_network, network::set_network, network::network_config,
    ),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "discovery_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "the discovery token HTTP boot gives a discovery agent as `kiln.token`: bound to the boot \
                         MAC, good for one report, until `[boot] discovery_token_secs` after the boot",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "job_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("the job's token, given to its agent or installer as `kiln.token`"))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as committed: pretty JSON, version pinned to the
/// crate's, with a trailing newline.
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut text = doc.to_pretty_json().expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

async fn openapi_doc() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], openapi_json())
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi_doc))
        .route("/api/v1/whoami", get(org::whoami))
        .route("/api/v1/machines", post(machines::create).get(machines::list))
        .route("/api/v1/machines/bulk", post(machines::bulk_create))
        .route(
            "/api/v1/machines/{key}",
            get(machines::get).patch(machines::update).delete(machines::delete),
        )
        .route("/api/v1/machines/{key}/offer", get(machines::offer))
        .route("/api/v1/machines/{key}/confirm-port", post(machines::confirm_port))
        .route("/api/v1/machines/{key}/power", get(power::status).post(power::power))
        .route("/api/v1/machines/{key}/bootdev", put(power::bootdev))
        .route("/api/v1/machines/{key}/bmc/check", post(power::check))
        .route("/api/v1/machines/{key}/discover", post(power::discover))
        .route(
            "/api/v1/machines/{key}/network",
            get(network::get_network).put(network::set_network),
        )
        .route("/api/v1/machines/{key}/network-config", get(network::network_config))
        .route(
            "/api/v1/subnets",
            post(network::create_subnet).get(network::list_subnets),
        )
        .route(
            "/api/v1/subnets/{key}",
            get(network::get_subnet)
                .patch(network::update_subnet)
                .delete(network::delete_subnet),
        )
        .route("/api/v1/sites", post(org::create_site).get(org::list_sites))
        .route("/api/v1/sites/{name}", delete(org::delete_site))
        .route("/api/v1/racks", post(org::create_rack).get(org::list_racks))
        .route("/api/v1/racks/{name}", delete(org::delete_rack))
        .route("/api/v1/tenants", post(org::create_tenant).get(org::list_tenants))
        .route("/api/v1/tenants/{name}", delete(org::delete_tenant))
        .route("/api/v1/tokens", post(org::create_token).get(org::list_tokens))
        .route("/api/v1/tokens/{key}", delete(org::revoke_token))
        .route(
            "/api/v1/os-images",
            post(catalog::create_os_image).get(catalog::list_os_images),
        )
        .route(
            "/api/v1/os-images/{key}",
            get(catalog::get_os_image)
                .patch(catalog::update_os_image)
                .delete(catalog::delete_os_image),
        )
        .route("/api/v1/tasks", post(catalog::create_task).get(catalog::list_tasks))
        .route(
            "/api/v1/tasks/{key}",
            get(catalog::get_task)
                .patch(catalog::update_task)
                .delete(catalog::delete_task),
        )
        .route("/api/v1/layouts", get(catalog::list_layouts))
        .route("/api/v1/events", get(events::list))
        .route("/api/v1/leases", get(events::leases))
        .route("/api/v1/boot/explain", get(crate::boot_http::explain))
        .route("/api/v1/machines/{key}/reimage", post(jobs::reimage))
        .route("/api/v1/jobs", get(jobs::list))
        .route("/api/v1/jobs/{id}", get(jobs::get))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/jobs/{id}/pause", post(jobs::pause))
        .route("/api/v1/jobs/{id}/resume", post(jobs::resume))
        .route("/api/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/api/v1/jobs/{id}/events", get(jobs::events))
        .route("/api/v1/rollouts", post(rollouts::create).get(rollouts::list))
        .route("/api/v1/rollouts/{id}", get(rollouts::get))
        .route("/api/v1/rollouts/{id}/pause", post(rollouts::pause))
        .route("/api/v1/rollouts/{id}/resume", post(rollouts::resume))
        .route("/api/v1/rollouts/{id}/abort", post(rollouts::abort))
        .merge(agent_routes())
}

/// The endpoints agents and installers call with the token of their job
/// or discovery (no API token): served on the API listener and on the
/// plain-HTTP boot listener (`[boot] listen`).
pub fn agent_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs/{id}/stages/{n}", post(jobs::report_stage))
        .route("/api/v1/jobs/{id}/failure", post(jobs::report_failure))
        .route("/api/v1/jobs/{id}/plan", get(agent::plan))
        .route("/api/v1/discovery", post(agent::discovery))
}
