//! The route-table test: every path and method of the OpenAPI document
//! (and every route the router serves) has a policy in
//! `kiln_server::policy::ROUTES`, and each is called under every role —
//! admin, operator, the tenant owning the object, another tenant, no
//! token, and the job's own token — with a valid request on fresh
//! objects. The status must be the one the policy declares for that cell:
//! success (2xx; a 400 or 422 there fails the test), 401, 403, or 404 for
//! another tenant's object. Every field only operators may set is sent by
//! the owning tenant, which must get 403 naming the field. The policy
//! table is also what docs/security.md shows.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln_client::Client;
use kiln_server::Settings;
use kiln_server::config::BootSettings;
use kiln_server::policy::{Auth, MinRole, ROUTES, RoutePolicy};
use kiln_test_utils::{TestServer, api_test};
use kiln_types::JobId;
use kiln_types::auth::{Role, TenantCreate, TokenCreate};
use kiln_types::job::JobState;
use reqwest::Method;
use serde_json::{Value, json};

use super::jobs::{catalog, machine, sim_with};

/// Simulated BMCs: enough for every fresh machine the test makes.
const BMCS: usize = 400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    Admin,
    Operator,
    Owner,
    OtherTenant,
    NoToken,
    JobToken,
}

const CELLS: [Cell; 6] = [
    Cell::Admin,
    Cell::Operator,
    Cell::Owner,
    Cell::OtherTenant,
    Cell::NoToken,
    Cell::JobToken,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Success,
    Status(u16),
}

/// What the policy says `cell` gets on route `r`.
fn expected(r: &RoutePolicy, cell: Cell) -> Expect {
    let role = match cell {
        Cell::Admin => Some(MinRole::Admin),
        Cell::Operator => Some(MinRole::Operator),
        Cell::Owner | Cell::OtherTenant => Some(MinRole::Tenant),
        Cell::NoToken | Cell::JobToken => None,
    };
    match (r.auth, role) {
        (Auth::Public, _) => Expect::Success,
        (Auth::JobToken, _) if cell == Cell::JobToken => Expect::Success,
        (Auth::JobToken | Auth::DiscoveryToken, _) | (Auth::Token(_), None) => Expect::Status(401),
        (Auth::Token(_), Some(_)) if cell == Cell::OtherTenant && r.owned => Expect::Status(404),
        (Auth::Token(min), Some(role)) if role >= min => Expect::Success,
        (Auth::Token(_), Some(_)) => Expect::Status(403),
    }
}

/// The server with two tenants, a simulated Redfish BMC and a catalog;
/// each call gets fresh objects.
struct World<'a> {
    srv: &'a TestServer,
    /// A simulated BMC per machine (an address is one machine's).
    bmcs: Vec<String>,
    admin: Client,
    operator: String,
    owner: String,
    other: String,
    http: reqwest::Client,
    n: AtomicU32,
    machines: AtomicU32,
}

/// A request: method, path (parameters filled in), body.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    /// The job the path names, whose token the `JobToken` cell sends.
    job: Option<JobId>,
}

