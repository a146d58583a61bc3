//! Typed HTTP client for kiln's REST API, over the types of `kiln-types`.
//! The CLI, the agent and the tests use it; it never touches the database.
//! Over `https://` it trusts the system's roots, a CA file, or exactly one
//! certificate pinned by its SHA-256 fingerprint ([`Trust`], the `tls`
//! module).

mod tls;

use std::time::Duration;

use kiln_types::agent::{DeployPlan, DiscoveryReport, DiscoveryResult};
use kiln_types::auth::{Tenant, TenantCreate, TokenCreate, TokenCreated, TokenInfo, WhoAmI};
use kiln_types::catalog::{LayoutInfo, OsImage, OsImageCreate, OsImagePatch, Task, TaskCreate, TaskPatch};
use kiln_types::error::ApiError;
use kiln_types::event::{Event, EventFilter};
use kiln_types::job::{
    Job, JobDetail, JobFilter, JobLogEntry, ReimageRequest, RetryRequest, Rollout, RolloutRequest, StageReport,
};
use kiln_types::machine::{Machine, MachineBulkCreate, MachineCreate, MachineFilter, MachineOffer, MachinePatch};
use kiln_types::network::{MachineNetwork, Subnet, SubnetCreate, SubnetDetail, SubnetPatch};
use kiln_types::page::Page;
use kiln_types::power::{
    BmcCheck, BootDeviceRequest, BootDeviceResult, PowerAction, PowerRequest, PowerResult, PowerStatus,
};
use kiln_types::site::{Rack, RackCreate, Site, SiteCreate};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use tls::{Trust, parse_fingerprint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{} ({status})", .error.message)]
    Api { status: u16, error: ApiError },
    #[error("cannot reach the kiln server at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the server's answer could not be read: {0}")]
    Decode(String),
    /// The server's certificate is not the pinned one.
    #[error(
        "refused the server at {url}: its certificate has fingerprint {seen}, not the pinned {pinned}. \
         If its certificate was replaced on purpose, read the new fingerprint on the server \
         (`kiln server fingerprint --config FILE` or `--data-dir DIR`, or \
         `openssl x509 -noout -fingerprint -sha256 -in CERT`) and set KILN_FINGERPRINT to it; \
         otherwise something between you and the server is posing as it"
    )]
    Fingerprint { url: String, pinned: String, seen: String },
    /// The server's certificate is not trusted (no pin, and no CA vouches).
    #[error(
        "cannot trust the certificate of the server at {url} ({detail}). A kiln server with a \
         generated certificate prints its fingerprint at start (and `kiln server fingerprint` shows it): \
         pin it with KILN_FINGERPRINT=sha256:…, or give the CA that signed it with KILN_CA_FILE"
    )]
    Untrusted { url: String, detail: String },
    /// The TLS settings cannot be used (an unreadable CA file…).
    #[error("{0}")]
    Tls(String),
}

impl ClientError {
    /// The HTTP status, for an error the server sent.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A connection to one kiln server with one token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// The pin and the last certificate it refused, to name both.
    pin: Option<std::sync::Arc<tls::Pin>>,
}

