//! HTTP boot: the iPXE script a machine is told to run (`/boot/ipxe`) and
//! `kiln boot explain`'s endpoint; the files it loads (`/boot/file/…`) are
//! `boot_files`'. Scripts come from the boot decision and are rendered by
//! `kiln_boot::ipxe`, which refuses any value that could add commands.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use kiln_boot::decision::{BootAnswer, BootPolicy, decide};
use kiln_boot::ipxe::{AgentBoot, Firmware, render};
use kiln_types::MacAddr;
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::machine::{FirmwareMode, Machine};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::api::extract::ApiQuery;
use crate::auth::Caller;
use crate::config::BootSettings;
use crate::error::{ApiError, ApiResult};

/// What HTTP boot needs from the configuration.
#[derive(Debug, Clone)]
pub struct BootContext {
    pub settings: BootSettings,
    pub artifacts: PathBuf,
    /// `/boot/file/`: the artifacts directory and its in-memory cache.
    pub files: Arc<crate::boot_files::Artifacts>,
}

impl BootContext {
    fn policy(&self) -> BootPolicy {
        BootPolicy {
            discovery: self.settings.discovery,
        }
    }

    /// The discovery agent's boot for the machine booting from `mac` (on
    /// the switch port `port`, when the inventory records one for that
    /// NIC), with URLs under `base` and a fresh token its report must
    /// carry: bound to that MAC and port, good once, until `[boot]
    /// discovery_token_secs` from now.
    fn agent(&self, base: &str, mac: MacAddr, port: Option<&str>, secrets: &crate::secrets::SecretBox) -> AgentBoot {
        // The config keeps discovery_token_secs within a day.
        let expires_at = Utc::now() + chrono::Duration::seconds(self.settings.discovery_token_secs as i64);
        let mut cmdline = self.settings.agent_cmdline.clone();
        cmdline.push(format!("kiln.server={base}"));
        cmdline.push("kiln.mode=discover".into());
        cmdline.push(format!("BOOTIF={mac}"));
        cmdline.push(format!(
            "kiln.token={}",
            secrets.discovery_token(mac, port, expires_at).expose()
        ));
        AgentBoot {
            kernel: format!("{base}/boot/file/{}", self.settings.agent_kernel),
            initrd: format!("{base}/boot/file/{}", self.settings.agent_initrd),
            cmdline,
        }
    }
}

/// Query of `/boot/ipxe`: iPXE fills it from `${net0/mac}` and `${platform}`.
#[derive(Debug, Deserialize)]
pub struct IpxeQuery {
    mac: String,
    /// SMBIOS UUID and serial (`${uuid}`, `${serial}`): the machine when
    /// its MAC is not in the inventory. Empty, unexpanded or placeholder
    /// values are ignored.
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    serial: Option<String>,
    /// `efi` or `pcbios`.
    #[serde(default)]
    platform: Option<String>,
}

