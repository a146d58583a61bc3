//! The IPMI driver against a real BMC: OpenIPMI's `ipmi_sim` on a loopback
//! port, with a chassis script that records every power and boot action
//! into a file. Between the driver and the BMC sits a small UDP relay that
//! counts what passes (RAKP attempts, Open Session proposals), can lose a
//! chosen answer, and can answer Get Channel Cipher Suites itself to play
//! a BMC that offers other suites.
//!
//! `scripts/test` installs Debian's `openipmi` (and `ipmitool`); without
//! `ipmi_sim` these tests fail with a message saying so, they do not skip.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_bmc::ipmi::IpmiDriver;
use kiln_bmc::ipmi::codec::{self, payload};
use kiln_bmc::{BmcDriver, BmcErrorKind, BootDevice, BootFirmware, BootPersistence, Password, PowerAction, PowerState};
use tokio::net::UdpSocket;

const USER: &str = "admin";
const PASSWORD: &str = "kiln-canary-pw";

/// A running ipmi_sim, killed (by PID) when dropped.
struct Sim {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

fn find_ipmi_sim() -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join("ipmi_sim");
        if p.exists() {
            return p;
        }
    }
    panic!("ipmi_sim (Debian package openipmi) is not installed: run the tests with scripts/test, which installs it");
}

const CHASSIS: &str = r#"#!/bin/sh
# ipmi_sim chassis_control hook: records every call, keeps power and boot
# device in files.
D=$(dirname "$0")
echo "$*" >>"$D/actions.log"
op=$1; shift
case $op in
get)
  for p in "$@"; do
    case $p in
      power) echo "power:$(cat "$D/power" 2>/dev/null || echo 0)" ;;
      boot) echo "boot:$(cat "$D/boot" 2>/dev/null || echo none)" ;;
      *) echo "Invalid parameter: $p"; exit 1 ;;
    esac
  done ;;
set)
  while [ $# -gt 1 ]; do
    p=$1; v=$2; shift 2
    case $p in
      power) echo "$v" >"$D/power" ;;
      boot) echo "$v" >"$D/boot" ;;
      reset|shutdown) ;;
      identify) shift ;;
      *) echo "Invalid parameter: $p"; exit 1 ;;
    esac
  done ;;
*) exit 1 ;;
esac
exit 0
"#;

/// A FRU area: version 1, its length, `header`, the fields as 8-bit
/// text, the end marker, padding and the checksum (FRU spec §9–11). A
/// one-character field cannot be written so: its type/length byte would be
/// 0xc1, the end marker.
fn fru_area(header: &[u8], fields: &[&str]) -> Vec<u8> {
    let mut a = vec![0x01, 0x00];
    a.extend_from_slice(header);
    for f in fields {
        a.push(0xc0 | f.len() as u8);
        a.extend_from_slice(f.as_bytes());
    }
    a.push(0xc1);
    while (a.len() + 1) % 8 != 0 {
        a.push(0);
    }
    a[1] = ((a.len() + 1) / 8) as u8;
    a.push(0u8.wrapping_sub(a.iter().fold(0u8, |s, b| s.wrapping_add(*b))));
    a
}

/// A 256-byte FRU image with a board area (serial `board_serial`) and a
/// product area (serial `product_serial`).
fn fru_image(board_serial: &str, product_serial: &str) -> Vec<u8> {
    let board = fru_area(&[25, 0, 0, 0], &["Acme", "X11-board", board_serial, "PN-1", ""]);
    let product = fru_area(
        &[25],
        &["Acme", "Rack 740", "PN-9", "v1", product_serial, "asset-7", ""],
    );
    let mut header = vec![0x01, 0, 0, 1, (1 + board.len() / 8) as u8, 0, 0];
    header.push(0u8.wrapping_sub(header.iter().fold(0u8, |s, b| s.wrapping_add(*b))));
    let mut image = [header, board, product].concat();
    image.resize(256, 0);
    image
}

/// The FRU the default simulated BMC serves.
const FRU_PRODUCT_SERIAL: &str = "SIM-SYS-0007";

impl Sim {
    async fn start() -> Sim {
        Sim::start_with_fru(&fru_image("SIM-BRD-0007", FRU_PRODUCT_SERIAL)).await
    }

