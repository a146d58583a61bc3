//! SSRF tests of the server's outbound client (issue 14): every request
//! that could reach the control plane is refused before any connection.
//!
//! Each test makes two network namespaces joined by a veth pair: "kiln"
//! (10.20.0.1, with 127.0.0.1, ::1 and 169.254.169.254 on its loopback) where
//! the client runs, and "remote" (10.20.0.2) where a webhook receiver runs.
//! In "kiln", tripwire listeners on every refused address count the
//! connections they accept; each test ends by connecting to them itself, so
//! a tripwire that could not have seen the client fails the test too.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::post;
use axum::serve::ListenerExt;
use futures::future::BoxFuture;
use kiln_server::outbound::{AllowedNet, OutboundClient, OutboundError, OutboundSettings, Resolver};

const PORT: u16 = 8080;
const KILN: &str = "10.20.0.1";
const REMOTE: &str = "10.20.0.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip(8)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted (with its devices) on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Lab {
    kiln: Netns,
    remote: Netns,
}

fn lab(tag: &str) -> Lab {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    assert!(
        root,
        "this test makes network namespaces and needs root; run the tests as root (CI does)"
    );
    let pid = std::process::id();
    let kiln = Netns::new(format!("kob-{pid}-{tag}-k"));
    let remote = Netns::new(format!("kob-{pid}-{tag}-r"));
    let (k, r) = (kiln.0.as_str(), remote.0.as_str());
    ip(&[
        "-n", k, "link", "add", "ob0", "type", "veth", "peer", "name", "ob1", "netns", r,
    ]);
    ip(&["-n", k, "addr", "add", &format!("{KILN}/24"), "dev", "ob0"]);
    ip(&["-n", r, "addr", "add", &format!("{REMOTE}/24"), "dev", "ob1"]);
    ip(&["-n", k, "link", "set", "ob0", "up"]);
    ip(&["-n", r, "link", "set", "ob1", "up"]);
    // The cloud metadata address, as a cloud host has it.
    ip(&["-n", k, "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    Lab { kiln, remote }
}

/// Moves the calling thread into `ns` (a thread's sockets live in its
/// namespace; threads it starts inherit it).
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the namespace");
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Runs `body` on a thread of its own inside `ns`, on a runtime of its own.
fn run_in<F, Fut, T>(ns: &str, body: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body())
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// The webhook receiver in "remote": records what it is sent, counts the
/// connections it accepts.
struct Receiver {
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    accepted: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(ns: &str) -> Receiver {
        let bodies = Arc::new(Mutex::new(vec![]));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let (ns, b, a) = (ns.to_owned(), bodies.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = Router::new()
                    .route(
                        "/hook",
                        post(|State(b): State<Arc<Mutex<Vec<Vec<u8>>>>>, body: Bytes| async move {
                            b.lock().unwrap().push(body.to_vec());
                            "received"
                        }),
                    )
                    .route(
                        "/redirect",
                        post(|| async {
                            (
                                StatusCode::FOUND,
                                [(header::LOCATION, format!("http://127.0.0.1:{PORT}/hook"))],
                            )
                        }),
                    )
                    .route("/big", post(|| async { vec![b'x'; 1 << 20] }))
                    .route(
                        "/slow",
                        post(|| async {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            "late"
                        }),
                    )
                    .route(
                        "/fail",
                        post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "receiver broke") }),
                    )
                    .with_state(b);
                let listener = tokio::net::TcpListener::bind((REMOTE, PORT))
                    .await
                    .expect("bind the receiver")
                    .tap_io(move |_| {
                        a.fetch_add(1, Ordering::SeqCst);
                    });
                ready.send(()).unwrap();
                // Not graceful: /slow would hold the stop for a minute.
                tokio::select! {
                    r = axum::serve(listener, app) => r.unwrap(),
                    _ = stopped => {}
                }
            });
        });
        is_ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the receiver starts");
        Receiver {
            bodies,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn bodies(&self) -> Vec<Vec<u8>> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Listeners on the addresses the client must never reach, in "kiln".
struct Tripwires(Vec<(SocketAddr, Arc<AtomicUsize>)>);

impl Tripwires {
    /// Loopback (both families), the metadata address and the server's own
    /// listen address. Call inside "kiln"'s runtime.
    async fn arm() -> Tripwires {
        let mut wires = vec![];
        for addr in ["127.0.0.1", "::1", "169.254.169.254", KILN] {
            let addr = SocketAddr::new(addr.parse().unwrap(), PORT);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            let hits = Arc::new(AtomicUsize::new(0));
            let h = hits.clone();
            tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    h.fetch_add(1, Ordering::SeqCst);
                    drop(conn);
                }
            });
            wires.push((addr, hits));
        }
        Tripwires(wires)
    }

    /// Every tripwire has seen `n` connections (after letting the accept
    /// loops run).
    async fn assert_seen(&self, n: usize, what: &str) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        for (addr, hits) in &self.0 {
            assert_eq!(hits.load(Ordering::SeqCst), n, "{addr} accepted connections {what}");
        }
    }

    /// Proves the tripwires would have seen the client: connects to each
    /// once, from the same namespace and runtime.
    async fn prove_they_work(&self) {
        let before: Vec<usize> = self.0.iter().map(|(_, h)| h.load(Ordering::SeqCst)).collect();
        for (addr, _) in &self.0 {
            tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("the tripwire on {addr} cannot be reached: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        for ((addr, hits), b) in self.0.iter().zip(before) {
            assert_eq!(hits.load(Ordering::SeqCst), b + 1, "the tripwire on {addr} counts");
        }
    }
}