impl World<'_> {
    fn next(&self) -> u32 {
        self.n.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh machine owned by `acme`, ready, with a BMC that answers.
    async fn machine(&self) -> String {
        let n = self.machines.fetch_add(1, Ordering::Relaxed);
        let host = format!("pol{n}");
        let bmc = self
            .bmcs
            .get(n as usize)
            .expect("more machines than simulated BMCs: raise BMCS");
        let mut m = machine(&host, &format!("52:54:00:70:{:02x}:{:02x}", n / 256, n % 256), bmc);
        m.state = kiln_types::machine::MachineState::Ready;
        m.owner = Some("acme".into());
        self.admin.create_machine(&m).await.unwrap();
        host
    }

    /// A fresh reimage job of a fresh machine of `acme`, active (it waits
    /// for its installer), or cancelled when `ended`.
    async fn job(&self, ended: bool) -> JobId {
        let host = self.machine().await;
        let job = self
            .admin
            .reimage(&host, &serde_json::from_value(json!({"os": "debian-12"})).unwrap())
            .await
            .unwrap();
        if ended {
            self.admin.job_action(&job.id.to_string(), "cancel").await.unwrap();
            let start = Instant::now();
            while self.admin.get_job(&job.id.to_string()).await.unwrap().job.state != JobState::Cancelled {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "job {} was not cancelled",
                    job.id
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        job.id
    }

    /// A rollout's request over a fresh machine of its own (tagged).
    async fn rollout_body(&self) -> Value {
        let tag = format!("roll{}", self.next());
        let host = self.machine().await;
        self.admin
            .update_machine(&host, &serde_json::from_value(json!({"tags": [tag]})).unwrap())
            .await
            .unwrap();
        json!({"selector": {"tag": tag}, "reimage": {"os": "debian-12"}})
    }

    async fn rollout(&self) -> String {
        let body = serde_json::from_value(self.rollout_body().await).unwrap();
        self.admin.create_rollout(&body).await.unwrap().job.id.to_string()
    }

    /// The request for route `r` on fresh objects (valid for its schema).
    async fn call(&self, r: &RoutePolicy) -> Call {
        let n = self.next();
        let mut job = None;
        let mut path = r.path.to_string();
        if path.contains("/machines/{key}") {
            let host = self.machine().await;
            if path.ends_with("/network-config") {
                let net =
                    serde_json::from_value(json!({"interfaces": [{"name": "eth0", "addresses": [{"dhcp": "v4"}]}]}));
                self.admin.set_machine_network(&host, &net.unwrap()).await.unwrap();
            }
            path = path.replace("{key}", &host);
        } else if path.contains("/jobs/{id}") {
            let id = self.job(path.ends_with("/retry")).await;
            job = Some(id);
            path = path.replace("{id}", &id.to_string()).replace("{n}", "2");
        } else if path.contains("/boot/job/{id}") {
            let id = self.job(false).await;
            job = Some(id);
            path = path.replace("{id}", &id.to_string()).replace("{file}", "user-data");
        } else if path.contains("/rollouts/{id}") {
            path = path.replace("{id}", &self.rollout().await);
        } else if path.contains("{name}") || path.contains("{key}") {
            let name = format!("x{n}");
            let made = match path.split('/').nth(3).unwrap() {
                "sites" => self
                    .admin
                    .create_site(&serde_json::from_value(json!({"name": name})).unwrap())
                    .await
                    .map(|_| name),
                "racks" => self
                    .admin
                    .create_rack(&serde_json::from_value(json!({"name": name, "site": "s0"})).unwrap())
                    .await
                    .map(|_| name),
                "tenants" => self
                    .admin
                    .create_tenant(&TenantCreate {
                        name: name.clone(),
                        description: None,
                    })
                    .await
                    .map(|_| name),
                "tokens" => self
                    .admin
                    .create_token(&TokenCreate {
                        role: Role::Operator,
                        tenant: None,
                        name: Some(name),
                        expires_at: None,
                    })
                    .await
                    .map(|t| t.info.id.to_string()),
                "os-images" => self
                    .admin
                    .create_os_image(&os_image(&name))
                    .await
                    .map(|_| format!("{name}-1")),
                "tasks" => self
                    .admin
                    .create_task(&serde_json::from_value(task(&name)).unwrap())
                    .await
                    .map(|_| name),
                "subnets" => self
                    .admin
                    .create_subnet(&serde_json::from_value(subnet(&name, n)).unwrap())
                    .await
                    .map(|_| name),
                other => panic!("no fixture for /{other}/…: add one to World::call"),
            }
            .unwrap();
            path = path.replace("{name}", &made).replace("{key}", &made);
        }
        path = path.replace("{*path}", "policy.txt");
        match r.path {
            "/boot/ipxe" => path.push_str("?mac=52:54:00:70:ff:ff"),
            "/api/v1/boot/explain" => path.push_str("?target=52:54:00:70:ff:ff"),
            _ => {}
        }
        let body = match (r.method, r.path) {
            ("POST", "/api/v1/machines") => Some(json!({"hostname": format!("new{n}")})),
            ("POST", "/api/v1/machines/bulk") => Some(json!({"machines": [{"hostname": format!("bulk{n}")}]})),
            ("PATCH", "/api/v1/machines/{key}") => Some(json!({"tags": ["edited"]})),
            ("POST", "/api/v1/machines/{key}/power") => Some(json!({"action": "on"})),
            ("PUT", "/api/v1/machines/{key}/bootdev") => Some(json!({"device": "disk", "once": true})),
            ("POST", "/api/v1/sites") => Some(json!({"name": format!("site{n}")})),
            ("POST", "/api/v1/racks") => Some(json!({"name": format!("rack{n}"), "site": "s0"})),
            ("POST", "/api/v1/tenants") => Some(json!({"name": format!("tenant{n}")})),
            ("POST", "/api/v1/tokens") => Some(json!({"role": "operator", "name": format!("tok{n}")})),
            ("POST", "/api/v1/os-images") => Some(serde_json::to_value(os_image(&format!("img{n}"))).unwrap()),
            ("PATCH", "/api/v1/os-images/{key}") => Some(json!({"min_ram_bytes": 1 << 30})),
            ("POST", "/api/v1/tasks") => Some(task(&format!("task{n}"))),
            ("PATCH", "/api/v1/tasks/{key}") => Some(json!({"content": "echo edited\n"})),
            ("POST", "/api/v1/subnets") => Some(subnet(&format!("sub{n}"), n)),
            ("PATCH", "/api/v1/subnets/{key}") => Some(json!({"mtu": 9000})),
            ("PUT", "/api/v1/machines/{key}/network") => {
                Some(json!({"interfaces": [{"name": "eth0", "addresses": [{"dhcp": "v4"}]}]}))
            }
            ("POST", "/api/v1/machines/{key}/reimage") => Some(json!({"os": "debian-12"})),
            ("POST", "/api/v1/jobs/{id}/retry") => Some(json!({})),
            ("POST", "/api/v1/jobs/{id}/stages/{n}") => Some(json!({"message": "base system installed"})),
            ("POST", "/api/v1/jobs/{id}/failure") => Some(json!({"message": "disk vdb is gone"})),
            ("POST", "/api/v1/discovery") => Some(json!({
                "boot_mac": "52:54:00:70:ff:fe",
                "hardware": {"memory_bytes": 1 << 30, "disks": [], "nics": []},
                "lldp": []
            })),
            ("POST", "/api/v1/rollouts") => Some(self.rollout_body().await),
            _ => None,
        };
        let method = Method::from_bytes(r.method.as_bytes()).unwrap();
        Call {
            method,
            path,
            body,
            job,
        }
    }

    /// Sends `call` as `cell`; the status, and the body's text.
    async fn send(&self, call: &Call, cell: Cell) -> (u16, String) {
        let token = match cell {
            Cell::Admin => Some(self.srv.admin_token.clone()),
            Cell::Operator => Some(self.operator.clone()),
            Cell::Owner => Some(self.owner.clone()),
            Cell::OtherTenant => Some(self.other.clone()),
            Cell::NoToken => None,
            Cell::JobToken => call
                .job
                .map(|id| self.srv.state.secrets.job_token(id).expose().to_string()),
        };
        let mut path = call.path.clone();
        if path.starts_with("/boot/job/")
            && let Some(t) = &token
            && cell == Cell::JobToken
        {
            path.push_str(&format!("?token={t}"));
        }
        let mut req = self
            .http
            .request(call.method.clone(), format!("{}{path}", self.srv.url));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = &call.body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        // An event stream does not end: its status is the answer.
        let text = if resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
        {
            String::new()
        } else {
            resp.text().await.unwrap_or_default()
        };
        (status, text)
    }
}

fn os_image(name: &str) -> kiln_types::catalog::OsImageCreate {
    serde_json::from_value(json!({
        "name": name, "version": "1", "arch": "x86_64", "kind": "disk-image", "tags": ["bm"],
        "min_ram_bytes": 1 << 30, "min_disk_bytes": 1 << 30,
        "source": "images/x.raw", "sha256": "ab".repeat(32)
    }))
    .unwrap()
}

/// A subnet of its own /24 (subnets may not overlap).
fn subnet(name: &str, n: u32) -> Value {
    json!({"name": name, "prefix": format!("10.{}.{}.0/24", 100 + n / 256, n % 256)})
}

fn task(name: &str) -> Value {
    json!({"name": name, "kind": "script", "content": "echo hi\n"})
}

/// Operation routes in the OpenAPI document, as `(METHOD, path)`.
fn openapi_routes() -> BTreeSet<(String, String)> {
    let doc: Value = serde_json::from_str(&kiln_server::api::openapi_json()).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// The paths the router's source declares (`.route("PATH", …)`): a route
/// served without an OpenAPI entry still needs a policy.
fn router_paths() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in ["src/api/mod.rs", "src/lib.rs"] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        for part in text.split(".route(").skip(1) {
            let path = part.trim_start().strip_prefix('"').and_then(|p| p.split('"').next());
            out.insert(
                path.unwrap_or_else(|| panic!("{file}: a .route( without a literal path"))
                    .to_string(),
            );
        }
    }
    out
}

#[test]
fn every_route_has_a_policy() {
    let table: BTreeSet<(String, String)> = ROUTES.iter().map(|r| (r.method.into(), r.path.into())).collect();
    assert_eq!(table.len(), ROUTES.len(), "a route is in policy::ROUTES twice");
    let missing: Vec<_> = openapi_routes().difference(&table).cloned().collect();
    assert!(
        missing.is_empty(),
        "routes without a policy in kiln_server::policy::ROUTES: {missing:?}"
    );
    let paths: BTreeSet<String> = ROUTES.iter().map(|r| r.path.to_string()).collect();
    let unlisted: Vec<_> = router_paths().difference(&paths).cloned().collect();
    assert!(unlisted.is_empty(), "router paths without a policy: {unlisted:?}");
    let stale: Vec<_> = paths.difference(&router_paths()).cloned().collect();
    assert!(
        stale.is_empty(),
        "policies for paths the router does not serve: {stale:?}"
    );
}

#[test]
fn docs_security_md_shows_the_policy_table() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/security.md")).unwrap();
    let table = kiln_server::policy::routes_markdown();
    assert!(
        doc.contains(&table),
        "docs/security.md's route table is stale: replace it with this one (kiln_server::policy::routes_markdown()):\n{table}"
    );
}