    /// With `fru` as FRU device 0 of the BMC (served by ipmi_sim's own
    /// Read FRU Data from a file).
    async fn start_with_fru(fru: &[u8]) -> Sim {
        let bin = find_ipmi_sim();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_udp_port();
        let chassis = d.join("chassis.sh");
        std::fs::write(&chassis, CHASSIS).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&chassis, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            d.join("lan.conf"),
            format!(
                r#"name "kilntest"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid 4c616200000040008000000000000007
  endlan
  chassis_control "{chassis}"
  user 1 false "" "" user 1 none
  user 2 true "{USER}" "{PASSWORD}" admin 10 none md2 md5 straight
"#,
                chassis = chassis.display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("fru.bin"), fru).unwrap();
        // Device support 0x9f includes "FRU inventory device".
        std::fs::write(
            d.join("sim.emu"),
            format!(
                "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
                 mc_add_fru_data 0x20 0 {} file 0 \"{}\"\nmc_enable 0x20\n",
                fru.len(),
                d.join("fru.bin").display()
            ),
        )
        .unwrap();
        std::fs::create_dir(d.join("state")).unwrap();
        let log = std::fs::File::create(d.join("ipmi_sim.log")).unwrap();
        let child = Command::new(bin)
            .arg("-n")
            .arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("sim.emu"))
            .arg("-s")
            .arg(d.join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ipmi_sim");
        let sim = Sim { child, port, dir };
        sim.wait_ready().await;
        sim
    }

    /// Ready when it answers an ASF presence ping (the codec's ping, read
    /// back with the codec's pong parser).
    async fn wait_ready(&self) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.connect(self.addr()).await.unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        while Instant::now() < end {
            let _ = s.send(&codec::asf_ping(9)).await;
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf)).await {
                let pong = codec::parse_asf_pong(&buf[..n]).expect("a pong");
                assert_eq!(pong.tag, 9);
                assert!(pong.ipmi, "ipmi_sim says it does not speak IPMI");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ipmi_sim did not come up: {}", self.log());
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ipmi_sim.log")).unwrap_or_default()
    }

    fn actions(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("actions.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn power_file(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("power"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

/// How the relay treats Get Channel Cipher Suites.
#[derive(Clone, Debug)]
enum SuiteList {
    /// Passes it to ipmi_sim.
    Real,
    /// Answers itself with these records.
    Answer(Vec<u8>),
    /// Answers itself with this completion code.
    Error(u8),
}

#[derive(Default, Debug)]
struct Seen {
    rakp1: usize,
    rakp3_ok: usize,
    rakp3_error: usize,
    /// Authentication algorithms proposed in Open Session Requests.
    proposals: Vec<u8>,
    /// In-session (authenticated IPMI payload) packets each way.
    session_requests: usize,
    session_responses: usize,
}

#[derive(Debug)]
struct RelayState {
    seen: Seen,
    suites: SuiteList,
    /// 1-based indexes of in-session answers to lose.
    lose_answers: HashSet<usize>,
}

struct Relay {
    addr: SocketAddr,
    state: Arc<Mutex<RelayState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_session_ipmi(buf: &[u8]) -> bool {
    buf.len() > 5 && buf[3] == 0x07 && buf[4] == 0x06 && buf[5] & 0x3f == 0 && buf[5] & 0x40 != 0
}

impl Relay {
    async fn start(bmc: SocketAddr, suites: SuiteList) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(bmc).await.unwrap();
        let addr = front.local_addr().unwrap();
        let state = Arc::new(Mutex::new(RelayState {
            seen: Seen::default(),
            suites,
            lose_answers: HashSet::new(),
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut a = [0u8; 2048];
            let mut b = [0u8; 2048];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        let pkt = &a[..n];
                        let answer = Self::from_client(&st, pkt);
                        match answer {
                            Some(reply) => { let _ = front.send_to(&reply, from).await; }
                            None => { let _ = back.send(pkt).await; }
                        }
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { return };
                        let pkt = &b[..n];
                        if is_session_ipmi(pkt) {
                            let mut s = st.lock().unwrap();
                            s.seen.session_responses += 1;
                            let k = s.seen.session_responses;
                            if s.lose_answers.contains(&k) {
                                continue;
                            }
                        }
                        if let Some(c) = client { let _ = front.send_to(pkt, c).await; }
                    }
                }
            }
        });
        Relay { addr, state, task }
    }

    /// Counts a client datagram; returns a reply when the relay answers it
    /// itself instead of passing it on.
    fn from_client(st: &Mutex<RelayState>, pkt: &[u8]) -> Option<Vec<u8>> {
        let mut s = st.lock().unwrap();
        if pkt.len() > 5 && pkt[3] == 0x07 && pkt[4] == 0x06 {
            let ptype = pkt[5] & 0x3f;
            let body = &pkt[16..];
            match ptype {
                payload::OPEN_SESSION_REQUEST if body.len() >= 13 => s.seen.proposals.push(body[12]),
                payload::RAKP1 => s.seen.rakp1 += 1,
                payload::RAKP3 if body.len() >= 2 => {
                    if body[1] == 0 {
                        s.seen.rakp3_ok += 1
                    } else {
                        s.seen.rakp3_error += 1
                    }
                }
                _ => {}
            }
            if is_session_ipmi(pkt) {
                s.seen.session_requests += 1;
            }
            return None;
        }
        // An IPMI 1.5 sessionless request: Get Channel Cipher Suites?
        if pkt.len() >= 20 && pkt[3] == 0x07 && pkt[4] == 0x00 {
            let msg = &pkt[14..];
            let (netfn, rq_seq, cmd) = (msg[1] >> 2, msg[4] >> 2, msg[5]);
            if netfn == 0x06 && cmd == 0x54 {
                let index = (msg[8] & 0x3f) as usize;
                let data: Vec<u8> = match &s.suites {
                    SuiteList::Real => return None,
                    SuiteList::Error(cc) => vec![*cc],
                    SuiteList::Answer(records) => {
                        let start = (index * 16).min(records.len());
                        let end = (start + 16).min(records.len());
                        let mut d = vec![0x00, 0x01];
                        d.extend_from_slice(&records[start..end]);
                        d
                    }
                };
                return Some(sessionless_response(0x07, 0x54, rq_seq, &data));
            }
        }
        None
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.state.lock().unwrap().seen)
    }

    fn lose_answer(&self, k: usize) {
        self.state.lock().unwrap().lose_answers.insert(k);
    }
}

