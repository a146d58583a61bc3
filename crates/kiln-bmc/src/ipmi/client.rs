//! The thin async RMCP+ client over tokio UDP: open a session (auth caps →
//! cipher suites → Open Session → RAKP 1–4 → session privilege), send
//! commands within the call's deadline, close the session.
//!
//! Retry rule (see docs/bmc.md): a datagram lost on the way to or from the
//! BMC is retried only for requests whose repetition changes nothing —
//! reads, session set-up, and writes that set a value (boot flags, power on
//! / off). A retry repeats the same IPMI request with the same rqSeq (so a
//! late answer to the first try still matches) in a new packet with the
//! next session sequence number (a BMC drops a repeated sequence number as
//! a replay). A request that acts (power cycle, reset, soft off) is sent
//! exactly once; if its answer is lost the caller gets "outcome unknown".
//! Authentication is never retried after a refusal: one wrong password
//! costs the BMC's lock-out counter one try per call, not three.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::cmd;
use super::codec::{self, CodecError, Packet, Request, Response, SeqWindow, payload};
use super::crypto::{RakpState, SessionKeys, codes_equal};
use super::suite::{self, OfferedSuite, Suite};
use crate::{BmcError, Password};

/// How to reach and log in to one BMC.
#[derive(Clone, Debug)]
pub struct IpmiConfig {
    /// Shown in errors and logs ("host:port").
    pub name: String,
    pub addr: SocketAddr,
    pub username: String,
    pub password: Password,
    /// The BMC key K_G, when the BMC has one set.
    pub kg: Option<Password>,
    /// Privilege level asked for (default administrator).
    pub privilege: u8,
    /// How long one try waits for its answer.
    pub try_timeout: Duration,
    /// Tries per retryable request (at least 1).
    pub tries: u32,
    /// Budget for a whole driver call: session, commands and close.
    pub deadline: Duration,
}

/// Whether a request may be sent again when its answer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Repeating it changes nothing: resend up to `tries` times.
    Idempotent,
    /// It acts: send it once.
    Never,
}

/// No answer in time: the caller decides what that means for its step.
#[derive(Debug)]
struct NoAnswer {
    waited: Duration,
    tries: u32,
}

/// The socket and the time budget of one driver call.
#[derive(Debug)]
struct Transport {
    sock: UdpSocket,
    name: String,
    try_timeout: Duration,
    tries: u32,
    deadline: Instant,
}

impl Transport {
    fn unreachable(&self, e: std::io::Error) -> BmcError {
        BmcError::Unreachable {
            bmc: self.name.clone(),
            reason: e.to_string(),
        }
    }

    /// Sends what `build` makes and waits for a datagram that `accept`
    /// takes, resending (a freshly built packet) up to `tries` times for
    /// `Retry::Idempotent`. Datagrams `accept` rejects (stray, stale,
    /// forged) are dropped and the wait goes on.
    async fn exchange<T>(
        &self,
        retry: Retry,
        mut build: impl FnMut() -> Vec<u8>,
        mut accept: impl FnMut(&[u8]) -> Option<T>,
    ) -> Result<Result<T, NoAnswer>, BmcError> {
        let tries = match retry {
            Retry::Idempotent => self.tries.max(1),
            Retry::Never => 1,
        };
        let started = Instant::now();
        let mut buf = vec![0u8; 2048];
        for attempt in 1..=tries {
            if Instant::now() >= self.deadline {
                break;
            }
            let packet = build();
            self.sock.send(&packet).await.map_err(|e| self.unreachable(e))?;
            let try_end = (Instant::now() + self.try_timeout).min(self.deadline);
            loop {
                match tokio::time::timeout_at(try_end, self.sock.recv(&mut buf)).await {
                    Err(_elapsed) => {
                        tracing::debug!(bmc = %self.name, attempt, "no answer in time");
                        break;
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        // ICMP port unreachable: nothing listens there.
                        return Err(self.unreachable(e));
                    }
                    Ok(Err(e)) => return Err(self.unreachable(e)),
                    Ok(Ok(n)) => {
                        if let Some(t) = accept(&buf[..n]) {
                            return Ok(Ok(t));
                        }
                    }
                }
            }
        }
        Ok(Err(NoAnswer {
            waited: started.elapsed(),
            tries,
        }))
    }

