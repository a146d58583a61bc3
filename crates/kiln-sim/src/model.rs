//! One simulated BMC's state as plain data: its systems' power (with
//! transitions that complete after a set delay), boot overrides (a `Once`
//! override is consumed by the next boot), sessions, fault knobs and what
//! it has seen. Time is passed in, so every behaviour is deterministic and
//! tested without a clock; `lib.rs` serves it over HTTP.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How one BMC behaves. Every BMC of a fleet starts from the same spec;
/// tests change single BMCs through the handle.
#[derive(Debug, Clone)]
pub struct BmcSpec {
    /// Systems behind this BMC (a blade chassis has several).
    pub systems: usize,
    /// Whether the service has a SessionService (else basic auth only).
    pub sessions: bool,
    /// How long a power change takes before `PowerState` shows it.
    pub power_delay: Duration,
    /// Added before every answer.
    pub latency: Duration,
    /// `ResetType@Redfish.AllowableValues`.
    pub allowed_resets: Vec<String>,
    /// Whether the systems start powered on.
    pub powered_on: bool,
    pub faults: Faults,
}

impl Default for BmcSpec {
    fn default() -> Self {
        BmcSpec {
            systems: 1,
            sessions: true,
            power_delay: Duration::ZERO,
            latency: Duration::ZERO,
            allowed_resets: ["On", "ForceOff", "GracefulShutdown", "ForceRestart", "PowerCycle"]
                .map(String::from)
                .to_vec(),
            powered_on: false,
            faults: Faults::default(),
        }
    }
}

/// Faults to inject, per BMC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// The next this-many requests (any path) answer 503.
    pub error_burst: u32,
    /// Requests get no answer at all (the connection stays open).
    pub hang: bool,
    /// Every authenticated request answers 401, as with a wrong password.
    pub reject_auth: bool,
    /// Apply `error_burst` and `hang` only to requests whose path contains
    /// this (e.g. `ComputerSystem.Reset`, to lose exactly the action).
    pub only_path: Option<String>,
}

impl Faults {
    /// Whether `error_burst` and `hang` apply to a request for `path`.
    pub fn applies_to(&self, path: &str) -> bool {
        self.only_path.as_deref().is_none_or(|p| path.contains(p))
    }
}

/// A power state as the simulator keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    On,
    Off,
}

impl Power {
    fn as_str(self) -> &'static str {
        match self {
            Power::On => "On",
            Power::Off => "Off",
        }
    }
}

/// A boot the simulated machine made: where from, in which mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub system: usize,
    pub target: String,
    pub mode: String,
}

/// One system behind the BMC.
#[derive(Debug, Clone)]
pub struct System {
    pub id: String,
    pub uuid: uuid::Uuid,
    pub serial: String,
    pub power: Power,
    /// A change under way: the state it leads to and when it shows.
    pub pending: Option<(Power, Instant)>,
    pub override_enabled: String,
    pub override_target: String,
    pub override_mode: String,
    /// Bumped by every write, sent as the ETag.
    pub version: u64,
}

/// Counters a test reads to check what a driver did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    /// Requests answered 401.
    pub unauthorized: u64,
    /// Requests answered 503 by an error burst.
    pub injected_errors: u64,
    /// Requests left without an answer (`hang`).
    pub hung: u64,
    pub sessions_created: u64,
    pub sessions_deleted: u64,
    /// `ResetType`s received, in order.
    pub resets: Vec<String>,
    pub patches: u64,
}

/// A BMC: its spec, systems, sessions, boots and counters.
#[derive(Debug)]
pub struct Bmc {
    pub index: usize,
    pub spec: BmcSpec,
    pub systems: Vec<System>,
    pub sessions: HashMap<String, u64>,
    next_session: u64,
    pub boots: Vec<Boot>,
    pub stats: Stats,
}

/// An answer: status, extra headers, JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Value,
}

