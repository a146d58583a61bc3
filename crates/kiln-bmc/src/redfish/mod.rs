//! The Redfish driver: power and boot override through a BMC's Redfish
//! service, over HTTPS verified by default.
//!
//! - `plan`: the decisions (address, which system, which `ResetType`s, the
//!   boot override body), pure and table-tested;
//! - `tls`: the HTTP clients (rustls on ring; verified, or per-BMC insecure);
//! - `cert`: the BMC's CA certificates checked, a refused certificate named;
//! - [`RedfishDriver`]: the [`BmcDriver`] for one BMC. Each call logs in (a
//!   session, or basic auth when the service has none), does its requests
//!   within one deadline and deletes its session again — or, given
//!   [`Sessions`] (the server does), keeps the session, the service root and
//!   the system's path for the next call to the same BMC, and logs in again
//!   only when the BMC no longer takes the session.
//!
//! Sessions, system discovery, the reset mapping and the retry rule are
//! described in `docs/bmc.md`.

pub mod cert;
pub mod plan;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use tokio::time::Instant;

pub use plan::{Endpoint, RfPower, Step};
pub use tls::TlsPolicy;

use crate::{
    BmcDriver, BmcError, BootDevice, BootFirmware, BootPersistence, Identity, Password, PowerAction, PowerState,
};

/// Everything the driver needs for one BMC.
#[derive(Debug, Clone)]
pub struct RedfishConfig {
    /// `https://host[:port]` or `https://host/redfish/v1/Systems/ID`.
    pub address: String,
    pub username: String,
    pub password: Password,
    /// Accept any certificate. Explicit per BMC; the caller records it in
    /// the audit log whenever it is used.
    pub insecure: bool,
    /// Extra CA certificates (PEM) to trust for this BMC, e.g. a site's own
    /// CA that signed the BMCs' certificates.
    pub ca_pem: Option<String>,
    /// The machine's UUID and serial, to find its system among several.
    pub machine_uuid: Option<uuid::Uuid>,
    pub machine_serial: Option<String>,
    /// The longest one HTTP request may take (connect to last body byte).
    pub request_timeout: Duration,
    /// Tries for a request that may be repeated (see `docs/bmc.md`).
    pub tries: u32,
    /// The whole driver call, waiting for the power state included.
    pub deadline: Duration,
    /// How often the power state is read while waiting for it to change.
    pub poll_interval: Duration,
    /// Where logins are kept between calls; `None`: each call logs in and
    /// out.
    pub sessions: Option<Arc<Sessions>>,
}

impl RedfishConfig {
    /// Default timing: 10 s per request, 3 tries, 90 s per call (real BMCs
    /// and sushy-tools take up to tens of seconds to change power state),
    /// the state read every second.
    pub fn new(address: &str, username: &str, password: Password) -> Self {
        RedfishConfig {
            address: address.to_string(),
            username: username.to_string(),
            password,
            insecure: false,
            ca_pem: None,
            machine_uuid: None,
            machine_serial: None,
            request_timeout: Duration::from_secs(10),
            tries: 3,
            deadline: Duration::from_secs(90),
            poll_interval: Duration::from_secs(1),
            sessions: None,
        }
    }
}

/// Redfish logins kept between calls, shared by the drivers of a process.
///
/// A call that finds a login for its BMC (same address, user, password,
/// and the same machine to look for) skips reading the service root,
/// opening a session, finding the system and deleting the session: three
/// or four requests instead of eight for a power change. The BMC ends an
/// idle session itself (its `SessionTimeout`); the next call then gets a
/// 401 on its first request, logs in again and starts over (only if no
/// action had gone out yet). Like sushy (OpenStack Ironic's Redfish library), at most one
/// session per BMC stays open.
#[derive(Debug, Default)]
pub struct Sessions {
    kept: Mutex<HashMap<SessionKey, Kept>>,
}

/// Whose login it is. The password is kept as a SHA-256 digest: a changed
/// password is a new key, so it is checked by a fresh login.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    address: String,
    username: String,
    password_sha256: [u8; 32],
    machine_uuid: Option<uuid::Uuid>,
    machine_serial: Option<String>,
}

