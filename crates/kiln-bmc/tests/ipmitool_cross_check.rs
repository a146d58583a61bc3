//! Cross-checks kiln's RMCP+ cryptography for cipher suite 17 (and 3)
//! against an independent implementation: ipmitool.
//!
//! ipmi_sim has no SHA-256, so no real BMC here speaks suite 17. Instead
//! this test plays a minimal BMC built from kiln's own codec and crypto
//! functions (the RAKP 2 and 4 codes, the SIK, K1/K2, integrity and
//! AES-CBC with the IPMI pad) and lets `ipmitool -I lanplus -C 17` log in
//! and read the chassis status. ipmitool checks every code kiln computes and
//! decrypts every answer; the fake BMC checks ipmitool's RAKP 3 code and
//! every request's integrity code. Both directions agreeing is what makes
//! the client's suite-17 path trustworthy without a SHA-256 BMC.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use kiln_bmc::ipmi::codec::{self, payload};
use kiln_bmc::ipmi::crypto::{Hash, RakpState, SessionKeys, codes_equal};

const USER: &str = "admin";
const PASSWORD: &str = "cross-check-pw";
const BMC_SID: u32 = 0x0a0b_0c0d;
const GUID: [u8; 16] = [0x4c, 0x61, 0x62, 0, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 0x17];

/// What the fake BMC saw, for the assertions.
#[derive(Debug, Default)]
struct Log {
    rakp3_verified: bool,
    commands: Vec<(u8, u8)>,
    bad_packets: usize,
}

fn response(req: &[u8], completion: u8, data: &[u8]) -> Vec<u8> {
    // req: rsAddr, netfn/lun, chk, rqAddr, rqSeq/lun, cmd, data…, chk
    let mut m = vec![req[3], ((req[1] >> 2) | 1) << 2];
    m.push(codec::checksum(&m));
    m.extend_from_slice(&[req[0], req[4] & 0xfc, req[5], completion]);
    m.extend_from_slice(data);
    let c = codec::checksum(&m[3..]);
    m.push(c);
    m
}