/// A BMC's IPMI 1.5 sessionless answer (what the relay forges).
fn sessionless_response(netfn: u8, cmd: u8, rq_seq: u8, data: &[u8]) -> Vec<u8> {
    let mut m = vec![codec::CONSOLE_ADDR, netfn << 2];
    m.push(codec::checksum(&m));
    m.extend_from_slice(&[codec::BMC_ADDR, rq_seq << 2, cmd]);
    m.extend_from_slice(data);
    let c = codec::checksum(&m[3..]);
    m.push(c);
    codec::wrap_v15(&m)
}

fn record(id: u8, auth: u8, integ: u8, conf: u8) -> Vec<u8> {
    vec![0xc0, id, auth, 0x40 | integ, 0x80 | conf]
}

fn driver(addr: SocketAddr, password: &str) -> IpmiDriver {
    IpmiDriver::new(&addr.to_string(), USER, Password::new(password))
        .unwrap()
        .with_timing(Duration::from_millis(500), 3, Duration::from_secs(10))
}

#[tokio::test]
async fn power_on_off_cycle_and_status_through_ipmi_sim() {
    let sim = Sim::start().await;
    let relay = Relay::start(sim.addr(), SuiteList::Real).await;
    let d = driver(relay.addr, PASSWORD);

    // ipmi_sim lists suites 0–14: kiln must pick 3 and never propose 17
    // (not listed) nor anything weaker.
    assert_eq!(d.negotiated_suite().await.unwrap(), 3);
    assert_eq!(relay.seen(|s| s.proposals.clone()), vec![1]);

    assert_eq!(d.power_status().await.unwrap(), PowerState::Off);
    d.power(PowerAction::On).await.unwrap();
    assert_eq!(sim.power_file(), "1");
    assert_eq!(d.power_status().await.unwrap(), PowerState::On);
    d.power(PowerAction::Off).await.unwrap();
    assert_eq!(d.power_status().await.unwrap(), PowerState::Off);
    d.power(PowerAction::On).await.unwrap();
    d.power(PowerAction::Cycle).await.unwrap();
    // ipmi_sim carries out a cycle as "power 0", then "power 1" once the
    // chassis reads off.
    let end = Instant::now() + Duration::from_secs(10);
    while sim.actions().iter().filter(|a| *a == "set power 1").count() < 3 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sets: Vec<String> = sim.actions().into_iter().filter(|a| a.starts_with("set ")).collect();
    assert_eq!(
        sets,
        vec![
            "set power 1",
            "set power 0",
            "set power 1",
            "set power 0",
            "set power 1"
        ],
        "{}",
        sim.log()
    );
    assert_eq!(d.power_status().await.unwrap(), PowerState::On);
}