/// Answers each lookup with the next of its answers (the last one forever),
/// and counts the lookups.
#[derive(Debug)]
struct ScriptedResolver {
    answers: Mutex<Vec<Vec<IpAddr>>>,
    lookups: AtomicUsize,
}

impl ScriptedResolver {
    fn new(answers: &[&[&str]]) -> Arc<ScriptedResolver> {
        let answers = answers
            .iter()
            .rev()
            .map(|a| a.iter().map(|ip| ip.parse().unwrap()).collect())
            .collect();
        Arc::new(ScriptedResolver {
            answers: Mutex::new(answers),
            lookups: AtomicUsize::new(0),
        })
    }
}

impl Resolver for ScriptedResolver {
    fn lookup(&self, _host: &str, _port: u16) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let mut answers = self.answers.lock().unwrap();
        let answer = if answers.len() > 1 {
            answers.pop().unwrap()
        } else {
            answers[0].clone()
        };
        Box::pin(async move { Ok(answer) })
    }
}

/// Names resolve through `resolver`; nothing here reads the test host's DNS.
#[derive(Debug)]
struct ByName(Vec<(&'static str, Arc<ScriptedResolver>)>);

impl Resolver for ByName {
    fn lookup(&self, host: &str, port: u16) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
        match self.0.iter().find(|(name, _)| *name == host) {
            Some((_, r)) => r.lookup(host, port),
            None => {
                let host = host.to_owned();
                Box::pin(async move { Err(std::io::Error::other(format!("no such test name {host}"))) })
            }
        }
    }
}

/// The server's client as "kiln" runs it: listening on 10.20.0.1, with
/// the lab's network in `allow` when asked.
fn client(allow: &[&str], resolver: Arc<dyn Resolver>) -> OutboundClient {
    let settings = OutboundSettings {
        allow: allow
            .iter()
            .map(|a| AllowedNet::try_from(a.to_string()).unwrap())
            .collect(),
        connect_timeout_secs: 2,
        timeout_secs: 2,
        max_response_bytes: 64 << 10,
    };
    OutboundClient::new(settings, vec![KILN.parse().unwrap()])
        .unwrap()
        .with_resolver(resolver)
}

fn body() -> serde_json::Value {
    serde_json::json!({"job": "0193a5e0-0000-7000-8000-000000000001", "state": "succeeded"})
}

#[test]
fn the_control_plane_is_refused_before_any_connection() {
    let lab = lab("cp");
    let remote = Receiver::start(&lab.remote.0);
    let names = ByName(vec![
        ("loop.test", ScriptedResolver::new(&[&["127.0.0.1"]])),
        ("loop6.test", ScriptedResolver::new(&[&["::1"]])),
        ("metadata.test", ScriptedResolver::new(&[&["169.254.169.254"]])),
        ("self.test", ScriptedResolver::new(&[&[KILN]])),
        // One good address does not carry a bad one.
        ("mixed.test", ScriptedResolver::new(&[&[REMOTE, "127.0.0.1"]])),
    ]);
    run_in(&lab.kiln.0, || async move {
        let wires = Tripwires::arm().await;
        // The lab's network is allowed, so only the rules under test refuse.
        let c = client(&["10.20.0.0/16"], Arc::new(names));
        for (url, says) in [
            ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address"),
            ("http://[::1]:8080/hook", "::1 is a loopback address"),
            ("http://169.254.169.254:8080/latest/meta-data/", "link-local"),
            ("http://10.20.0.1:8080/api/v1/tokens", "own addresses"),
            (
                "http://[::ffff:127.0.0.1]:8080/hook",
                "embeds the IPv4 address 127.0.0.1",
            ),
            ("http://[::ffff:10.20.0.1]:8080/hook", "own addresses"),
            ("http://2130706433:8080/hook", "loopback"),
            (
                "http://loop.test:8080/hook",
                "`loop.test` resolves to 127.0.0.1: 127.0.0.1 is a loopback address (127.0.0.0/8), which outbound requests never reach",
            ),
            ("http://loop6.test:8080/hook", "`loop6.test` resolves to ::1"),
            ("http://metadata.test:8080/hook", "resolves to 169.254.169.254"),
            ("http://self.test:8080/hook", "own addresses"),
            ("http://mixed.test:8080/hook", "`mixed.test` resolves to 127.0.0.1"),
        ] {
            let e = c.post_json(url, &body()).await.unwrap_err();
            assert!(
                e.refusal().is_some(),
                "{url}: refused by the rules, not by the network: {e}"
            );
            assert!(e.to_string().contains(says), "{url}: {e}");
            // The same words at request time (the callback URL's check).
            let e = c.check_url(url).await.unwrap_err();
            assert!(e.to_string().contains(says), "{url}: {e}");
        }
        wires.assert_seen(0, "from refused URLs").await;
        wires.prove_they_work().await;
    });
    assert_eq!(
        remote.accepted(),
        0,
        "mixed.test was refused before connecting to its good address"
    );
}

#[test]
fn a_rebinding_name_is_called_only_on_the_address_that_was_checked() {
    let lab = lab("rb");
    let remote = Receiver::start(&lab.remote.0);
    // First the receiver's address (allowed), then loopback: a rebinding
    // server's two answers.
    let rebinding = ScriptedResolver::new(&[&[REMOTE], &["127.0.0.1"]]);
    let r = rebinding.clone();
    run_in(&lab.kiln.0, || async move {
        let wires = Tripwires::arm().await;
        let c = client(&["10.20.0.0/16"], Arc::new(ByName(vec![("hooks.test", r.clone())])));
        let got = c.post_json("http://hooks.test:8080/hook", &body()).await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body, b"received");
        assert_eq!(
            r.lookups.load(Ordering::SeqCst),
            1,
            "one lookup: the request used the checked answer"
        );
        wires.assert_seen(0, "from the rebinding name").await;
        // The resolver really does rebind: the next call sees loopback, and
        // is refused.
        let e = c.post_json("http://hooks.test:8080/hook", &body()).await.unwrap_err();
        assert!(e.to_string().contains("`hooks.test` resolves to 127.0.0.1"), "{e}");
        wires.assert_seen(0, "after the rebinding").await;
        wires.prove_they_work().await;
    });
    assert_eq!(rebinding.lookups.load(Ordering::SeqCst), 2);
    assert_eq!(remote.bodies(), vec![serde_json::to_vec(&body()).unwrap()]);
}