/// Serves one ipmitool session, then returns what it saw.
fn fake_bmc(sock: UdpSocket, hash: Hash, algs: codec::Algorithms) -> Log {
    let mut log = Log::default();
    let mut buf = [0u8; 2048];
    let mut console_sid = 0u32;
    let mut rakp: Option<RakpState> = None;
    let mut keys: Option<SessionKeys> = None;
    let mut seq = 0u32;
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let pkt = &buf[..n];
        // Inside the session every IPMI packet must pass kiln's integrity
        // check and decrypt; session set-up messages stay clear.
        let p = match codec::unwrap(pkt, keys.as_ref()) {
            Ok(p) => p,
            Err(_) => match codec::unwrap(pkt, None) {
                Ok(p) if keys.is_none() || p.payload_type != payload::IPMI => p,
                _ => {
                    eprintln!(
                        "bad packet: {:?} len {} {:02x?}",
                        codec::unwrap(pkt, keys.as_ref()),
                        pkt.len(),
                        pkt
                    );
                    log.bad_packets += 1;
                    continue;
                }
            },
        };
        let is_v15 = pkt[4] == codec::AUTHTYPE_NONE;
        let reply: Vec<u8> = match p.payload_type {
            payload::IPMI => {
                let m = &p.payload;
                let (netfn, cmd) = (m[1] >> 2, m[5]);
                log.commands.push((netfn, cmd));
                let (cc, data): (u8, Vec<u8>) = match (netfn, cmd) {
                    // Get Channel Auth Caps: channel 1, IPMI 2.0 extended data.
                    (0x06, 0x38) => (0, vec![0x01, 0x80, 0x04, 0x02, 0, 0, 0, 0]),
                    (0x06, 0x3b) => (0, vec![m[6] & 0x0f]),
                    (0x06, 0x3c) => (0, vec![]),
                    (0x00, 0x01) => (0, vec![0x01, 0x00, 0x00, 0x00]),
                    _ => (0xc1, vec![]),
                };
                let rsp = response(m, cc, &data);
                if is_v15 {
                    codec::wrap_v15(&rsp)
                } else if let Some(k) = &keys {
                    seq += 1;
                    codec::wrap_v20(payload::IPMI, console_sid, seq, &rsp, Some((k, [0x5a; 16])))
                } else {
                    codec::wrap_v20(payload::IPMI, 0, 0, &rsp, None)
                }
            }
            payload::OPEN_SESSION_REQUEST => {
                let b = &p.payload;
                console_sid = u32::from_le_bytes(b[4..8].try_into().unwrap());
                let proposed = (b[12] & 0x3f, b[20] & 0x3f, b[28] & 0x3f);
                assert_eq!(
                    proposed,
                    (algs.auth, algs.integrity, algs.confidentiality),
                    "ipmitool proposed other algorithms"
                );
                let mut r = vec![b[0], 0, 4, 0];
                r.extend_from_slice(&console_sid.to_le_bytes());
                r.extend_from_slice(&BMC_SID.to_le_bytes());
                r.extend_from_slice(&b[8..32]);
                codec::wrap_v20(payload::OPEN_SESSION_RESPONSE, 0, 0, &r, None)
            }
            payload::RAKP1 => {
                let b = &p.payload;
                let ulen = b[27] as usize;
                let state = RakpState {
                    hash,
                    console_session_id: console_sid,
                    bmc_session_id: BMC_SID,
                    console_random: b[8..24].try_into().unwrap(),
                    bmc_random: *b"bmc-random-16byt",
                    bmc_guid: GUID,
                    role: b[24],
                    username: b[28..28 + ulen].to_vec(),
                };
                assert_eq!(state.username, USER.as_bytes());
                let mut r = vec![b[0], 0, 0, 0];
                r.extend_from_slice(&console_sid.to_le_bytes());
                r.extend_from_slice(&state.bmc_random);
                r.extend_from_slice(&GUID);
                r.extend_from_slice(&state.rakp2_code(PASSWORD.as_bytes()));
                rakp = Some(state);
                codec::wrap_v20(payload::RAKP2, 0, 0, &r, None)
            }
            payload::RAKP3 => {
                let b = &p.payload;
                let state = rakp.as_ref().expect("RAKP 1 first");
                let ok = codes_equal(&b[8..], &state.rakp3_code(PASSWORD.as_bytes()));
                log.rakp3_verified = ok;
                let sik = state.sik(PASSWORD.as_bytes());
                let mut r = vec![b[0], if ok { 0 } else { 0x0f }, 0, 0];
                r.extend_from_slice(&console_sid.to_le_bytes());
                if ok {
                    r.extend_from_slice(&state.rakp4_icv(&sik));
                }
                let reply = codec::wrap_v20(payload::RAKP4, 0, 0, &r, None);
                keys = Some(SessionKeys::derive(hash, &sik));
                reply
            }
            _ => continue,
        };
        sock.send_to(&reply, from).unwrap();
        if log.commands.last() == Some(&(0x06, 0x3c)) {
            break;
        }
    }
    log
}

fn run(suite: &str, hash: Hash, algs: codec::Algorithms) {
    if Command::new("ipmitool").arg("-V").output().is_err() {
        panic!("ipmitool is not installed: run the tests with scripts/test, which installs it");
    }
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let bmc = std::thread::spawn(move || fake_bmc(sock, hash, algs));
    let out = Command::new("ipmitool")
        .args(["-I", "lanplus", "-C", suite, "-H", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args([
            "-U", USER, "-P", PASSWORD, "-R", "1", "-N", "2", "chassis", "power", "status",
        ])
        .output()
        .unwrap();
    let log = bmc.join().unwrap();
    eprintln!("fake BMC log: {log:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("Chassis Power is on"),
        "ipmitool -C {suite} failed: {stdout} {stderr} {log:?}"
    );
    assert!(log.rakp3_verified, "{log:?}");
    assert_eq!(log.bad_packets, 0, "{log:?}");
    // Privilege, status and close went through the protected session.
    for cmd in [(0x06, 0x3b), (0x00, 0x01), (0x06, 0x3c)] {
        assert!(log.commands.contains(&cmd), "{log:?}");
    }
}

#[test]
fn ipmitool_logs_in_with_suite_17_against_kiln_crypto() {
    run(
        "17",
        Hash::Sha256,
        codec::Algorithms {
            auth: 3,
            integrity: 4,
            confidentiality: 1,
        },
    );
}

#[test]
fn ipmitool_logs_in_with_suite_3_against_kiln_crypto() {
    run(
        "3",
        Hash::Sha1,
        codec::Algorithms {
            auth: 1,
            integrity: 1,
            confidentiality: 1,
        },
    );
}