#[tokio::test]
async fn next_boot_network_uefi_once_reads_back() {
    let sim = Sim::start().await;
    let d = driver(sim.addr(), PASSWORD);
    d.set_boot_device(BootDevice::Network, BootPersistence::Once, BootFirmware::Uefi)
        .await
        .unwrap();
    assert!(
        sim.actions().contains(&"set boot pxe".to_string()),
        "{:?}",
        sim.actions()
    );
    // ipmi_sim keeps only the device (its chassis hook gets no valid,
    // persistent or EFI bit), so the device selector byte is what it can
    // give back; the full bytes are unit-tested in cmd.rs.
    let flags = d.boot_flags().await.unwrap();
    assert_eq!(flags[1], 0x04, "device selector: force PXE, got {flags:02x?}");

    d.set_boot_device(BootDevice::Disk, BootPersistence::Persistent, BootFirmware::Uefi)
        .await
        .unwrap();
    assert_eq!(d.boot_flags().await.unwrap()[1], 0x08);
    assert!(sim.actions().contains(&"set boot default".to_string()));
    d.set_boot_device(BootDevice::Cdrom, BootPersistence::Once, BootFirmware::Bios)
        .await
        .unwrap();
    assert_eq!(d.boot_flags().await.unwrap()[1], 0x14);
}

#[tokio::test]
async fn identity_is_the_system_guid_and_the_fru_serial() {
    let sim = Sim::start().await;
    let id = driver(sim.addr(), PASSWORD).identity().await.unwrap();
    assert_eq!(id.uuid, Some("4c616200-0000-4000-8000-000000000007".parse().unwrap()));
    // The product area's serial, read 16 bytes at a time.
    assert_eq!(id.serial.as_deref(), Some(FRU_PRODUCT_SERIAL));
}

#[tokio::test]
async fn a_blank_product_serial_falls_back_to_the_board_and_a_broken_fru_to_none() {
    let sim = Sim::start_with_fru(&fru_image("SIM-BRD-0008", "  ")).await;
    let id = driver(sim.addr(), PASSWORD).identity().await.unwrap();
    assert_eq!(id.serial.as_deref(), Some("SIM-BRD-0008"));
    drop(sim);
    // A FRU image with a broken header: no serial, the UUID still there.
    let mut broken = fru_image("BRD", "SYS");
    broken[7] ^= 0xff;
    let sim = Sim::start_with_fru(&broken).await;
    let id = driver(sim.addr(), PASSWORD).identity().await.unwrap();
    assert_eq!(id.serial, None);
    assert!(id.uuid.is_some());
}

#[tokio::test]
async fn wrong_password_is_auth_failed_after_one_attempt() {
    let sim = Sim::start().await;
    let relay = Relay::start(sim.addr(), SuiteList::Real).await;
    let d = driver(relay.addr, "not-the-password");
    let err = d.power_status().await.unwrap_err();
    assert_eq!(err.kind(), BmcErrorKind::AuthFailed, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("wrong password"), "{msg}");
    assert!(!msg.contains("not-the-password") && !format!("{err:?}").contains("not-the-password"));
    // One RAKP exchange per call, however many tries the driver has; the
    // BMC is told (RAKP 3 with an error status, sent without waiting, so
    // give the relay a moment), never given a proof.
    let end = Instant::now() + Duration::from_secs(2);
    while relay.seen(|s| s.rakp3_error) == 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.seen(|s| {
        assert_eq!((s.rakp1, s.rakp3_ok, s.rakp3_error), (1, 0, 1), "{s:?}");
    });
    // The engine's three tries are three attempts, not nine.
    for _ in 0..2 {
        assert_eq!(d.power_status().await.unwrap_err().kind(), BmcErrorKind::AuthFailed);
    }
    assert_eq!(relay.seen(|s| s.rakp1), 3);
    assert_eq!(sim.actions().iter().filter(|a| a.starts_with("set")).count(), 0);

    // An unknown user is refused too.
    let d = IpmiDriver::new(&relay.addr.to_string(), "nobody", Password::new(PASSWORD))
        .unwrap()
        .with_timing(Duration::from_millis(500), 3, Duration::from_secs(10));
    assert_eq!(d.power_status().await.unwrap_err().kind(), BmcErrorKind::AuthFailed);
}

#[tokio::test]
async fn a_bmc_listing_only_suite_3_gets_suite_3() {
    let sim = Sim::start().await;
    let list = [
        record(0, 0, 0, 0),
        record(1, 1, 0, 0),
        record(2, 1, 1, 0),
        record(3, 1, 1, 1),
    ]
    .concat();
    let relay = Relay::start(sim.addr(), SuiteList::Answer(list)).await;
    let d = driver(relay.addr, PASSWORD);
    assert_eq!(d.negotiated_suite().await.unwrap(), 3);
    assert_eq!(relay.seen(|s| s.proposals.clone()), vec![1], "only suite 3 proposed");
    assert_eq!(d.power_status().await.unwrap(), PowerState::Off);
}