/// Percent-encodes one path segment (hostnames and names are plain, but an
/// id or key from a user may not be).
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Makes ring the process's TLS crypto provider, once. The workspace's
/// reqwest is built on rustls without a provider of its own (the Redfish
/// driver picks ring, and Cargo unifies features), so a plain
/// `reqwest::Client` panics unless one is installed: every binary and test
/// server calls this first, and so does [`Client::new`].
pub fn install_tls_provider() {
    // Err means one is installed already, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Client {
    /// `base` is the server URL (`http://127.0.0.1:7070`); an `https://`
    /// server is trusted by the system's roots.
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client::with_trust(base, token, &Trust::System).expect("building the HTTP client")
    }

    /// A client that trusts an `https://` server as `trust` says.
    pub fn with_trust(base: &str, token: Option<String>, trust: &Trust) -> Result<Client> {
        install_tls_provider();
        let (tls, pin) = tls::client_config(trust).map_err(ClientError::Tls)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .connect_timeout(Duration::from_secs(10))
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| ClientError::Tls(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
            pin,
        })
    }

    /// What a failed connection means: a refused pin, an untrusted
    /// certificate, or the server not reachable.
    fn connect_error(&self, source: reqwest::Error) -> ClientError {
        let url = self.base.clone();
        if let Some(pin) = &self.pin
            && let Some(seen) = pin.refused()
        {
            return ClientError::Fingerprint {
                url,
                pinned: tls::show(&pin.want),
                seen: tls::show(&seen),
            };
        }
        match tls::certificate_problem(&source) {
            Some(detail) => ClientError::Untrusted { url, detail },
            None => ClientError::Connect { url, source },
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A request to `path` on this server, with this client's TLS trust
    /// and token, for what the typed methods do not cover (boot files,
    /// extra headers in tests).
    pub fn raw(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn call<B: Serialize, Q: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: Option<&Q>,
        body: Option<&B>,
    ) -> Result<T> {
        let text = self.call_text(method, path, query, body).await?;
        let text = if text.is_empty() { "null".to_string() } else { text };
        serde_json::from_str(&text).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn call_text<B: Serialize, Q: Serialize>(
        &self,
        method: Method,
        path: &str,
        query: Option<&Q>,
        body: Option<&B>,
    ) -> Result<String> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(q) = query {
            req = req.query(q);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|source| self.connect_error(source))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| ClientError::Decode(e.to_string()))?;
        if status.is_success() {
            return Ok(text);
        }
        let error = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| ApiError {
            code: "http".into(),
            message: if text.trim().is_empty() {
                status.to_string()
            } else {
                text.trim().to_string()
            },
            details: vec![],
        });
        Err(ClientError::Api {
            status: status.as_u16(),
            error,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), (), T>(Method::GET, path, None, None).await
    }

    async fn get_q<Q: Serialize, T: DeserializeOwned>(&self, path: &str, q: &Q) -> Result<T> {
        self.call::<(), Q, T>(Method::GET, path, Some(q), None).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call::<B, (), T>(Method::POST, path, None, Some(body)).await
    }

    async fn delete_q<Q: Serialize>(&self, path: &str, q: Option<&Q>) -> Result<()> {
        self.call_text::<(), Q>(Method::DELETE, path, q, None).await.map(|_| ())
    }

    /// `GET /healthz`: `Ok` when the server and its database answer.
    pub async fn healthz(&self) -> Result<()> {
        self.call_text::<(), ()>(Method::GET, "/healthz", None, None)
            .await
            .map(|_| ())
    }

    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.get("/api/v1/openapi.json").await
    }

    pub async fn whoami(&self) -> Result<WhoAmI> {
        self.get("/api/v1/whoami").await
    }

    // ---- machines ----

    pub async fn create_machine(&self, m: &MachineCreate) -> Result<Machine> {
        self.post("/api/v1/machines", m).await
    }

    pub async fn bulk_create_machines(&self, machines: Vec<MachineCreate>) -> Result<Vec<Machine>> {
        self.post("/api/v1/machines/bulk", &MachineBulkCreate { machines })
            .await
    }

    /// Bulk create from an already-built JSON body (for raw rows).
    pub async fn bulk_create_raw(&self, body: &serde_json::Value) -> Result<Vec<Machine>> {
        self.post("/api/v1/machines/bulk", body).await
    }

    pub async fn list_machines(&self, filter: &MachineFilter) -> Result<Page<Machine>> {
        self.get_q("/api/v1/machines", filter).await
    }

    /// Every machine matching `filter`, following the cursor.
    pub async fn list_all_machines(&self, filter: &MachineFilter) -> Result<Vec<Machine>> {
        let mut filter = filter.clone();
        let mut out = vec![];
        loop {
            let page = self.list_machines(&filter).await?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => filter.cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    pub async fn get_machine(&self, key: &str) -> Result<Machine> {
        self.get(&format!("/api/v1/machines/{}", seg(key))).await
    }

    pub async fn update_machine(&self, key: &str, patch: &MachinePatch) -> Result<Machine> {
        self.call::<_, (), _>(
            Method::PATCH,
            &format!("/api/v1/machines/{}", seg(key)),
            None,
            Some(patch),
        )
        .await
    }

    pub async fn delete_machine(&self, key: &str) -> Result<()> {
        self.delete_q::<()>(&format!("/api/v1/machines/{}", seg(key)), None)
            .await
    }

    pub async fn machine_offer(&self, key: &str) -> Result<MachineOffer> {
        self.get(&format!("/api/v1/machines/{}/offer", seg(key))).await
    }

    /// Net-boots the discovery agent on machine `key` through its BMC.
    pub async fn discover_machine(&self, key: &str) -> Result<Machine> {
        self.post(
            &format!("/api/v1/machines/{}/discover", seg(key)),
            &serde_json::json!({}),
        )
        .await
    }

    /// Accepts the MAC a flagged switch port showed (issue 15).
    pub async fn confirm_port(&self, key: &str) -> Result<Machine> {
        self.post(
            &format!("/api/v1/machines/{}/confirm-port", seg(key)),
            &serde_json::json!({}),
        )
        .await
    }

    // ---- sites and racks ----

    pub async fn create_site(&self, s: &SiteCreate) -> Result<Site> {
        self.post("/api/v1/sites", s).await
    }

    pub async fn list_sites(&self) -> Result<Vec<Site>> {
        self.get("/api/v1/sites").await
    }

    pub async fn delete_site(&self, name: &str) -> Result<()> {
        self.delete_q::<()>(&format!("/api/v1/sites/{}", seg(name)), None).await
    }

    pub async fn create_rack(&self, r: &RackCreate) -> Result<Rack> {
        self.post("/api/v1/racks", r).await
    }

    pub async fn list_racks(&self, site: Option<&str>) -> Result<Vec<Rack>> {
        #[derive(Serialize)]
        struct Q<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            site: Option<&'a str>,
        }
        self.get_q("/api/v1/racks", &Q { site }).await
    }

    pub async fn delete_rack(&self, name: &str, site: Option<&str>) -> Result<()> {
        #[derive(Serialize)]
        struct Q<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            site: Option<&'a str>,
        }
        self.delete_q(&format!("/api/v1/racks/{}", seg(name)), Some(&Q { site }))
            .await
    }

    // ---- tenants and tokens ----

    pub async fn create_tenant(&self, t: &TenantCreate) -> Result<Tenant> {
        self.post("/api/v1/tenants", t).await
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        self.get("/api/v1/tenants").await
    }

    pub async fn delete_tenant(&self, name: &str) -> Result<()> {
        self.delete_q::<()>(&format!("/api/v1/tenants/{}", seg(name)), None)
            .await
    }

    pub async fn create_token(&self, t: &TokenCreate) -> Result<TokenCreated> {
        self.post("/api/v1/tokens", t).await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        self.get("/api/v1/tokens").await
    }

    pub async fn revoke_token(&self, key: &str) -> Result<TokenInfo> {
        self.call::<(), (), _>(Method::DELETE, &format!("/api/v1/tokens/{}", seg(key)), None, None)
            .await
    }

    // ---- network ----

    pub async fn create_subnet(&self, new: &SubnetCreate) -> Result<Subnet> {
        self.post("/api/v1/subnets", new).await
    }

    pub async fn list_subnets(&self) -> Result<Vec<Subnet>> {
        self.get("/api/v1/subnets").await
    }

    pub async fn get_subnet(&self, key: &str) -> Result<SubnetDetail> {
        self.get(&format!("/api/v1/subnets/{}", seg(key))).await
    }

    pub async fn update_subnet(&self, key: &str, patch: &SubnetPatch) -> Result<Subnet> {
        self.call::<_, (), _>(
            Method::PATCH,
            &format!("/api/v1/subnets/{}", seg(key)),
            None,
            Some(patch),
        )
        .await
    }

    pub async fn delete_subnet(&self, key: &str) -> Result<()> {
        self.delete_q::<()>(&format!("/api/v1/subnets/{}", seg(key)), None)
            .await
    }

    pub async fn machine_network(&self, key: &str) -> Result<MachineNetwork> {
        self.get(&format!("/api/v1/machines/{}/network", seg(key))).await
    }

    /// Replaces the machine's network; the answer has every static address.
    pub async fn set_machine_network(&self, key: &str, net: &MachineNetwork) -> Result<MachineNetwork> {
        self.call::<_, (), _>(
            Method::PUT,
            &format!("/api/v1/machines/{}/network", seg(key)),
            None,
            Some(net),
        )
        .await
    }

    /// The cloud-init network-config (YAML) the machine's new OS gets.
    pub async fn machine_network_config(&self, key: &str) -> Result<String> {
        self.call_text::<(), ()>(
            Method::GET,
            &format!("/api/v1/machines/{}/network-config", seg(key)),
            None,
            None,
        )
        .await
    }

    // ---- catalog ----

    pub async fn create_os_image(&self, i: &OsImageCreate) -> Result<OsImage> {
        self.post("/api/v1/os-images", i).await
    }

    pub async fn list_os_images(&self) -> Result<Vec<OsImage>> {
        self.get("/api/v1/os-images").await
    }

    pub async fn get_os_image(&self, key: &str) -> Result<OsImage> {
        self.get(&format!("/api/v1/os-images/{}", seg(key))).await
    }

    pub async fn update_os_image(&self, key: &str, patch: &OsImagePatch) -> Result<OsImage> {
        self.call::<_, (), _>(
            Method::PATCH,
            &format!("/api/v1/os-images/{}", seg(key)),
            None,
            Some(patch),
        )
        .await
    }

    pub async fn delete_os_image(&self, key: &str) -> Result<()> {
        self.delete_q::<()>(&format!("/api/v1/os-images/{}", seg(key)), None)
            .await
    }

    pub async fn create_task(&self, t: &TaskCreate) -> Result<Task> {
        self.post("/api/v1/tasks", t).await
    }

    pub async fn list_tasks(&self) -> Result<Vec<Task>> {
        self.get("/api/v1/tasks").await
    }

    pub async fn get_task(&self, key: &str) -> Result<Task> {
        self.get(&format!("/api/v1/tasks/{}", seg(key))).await
    }

    pub async fn update_task(&self, key: &str, patch: &TaskPatch) -> Result<Task> {
        self.call::<_, (), _>(Method::PATCH, &format!("/api/v1/tasks/{}", seg(key)), None, Some(patch))
            .await
    }

    pub async fn delete_task(&self, key: &str) -> Result<()> {
        self.delete_q::<()>(&format!("/api/v1/tasks/{}", seg(key)), None).await
    }

    pub async fn list_layouts(&self) -> Result<Vec<LayoutInfo>> {
        self.get("/api/v1/layouts").await
    }

    // ---- boot ----

    pub async fn list_leases(&self, all: bool) -> Result<Vec<kiln_types::lease::Lease>> {
        self.get_q("/api/v1/leases", &[("all", all)]).await
    }

    /// What `target` (hostname, id or MAC) would be told if it net-booted now.
    pub async fn boot_explain(&self, target: &str, platform: Option<&str>) -> Result<serde_json::Value> {
        #[derive(Serialize)]
        struct Q<'a> {
            target: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            platform: Option<&'a str>,
        }
        self.get_q("/api/v1/boot/explain", &Q { target, platform }).await
    }

    // ---- BMC: power, boot device, check ----

    /// The power state, read from the machine's BMC now.
    pub async fn power_status(&self, key: &str) -> Result<PowerStatus> {
        self.get(&format!("/api/v1/machines/{}/power", seg(key))).await
    }

    pub async fn power(&self, key: &str, action: PowerAction) -> Result<PowerResult> {
        self.post(
            &format!("/api/v1/machines/{}/power", seg(key)),
            &PowerRequest { action },
        )
        .await
    }

    /// The next boot device: until changed, or for the next boot only.
    pub async fn set_boot_device(&self, key: &str, req: &BootDeviceRequest) -> Result<BootDeviceResult> {
        self.call::<_, (), _>(
            Method::PUT,
            &format!("/api/v1/machines/{}/bootdev", seg(key)),
            None,
            Some(req),
        )
        .await
    }

    pub async fn bmc_check(&self, key: &str) -> Result<BmcCheck> {
        self.call::<(), (), _>(
            Method::POST,
            &format!("/api/v1/machines/{}/bmc/check", seg(key)),
            None,
            None,
        )
        .await
    }

    // ---- audit log ----

    pub async fn list_events(&self, filter: &EventFilter) -> Result<Page<Event>> {
        self.get_q("/api/v1/events", filter).await
    }
    // ---- jobs ----

    /// Starts a reimage of machine `key`.
    pub async fn reimage(&self, key: &str, req: &ReimageRequest) -> Result<Job> {
        self.post(&format!("/api/v1/machines/{}/reimage", seg(key)), req).await
    }

    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        self.get_q("/api/v1/jobs", filter).await
    }

    pub async fn get_job(&self, id: &str) -> Result<JobDetail> {
        self.get(&format!("/api/v1/jobs/{}", seg(id))).await
    }

    /// `cancel`, `pause` or `resume` job `id`.
    pub async fn job_action(&self, id: &str, action: &str) -> Result<Job> {
        self.call::<(), (), _>(Method::POST, &format!("/api/v1/jobs/{}/{action}", seg(id)), None, None)
            .await
    }

    pub async fn retry_job(&self, id: &str, req: &RetryRequest) -> Result<Job> {
        self.post(&format!("/api/v1/jobs/{}/retry", seg(id)), req).await
    }

    /// Reports stage `n` of job `id`; the client's token must be the job's.
    pub async fn report_stage(&self, id: &str, n: u8, message: &str) -> Result<()> {
        let body = StageReport {
            message: message.to_string(),
        };
        self.call_text::<_, ()>(
            Method::POST,
            &format!("/api/v1/jobs/{}/stages/{n}", seg(id)),
            None,
            Some(&body),
        )
        .await
        .map(|_| ())
    }

    /// Reports that job `id`'s install cannot go on; the client's token
    /// must be the job's.
    pub async fn report_failure(&self, id: &str, message: &str) -> Result<()> {
        let body = StageReport {
            message: message.to_string(),
        };
        self.call_text::<_, ()>(
            Method::POST,
            &format!("/api/v1/jobs/{}/failure", seg(id)),
            None,
            Some(&body),
        )
        .await
        .map(|_| ())
    }

    /// Follows job `id`'s event stream, calling `on_event` for each log line
    /// and once for the end; returns the final job.
    pub async fn watch_job(&self, id: &str, on_event: impl FnMut(&JobEvent)) -> Result<Job> {
        self.watch_job_after(id, 0, on_event).await
    }

    /// [`Client::watch_job`] from the log line after `after_seq` (0: from
    /// the start): how a watcher whose connection broke picks up again
    /// without seeing a line twice.
    pub async fn watch_job_after(&self, id: &str, after_seq: i64, mut on_event: impl FnMut(&JobEvent)) -> Result<Job> {
        let url = format!("{}/api/v1/jobs/{}/events", self.base, seg(id));
        let mut req = self.http.get(&url).timeout(Duration::from_secs(24 * 3600));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if after_seq > 0 {
            req = req.header("Last-Event-ID", after_seq.to_string());
        }
        let mut resp = req.send().await.map_err(|source| self.connect_error(source))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let error = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| ApiError {
                code: "http".into(),
                message: status.to_string(),
                details: vec![],
            });
            return Err(ClientError::Api {
                status: status.as_u16(),
                error,
            });
        }
        // Bytes, not text, until a whole line is in: a chunk may end inside
        // a multi-byte character of a stage message.
        let mut buf: Vec<u8> = Vec::new();
        let (mut event, mut data) = (String::new(), String::new());
        while let Some(chunk) = resp.chunk().await.map_err(|e| ClientError::Decode(e.to_string()))? {
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\r', '\n']);
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                } else if line.is_empty() && !data.is_empty() {
                    let decode = |e: serde_json::Error| ClientError::Decode(e.to_string());
                    match event.as_str() {
                        "end" => {
                            let job: Job = serde_json::from_str(&data).map_err(decode)?;
                            on_event(&JobEvent::End(job.clone()));
                            return Ok(job);
                        }
                        _ => on_event(&JobEvent::Log(serde_json::from_str(&data).map_err(decode)?)),
                    }
                    event.clear();
                    data.clear();
                }
            }
        }
        Err(ClientError::Decode("the event stream ended before the job did".into()))
    }
}