impl Answer {
    fn json(status: u16, body: Value) -> Self {
        Answer {
            status,
            headers: vec![],
            body,
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Answer::json(
            status,
            json!({"error": {"code": "Base.1.0.GeneralError", "message": message,
                "@Message.ExtendedInfo": [{"MessageId": "Base.1.0.GeneralError", "Message": message}]}}),
        )
    }

    fn empty(status: u16) -> Self {
        Answer::json(status, Value::Null)
    }
}

/// The credentials a request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    None,
    Basic { user: String, password: String },
    Token(String),
}

/// The deterministic UUID of system `sys` of BMC `bmc` (version 4 bits set,
/// so it parses as any other UUID).
pub fn system_uuid(bmc: usize, sys: usize) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x5e1d_0000_0000_4000_8000_0000_0000_0000 | ((bmc as u128) << 24) | sys as u128)
}

impl Bmc {
    pub fn new(index: usize, spec: BmcSpec) -> Self {
        let power = if spec.powered_on { Power::On } else { Power::Off };
        let systems = (0..spec.systems.max(1))
            .map(|s| System {
                id: (s + 1).to_string(),
                uuid: system_uuid(index, s),
                serial: format!("SIM{index:05}-{}", s + 1),
                power,
                pending: None,
                override_enabled: "Disabled".into(),
                override_target: "None".into(),
                override_mode: "UEFI".into(),
                version: 1,
            })
            .collect();
        Bmc {
            index,
            spec,
            systems,
            sessions: HashMap::new(),
            next_session: 1,
            boots: vec![],
            stats: Stats::default(),
        }
    }

    /// Completes the power changes whose time has come. A system that comes
    /// on boots: from its override target if one is set (a `Once` override
    /// is then consumed), else from its disk.
    pub fn settle(&mut self, now: Instant) {
        for (i, s) in self.systems.iter_mut().enumerate() {
            let Some((to, at)) = s.pending else { continue };
            if now < at {
                continue;
            }
            s.pending = None;
            if to == Power::On && s.power == Power::Off {
                self.boots.push(boot(i, s));
            }
            s.power = to;
        }
    }

    /// The earliest pending power change, if any: when [`Bmc::settle`]
    /// next has something to do (whoever simulates what a boot does wakes
    /// up then).
    pub fn next_change(&self) -> Option<Instant> {
        self.systems.iter().filter_map(|s| s.pending.map(|(_, at)| at)).min()
    }

    /// The system restarts by itself, as an installer does at its end: it
    /// stays on and boots again at once, from where the override says (a
    /// `Once` override is consumed). Not a BMC action: `stats.resets` does
    /// not count it. A system that is off does nothing.
    pub fn reboot_from_os(&mut self, now: Instant, sys: usize) {
        self.settle(now);
        let Some(s) = self.systems.get_mut(sys) else { return };
        if s.power == Power::On && s.pending.is_none() {
            self.boots.push(boot(sys, s));
        }
    }