    fn timeout(&self, step: &str, n: NoAnswer) -> BmcError {
        BmcError::Timeout {
            bmc: self.name.clone(),
            step: step.to_string(),
            waited: n.waited,
            tries: n.tries,
        }
    }

    fn protocol(&self, step: &str, detail: impl Into<String>) -> BmcError {
        BmcError::Protocol {
            bmc: self.name.clone(),
            step: step.to_string(),
            detail: detail.into(),
        }
    }

    /// A request outside any session, in an IPMI 1.5 packet.
    async fn sessionless(
        &self,
        step: &str,
        req: &Request,
        rq_seq: u8,
        retry: Retry,
    ) -> Result<Result<Response, NoAnswer>, BmcError> {
        let packet = codec::wrap_v15(&codec::encode_request(req, rq_seq));
        self.exchange(
            retry,
            || packet.clone(),
            |buf| {
                let p = codec::unwrap(buf, None).ok()?;
                let r = ipmi_payload(&p)?;
                matches_request(&r, req, rq_seq).then_some(r)
            },
        )
        .await
        .inspect(|r| {
            if r.is_err() {
                tracing::debug!(bmc = %self.name, step, "sessionless request unanswered");
            }
        })
    }

    /// A clear RMCP+ session-setup message, answered by payload type
    /// `answer` with our `tag`.
    async fn setup(&self, step: &str, ptype: u8, body: Vec<u8>, answer: u8, tag: u8) -> Result<Vec<u8>, BmcError> {
        let packet = codec::wrap_v20(ptype, 0, 0, &body, None);
        self.exchange(
            Retry::Idempotent,
            || packet.clone(),
            |buf| {
                let p = codec::unwrap(buf, None).ok()?;
                (p.payload_type == answer && p.payload.first() == Some(&tag)).then_some(p.payload)
            },
        )
        .await?
        .map_err(|n| self.timeout(step, n))
    }
}

fn ipmi_payload(p: &Packet) -> Option<Response> {
    if p.payload_type != payload::IPMI {
        return None;
    }
    codec::decode_response(&p.payload).ok()
}

fn matches_request(r: &Response, req: &Request, rq_seq: u8) -> bool {
    r.netfn == (req.netfn | 1) && r.cmd == req.cmd && r.rq_seq == (rq_seq & 0x3f)
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source works");
    b
}

/// An established RMCP+ session.
#[derive(Debug)]
pub struct Session {
    t: Transport,
    suite: Suite,
    console_sid: u32,
    bmc_sid: u32,
    keys: SessionKeys,
    seq_out: u32,
    rq_seq: u8,
    window: SeqWindow,
}

/// An IPMI completion code in words.
pub fn completion_name(cc: u8) -> &'static str {
    match cc {
        0x00 => "success",
        0x80 => "parameter not supported",
        0xc0 => "node busy",
        0xc1 => "invalid or unsupported command",
        0xc3 => "timeout while processing",
        0xc7 => "request data length invalid",
        0xc9 => "parameter out of range",
        0xcc => "invalid data field in request",
        0xd4 => "insufficient privilege level",
        0xd5 => "command not supported in present state",
        0xff => "unspecified error",
        _ => "error",
    }
}