#[tokio::test]
async fn a_bmc_listing_only_suite_0_is_refused() {
    let sim = Sim::start().await;
    let relay = Relay::start(sim.addr(), SuiteList::Answer(record(0, 0, 0, 0))).await;
    let err = driver(relay.addr, PASSWORD).power_status().await.unwrap_err();
    assert_eq!(err.kind(), BmcErrorKind::Unsupported, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("offers [0]") && msg.contains("17 or 3"), "{msg}");
    // Refused before any session was proposed.
    assert_eq!(relay.seen(|s| (s.proposals.len(), s.rakp1)), (0, 0));
}

#[tokio::test]
async fn without_a_suite_list_kiln_proposes_17_then_falls_back_to_3() {
    let sim = Sim::start().await;
    let relay = Relay::start(sim.addr(), SuiteList::Error(0xc1)).await;
    let d = driver(relay.addr, PASSWORD);
    // ipmi_sim has no SHA-256: it refuses 17 ("invalid authentication
    // algorithm"), and kiln goes on with 3.
    assert_eq!(d.negotiated_suite().await.unwrap(), 3);
    assert_eq!(relay.seen(|s| s.proposals.clone()), vec![3, 1]);
}

#[tokio::test]
async fn a_lost_status_answer_is_retried() {
    let sim = Sim::start().await;
    let relay = Relay::start(sim.addr(), SuiteList::Real).await;
    // In-session answers: 1 = Set Session Privilege, 2 = Get Chassis Status.
    relay.lose_answer(2);
    let d = driver(relay.addr, PASSWORD);
    assert_eq!(d.power_status().await.unwrap(), PowerState::Off);
    // privilege, status, status again, close
    assert_eq!(relay.seen(|s| s.session_requests), 4);
}

#[tokio::test]
async fn a_lost_cycle_answer_is_not_repeated() {
    let sim = Sim::start().await;
    let relay = Relay::start(sim.addr(), SuiteList::Real).await;
    let d = driver(relay.addr, PASSWORD);
    d.power(PowerAction::On).await.unwrap();
    let before = relay.seen(|s| s.session_responses);
    // This call's answers: 1 = privilege, 2 = Chassis Control.
    relay.lose_answer(before + 2);
    let err = d.power(PowerAction::Cycle).await.unwrap_err();
    assert_eq!(err.kind(), BmcErrorKind::OutcomeUnknown, "{err}");
    assert!(err.to_string().contains("not repeated blindly"));
    // The BMC got one power-cycle request: privilege, cycle, close.
    assert_eq!(relay.seen(|s| s.session_requests), 3 + 3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let offs = sim.actions().iter().filter(|a| *a == "set power 0").count();
    assert_eq!(offs, 1, "{:?}", sim.actions());
}

#[tokio::test]
async fn a_closed_port_is_unreachable_and_a_silent_one_times_out_within_the_deadline() {
    // Nothing listens: the kernel answers ICMP port unreachable.
    let port = free_udp_port();
    let d = IpmiDriver::new(&format!("127.0.0.1:{port}"), USER, Password::new(PASSWORD))
        .unwrap()
        .with_timing(Duration::from_millis(300), 3, Duration::from_secs(5));
    let t = Instant::now();
    let err = d.power_status().await.unwrap_err();
    assert!(
        matches!(err.kind(), BmcErrorKind::Unreachable | BmcErrorKind::Timeout),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));

    // Something holds the port and never answers: a timeout after the
    // tries, well within the call's deadline.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let d = IpmiDriver::new(&silent.local_addr().unwrap().to_string(), USER, Password::new(PASSWORD))
        .unwrap()
        .with_timing(Duration::from_millis(300), 3, Duration::from_secs(5));
    let t = Instant::now();
    let err = d.power(PowerAction::On).await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.kind(), BmcErrorKind::Timeout, "{err}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(err.to_string().contains("3 tries"), "{err}");

    // A deadline shorter than the tries wins.
    let d = d.with_timing(Duration::from_millis(300), 10, Duration::from_millis(700));
    let t = Instant::now();
    assert_eq!(d.power_status().await.unwrap_err().kind(), BmcErrorKind::Timeout);
    assert!(t.elapsed() < Duration::from_millis(1000), "{:?}", t.elapsed());
}