#[derive(Debug, Clone)]
struct Kept {
    root: Value,
    auth: Auth,
    system: Option<String>,
    /// The client to end the session with ([`Sessions::close_all`]; the
    /// key's address says where).
    client: reqwest::Client,
}

impl Sessions {
    fn get(&self, key: &SessionKey) -> Option<Kept> {
        self.kept.lock().expect("redfish sessions").get(key).cloned()
    }

    fn put(&self, key: SessionKey, kept: Kept) {
        self.kept.lock().expect("redfish sessions").insert(key, kept);
    }

    fn forget(&self, key: &SessionKey) {
        self.kept.lock().expect("redfish sessions").remove(key);
    }

    /// Ends every kept session on its BMC, all at once, within `wait` in
    /// all: for a server that stops, so that its sessions do not hold the
    /// BMCs' few session slots until they time out. How many BMCs said yes.
    pub async fn close_all(&self, wait: Duration) -> usize {
        use futures::StreamExt;
        let kept: Vec<(SessionKey, Kept)> = self.kept.lock().expect("redfish sessions").drain().collect();
        let closed = std::sync::atomic::AtomicUsize::new(0);
        let deletes = kept.into_iter().filter_map(|(key, k)| {
            let Auth::Session {
                token,
                path: Some(path),
            } = k.auth
            else {
                return None;
            };
            // The address parsed when the session was opened.
            let origin = plan::parse_address(&key.address).ok()?.origin;
            let closed = &closed;
            Some(async move {
                let name = plan::display_name(&key.address);
                if delete_session(&k.client, format!("{origin}{path}"), &token, wait, &name).await {
                    closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        });
        let closing = futures::stream::iter(deletes).for_each_concurrent(64, |delete| delete);
        let _ = tokio::time::timeout(wait, closing).await;
        closed.into_inner()
    }

    /// How many BMCs have a login kept.
    pub fn len(&self) -> usize {
        self.kept.lock().expect("redfish sessions").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Redfish driver for one BMC.
#[derive(Debug)]
pub struct RedfishDriver {
    cfg: RedfishConfig,
    /// The address as shown in errors and logs (never with a password).
    name: String,
    endpoint: Endpoint,
    client: reqwest::Client,
    /// The system's path once found; a machine's system does not move.
    system: OnceLock<String>,
}

/// Whether a request may be sent again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads and writes that set a value: retried after a 5xx, a lost
    /// answer or a failed connection.
    Idempotent,
    /// Retried after a 5xx or a failed connection, not after a lost answer
    /// (creating a session: a lost answer may have left one open).
    UnlessLost,
    /// An action: retried only when the connection failed (nothing was
    /// sent); a lost answer is [`BmcError::OutcomeUnknown`] and a 5xx is
    /// returned to the caller as it is.
    Once,
}

/// An HTTP answer, the parts the driver uses.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    etag: Option<String>,
    token: Option<String>,
    location: Option<String>,
    body: Value,
}

impl Reply {
    /// The Redfish error message in the body, if any.
    fn message(&self) -> String {
        let e = &self.body["error"];
        let ext = e["@Message.ExtendedInfo"][0]["Message"].as_str();
        ext.or(e["message"].as_str())
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
enum Auth {
    Basic,
    Session { token: Password, path: Option<String> },
}

/// One driver call: its deadline, its login, the service root.
struct Call<'a> {
    d: &'a RedfishDriver,
    started: Instant,
    deadline: Instant,
    auth: Option<Auth>,
    root: Value,
    /// An action (a request sent once) has gone out in this call.
    acted: std::sync::atomic::AtomicBool,
}

impl RedfishDriver {
    pub fn new(cfg: RedfishConfig) -> Result<Self, BmcError> {
        let name = plan::display_name(&cfg.address);
        let config_err = |detail: String| BmcError::Config {
            bmc: name.clone(),
            detail,
        };
        let endpoint = plan::parse_address(&cfg.address).map_err(config_err)?;
        let policy = if cfg.insecure {
            TlsPolicy::Insecure
        } else {
            TlsPolicy::Verify {
                extra_ca_pem: cfg.ca_pem.clone(),
            }
        };
        let client = tls::client(&policy).map_err(config_err)?;
        Ok(RedfishDriver {
            cfg,
            name,
            endpoint,
            client,
            system: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &RedfishConfig {
        &self.cfg
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self, step: &str, detail: String) -> BmcError {
        BmcError::Protocol {
            bmc: self.name().to_string(),
            step: step.to_string(),
            detail,
        }
    }

    /// Logs in, runs `f`, logs out whatever `f` returned. With
    /// [`Sessions`], a kept login is used instead and kept again; if the BMC
    /// no longer takes it, `f` runs once more after a fresh login.
    ///
    /// `f` makes the call's body (a fresh one for a second run: an async
    /// closure run twice by reference would not be `Send`).
    async fn with_call<T, B>(&self, f: impl Fn() -> B) -> Result<T, BmcError>
    where
        B: AsyncFnOnce(&mut Call<'_>) -> Result<T, BmcError>,
    {
        let started = Instant::now();
        let mut c = Call {
            d: self,
            started,
            deadline: started + self.cfg.deadline,
            auth: None,
            root: Value::Null,
            acted: Default::default(),
        };
        let kept = self.cfg.sessions.as_ref().map(|s| (s, self.session_key()));
        if let Some((sessions, key)) = &kept
            && let Some(k) = sessions.get(key)
        {
            c.root = k.root;
            c.auth = Some(k.auth);
            if let Some(system) = k.system {
                let _ = self.system.set(system);
            }
            match f()(&mut c).await {
                Err(e @ BmcError::AuthFailed { .. }) => {
                    sessions.forget(key);
                    // A refused token before any action went out: nothing
                    // happened yet, so log in afresh and run again. Refused
                    // basic auth is the password itself.
                    let stale_token = matches!(c.auth, Some(Auth::Session { .. }))
                        && !c.acted.load(std::sync::atomic::Ordering::Relaxed);
                    if !stale_token {
                        return Err(e);
                    }
                    tracing::debug!(bmc = self.name(), "the kept session was refused: logging in again");
                }
                out => {
                    self.keep(&c, sessions, key);
                    return out;
                }
            }
        }
        c.login().await?;
        let out = f()(&mut c).await;
        match &kept {
            Some((sessions, key)) if !matches!(out, Err(BmcError::AuthFailed { .. })) => self.keep(&c, sessions, key),
            _ => c.logout().await,
        }
        out
    }

    fn session_key(&self) -> SessionKey {
        use sha2::Digest;
        SessionKey {
            address: self.cfg.address.clone(),
            username: self.cfg.username.clone(),
            password_sha256: sha2::Sha256::digest(self.cfg.password.expose().as_bytes()).into(),
            machine_uuid: self.cfg.machine_uuid,
            machine_serial: self.cfg.machine_serial.clone(),
        }
    }

    /// Keeps `c`'s login, root and the system found, for the next call.
    fn keep(&self, c: &Call<'_>, sessions: &Sessions, key: &SessionKey) {
        if let Some(auth) = &c.auth {
            sessions.put(
                key.clone(),
                Kept {
                    root: c.root.clone(),
                    auth: auth.clone(),
                    system: self.system.get().cloned(),
                    client: self.client.clone(),
                },
            );
        }
    }

    /// The machine's system, found once and remembered.
    async fn system_path(&self, c: &mut Call<'_>) -> Result<String, BmcError> {
        if let Some(p) = self.endpoint.system.as_ref().or(self.system.get()) {
            return Ok(p.clone());
        }
        let step = "find the system";
        let systems = c.root["Systems"]["@odata.id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/Systems", self.endpoint.root));
        let list = c.get(&systems, "list the systems").await?.body;
        let members: Vec<String> = list["Members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|x| x["@odata.id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let uuid = self.cfg.machine_uuid;
        let serial = self.cfg.machine_serial.as_deref();
        let mut candidates = Vec::with_capacity(members.len());
        for m in &members {
            // With nothing to match on, one member is the machine: no need
            // to read it.
            if members.len() == 1 && uuid.is_none() && serial.is_none() {
                candidates.push(plan::Candidate {
                    path: m.clone(),
                    ..Default::default()
                });
                break;
            }
            let body = c.get(m, "read a system").await?.body;
            candidates.push(plan::Candidate::from_json(m, &body));
        }
        let i = plan::choose_system(&candidates, uuid, serial).map_err(|detail| self.protocol(step, detail))?;
        let path = candidates.swap_remove(i).path;
        Ok(self.system.get_or_init(|| path).clone())
    }

    async fn read_system(&self, c: &mut Call<'_>) -> Result<(String, Reply), BmcError> {
        let path = self.system_path(c).await?;
        let r = c.get(&path, "read the system").await?;
        Ok((path, r))
    }

    fn power_of(&self, body: &Value) -> Result<RfPower, BmcError> {
        let raw = &body["PowerState"];
        raw.as_str().and_then(RfPower::parse).ok_or_else(|| {
            self.protocol(
                "read the power state",
                format!("PowerState is {raw}, not a Redfish power state"),
            )
        })
    }

    /// The allowed `ResetType`s: inline, or in the action's ActionInfo.
    async fn allowed_resets(&self, c: &mut Call<'_>, action: &Value) -> Result<Option<Vec<String>>, BmcError> {
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        };
        if let Some(list) = strings(&action["ResetType@Redfish.AllowableValues"]) {
            return Ok(Some(list));
        }
        if let Some(info) = action["@Redfish.ActionInfo"].as_str() {
            let body = c.get(info, "read the reset ActionInfo").await?.body;
            let params = body["Parameters"].as_array().cloned().unwrap_or_default();
            return Ok(params
                .iter()
                .find(|p| p["Name"] == "ResetType")
                .and_then(|p| strings(&p["AllowableValues"])));
        }
        Ok(None)
    }

    /// POSTs one `ResetType`. `On`, `ForceOn`, `ForceOff` and
    /// `GracefulShutdown` are sent again after a 5xx or a lost answer only
    /// when the power state shows they did not take effect; anything else is
    /// sent once.
    async fn reset(
        &self,
        c: &mut Call<'_>,
        target: &str,
        reset_type: &'static str,
        leads_to: PowerState,
    ) -> Result<(), BmcError> {
        let step = format!("ComputerSystem.Reset {reset_type}");
        let body = json!({ "ResetType": reset_type });
        let mut tries = 0;
        loop {
            tries += 1;
            let failure = match c
                .send(Method::POST, target, Some(&body), None, Retry::Once, &step)
                .await
            {
                Ok(r) if r.status.is_success() => return Ok(()),
                Ok(r) if r.status.is_server_error() => {
                    self.protocol(&step, format!("HTTP {}{}", r.status, r.message()))
                }
                Ok(r) => {
                    return Err(self.protocol(&step, format!("refused with HTTP {}{}", r.status, r.message())));
                }
                Err(e @ BmcError::OutcomeUnknown { .. }) => e,
                Err(e) => return Err(e),
            };
            if !plan::reset_is_idempotent(reset_type) || tries >= self.cfg.tries {
                return Err(failure);
            }
            // It sets a state: if the state is there (or on its way), the
            // request did reach the BMC; else sending it again is harmless.
            // If the state cannot be read (the deadline came), what is known
            // is the reset's own failure: its outcome may be unknown.
            let Ok((_, r)) = self.read_system(c).await else {
                return Err(failure);
            };
            let now = self.power_of(&r.body)?;
            if now.status() == leads_to {
                tracing::debug!(bmc = self.name(), %step, ?now, "answer lost but the power state shows it took effect");
                return Ok(());
            }
            tracing::debug!(bmc = self.name(), %step, ?now, "failed and the power state shows it did not happen: sending again");
        }
    }

    /// Reads the power state until it is `want`, or fails naming the state
    /// last seen when the call's deadline comes first.
    async fn wait_for(&self, c: &mut Call<'_>, want: PowerState, after: &str) -> Result<(), BmcError> {
        loop {
            let (_, r) = self.read_system(c).await?;
            let now = self.power_of(&r.body)?;
            if now.is(want) {
                return Ok(());
            }
            if Instant::now() + self.cfg.poll_interval >= c.deadline {
                return Err(BmcError::Timeout {
                    bmc: self.name().to_string(),
                    step: format!("the power state to become {want} after {after} (it still reads {now:?})"),
                    waited: c.started.elapsed(),
                    tries: 1,
                });
            }
            tokio::time::sleep(self.cfg.poll_interval).await;
        }
    }
}

impl Call<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.d.endpoint.origin, path)
    }

    fn auth_failed(&self, status: StatusCode, method: &Method, path: &str) -> BmcError {
        let why = if status == StatusCode::FORBIDDEN {
            "the user lacks the privilege; give it the Administrator or Operator role"
        } else {
            "wrong user or password"
        };
        BmcError::AuthFailed {
            bmc: self.d.name().to_string(),
            user: self.d.cfg.username.clone(),
            reason: format!("HTTP {status} to {method} {path} ({why}); not retried, so the account is not locked out"),
        }
    }

    /// One request with the call's deadline and the retry policy. Every
    /// HTTP answer but 401/403 comes back as a [`Reply`]; 5xx answers are
    /// retried first where the policy allows.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        retry: Retry,
        step: &str,
    ) -> Result<Reply, BmcError> {
        let d = self.d;
        let name = || d.name().to_string();
        let max = d.cfg.tries.max(1);
        let mut tries = 0;
        loop {
            tries += 1;
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(BmcError::Timeout {
                    bmc: name(),
                    step: step.to_string(),
                    waited: self.started.elapsed(),
                    tries: tries - 1,
                });
            }
            let mut rb = d
                .client
                .request(method.clone(), self.url(path))
                .timeout(remaining.min(d.cfg.request_timeout))
                .header(header::ACCEPT, "application/json");
            match &self.auth {
                Some(Auth::Session { token, .. }) => rb = rb.header("X-Auth-Token", token.expose()),
                Some(Auth::Basic) => rb = rb.basic_auth(&d.cfg.username, Some(d.cfg.password.expose())),
                None => {}
            }
            if let Some(tag) = if_match {
                rb = rb.header(header::IF_MATCH, tag);
            }
            if let Some(b) = body {
                rb = rb.json(b);
            }
            if retry == Retry::Once {
                self.acted.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let outcome = async {
                let resp = rb.send().await?;
                let status = resp.status();
                let h = resp.headers();
                let text = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
                let (etag, token, location) = (text("etag"), text("x-auth-token"), text("location"));
                let bytes = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, etag, token, location, bytes))
            }
            .await;
            let again = tries < max && Instant::now() < self.deadline;
            let err = match outcome {
                Ok((status, etag, token, location, bytes)) => {
                    tracing::debug!(bmc = d.name(), %method, path, %status, "redfish");
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        return Err(self.auth_failed(status, &method, path));
                    }
                    if status.is_server_error() && retry != Retry::Once && again {
                        backoff(tries).await;
                        continue;
                    }
                    // Not JSON (an empty 204, an HTML error page) reads as null.
                    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    let etag = etag.or_else(|| body["@odata.etag"].as_str().map(str::to_string));
                    return Ok(Reply {
                        status,
                        etag,
                        token,
                        location,
                        body,
                    });
                }
                Err(e) => e,
            };
            let (detail, bad_cert) = tls::describe(&err);
            if bad_cert {
                return Err(BmcError::Config {
                    bmc: name(),
                    detail: format!(
                        "its TLS certificate is not trusted ({detail}); give the BMC's CA certificate, or mark this BMC insecure (recorded in the audit log)"
                    ),
                });
            }
            tracing::debug!(bmc = d.name(), %method, path, error = %detail, tries, "redfish request failed");
            if err.is_connect() {
                // Nothing reached the BMC: any request may be tried again.
                if again {
                    backoff(tries).await;
                    continue;
                }
                return Err(BmcError::Unreachable {
                    bmc: name(),
                    reason: detail,
                });
            }
            // The request may have reached the BMC and its answer was lost.
            match retry {
                Retry::Idempotent if again => {
                    backoff(tries).await;
                    continue;
                }
                Retry::Once => {
                    return Err(BmcError::OutcomeUnknown {
                        bmc: name(),
                        action: step.to_string(),
                        waited: self.started.elapsed(),
                    });
                }
                _ => {
                    return Err(BmcError::Timeout {
                        bmc: name(),
                        step: format!("{step} ({detail})"),
                        waited: self.started.elapsed(),
                        tries,
                    });
                }
            }
        }
    }