impl Session {
    /// Opens a session: the whole handshake, within `cfg.deadline`.
    pub async fn open(cfg: &IpmiConfig) -> Result<Session, BmcError> {
        let deadline = Instant::now() + cfg.deadline;
        let bind: SocketAddr = if cfg.addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let name = cfg.name.clone();
        let unreachable = |e: std::io::Error| BmcError::Unreachable {
            bmc: name.clone(),
            reason: e.to_string(),
        };
        let sock = UdpSocket::bind(bind).await.map_err(unreachable)?;
        sock.connect(cfg.addr).await.map_err(unreachable)?;
        let t = Transport {
            sock,
            name: cfg.name.clone(),
            try_timeout: cfg.try_timeout,
            tries: cfg.tries,
            deadline,
        };
        let auth_failed = |reason: String| BmcError::AuthFailed {
            bmc: cfg.name.clone(),
            user: cfg.username.clone(),
            reason,
        };
        let unsupported = |what: String| BmcError::Unsupported {
            bmc: cfg.name.clone(),
            what,
        };
        if cfg.username.len() > 16 {
            return Err(BmcError::Config {
                bmc: cfg.name.clone(),
                detail: "IPMI user names are at most 16 bytes".into(),
            });
        }
        if cfg.password.expose().len() > 20 {
            return Err(BmcError::Config {
                bmc: cfg.name.clone(),
                detail: "IPMI 2.0 passwords are at most 20 bytes".into(),
            });
        }

        // 1. Does it speak IPMI 2.0, and does it want a BMC key?
        let step = "Get Channel Authentication Capabilities";
        let caps = t
            .sessionless(step, &cmd::get_channel_auth_caps(cfg.privilege), 0, Retry::Idempotent)
            .await?
            .map_err(|n| t.timeout(step, n))?;
        if caps.completion != 0 {
            return Err(t.protocol(step, completion_name(caps.completion)));
        }
        let caps = cmd::parse_auth_caps(&caps.data).map_err(|e| t.protocol(step, e))?;
        if !caps.ipmi20 {
            return Err(unsupported(
                "IPMI 2.0 (RMCP+): this BMC offers only IPMI 1.5, whose authentication kiln does not use".into(),
            ));
        }
        if caps.kg_required && cfg.kg.is_none() {
            return Err(auth_failed(
                "the BMC has a BMC key (K_G) set; configure it for this machine".into(),
            ));
        }

        // 2. Which suites does it list? One try only: without a list kiln
        // proposes 17 then 3, which is as safe, so a lost answer costs
        // nothing but the list.
        let offered = list_cipher_suites(&t).await?;
        let candidates = suite::candidates(offered.as_deref()).map_err(|e| unsupported(e.to_string()))?;

        // 3. Open Session with the first suite the BMC accepts.
        let console_sid = loop {
            let s = u32::from_le_bytes(random());
            if s != 0 {
                break s;
            }
        };
        let mut refused = Vec::new();
        let mut opened = None;
        for (i, s) in candidates.iter().enumerate() {
            let tag = i as u8;
            let step = format!("Open Session (cipher suite {})", s.id());
            let body = codec::open_session_request(tag, cfg.privilege, console_sid, s.algorithms());
            let raw = t
                .setup(
                    &step,
                    payload::OPEN_SESSION_REQUEST,
                    body,
                    payload::OPEN_SESSION_RESPONSE,
                    tag,
                )
                .await?;
            let r = codec::parse_open_session_response(&raw).map_err(|e| t.protocol(&step, e.to_string()))?;
            if r.status != 0 {
                let why = codec::rmcpp_status_name(r.status);
                if codec::status_means_unsupported_suite(r.status) {
                    tracing::debug!(bmc = %cfg.name, suite = s.id(), why, "suite refused, trying the next");
                    refused.push(format!("{} ({why})", s.id()));
                    continue;
                }
                if codec::status_means_auth_failure(r.status) {
                    return Err(auth_failed(format!("{step}: {why}")));
                }
                return Err(t.protocol(&step, why));
            }
            // Fail closed: the BMC must use exactly what was proposed,
            // never a weaker algorithm it picked itself.
            if r.algorithms != Some(s.algorithms()) || r.console_sid != console_sid || r.bmc_sid == 0 {
                return Err(t.protocol(
                    &step,
                    format!("the answer does not match the proposal: {:?}", r.algorithms),
                ));
            }
            opened = Some((*s, r.bmc_sid));
            break;
        }
        let Some((suite, bmc_sid)) = opened else {
            let offered_ids = offered
                .as_ref()
                .map(|o| o.iter().map(|s| s.id.to_string()).collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|| "no list".into());
            return Err(unsupported(format!(
                "cipher suite 17 or 3 is required (kiln never uses 0, 1 or 2); the BMC refused {} (it lists: {offered_ids})",
                refused.join(" and ")
            )));
        };

        // 4. RAKP 1 / 2: the BMC proves it knows the password.
        let role = 0x10 | (cfg.privilege & 0x0f); // name-only lookup
        let console_random: [u8; 16] = random();
        let user = cfg.username.as_bytes();
        let step = "RAKP 1/2";
        let raw = t
            .setup(
                step,
                payload::RAKP1,
                codec::rakp1(0x10, bmc_sid, &console_random, role, user),
                payload::RAKP2,
                0x10,
            )
            .await?;
        let r2 = codec::parse_rakp2(&raw).map_err(|e| t.protocol(step, e.to_string()))?;
        if r2.status != 0 {
            let why = codec::rmcpp_status_name(r2.status);
            return Err(if codec::status_means_auth_failure(r2.status) {
                auth_failed(format!("RAKP 2: {why}"))
            } else {
                t.protocol(step, why)
            });
        }
        if r2.console_sid != console_sid {
            return Err(t.protocol(step, "RAKP 2 names another session"));
        }
        let rakp = RakpState {
            hash: suite.hash(),
            console_session_id: console_sid,
            bmc_session_id: bmc_sid,
            console_random,
            bmc_random: r2.bmc_random,
            bmc_guid: r2.bmc_guid,
            role,
            username: user.to_vec(),
        };
        let password = cfg.password.expose().as_bytes();
        if !codes_equal(&rakp.rakp2_code(password), &r2.auth_code) {
            // Tell the BMC, so that it frees the session now (best effort,
            // no answer awaited), and do not try again: another try is
            // another strike on the BMC's lock-out counter.
            let _ = t
                .sock
                .send(&codec::wrap_v20(
                    payload::RAKP3,
                    0,
                    0,
                    &codec::rakp3(0x11, 0x0f, bmc_sid, &[]),
                    None,
                ))
                .await;
            return Err(auth_failed(
                "wrong password: the BMC's RAKP 2 code does not match it".into(),
            ));
        }

        // 5. RAKP 3 / 4: we prove it, the BMC confirms the session key.
        let step = "RAKP 3/4";
        let raw = t
            .setup(
                step,
                payload::RAKP3,
                codec::rakp3(0x11, 0, bmc_sid, &rakp.rakp3_code(password)),
                payload::RAKP4,
                0x11,
            )
            .await?;
        let r4 = codec::parse_rakp4(&raw).map_err(|e| t.protocol(step, e.to_string()))?;
        if r4.status != 0 {
            let why = codec::rmcpp_status_name(r4.status);
            return Err(if codec::status_means_auth_failure(r4.status) {
                auth_failed(format!("RAKP 4: {why}"))
            } else {
                t.protocol(step, why)
            });
        }
        let kg = cfg.kg.as_ref().map(|k| k.expose().as_bytes()).unwrap_or(password);
        let sik = rakp.sik(kg);
        if r4.console_sid != console_sid || !codes_equal(&rakp.rakp4_icv(&sik), &r4.icv) {
            return Err(t.protocol(
                step,
                "RAKP 4 integrity check value is wrong: the BMC does not hold the session key (wrong K_G, or not the BMC it claims to be)",
            ));
        }
        let keys = SessionKeys::derive(suite.hash(), &sik);
        tracing::debug!(bmc = %cfg.name, suite = suite.id(), "RMCP+ session open");

        let mut session = Session {
            t,
            suite,
            console_sid,
            bmc_sid,
            keys,
            seq_out: 0,
            rq_seq: 0,
            window: SeqWindow::default(),
        };
        // 6. Sessions start at user level; raise to what was asked for.
        let r = session
            .call(
                "Set Session Privilege Level",
                &cmd::set_session_privilege(cfg.privilege),
                Retry::Idempotent,
            )
            .await?;
        if r.completion != 0 {
            session.close().await;
            return Err(auth_failed(format!(
                "Set Session Privilege Level: {}",
                completion_name(r.completion)
            )));
        }
        Ok(session)
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Sends one request in the session and returns its answer (any
    /// completion code). With `Retry::Never`, a lost answer is
    /// `OutcomeUnknown`; otherwise `Timeout`.
    pub async fn call(&mut self, step: &str, req: &Request, retry: Retry) -> Result<Response, BmcError> {
        self.rq_seq = (self.rq_seq + 1) & 0x3f;
        let rq_seq = self.rq_seq;
        let message = codec::encode_request(req, rq_seq);
        let (keys, bmc_sid, console_sid) = (&self.keys, self.bmc_sid, self.console_sid);
        let seq_out = &mut self.seq_out;
        let window = &mut self.window;
        let res = self
            .t
            .exchange(
                retry,
                || {
                    *seq_out = codec::next_seq(*seq_out);
                    codec::wrap_v20(payload::IPMI, bmc_sid, *seq_out, &message, Some((keys, random())))
                },
                |buf| {
                    let p = match codec::unwrap(buf, Some(keys)) {
                        Ok(p) => p,
                        Err(CodecError::Integrity) => {
                            tracing::debug!("dropped a packet that failed the integrity check");
                            return None;
                        }
                        Err(_) => return None,
                    };
                    if p.session_id != console_sid || !window.accept(p.seq) {
                        return None;
                    }
                    let r = ipmi_payload(&p)?;
                    matches_request(&r, req, rq_seq).then_some(r)
                },
            )
            .await?;
        res.map_err(|n| match retry {
            Retry::Idempotent => self.t.timeout(step, n),
            Retry::Never => BmcError::OutcomeUnknown {
                bmc: self.t.name.clone(),
                action: step.to_string(),
                waited: n.waited,
            },
        })
    }

    /// Closes the session, best effort: one try, a short wait. A session
    /// that is not closed times out on the BMC by itself.
    pub async fn close(mut self) {
        self.t.tries = 1;
        self.t.deadline = self.t.deadline.max(Instant::now() + self.t.try_timeout);
        let req = cmd::close_session(self.bmc_sid);
        if let Err(e) = self.call("Close Session", &req, Retry::Idempotent).await {
            tracing::debug!(bmc = %self.t.name, error = %e, "closing the session failed");
        }
    }
}

/// Get Channel Cipher Suites, before a session. `None` when the BMC does
/// not answer it or answers with an error.
async fn list_cipher_suites(t: &Transport) -> Result<Option<Vec<OfferedSuite>>, BmcError> {
    let mut bytes = Vec::new();
    for index in 0..0x40u8 {
        let step = "Get Channel Cipher Suites";
        let r = match t
            .sessionless(step, &cmd::get_channel_cipher_suites(index), index & 0x3f, Retry::Never)
            .await?
        {
            Ok(r) => r,
            Err(_) => return Ok(None),
        };
        if r.completion != 0 || r.data.is_empty() {
            tracing::debug!(bmc = %t.name, cc = r.completion, "no cipher suite list");
            return Ok(None);
        }
        let page = &r.data[1..];
        bytes.extend_from_slice(page);
        if page.len() < 16 {
            break;
        }
    }
    match suite::parse_cipher_suite_records(&bytes) {
        Ok(list) => Ok(Some(list)),
        Err(e) => Err(t.protocol("Get Channel Cipher Suites", e)),
    }
}