#[test]
fn a_redirect_to_loopback_is_reported_not_followed() {
    let lab = lab("rd");
    let remote = Receiver::start(&lab.remote.0);
    run_in(&lab.kiln.0, || async move {
        let wires = Tripwires::arm().await;
        let c = client(&["10.20.0.0/16"], Arc::new(ByName(vec![])));
        let e = c
            .post_json("http://10.20.0.2:8080/redirect", &body())
            .await
            .unwrap_err();
        match &e {
            OutboundError::Redirect { status, location } => {
                assert_eq!(*status, 302);
                assert_eq!(location, "http://127.0.0.1:8080/hook");
            }
            other => panic!("expected a refused redirect, got {other}"),
        }
        assert!(e.to_string().contains("which kiln does not follow"), "{e}");
        wires.assert_seen(0, "from the redirect").await;
        wires.prove_they_work().await;
    });
    assert_eq!(remote.accepted(), 1, "the redirecting receiver was called once");
    assert!(remote.bodies().is_empty());
}

#[test]
fn a_private_receiver_is_reached_only_when_allowed() {
    let lab = lab("al");
    let remote = Receiver::start(&lab.remote.0);
    let accepted = remote.accepted.clone();
    run_in(&lab.kiln.0, || async move {
        let e = client(&[], Arc::new(ByName(vec![])))
            .post_json("http://10.20.0.2:8080/hook", &body())
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("`[outbound] allow`"),
            "says how to allow it: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "refused before connecting");
        let got = client(&["10.20.0.0/24"], Arc::new(ByName(vec![])))
            .post_json("http://10.20.0.2:8080/hook", &body())
            .await
            .unwrap();
        assert_eq!((got.status, got.body.as_slice()), (200, &b"received"[..]));
    });
    assert_eq!(remote.bodies(), vec![serde_json::to_vec(&body()).unwrap()]);
}