    /// GET, retried; anything but 2xx is an error.
    async fn get(&self, path: &str, step: &str) -> Result<Reply, BmcError> {
        let r = self
            .send(Method::GET, path, None, None, Retry::Idempotent, step)
            .await?;
        if !r.status.is_success() {
            return Err(self
                .d
                .protocol(step, format!("GET {path}: HTTP {}{}", r.status, r.message())));
        }
        Ok(r)
    }

    /// Reads the service root (no authentication, by the standard) and
    /// opens a session where the service has them, else uses basic auth.
    async fn login(&mut self) -> Result<(), BmcError> {
        let root_path = self.d.endpoint.root.clone();
        self.root = self.get(&root_path, "read the service root").await?.body;
        let sessions = self.root["Links"]["Sessions"]["@odata.id"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                self.root
                    .get("SessionService")
                    .map(|_| format!("{root_path}/SessionService/Sessions"))
            });
        let Some(sessions) = sessions else {
            self.auth = Some(Auth::Basic);
            return Ok(());
        };
        let creds = json!({ "UserName": self.d.cfg.username, "Password": self.d.cfg.password.expose() });
        let r = self
            .send(
                Method::POST,
                &sessions,
                Some(&creds),
                None,
                Retry::UnlessLost,
                "create a session",
            )
            .await?;
        match (r.status.is_success(), r.token) {
            (true, Some(token)) => {
                let path = r
                    .location
                    .map(|l| strip_origin(&l).to_string())
                    .or_else(|| r.body["@odata.id"].as_str().map(str::to_string));
                self.auth = Some(Auth::Session {
                    token: Password::new(token),
                    path,
                });
            }
            (ok, _) => {
                // The root names a session service that does not work
                // (404/405/501, or no token): basic auth, as for a service
                // without one.
                tracing::debug!(bmc = self.d.name(), status = %r.status, token = ok, "no session: using basic auth");
                self.auth = Some(Auth::Basic);
            }
        }
        Ok(())
    }

    /// Deletes the session: one try with a short wait of its own (even past
    /// the call's deadline); a session left behind expires on the BMC.
    async fn logout(&mut self) {
        let Some(Auth::Session {
            token,
            path: Some(path),
        }) = self.auth.take()
        else {
            return;
        };
        let wait = self.d.cfg.request_timeout.min(Duration::from_secs(5));
        delete_session(&self.d.client, self.url(&path), &token, wait, self.d.name()).await;
    }
}