/// Discovery on (for `POST …/discover`), and no failed-authentication
/// limit: every no-token cell is a failure from 127.0.0.1, which would
/// otherwise turn the next calls into 429s.
fn discovery_on() -> Settings {
    Settings {
        boot: Some(BootSettings {
            discovery: true,
            ..Default::default()
        }),
        auth: Some(kiln_server::auth::AuthSettings {
            failures_per_minute: 0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

api_test!(
    every_route_answers_every_role_as_its_policy_says,
    settings = discovery_on(),
    |srv| {
        let start = Instant::now();
        let sim = sim_with(BMCS).await;
        let admin = srv.admin();
        catalog(&admin).await;
        admin
            .create_site(&serde_json::from_value(json!({"name": "s0"})).unwrap())
            .await
            .unwrap();
        std::fs::write(srv.config.artifacts_dir().join("policy.txt"), "served\n").unwrap();
        let mut tokens = vec![];
        for (tenant, role) in [
            (None, Role::Operator),
            (Some("acme"), Role::Tenant),
            (Some("globex"), Role::Tenant),
        ] {
            if let Some(t) = tenant {
                admin
                    .create_tenant(&TenantCreate {
                        name: t.into(),
                        description: None,
                    })
                    .await
                    .unwrap();
            }
            let made = admin
                .create_token(&TokenCreate {
                    role,
                    tenant: tenant.map(String::from),
                    name: None,
                    expires_at: None,
                })
                .await
                .unwrap();
            tokens.push(made.token);
        }
        let world = World {
            srv: &srv,
            bmcs: sim.bmcs().iter().map(|b| b.url().to_string()).collect(),
            admin,
            operator: tokens[0].clone(),
            owner: tokens[1].clone(),
            other: tokens[2].clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            n: AtomicU32::new(0),
            machines: AtomicU32::new(0),
        };

        let mut wrong = vec![];
        let mut cells = 0;
        for r in ROUTES {
            for cell in CELLS {
                if cell == Cell::JobToken && r.auth != Auth::JobToken {
                    continue;
                }
                let want = expected(r, cell);
                let call = world.call(r).await;
                // Discovery never changes a tenant's machine: an operator
                // discovers it once it is released.
                if r.path.ends_with("/discover") && matches!(cell, Cell::Admin | Cell::Operator) {
                    let host = call.path.split('/').nth(4).unwrap();
                    let release = serde_json::from_value(json!({"owner": null})).unwrap();
                    world.admin.update_machine(host, &release).await.unwrap();
                }
                // Issue 15: a port confirmation needs a flagged port — the
                // fixture's NIC put on a port that then shows another MAC.
                if r.path.ends_with("/confirm-port") && matches!(cell, Cell::Admin | Cell::Operator) {
                    let host = call.path.split('/').nth(4).unwrap();
                    let port = format!("policy-{host}");
                    let k = world.next() % 100;
                    let nics = serde_json::from_value(
                        json!({"nics": [{"mac": format!("52:54:00:71:{k:02}:01"), "circuit_id": port}]}),
                    )
                    .unwrap();
                    world.admin.update_machine(host, &nics).await.unwrap();
                    let other = format!("52:54:00:71:{k:02}:02").parse().unwrap();
                    srv.state.store.observe_port(other, Some(&port), None).await.unwrap();
                }
                let (status, text) = world.send(&call, cell).await;
                cells += 1;
                let ok = match want {
                    Expect::Success => (200..300).contains(&status),
                    Expect::Status(s) => status == s,
                };
                if !ok {
                    wrong.push(format!(
                        "{} {} as {cell:?}: want {want:?}, got {status}: {}",
                        r.method,
                        call.path,
                        text.chars().take(300).collect::<String>()
                    ));
                }
            }
            // Fields above a tenant: the owner sets each, and is refused by name.
            for field in r.operator_fields {
                let mut call = world.call(r).await;
                let body = call.body.get_or_insert_with(|| json!({}));
                body[*field] = match *field {
                    "once" => json!(false),
                    "from_step" => json!("validate"),
                    _ => json!(true),
                };
                let (status, text) = world.send(&call, Cell::Owner).await;
                cells += 1;
                if status != 403 || !text.contains(&format!("`{field}`")) {
                    wrong.push(format!(
                        "{} {} as Owner with `{field}` set: want 403 naming the field, got {status}: {text}",
                        r.method, call.path
                    ));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {cells} cells differ from the policy:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
        println!(
            "route table: {cells} cells on {} routes in {:.1} s",
            ROUTES.len(),
            start.elapsed().as_secs_f64()
        );
        sim.shutdown().await;
    }
);