    /// Takes one request through the faults (the hang is the caller's:
    /// it must not answer at all), authentication and the routes.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        now: Instant,
        method: &str,
        path: &str,
        creds: &Credentials,
        if_match: Option<&str>,
        user: &str,
        password: &str,
        body: &Value,
    ) -> Answer {
        self.stats.requests += 1;
        if self.spec.faults.error_burst > 0 && self.spec.faults.applies_to(path) {
            self.spec.faults.error_burst -= 1;
            self.stats.injected_errors += 1;
            return Answer::error(503, "simulated server error (error burst)");
        }
        self.settle(now);
        let path = path.trim_end_matches('/');
        if method == "GET" && path == "/redfish/v1" {
            return Answer::json(200, self.root());
        }
        if method == "POST" && path == "/redfish/v1/SessionService/Sessions" && self.spec.sessions {
            let ok = !self.spec.faults.reject_auth
                && body["UserName"].as_str() == Some(user)
                && body["Password"].as_str() == Some(password);
            if !ok {
                self.stats.unauthorized += 1;
                return Answer::error(401, "invalid credentials");
            }
            let id = self.next_session;
            self.next_session += 1;
            let token = format!("sim-{}-{id}-{:016x}", self.index, random_u64());
            self.sessions.insert(token.clone(), id);
            self.stats.sessions_created += 1;
            let loc = format!("/redfish/v1/SessionService/Sessions/{id}");
            return Answer {
                status: 201,
                headers: vec![("X-Auth-Token", token), ("Location", loc.clone())],
                body: json!({"@odata.id": loc, "Id": id.to_string(), "UserName": user}),
            };
        }
        let authed = !self.spec.faults.reject_auth
            && match creds {
                Credentials::None => false,
                Credentials::Basic { user: u, password: p } => u == user && p == password,
                Credentials::Token(t) => self.sessions.contains_key(t),
            };
        if !authed {
            self.stats.unauthorized += 1;
            return Answer::error(401, "authentication required");
        }
        let parts: Vec<&str> = path
            .trim_start_matches("/redfish/v1")
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        match (method, parts.as_slice()) {
            ("DELETE", ["SessionService", "Sessions", id]) if self.spec.sessions => {
                let before = self.sessions.len();
                self.sessions.retain(|_, v| v.to_string() != *id);
                if self.sessions.len() == before {
                    return Answer::error(404, "no such session");
                }
                self.stats.sessions_deleted += 1;
                Answer::empty(204)
            }
            ("GET", ["SessionService"]) if self.spec.sessions => Answer::json(
                200,
                json!({"@odata.id": "/redfish/v1/SessionService", "Id": "SessionService",
                    "Sessions": {"@odata.id": "/redfish/v1/SessionService/Sessions"}}),
            ),
            ("GET", ["Systems"]) => Answer::json(
                200,
                json!({
                    "@odata.id": "/redfish/v1/Systems",
                    "Members@odata.count": self.systems.len(),
                    "Members": self.systems.iter().map(|s| json!({"@odata.id": format!("/redfish/v1/Systems/{}", s.id)})).collect::<Vec<_>>(),
                }),
            ),
            ("GET", ["Systems", id]) => match self.system(id) {
                Some(i) => {
                    let s = &self.systems[i];
                    Answer {
                        status: 200,
                        headers: vec![("ETag", etag(s))],
                        body: self.system_json(i),
                    }
                }
                None => Answer::error(404, "no such system"),
            },
            ("PATCH", ["Systems", id]) => {
                let Some(i) = self.system(id) else {
                    return Answer::error(404, "no such system");
                };
                if let Some(tag) = if_match
                    && tag != "*"
                    && tag != etag(&self.systems[i])
                {
                    return Answer::error(412, "the ETag does not match: read the system again");
                }
                self.patch(i, body)
            }
            ("POST", ["Systems", id, "Actions", "ComputerSystem.Reset"]) => {
                let Some(i) = self.system(id) else {
                    return Answer::error(404, "no such system");
                };
                self.reset(now, i, body)
            }
            _ => Answer::error(404, "not simulated"),
        }
    }

    fn system(&self, id: &str) -> Option<usize> {
        self.systems.iter().position(|s| s.id == id)
    }

    fn root(&self) -> Value {
        let mut root = json!({
            "@odata.id": "/redfish/v1",
            "@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
            "Id": "RootService",
            "Name": "kiln simulated BMC",
            "RedfishVersion": "1.15.0",
            "UUID": system_uuid(self.index, 0xffffff).to_string(),
            "Systems": {"@odata.id": "/redfish/v1/Systems"},
        });
        if self.spec.sessions {
            root["SessionService"] = json!({"@odata.id": "/redfish/v1/SessionService"});
            root["Links"] = json!({"Sessions": {"@odata.id": "/redfish/v1/SessionService/Sessions"}});
        }
        root
    }

    fn system_json(&self, i: usize) -> Value {
        let s = &self.systems[i];
        json!({
            "@odata.id": format!("/redfish/v1/Systems/{}", s.id),
            "@odata.type": "#ComputerSystem.v1_20_0.ComputerSystem",
            "@odata.etag": etag(s),
            "Id": s.id,
            "Name": format!("sim {} system {}", self.index, s.id),
            "UUID": s.uuid.to_string(),
            "SerialNumber": s.serial,
            "PowerState": s.power.as_str(),
            "Boot": {
                "BootSourceOverrideEnabled": s.override_enabled,
                "BootSourceOverrideEnabled@Redfish.AllowableValues": ["Disabled", "Once", "Continuous"],
                "BootSourceOverrideTarget": s.override_target,
                "BootSourceOverrideTarget@Redfish.AllowableValues": ["None", "Pxe", "Hdd", "Cd", "UefiHttp", "BiosSetup"],
                "BootSourceOverrideMode": s.override_mode,
                "BootSourceOverrideMode@Redfish.AllowableValues": ["UEFI", "Legacy"],
            },
            "Actions": {"#ComputerSystem.Reset": {
                "target": format!("/redfish/v1/Systems/{}/Actions/ComputerSystem.Reset", s.id),
                "ResetType@Redfish.AllowableValues": self.spec.allowed_resets,
            }},
        })
    }

    fn patch(&mut self, i: usize, body: &Value) -> Answer {
        let Some(boot) = body.get("Boot").and_then(Value::as_object) else {
            return Answer::error(400, "only Boot can be patched");
        };
        let allowed = self.system_json(i)["Boot"].clone();
        for (k, v) in boot {
            let ok = allowed[format!("{k}@Redfish.AllowableValues")]
                .as_array()
                .is_some_and(|l| l.contains(v));
            if !ok {
                return Answer::error(400, &format!("{k} {v} is not allowed"));
            }
        }
        self.stats.patches += 1;
        let s = &mut self.systems[i];
        let text = |k: &str| boot.get(k).and_then(Value::as_str).map(str::to_string);
        if let Some(v) = text("BootSourceOverrideEnabled") {
            s.override_enabled = v;
        }
        if let Some(v) = text("BootSourceOverrideTarget") {
            s.override_target = v;
        }
        if let Some(v) = text("BootSourceOverrideMode") {
            s.override_mode = v;
        }
        s.version += 1;
        Answer::empty(204)
    }

    fn reset(&mut self, now: Instant, i: usize, body: &Value) -> Answer {
        let Some(t) = body["ResetType"].as_str() else {
            return Answer::error(400, "ResetType is missing");
        };
        if !self.spec.allowed_resets.iter().any(|a| a == t) {
            return Answer::error(400, &format!("ResetType {t} is not allowed"));
        }
        self.stats.resets.push(t.to_string());
        let at = now + self.spec.power_delay;
        let s = &mut self.systems[i];
        s.pending = match t {
            "On" | "ForceOn" => (s.power == Power::Off).then_some((Power::On, at)),
            "ForceOff" | "GracefulShutdown" => (s.power == Power::On).then_some((Power::Off, at)),
            // A restart is seen off at once, and on (booting) after the delay.
            "ForceRestart" | "PowerCycle" | "GracefulRestart" => {
                s.power = Power::Off;
                Some((Power::On, at))
            }
            _ => s.pending,
        };
        self.settle(now);
        Answer::empty(204)
    }
}