/// `DELETE`s a session: one try, `wait` at most. Whether the BMC said yes;
/// a session left behind expires on the BMC.
async fn delete_session(client: &reqwest::Client, url: String, token: &Password, wait: Duration, bmc: &str) -> bool {
    let res = client
        .delete(url)
        .header("X-Auth-Token", token.expose())
        .timeout(wait)
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => true,
        Ok(r) => {
            tracing::debug!(bmc, status = %r.status(), "deleting the session failed; it will expire");
            false
        }
        Err(e) => {
            tracing::debug!(bmc, error = %tls::describe(&e).0, "deleting the session failed; it will expire");
            false
        }
    }
}

/// `https://h:1/redfish/v1/SessionService/Sessions/3` → the path.
fn strip_origin(location: &str) -> &str {
    match location.find("://") {
        Some(i) => location[i + 3..].find('/').map_or("/", |j| &location[i + 3 + j..]),
        None => location,
    }
}

/// A short pause between tries: 100 ms, 200 ms, 400 ms, … at most 2 s.
async fn backoff(tries: u32) {
    let ms = 100u64 << tries.saturating_sub(1).min(4);
    tokio::time::sleep(Duration::from_millis(ms.min(2000))).await;
}

impl BmcDriver for RedfishDriver {
    fn power_status(&self) -> BoxFuture<'_, Result<PowerState, BmcError>> {
        Box::pin(self.with_call(move || {
            async move |c: &mut Call<'_>| {
                let (_, r) = self.read_system(c).await?;
                Ok(self.power_of(&r.body)?.status())
            }
        }))
    }

    fn power(&self, action: PowerAction) -> BoxFuture<'_, Result<(), BmcError>> {
        Box::pin(self.with_call(move || {
            async move |c: &mut Call<'_>| {
                let (system, r) = self.read_system(c).await?;
                let current = self.power_of(&r.body)?;
                let reset = &r.body["Actions"]["#ComputerSystem.Reset"];
                let target = reset["target"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{system}/Actions/ComputerSystem.Reset"));
                let allowed = self.allowed_resets(c, reset).await?;
                let steps =
                    plan::reset_plan(action, current, allowed.as_deref()).map_err(|what| BmcError::Unsupported {
                        bmc: self.name().to_string(),
                        what,
                    })?;
                tracing::debug!(bmc = self.name(), %action, ?current, ?steps, "power");
                let mut last = "";
                for (i, step) in steps.iter().enumerate() {
                    match *step {
                        Step::Reset(t) => {
                            // The state this reset leads to is the next wait's.
                            let leads_to = steps[i..]
                                .iter()
                                .find_map(|s| match s {
                                    Step::WaitFor(p) => Some(*p),
                                    Step::Reset(_) => None,
                                })
                                .unwrap_or(PowerState::On);
                            self.reset(c, &target, t, leads_to).await?;
                            last = t;
                        }
                        Step::WaitFor(want) => self.wait_for(c, want, last).await?,
                    }
                }
                Ok(())
            }
        }))
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        persistence: BootPersistence,
        firmware: BootFirmware,
    ) -> BoxFuture<'_, Result<(), BmcError>> {
        Box::pin(self.with_call(move || {
            async move |c: &mut Call<'_>| {
                let step = "set the boot override";
                let mut precondition_failed = false;
                loop {
                    let (system, r) = self.read_system(c).await?;
                    let patch =
                        plan::boot_patch(device, persistence, firmware, r.body.get("Boot")).map_err(|what| {
                            BmcError::Unsupported {
                                bmc: self.name().to_string(),
                                what,
                            }
                        })?;
                    // Setting the same override twice is the same override:
                    // retried like a read.
                    let p = c
                        .send(
                            Method::PATCH,
                            &system,
                            Some(&patch),
                            r.etag.as_deref(),
                            Retry::Idempotent,
                            step,
                        )
                        .await?;
                    if p.status == StatusCode::PRECONDITION_FAILED && !precondition_failed {
                        // Someone changed the system between our read and our
                        // write: read it again and write once more.
                        precondition_failed = true;
                        continue;
                    }
                    if !p.status.is_success() {
                        return Err(self.protocol(step, format!("PATCH {system}: HTTP {}{}", p.status, p.message())));
                    }
                    let (_, after) = self.read_system(c).await?;
                    let want = plan::boot_target(device);
                    let seen = &after.body["Boot"]["BootSourceOverrideTarget"];
                    if seen.as_str() != Some(want) {
                        return Err(self.protocol(
                            step,
                            format!("the BMC accepted BootSourceOverrideTarget {want} but now shows {seen}"),
                        ));
                    }
                    return Ok(());
                }
            }
        }))
    }

    fn identity(&self) -> BoxFuture<'_, Result<Identity, BmcError>> {
        Box::pin(self.with_call(move || {
            async move |c: &mut Call<'_>| {
                let (_, r) = self.read_system(c).await?;
                let text = |k: &str| {
                    r.body[k]
                        .as_str()
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                };
                Ok(Identity {
                    serial: text("SerialNumber"),
                    uuid: text("UUID").and_then(|u| uuid::Uuid::parse_str(u.trim_matches(['{', '}'])).ok()),
                })
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_paths() {
        assert_eq!(
            strip_origin("https://h:1/redfish/v1/SessionService/Sessions/3"),
            "/redfish/v1/SessionService/Sessions/3"
        );
        assert_eq!(
            strip_origin("/redfish/v1/SessionService/Sessions/3"),
            "/redfish/v1/SessionService/Sessions/3"
        );
        assert_eq!(strip_origin("http://h"), "/");
    }

    #[test]
    fn insecure_and_ca_are_config() {
        let mut cfg = RedfishConfig::new("https://127.0.0.1:1", "root", Password::new("pw"));
        cfg.ca_pem = Some("not pem".into());
        let e = RedfishDriver::new(cfg).unwrap_err();
        assert!(e.to_string().contains("holds no CERTIFICATE block"), "{e}");
        let mut cfg = RedfishConfig::new("https://root:pw@127.0.0.1:1", "root", Password::new("pw"));
        cfg.insecure = true;
        let e = RedfishDriver::new(cfg).unwrap_err().to_string();
        assert!(e.contains("must not carry a user or password"), "{e}");
        assert!(!e.contains("pw@"), "the password in the address leaked: {e}");
    }
}