impl Client {
    // ---- the agent's calls (with a discovery or job token) ----

    /// Discovery mode's report; the client's token is the discovery token.
    pub async fn report_discovery(&self, report: &DiscoveryReport) -> Result<DiscoveryResult> {
        self.post("/api/v1/discovery", report).await
    }

    /// Deploy mode's instructions; the client's token is the job's.
    pub async fn deploy_plan(&self, job: &str) -> Result<DeployPlan> {
        self.get(&format!("/api/v1/jobs/{}/plan", seg(job))).await
    }

    // ---- rollouts ----

    pub async fn create_rollout(&self, req: &RolloutRequest) -> Result<Rollout> {
        self.post("/api/v1/rollouts", req).await
    }

    pub async fn list_rollouts(&self) -> Result<Vec<Rollout>> {
        self.get("/api/v1/rollouts").await
    }

    pub async fn get_rollout(&self, id: &str) -> Result<Rollout> {
        self.get(&format!("/api/v1/rollouts/{}", seg(id))).await
    }

    /// `pause`, `resume` or `abort` rollout `id`.
    pub async fn rollout_action(&self, id: &str, action: &str) -> Result<Rollout> {
        self.call::<(), (), _>(
            Method::POST,
            &format!("/api/v1/rollouts/{}/{action}", seg(id)),
            None,
            None,
        )
        .await
    }
}

/// What `watch_job` reports.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Log(JobLogEntry),
    End(Job),
}