/// The boot system `i` makes now: from its override target if one is set,
/// else from its disk; a `Once` override is consumed.
fn boot(i: usize, s: &mut System) -> Boot {
    let target = if s.override_enabled == "Disabled" {
        "Hdd".to_string()
    } else {
        s.override_target.clone()
    };
    if s.override_enabled == "Once" {
        s.override_enabled = "Disabled".into();
        s.override_target = "None".into();
        s.version += 1;
    }
    Boot {
        system: i,
        target,
        mode: s.override_mode.clone(),
    }
}

fn etag(s: &System) -> String {
    format!("W/\"{}\"", s.version)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // A token only has to be unguessable enough for a simulator; if the
    // system RNG fails the token is still unique by its session number.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "admin";
    const P: &str = "secret";

    fn basic() -> Credentials {
        Credentials::Basic {
            user: U.into(),
            password: P.into(),
        }
    }

    fn call(b: &mut Bmc, now: Instant, method: &str, path: &str, body: Value) -> Answer {
        b.handle(now, method, path, &basic(), None, U, P, &body)
    }

    #[test]
    fn slow_power_on_then_one_shot_override_consumed() {
        let t0 = Instant::now();
        let mut b = Bmc::new(
            3,
            BmcSpec {
                power_delay: Duration::from_secs(5),
                ..Default::default()
            },
        );
        let a = call(
            &mut b,
            t0,
            "PATCH",
            "/redfish/v1/Systems/1",
            json!({"Boot": {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Pxe"}}),
        );
        assert_eq!(a.status, 204);
        let a = call(
            &mut b,
            t0,
            "POST",
            "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
            json!({"ResetType": "On"}),
        );
        assert_eq!(a.status, 204);
        let power = |b: &mut Bmc, t| call(b, t, "GET", "/redfish/v1/Systems/1", Value::Null).body["PowerState"].clone();
        assert_eq!(power(&mut b, t0 + Duration::from_secs(4)), "Off", "not yet");
        assert_eq!(power(&mut b, t0 + Duration::from_secs(5)), "On");
        assert_eq!(
            b.boots,
            vec![Boot {
                system: 0,
                target: "Pxe".into(),
                mode: "UEFI".into()
            }]
        );
        let sys = call(
            &mut b,
            t0 + Duration::from_secs(5),
            "GET",
            "/redfish/v1/Systems/1",
            Value::Null,
        )
        .body;
        assert_eq!(sys["Boot"]["BootSourceOverrideEnabled"], "Disabled", "consumed");
        // The next boot is from disk again.
        let t1 = t0 + Duration::from_secs(6);
        call(
            &mut b,
            t1,
            "POST",
            "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
            json!({"ResetType": "ForceRestart"}),
        );
        assert_eq!(power(&mut b, t1), "Off", "a restart shows off at once");
        assert_eq!(power(&mut b, t1 + Duration::from_secs(5)), "On");
        assert_eq!(b.boots[1].target, "Hdd");
        assert_eq!(b.stats.resets, vec!["On", "ForceRestart"]);
    }

    #[test]
    fn continuous_override_stays() {
        let t0 = Instant::now();
        let mut b = Bmc::new(0, BmcSpec::default());
        call(
            &mut b,
            t0,
            "PATCH",
            "/redfish/v1/Systems/1",
            json!({"Boot": {"BootSourceOverrideEnabled": "Continuous", "BootSourceOverrideTarget": "Cd"}}),
        );
        for _ in 0..2 {
            call(
                &mut b,
                t0,
                "POST",
                "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
                json!({"ResetType": "PowerCycle"}),
            );
        }
        assert_eq!(
            b.boots.iter().map(|b| b.target.as_str()).collect::<Vec<_>>(),
            ["Cd", "Cd"]
        );
    }

    #[test]
    fn faults_auth_and_sessions() {
        let t0 = Instant::now();
        let mut b = Bmc::new(
            0,
            BmcSpec {
                faults: Faults {
                    error_burst: 2,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        assert_eq!(call(&mut b, t0, "GET", "/redfish/v1", Value::Null).status, 503);
        assert_eq!(call(&mut b, t0, "GET", "/redfish/v1", Value::Null).status, 503);
        assert_eq!(call(&mut b, t0, "GET", "/redfish/v1/", Value::Null).status, 200);
        let none = b.handle(
            t0,
            "GET",
            "/redfish/v1/Systems",
            &Credentials::None,
            None,
            U,
            P,
            &Value::Null,
        );
        assert_eq!(none.status, 401);
        let bad = b.handle(
            t0,
            "POST",
            "/redfish/v1/SessionService/Sessions",
            &Credentials::None,
            None,
            U,
            P,
            &json!({"UserName": U, "Password": "x"}),
        );
        assert_eq!(bad.status, 401);
        let s = b.handle(
            t0,
            "POST",
            "/redfish/v1/SessionService/Sessions",
            &Credentials::None,
            None,
            U,
            P,
            &json!({"UserName": U, "Password": P}),
        );
        assert_eq!(s.status, 201);
        let token = s.headers.iter().find(|h| h.0 == "X-Auth-Token").unwrap().1.clone();
        let tok = Credentials::Token(token);
        assert_eq!(
            b.handle(t0, "GET", "/redfish/v1/Systems", &tok, None, U, P, &Value::Null)
                .status,
            200
        );
        assert_eq!(
            b.handle(
                t0,
                "DELETE",
                "/redfish/v1/SessionService/Sessions/1",
                &tok,
                None,
                U,
                P,
                &Value::Null
            )
            .status,
            204
        );
        assert_eq!(
            b.handle(t0, "GET", "/redfish/v1/Systems", &tok, None, U, P, &Value::Null)
                .status,
            401,
            "deleted"
        );
        assert_eq!(
            (
                b.stats.sessions_created,
                b.stats.sessions_deleted,
                b.stats.injected_errors
            ),
            (1, 1, 2)
        );
    }

    #[test]
    fn refusals() {
        let t0 = Instant::now();
        let mut b = Bmc::new(
            0,
            BmcSpec {
                allowed_resets: vec!["On".into(), "ForceOff".into()],
                ..Default::default()
            },
        );
        let a = call(
            &mut b,
            t0,
            "POST",
            "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
            json!({"ResetType": "PowerCycle"}),
        );
        assert_eq!(a.status, 400);
        let a = call(
            &mut b,
            t0,
            "PATCH",
            "/redfish/v1/Systems/1",
            json!({"Boot": {"BootSourceOverrideTarget": "Floppy"}}),
        );
        assert_eq!(a.status, 400);
        let boot = json!({"Boot": {"BootSourceOverrideTarget": "Pxe"}});
        let stale = b.handle(
            t0,
            "PATCH",
            "/redfish/v1/Systems/1",
            &basic(),
            Some("W/\"0\""),
            U,
            P,
            &boot,
        );
        assert_eq!(stale.status, 412);
        assert!(b.stats.patches == 0);
        let fresh = b.handle(
            t0,
            "PATCH",
            "/redfish/v1/Systems/1",
            &basic(),
            Some("W/\"1\""),
            U,
            P,
            &boot,
        );
        assert_eq!(fresh.status, 204);
        assert!(b.stats.resets.is_empty());
    }

    #[test]
    fn a_reboot_from_the_os_boots_again_without_a_bmc_reset() {
        let t0 = Instant::now();
        let mut b = Bmc::new(
            0,
            BmcSpec {
                power_delay: Duration::from_secs(2),
                ..Default::default()
            },
        );
        b.reboot_from_os(t0, 0);
        assert!(b.boots.is_empty(), "a system that is off does not reboot");
        call(
            &mut b,
            t0,
            "PATCH",
            "/redfish/v1/Systems/1",
            json!({"Boot": {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Pxe"}}),
        );
        call(
            &mut b,
            t0,
            "POST",
            "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
            json!({"ResetType": "On"}),
        );
        assert_eq!(b.next_change(), Some(t0 + Duration::from_secs(2)));
        b.reboot_from_os(t0 + Duration::from_secs(2), 0);
        assert_eq!(b.next_change(), None);
        let targets: Vec<&str> = b.boots.iter().map(|b| b.target.as_str()).collect();
        assert_eq!(targets, ["Pxe", "Hdd"], "the once override went with the first boot");
        assert_eq!(b.stats.resets, vec!["On"]);
    }

    #[test]
    fn uuids_are_distinct_and_valid() {
        let a = system_uuid(4999, 0);
        assert_ne!(a, system_uuid(4999, 1));
        assert_ne!(a, system_uuid(4998, 0));
        assert_eq!(a.get_version_num(), 4);
    }
}