/// How iPXE leaves for the local disk: as iPXE says it runs (`${platform}`),
/// else as the machine's record says it boots, else BIOS.
fn firmware(platform: Option<&str>, machine: Option<&Machine>) -> Firmware {
    match platform {
        Some("efi") => Firmware::Uefi,
        Some("pcbios") => Firmware::Bios,
        _ => match machine.and_then(|m| m.firmware).map(|f| f.mode) {
            Some(FirmwareMode::Uefi) => Firmware::Uefi,
            _ => Firmware::Bios,
        },
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// The base URL machines use: configured, or the Host they asked.
pub(crate) fn base_url(ctx: &BootContext, headers: &HeaderMap) -> String {
    if let Some(b) = &ctx.settings.http_base {
        return b.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

/// The decision for `machine` now, with the arm its job set, if any
/// (URLs under `base`). A store error reads as "not armed": the machine
/// boots its disk rather than an installer.
async fn answer_for(state: &AppState, machine: Option<&Machine>, base: &str) -> BootAnswer {
    let arm = match machine {
        Some(m) => match state.store.netboot_arm(m.id).await {
            Ok(arm) => arm.map(|a| crate::jobs::netboot_arm(&a, &state.secrets, base)),
            Err(e) => {
                tracing::error!(machine = %m.hostname, error = %e, "cannot read the net-boot arm; answering as unarmed");
                None
            }
        },
        None => None,
    };
    decide(machine, arm.as_ref(), state.boot.policy(), Utc::now())
}

/// The relay circuit-id the inventory records for `machine`'s NIC `mac`:
/// what a discovery token is bound to besides the MAC, when known.
fn port_of(machine: Option<&Machine>, mac: MacAddr) -> Option<&str> {
    machine?
        .nics
        .iter()
        .find(|n| n.mac == Some(mac))
        .and_then(|n| n.circuit_id.as_deref())
}

/// Whether a firmware serial number names one machine: vendors fill the
/// field with placeholders shared by a whole product line.
pub(crate) fn is_real_serial(s: &str) -> bool {
    const PLACEHOLDERS: [&str; 8] = [
        "",
        "0",
        "none",
        "not specified",
        "default string",
        "system serial number",
        "to be filled by o.e.m.",
        "${serial:uristring}",
    ];
    let s = s.trim();
    !PLACEHOLDERS.iter().any(|p| s.eq_ignore_ascii_case(p)) && !s.chars().all(|c| c == '0' || c == ' ')
}

/// `GET /boot/ipxe?mac=…&uuid=…&serial=…&platform=…`: the script for this machine, now.
/// No token: a booting machine has none; the script holds nothing a
/// machine on this network could not be told anyway.
pub async fn ipxe_script(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<IpxeQuery>) -> Response {
    let mac: MacAddr = match q.mac.parse() {
        Ok(m) => m,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    // A MAC its flagged port showed (issue 15: a swapped server) is that
    // machine, answered with its disk, not an unknown one sent to discovery.
    let found = match state.store.find_machine_by_nic(mac, None, None).await {
        Ok(None) => state.store.find_machine_by_alert_mac(mac).await,
        other => other,
    };
    let machine = match found {
        Ok(None) => {
            let uuid = q
                .uuid
                .as_deref()
                .filter(|u| u.parse::<uuid::Uuid>().is_ok_and(|u| !u.is_nil()));
            let serial = q.serial.as_deref().filter(|s| is_real_serial(s));
            if uuid.is_none() && serial.is_none() {
                None
            } else {
                match state.store.find_machine_by_dmi(uuid, serial).await {
                    Ok(m) => m,
                    Err(e) => return ApiError::from(e).into_response(),
                }
            }
        }
        Ok(m) => m,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let base = base_url(&state.boot, &headers);
    let answer = answer_for(&state, machine.as_ref(), &base).await;
    let port = port_of(machine.as_ref(), mac);
    match render(
        &answer,
        firmware(q.platform.as_deref(), machine.as_ref()),
        &state.boot.agent(&base, mac, port, &state.secrets),
    ) {
        Ok(script) => {
            let (uuid, serial) = (q.uuid.as_deref().unwrap_or(""), q.serial.as_deref().unwrap_or(""));
            tracing::info!(%mac, uuid, serial, reason = answer.reason(), "ipxe script");
            if matches!(answer, BootAnswer::Discovery { .. }) {
                // Any machine on the network may get here: say so, and
                // what its token is good for.
                tracing::info!(
                    %mac,
                    port = port.unwrap_or("unknown"),
                    token_secs = state.boot.settings.discovery_token_secs,
                    "discovery boot ([boot] discovery is on): a one-report discovery token bound to this MAC"
                );
            }
            text(StatusCode::OK, script)
        }
        Err(e) => {
            tracing::error!(%mac, error = %e, "cannot render a boot script");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "kiln cannot render a boot script for this machine: see the server log\n".into(),
            )
        }
    }
}

/// Which machine to explain, and for which firmware.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExplainQuery {
    /// Hostname, machine id or MAC address.
    pub target: String,
    /// `efi` or `pcbios` (default).
    #[serde(default)]
    pub platform: Option<String>,
}

/// What a machine would be told if it net-booted now, and why.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BootExplain {
    pub target: String,
    /// Hostname of the machine the target names, if it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// `no_answer`, `discovery`, `install` or `local_disk`.
    pub answer: String,
    pub reason: String,
    /// The iPXE script it would get (the job token, if any, redacted).
    pub script: String,
}

#[utoipa::path(get, path = "/api/v1/boot/explain", tag = "boot", params(ExplainQuery),
    responses((status = 200, body = BootExplain), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn explain(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ExplainQuery>,
) -> ApiResult<Json<BootExplain>> {
    caller.require_operator()?;
    let machine = match q.target.parse::<MacAddr>() {
        // As `/boot/ipxe` finds it: a MAC its flagged port showed is that machine.
        Ok(mac) => match state.store.find_machine_by_nic(mac, None, None).await? {
            None => state.store.find_machine_by_alert_mac(mac).await?,
            found => found,
        },
        Err(_) => Some(state.store.get_machine(&q.target, None).await?),
    };
    let base = base_url(&state.boot, &headers);
    let answer = answer_for(&state, machine.as_ref(), &base).await;
    // The discovery token is made for the MAC asked about (or any of the
    // machine's); it is redacted below anyway.
    let mac = q
        .target
        .parse::<MacAddr>()
        .ok()
        .or_else(|| machine.as_ref().and_then(|m| m.nics.iter().find_map(|n| n.mac)))
        .unwrap_or_else(|| "00:00:00:00:00:00".parse().expect("a MAC"));
    let script = render(
        &answer,
        firmware(q.platform.as_deref(), machine.as_ref()),
        &state
            .boot
            .agent(&base, mac, port_of(machine.as_ref(), mac), &state.secrets),
    )
    .map_err(|e| ApiError::bad_request(format!("the boot script cannot be rendered: {e}")))?;
    let kind = serde_json::to_value(&answer)
        .ok()
        .and_then(|v| v.get("answer").and_then(|a| a.as_str()).map(str::to_string))
        .unwrap_or_default();
    // Tokens (a job's — also inside an installer's preseed URL —, or a
    // discovery token) are not for the operator's eyes.
    let script = kiln_boot::ipxe::redact(&script);
    Ok(Json(BootExplain {
        target: q.target,
        machine: machine.map(|m| m.hostname.to_string()),
        answer: kind,
        reason: answer.reason().to_string(),
        script,
    }))
}

/// The job file that is the machine's network-config (not a template).
const NETWORK_CONFIG: &str = "network-config";

/// `?token=` of `/boot/job/…`: installers fetch `preseed/url=` and `ks=`
/// without headers, so the job token rides in the query (the request log
/// records paths only).
#[derive(Debug, Deserialize)]
pub struct JobFileQuery {
    #[serde(default)]
    token: Option<String>,
}

/// `GET /boot/job/{id}/{preseed|kickstart|user-data|meta-data|ignition|network-config}?token=…`:
/// the installer file of a running reimage, rendered from its OS image's
/// template (or kiln's built-in one) with the machine and the job, or the
/// machine's network-config from the inventory. Only with the job's token,
/// only while the job runs.
pub async fn job_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::extract::Path((id, file)): axum::extract::Path<(String, String)>,
    Query(q): Query<JobFileQuery>,
) -> Response {
    use kiln_boot::templates::{InstallPlan, TemplateContext, TemplateKind};
    let kind = TemplateKind::parse(&file);
    if kind.is_none() && file != NETWORK_CONFIG {
        return text(
            StatusCode::NOT_FOUND,
            "no such file: a job serves preseed, kickstart, user-data, meta-data, ignition and network-config\n".into(),
        );
    }
    let Ok(id) = id.parse::<kiln_types::JobId>() else {
        return text(StatusCode::NOT_FOUND, "no such job\n".into());
    };
    if !q.token.as_deref().is_some_and(|t| state.secrets.check_job_token(id, t)) {
        return text(
            StatusCode::UNAUTHORIZED,
            format!("give job {id}'s token as ?token= (the kiln.token kernel argument)\n"),
        );
    }
    let job = match state.store.get_job(id).await {
        Ok(j) => j,
        Err(e) => return ApiError::from(e).into_response(),
    };
    if job.state.is_final() {
        return text(StatusCode::GONE, format!("job {id} has ended ({})\n", job.state));
    }
    let spec: kiln_types::job::ReimageSpec = match serde_json::from_value(job.spec.clone()) {
        Ok(s) => s,
        Err(_) => return text(StatusCode::NOT_FOUND, format!("job {id} is not a reimage\n")),
    };
    let Some(machine_id) = job.machine_id else {
        return text(StatusCode::GONE, "the job's machine was deleted\n".into());
    };
    let machine_key = machine_id.to_string();
    let (machine, image) = match tokio::try_join!(
        state.store.get_machine(&machine_key, None),
        state.store.get_os_image(&spec.os_image)
    ) {
        Ok(both) => both,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (net, subnets) = match state.store.get_machine_network(machine.id).await {
        Ok(n) => n,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(kind) = kind else {
        return match kiln_boot::network::network_config(&net, &subnets) {
            Some(body) => {
                tracing::info!(job = %id, machine = %machine.hostname, file = NETWORK_CONFIG, "installer file");
                text(StatusCode::OK, body)
            }
            None => text(
                StatusCode::NOT_FOUND,
                format!("machine {} has no network in the inventory\n", machine.hostname),
            ),
        };
    };
    let boot_mac = machine.nics.iter().find_map(|n| n.mac);
    let install_net = kiln_boot::network::install_network(&net, &subnets, boot_mac);
    let plan = InstallPlan {
        job_id: id.to_string(),
        token: state.secrets.job_token(id),
        hostname: Some(spec.hostname),
        layout: spec.layout,
        ssh_keys: spec.ssh_keys,
        root_password_hash: spec.root_password_hash,
        post_install_script: spec.post_install_script,
        callback_url: job.callback_url.clone(),
    };
    let base = base_url(&state.boot, &headers);
    let rendered = TemplateContext::new(&machine, &image, &plan, &base).and_then(|ctx| {
        let ctx = ctx.with_install_network(install_net);
        kiln_boot::templates::render(kind, image.templates.get(kind.as_str()).map(String::as_str), &ctx)
    });
    match rendered {
        Ok(body) => {
            tracing::info!(job = %id, machine = %machine.hostname, file = kind.as_str(), "installer file");
            text(StatusCode::OK, body)
        }
        Err(e) => {
            // The message names the template and line, never a value.
            tracing::warn!(job = %id, error = %e, "cannot render an installer file");
            text(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n"))
        }
    }
}