#[test]
fn answers_are_bounded_in_size_and_time() {
    let lab = lab("bd");
    let _remote = Receiver::start(&lab.remote.0);
    run_in(&lab.kiln.0, || async move {
        let c = client(&["10.20.0.0/16"], Arc::new(ByName(vec![])));
        let e = c.post_json("http://10.20.0.2:8080/big", &body()).await.unwrap_err();
        assert!(matches!(e, OutboundError::TooLarge { limit: 65536 }), "{e}");
        let e = c.post_json("http://10.20.0.2:8080/fail", &body()).await.unwrap_err();
        assert_eq!(e.to_string(), "answered 500: receiver broke");
        let start = Instant::now();
        let e = c.post_json("http://10.20.0.2:8080/slow", &body()).await.unwrap_err();
        assert!(matches!(e, OutboundError::Timeout(2)), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "gave up after {:?}",
            start.elapsed()
        );
        // Nothing listens on this port: a connection error, not a refusal.
        let e = c.post_json("http://10.20.0.2:9/hook", &body()).await.unwrap_err();
        assert!(matches!(e, OutboundError::Connect(_)) && e.refusal().is_none(), "{e}");
    });
}

#[test]
fn https_is_verified_against_the_system_roots() {
    let lab = lab("tl");
    // A TLS server whose certificate comes from a CA the system does not
    // trust: kiln-sim's BMC, in "remote".
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, is_ready) = std::sync::mpsc::channel();
    let ns = lab.remote.0.clone();
    let server = std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sim = kiln_sim::start(kiln_sim::SimConfig {
                ip: REMOTE.parse().unwrap(),
                base_port: 8443,
                tls: true,
                ..Default::default()
            })
            .await
            .expect("start the TLS server");
            ready.send(()).unwrap();
            let _ = stopped.await;
            sim.shutdown().await;
        });
    });
    is_ready
        .recv_timeout(Duration::from_secs(10))
        .expect("the TLS server starts");
    run_in(&lab.kiln.0, || async move {
        let c = client(&["10.20.0.0/16"], Arc::new(ByName(vec![])));
        let e = c
            .post_json("https://10.20.0.2:8443/redfish/v1", &body())
            .await
            .unwrap_err();
        assert!(e.refusal().is_none(), "the rules let it through: {e}");
        assert!(
            e.to_string().contains("invalid peer certificate"),
            "refused for its certificate: {e}"
        );
    });
    let _ = stop.send(());
    server.join().unwrap();
}
