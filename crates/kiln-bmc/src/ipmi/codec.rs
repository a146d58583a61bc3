//! The IPMI-over-LAN wire format as pure functions from bytes to values and
//! back: the RMCP header, the ASF presence ping, IPMI 1.5 and 2.0 (RMCP+)
//! session wrappers, IPMI messages with their checksums, the Open Session
//! and RAKP 1–4 payloads, and the sliding window over session sequence
//! numbers. No sockets here; `client.rs` does the I/O.
//!
//! Everything read from the network is length-checked before it is
//! indexed: a malformed datagram is an `Err`, never a panic.

use super::crypto::SessionKeys;

/// Why a datagram could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("datagram too short: {what} needs {need} bytes, got {got}")]
    Short {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("integrity check failed")]
    Integrity,
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), CodecError> {
    if buf.len() < n {
        Err(CodecError::Short {
            what,
            need: n,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub const RMCP_VERSION: u8 = 0x06;
/// RMCP sequence number 0xFF: "no RMCP ACK wanted", which IPMI requires.
pub const RMCP_NO_ACK: u8 = 0xff;
pub const RMCP_CLASS_ASF: u8 = 0x06;
pub const RMCP_CLASS_IPMI: u8 = 0x07;
pub const ASF_IANA: u32 = 4542;

/// Remote console software ID used as requester address (0x81 = SWID 40h).
pub const CONSOLE_ADDR: u8 = 0x81;
/// The BMC's responder address.
pub const BMC_ADDR: u8 = 0x20;

pub const AUTHTYPE_NONE: u8 = 0x00;
pub const AUTHTYPE_RMCP_PLUS: u8 = 0x06;

/// RMCP+ payload types (§13.27.3).
pub mod payload {
    pub const IPMI: u8 = 0x00;
    pub const OPEN_SESSION_REQUEST: u8 = 0x10;
    pub const OPEN_SESSION_RESPONSE: u8 = 0x11;
    pub const RAKP1: u8 = 0x12;
    pub const RAKP2: u8 = 0x13;
    pub const RAKP3: u8 = 0x14;
    pub const RAKP4: u8 = 0x15;
}

/// The IPMI checksum: the byte that makes the sum of the covered bytes
/// and itself zero (mod 256).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)).wrapping_neg()
}

/// An ASF Presence Ping (RMCP class ASF, message type 0x80).
pub fn asf_ping(tag: u8) -> Vec<u8> {
    let mut v = vec![RMCP_VERSION, 0, RMCP_NO_ACK, RMCP_CLASS_ASF];
    v.extend_from_slice(&ASF_IANA.to_be_bytes());
    v.extend_from_slice(&[0x80, tag, 0x00, 0x00]);
    v
}

/// What an ASF Presence Pong says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    pub tag: u8,
    /// "Supported entities" bit 7: the device speaks IPMI.
    pub ipmi: bool,
}

pub fn parse_asf_pong(buf: &[u8]) -> Result<Pong, CodecError> {
    need("ASF pong", buf, 12)?;
    if buf[0] != RMCP_VERSION || buf[3] & 0x7f != RMCP_CLASS_ASF {
        return Err(CodecError::Invalid("not an RMCP ASF message".into()));
    }
    if u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != ASF_IANA || buf[8] != 0x40 {
        return Err(CodecError::Invalid("not an ASF presence pong".into()));
    }
    let len = buf[11] as usize;
    need("ASF pong data", buf, 12 + len.max(9))?;
    Ok(Pong {
        tag: buf[9],
        ipmi: buf[12 + 8] & 0x80 != 0,
    })
}

/// An IPMI request as the console sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub netfn: u8,
    pub cmd: u8,
    pub data: Vec<u8>,
}

impl Request {
    pub fn new(netfn: u8, cmd: u8, data: impl Into<Vec<u8>>) -> Self {
        Request {
            netfn,
            cmd,
            data: data.into(),
        }
    }
}

/// An IPMI response from the BMC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub netfn: u8,
    pub cmd: u8,
    /// The 6-bit request sequence number, echoed from the request.
    pub rq_seq: u8,
    pub completion: u8,
    pub data: Vec<u8>,
}

/// The IPMI message of a request: rsAddr, netFn/rsLUN, checksum, rqAddr,
/// rqSeq/rqLUN, cmd, data, checksum.
pub fn encode_request(req: &Request, rq_seq: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(7 + req.data.len());
    m.push(BMC_ADDR);
    m.push(req.netfn << 2);
    m.push(checksum(&m[0..2]));
    m.push(CONSOLE_ADDR);
    m.push((rq_seq & 0x3f) << 2);
    m.push(req.cmd);
    m.extend_from_slice(&req.data);
    let c = checksum(&m[3..]);
    m.push(c);
    m
}

/// Reads an IPMI response message and checks both checksums.
pub fn decode_response(m: &[u8]) -> Result<Response, CodecError> {
    need("IPMI response", m, 8)?;
    if checksum(&m[0..2]) != m[2] {
        return Err(CodecError::Invalid("IPMI header checksum is wrong".into()));
    }
    let last = m.len() - 1;
    if checksum(&m[3..last]) != m[last] {
        return Err(CodecError::Invalid("IPMI data checksum is wrong".into()));
    }
    Ok(Response {
        netfn: m[1] >> 2,
        rq_seq: m[4] >> 2,
        cmd: m[5],
        completion: m[6],
        data: m[7..last].to_vec(),
    })
}

/// An IPMI 1.5 packet with auth type none, session 0: the only 1.5 form
/// kiln sends (Get Channel Authentication Capabilities, before a session).
pub fn wrap_v15(message: &[u8]) -> Vec<u8> {
    let mut v = vec![RMCP_VERSION, 0, RMCP_NO_ACK, RMCP_CLASS_IPMI, AUTHTYPE_NONE];
    v.extend_from_slice(&0u32.to_le_bytes()); // session sequence
    v.extend_from_slice(&0u32.to_le_bytes()); // session id
    v.push(message.len() as u8);
    v.extend_from_slice(message);
    v
}

/// A received packet, after its session wrapper was checked and removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// 1.5 packets have no payload type; they carry IPMI messages.
    pub payload_type: u8,
    pub session_id: u32,
    pub seq: u32,
    pub authenticated: bool,
    pub encrypted: bool,
    pub payload: Vec<u8>,
}

/// Reads an IPMI packet of either version. With `keys`, a 2.0 packet must
/// be authenticated and encrypted and pass both checks; without, it must be
/// neither (a session is not established yet). A 1.5 packet is accepted
/// only with auth type none and only without keys.
pub fn unwrap(buf: &[u8], keys: Option<&SessionKeys>) -> Result<Packet, CodecError> {
    need("RMCP header", buf, 5)?;
    if buf[0] != RMCP_VERSION || buf[3] != RMCP_CLASS_IPMI {
        return Err(CodecError::Invalid("not an RMCP IPMI message".into()));
    }
    let body = &buf[4..];
    match body[0] {
        AUTHTYPE_RMCP_PLUS => unwrap_v20(body, keys),
        AUTHTYPE_NONE => {
            if keys.is_some() {
                return Err(CodecError::Invalid(
                    "unauthenticated IPMI 1.5 packet inside an RMCP+ session".into(),
                ));
            }
            need("IPMI 1.5 session header", body, 10)?;
            let len = body[9] as usize;
            need("IPMI 1.5 message", body, 10 + len)?;
            Ok(Packet {
                payload_type: payload::IPMI,
                seq: u32_le(&body[1..5]),
                session_id: u32_le(&body[5..9]),
                authenticated: false,
                encrypted: false,
                payload: body[10..10 + len].to_vec(),
            })
        }
        other => Err(CodecError::Invalid(format!(
            "IPMI 1.5 auth type {other:#04x} (kiln speaks only RMCP+ in sessions)"
        ))),
    }
}

fn unwrap_v20(body: &[u8], keys: Option<&SessionKeys>) -> Result<Packet, CodecError> {
    need("RMCP+ session header", body, 12)?;
    let ptype = body[1];
    let encrypted = ptype & 0x80 != 0;
    let authenticated = ptype & 0x40 != 0;
    let payload_type = ptype & 0x3f;
    if payload_type == 0x02 {
        return Err(CodecError::Invalid("OEM payloads are not used by kiln".into()));
    }
    let session_id = u32_le(&body[2..6]);
    let seq = u32_le(&body[6..10]);
    let len = u16::from_le_bytes([body[10], body[11]]) as usize;
    need("RMCP+ payload", body, 12 + len)?;
    let raw = &body[12..12 + len];

    match keys {
        None => {
            if encrypted || authenticated {
                return Err(CodecError::Invalid(
                    "protected packet before the session keys exist".into(),
                ));
            }
            Ok(Packet {
                payload_type,
                session_id,
                seq,
                authenticated,
                encrypted,
                payload: raw.to_vec(),
            })
        }
        Some(k) => {
            // Fail closed: inside a session every packet must carry both
            // protections kiln negotiated, whatever the BMC puts in the
            // header bits.
            if !authenticated || !encrypted {
                return Err(CodecError::Invalid(
                    "unprotected packet inside an authenticated, encrypted session".into(),
                ));
            }
            let t = k.hash.truncated_len();
            // Trailer: pad (0-3 × 0xFF), pad length, next header (0x07), AuthCode.
            need("RMCP+ integrity trailer", body, 12 + len + 2 + t)?;
            let covered_end = body.len() - t;
            if covered_end < 12 + len + 2 {
                return Err(CodecError::Integrity);
            }
            let code = &body[covered_end..];
            if !super::crypto::codes_equal(&k.integrity_code(&body[..covered_end]), code) {
                return Err(CodecError::Integrity);
            }
            let pad_len = body[covered_end - 2] as usize;
            if body[covered_end - 1] != 0x07 || 12 + len + pad_len + 2 != covered_end {
                return Err(CodecError::Invalid("malformed integrity trailer".into()));
            }
            let payload = k.decrypt(raw).map_err(|e| CodecError::Invalid(e.into()))?;
            Ok(Packet {
                payload_type,
                session_id,
                seq,
                authenticated,
                encrypted,
                payload,
            })
        }
    }
}

/// An RMCP+ packet. With `keys` (an established session), the payload is
/// encrypted under `iv` and the packet gets its integrity trailer; without,
/// it goes in the clear (Open Session and RAKP messages).
pub fn wrap_v20(
    payload_type: u8,
    session_id: u32,
    seq: u32,
    payload: &[u8],
    keys: Option<(&SessionKeys, [u8; 16])>,
) -> Vec<u8> {
    let mut v = vec![RMCP_VERSION, 0, RMCP_NO_ACK, RMCP_CLASS_IPMI];
    let body_start = v.len();
    v.push(AUTHTYPE_RMCP_PLUS);
    let flags = if keys.is_some() { 0xc0 } else { 0x00 };
    v.push(flags | (payload_type & 0x3f));
    v.extend_from_slice(&session_id.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    match keys {
        None => {
            v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            v.extend_from_slice(payload);
        }
        Some((k, iv)) => {
            let enc = k.encrypt(iv, payload);
            v.extend_from_slice(&(enc.len() as u16).to_le_bytes());
            v.extend_from_slice(&enc);
            // Integrity pad: 0xFF bytes so that everything from the auth
            // type through the next-header byte is a multiple of 4.
            let covered = v.len() - body_start + 2;
            let pad = (4 - covered % 4) % 4;
            v.extend(std::iter::repeat_n(0xff, pad));
            v.push(pad as u8);
            v.push(0x07);
            let code = k.integrity_code(&v[body_start..]);
            v.extend_from_slice(&code);
        }
    }
    v
}

/// RMCP+ status codes (§13.24) that mean "this algorithm or suite is not
/// available here" — the ones after which kiln may try its next suite.
pub fn status_means_unsupported_suite(status: u8) -> bool {
    matches!(status, 0x04 | 0x05 | 0x06 | 0x07 | 0x10 | 0x11)
}

/// RMCP+ status codes that mean the user, its password or its privilege
/// were refused.
pub fn status_means_auth_failure(status: u8) -> bool {
    matches!(status, 0x09 | 0x0a | 0x0c | 0x0d | 0x0f)
}

/// A human-readable name for an RMCP+ status code.
pub fn rmcpp_status_name(status: u8) -> &'static str {
    match status {
        0x00 => "no errors",
        0x01 => "insufficient resources to create a session",
        0x02 => "invalid session ID",
        0x03 => "invalid payload type",
        0x04 => "invalid authentication algorithm",
        0x05 => "invalid integrity algorithm",
        0x06 => "no matching authentication payload",
        0x07 => "no matching integrity payload",
        0x08 => "inactive session ID",
        0x09 => "invalid role",
        0x0a => "unauthorized role or privilege level requested",
        0x0b => "insufficient resources to create a session at the requested role",
        0x0c => "invalid name length",
        0x0d => "unauthorized name",
        0x0e => "unauthorized GUID",
        0x0f => "invalid integrity check value",
        0x10 => "invalid confidentiality algorithm",
        0x11 => "no cipher suite match with the proposed security algorithms",
        0x12 => "illegal or unrecognized parameter",
        _ => "unknown status",
    }
}

/// The algorithms of one cipher suite, as numbered in Open Session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithms {
    pub auth: u8,
    pub integrity: u8,
    pub confidentiality: u8,
}

/// Open Session Request (§13.17): tag, requested maximum privilege,
/// our session ID and one proposal each for the three algorithms.
pub fn open_session_request(tag: u8, privilege: u8, console_sid: u32, algs: Algorithms) -> Vec<u8> {
    let mut v = vec![tag, privilege & 0x0f, 0, 0];
    v.extend_from_slice(&console_sid.to_le_bytes());
    for (kind, alg) in [(0x00, algs.auth), (0x01, algs.integrity), (0x02, algs.confidentiality)] {
        v.extend_from_slice(&[kind, 0, 0, 0x08, alg & 0x3f, 0, 0, 0]);
    }
    v
}

/// What an Open Session Response says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionResponse {
    pub tag: u8,
    pub status: u8,
    pub console_sid: u32,
    pub bmc_sid: u32,
    /// Present when `status` is 0.
    pub algorithms: Option<Algorithms>,
}

pub fn parse_open_session_response(p: &[u8]) -> Result<OpenSessionResponse, CodecError> {
    need("Open Session Response", p, 2)?;
    let (tag, status) = (p[0], p[1]);
    if status != 0 {
        // An error response may stop after the status (ipmi_sim) or carry
        // the session IDs; neither is needed to report it.
        let console_sid = if p.len() >= 8 { u32_le(&p[4..8]) } else { 0 };
        return Ok(OpenSessionResponse {
            tag,
            status,
            console_sid,
            bmc_sid: 0,
            algorithms: None,
        });
    }
    need("Open Session Response", p, 36)?;
    let alg = |at: usize, kind: u8| -> Result<u8, CodecError> {
        if p[at] != kind {
            return Err(CodecError::Invalid(format!(
                "Open Session Response: payload type {:#04x} where {kind:#04x} belongs",
                p[at]
            )));
        }
        Ok(p[at + 4] & 0x3f)
    };
    Ok(OpenSessionResponse {
        tag,
        status,
        console_sid: u32_le(&p[4..8]),
        bmc_sid: u32_le(&p[8..12]),
        algorithms: Some(Algorithms {
            auth: alg(12, 0x00)?,
            integrity: alg(20, 0x01)?,
            confidentiality: alg(28, 0x02)?,
        }),
    })
}

/// RAKP Message 1 (§13.20): tag, the BMC's session ID, our random number,
/// the role byte and the user name.
pub fn rakp1(tag: u8, bmc_sid: u32, console_random: &[u8; 16], role: u8, username: &[u8]) -> Vec<u8> {
    let mut v = vec![tag, 0, 0, 0];
    v.extend_from_slice(&bmc_sid.to_le_bytes());
    v.extend_from_slice(console_random);
    v.extend_from_slice(&[role, 0, 0, username.len() as u8]);
    v.extend_from_slice(username);
    v
}

/// What RAKP Message 2 says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp2 {
    pub tag: u8,
    pub status: u8,
    pub console_sid: u32,
    pub bmc_random: [u8; 16],
    pub bmc_guid: [u8; 16],
    pub auth_code: Vec<u8>,
}

pub fn parse_rakp2(p: &[u8]) -> Result<Rakp2, CodecError> {
    need("RAKP Message 2", p, 2)?;
    if p[1] != 0 {
        return Ok(Rakp2 {
            tag: p[0],
            status: p[1],
            console_sid: if p.len() >= 8 { u32_le(&p[4..8]) } else { 0 },
            bmc_random: [0; 16],
            bmc_guid: [0; 16],
            auth_code: Vec::new(),
        });
    }
    need("RAKP Message 2", p, 40)?;
    Ok(Rakp2 {
        tag: p[0],
        status: 0,
        console_sid: u32_le(&p[4..8]),
        bmc_random: p[8..24].try_into().expect("16 bytes"),
        bmc_guid: p[24..40].try_into().expect("16 bytes"),
        auth_code: p[40..].to_vec(),
    })
}

/// RAKP Message 3 (§13.22): tag, status, the BMC's session ID and our code
/// (empty when `status` reports an error to the BMC).
pub fn rakp3(tag: u8, status: u8, bmc_sid: u32, auth_code: &[u8]) -> Vec<u8> {
    let mut v = vec![tag, status, 0, 0];
    v.extend_from_slice(&bmc_sid.to_le_bytes());
    v.extend_from_slice(auth_code);
    v
}

/// What RAKP Message 4 says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp4 {
    pub tag: u8,
    pub status: u8,
    pub console_sid: u32,
    pub icv: Vec<u8>,
}

pub fn parse_rakp4(p: &[u8]) -> Result<Rakp4, CodecError> {
    need("RAKP Message 4", p, 2)?;
    if p[1] != 0 {
        return Ok(Rakp4 {
            tag: p[0],
            status: p[1],
            console_sid: 0,
            icv: Vec::new(),
        });
    }
    need("RAKP Message 4", p, 8)?;
    Ok(Rakp4 {
        tag: p[0],
        status: 0,
        console_sid: u32_le(&p[4..8]),
        icv: p[8..].to_vec(),
    })
}

/// The sliding window over the BMC's session sequence numbers: a packet is
/// accepted once, and only if it is at most `WINDOW` behind the highest
/// number seen or at most `WINDOW` ahead of it. This rejects replays of
/// captured packets and stale duplicates while tolerating reordering and
/// loss (IPMI 2.0 §6.12.13 asks the receiver for such a window).
#[derive(Debug, Clone, Default)]
pub struct SeqWindow {
    highest: u32,
    /// Bit i set: `highest - i` was seen (bit 0 is `highest` itself).
    seen: u32,
}

impl SeqWindow {
    pub const WINDOW: u32 = 16;

    /// Checks `seq` and records it if accepted.
    pub fn accept(&mut self, seq: u32) -> bool {
        // Zero is never a valid authenticated sequence number.
        if seq == 0 {
            return false;
        }
        if self.highest == 0 {
            self.highest = seq;
            self.seen = 1;
            return true;
        }
        let ahead = seq.wrapping_sub(self.highest);
        if ahead != 0 && ahead <= Self::WINDOW {
            self.seen = self.seen.checked_shl(ahead).unwrap_or(0) | 1;
            self.highest = seq;
            return true;
        }
        let behind = self.highest.wrapping_sub(seq);
        if behind < Self::WINDOW {
            let bit = 1u32 << behind;
            if self.seen & bit != 0 {
                return false;
            }
            self.seen |= bit;
            return true;
        }
        false
    }
}

/// The next outbound sequence number: increments, and skips 0 on wrap
/// (0 means "no sequence number" in RMCP+).
pub fn next_seq(seq: u32) -> u32 {
    match seq.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::super::crypto::Hash;
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn checksum_makes_the_sum_zero() {
        assert_eq!(checksum(&[0x20, 0x18]), 0xc8);
        assert_eq!(checksum(&[]), 0);
        for bytes in [&[1u8, 2, 3][..], &[0xff, 0xff], &[0x81, 0x04, 0x38, 0x8e, 0x04]] {
            let c = checksum(bytes);
            let sum = bytes.iter().fold(c, |a, b| a.wrapping_add(*b));
            assert_eq!(sum, 0);
        }
    }

    #[test]
    fn asf_ping_bytes_and_pong() {
        assert_eq!(asf_ping(7), h("06 00 ff 06 000011be 80 07 00 00"));
        // A pong: IANA 4542, type 0x40, tag 7, length 16, IPMI supported.
        let pong = h("06 00 ff 06 000011be 40 07 00 10 000011be 00000000 81 00 000000000000");
        assert_eq!(parse_asf_pong(&pong).unwrap(), Pong { tag: 7, ipmi: true });
        assert!(parse_asf_pong(&pong[..15]).is_err());
        assert!(parse_asf_pong(&asf_ping(7)).is_err());
    }

    #[test]
    fn get_channel_auth_caps_request_in_ipmi_15_is_the_classic_packet() {
        // The packet every IPMI tool sends first: RMCP, auth none, seq 0,
        // session 0, length 9, then the message to the BMC (0x20), netfn
        // App (0x06 << 2 = 0x18), rqSeq 0, cmd 0x38, channel 0x8e, admin.
        let msg = encode_request(&Request::new(0x06, 0x38, vec![0x8e, 0x04]), 0);
        assert_eq!(msg, h("20 18 c8 81 00 38 8e 04 b5"));
        assert_eq!(
            wrap_v15(&msg),
            h("06 00 ff 07 00 00000000 00000000 09 20 18 c8 81 00 38 8e 04 b5")
        );
    }

    #[test]
    fn response_decoding_checks_both_checksums() {
        // A Get Channel Auth Caps response from ipmi_sim (rqSeq 0).
        let m = h("81 1c 63 20 00 38 00 01 97 04 03 00 00 00 00 09");
        let r = decode_response(&m).unwrap();
        assert_eq!((r.netfn, r.cmd, r.rq_seq, r.completion), (0x07, 0x38, 0, 0));
        assert_eq!(r.data, h("01 97 04 03 00 00 00 00"));
        let mut bad = m.clone();
        bad[2] ^= 1;
        assert!(decode_response(&bad).is_err());
        let mut bad = m.clone();
        bad[9] ^= 1;
        assert!(decode_response(&bad).is_err());
        assert!(decode_response(&m[..5]).is_err());
    }

    #[test]
    fn rq_seq_is_six_bits_in_the_upper_bits() {
        let msg = encode_request(&Request::new(0x00, 0x01, vec![]), 0x3f);
        assert_eq!(msg[4], 0xfc);
        let msg = encode_request(&Request::new(0x00, 0x01, vec![]), 0x41);
        assert_eq!(msg[4], 0x04);
    }

    #[test]
    fn open_session_request_bytes() {
        let req = open_session_request(
            0x2a,
            4,
            0x11223344,
            Algorithms {
                auth: 3,
                integrity: 4,
                confidentiality: 1,
            },
        );
        assert_eq!(
            req,
            h("2a 04 0000 44332211 \
               00 0000 08 03 000000 \
               01 0000 08 04 000000 \
               02 0000 08 01 000000")
        );
        let mut rsp = h("2a 00 04 00 44332211 0a000000");
        rsp.extend(h("00 0000 08 03 000000 01 0000 08 04 000000 02 0000 08 01 000000"));
        let r = parse_open_session_response(&rsp).unwrap();
        assert_eq!(r.bmc_sid, 10);
        assert_eq!(r.console_sid, 0x11223344);
        assert_eq!(
            r.algorithms,
            Some(Algorithms {
                auth: 3,
                integrity: 4,
                confidentiality: 1
            })
        );
        // ipmi_sim's short error form: tag and status only.
        let e = parse_open_session_response(&h("2a 04")).unwrap();
        assert_eq!((e.status, e.algorithms), (0x04, None));
        assert!(parse_open_session_response(&rsp[..20]).is_err());
    }

    #[test]
    fn rakp_message_bytes() {
        let r1 = rakp1(1, 0x0a, &[0xaa; 16], 0x14, b"admin");
        let mut want = h("01 000000 0a000000");
        want.extend([0xaa; 16]);
        want.extend(h("14 0000 05"));
        want.extend_from_slice(b"admin");
        assert_eq!(r1, want);
        assert_eq!(rakp3(1, 0, 0x0a, &[9, 9]), h("01 00 0000 0a000000 09 09"));
        assert_eq!(rakp3(1, 0x0f, 0x0a, &[]), h("01 0f 0000 0a000000"));

        let mut r2 = h("01 00 0000 44332211");
        r2.extend([0xbb; 16]);
        r2.extend([0xcc; 16]);
        r2.extend([0xdd; 20]);
        let p = parse_rakp2(&r2).unwrap();
        assert_eq!((p.status, p.console_sid), (0, 0x11223344));
        assert_eq!((p.bmc_random, p.bmc_guid), ([0xbb; 16], [0xcc; 16]));
        assert_eq!(p.auth_code, vec![0xdd; 20]);
        assert_eq!(parse_rakp2(&h("01 0d")).unwrap().status, 0x0d);
        assert!(parse_rakp2(&r2[..30]).is_err());

        let p = parse_rakp4(&h("01 00 0000 44332211 010203")).unwrap();
        assert_eq!((p.console_sid, p.icv), (0x11223344, vec![1, 2, 3]));
    }

    #[test]
    fn clear_rmcpp_packet_bytes() {
        let p = wrap_v20(payload::RAKP1, 0, 0, &[1, 2, 3], None);
        assert_eq!(p, h("06 00 ff 07 06 12 00000000 00000000 0300 010203"));
        let back = unwrap(&p, None).unwrap();
        assert_eq!(back.payload_type, payload::RAKP1);
        assert_eq!(back.payload, vec![1, 2, 3]);
        assert!(!back.authenticated && !back.encrypted);
    }

    fn keys(hash: Hash) -> SessionKeys {
        SessionKeys::derive(hash, b"a session integrity key")
    }

    trait OtherK1 {
        fn with_other_k1(self) -> Self;
    }
    impl OtherK1 for SessionKeys {
        fn with_other_k1(mut self) -> Self {
            self.k1[0] ^= 1;
            self
        }
    }

    #[test]
    fn protected_packet_layout_and_round_trip() {
        for hash in [Hash::Sha1, Hash::Sha256] {
            let k = keys(hash);
            let iv = [0x11; 16];
            for len in 0..40usize {
                let payload: Vec<u8> = (0..len as u8).collect();
                let p = wrap_v20(payload::IPMI, 0x01020304, 5, &payload, Some((&k, iv)));
                // header: 0x06, payload type with both bits, sid, seq, length
                assert_eq!(&p[4..6], &[0x06, 0xc0]);
                assert_eq!(&p[6..10], &[4, 3, 2, 1]);
                assert_eq!(&p[10..14], &[5, 0, 0, 0]);
                let enc_len = u16::from_le_bytes([p[14], p[15]]) as usize;
                assert_eq!(enc_len, 16 + (len + 1).div_ceil(16) * 16);
                // Auth type through next header is a multiple of 4.
                let t = hash.truncated_len();
                let covered = p.len() - 4 - t;
                assert_eq!(covered % 4, 0);
                assert_eq!(p[4 + covered - 1], 0x07);
                let pad = p[4 + covered - 2] as usize;
                assert!(pad < 4);
                assert!(p[4 + covered - 2 - pad..4 + covered - 2].iter().all(|b| *b == 0xff));
                let back = unwrap(&p, Some(&k)).unwrap();
                assert_eq!(back.payload, payload);
                assert_eq!((back.session_id, back.seq), (0x01020304, 5));
            }
        }
    }

    #[test]
    fn protected_packet_tampering_is_caught() {
        let k = keys(Hash::Sha1);
        let p = wrap_v20(payload::IPMI, 7, 9, b"chassis status", Some((&k, [3; 16])));
        for i in 4..p.len() {
            let mut bad = p.clone();
            bad[i] ^= 0x01;
            assert!(unwrap(&bad, Some(&k)).is_err(), "flipped byte {i} went unnoticed");
        }
        // The right bytes under another key.
        assert_eq!(
            unwrap(&p, Some(&keys(Hash::Sha1).with_other_k1())).unwrap_err(),
            CodecError::Integrity
        );
        assert!(unwrap(&p, Some(&keys(Hash::Sha256))).is_err());
        // A clear packet inside a session is refused, as is a protected one
        // before it.
        let clear = wrap_v20(payload::IPMI, 7, 9, b"x", None);
        assert!(unwrap(&clear, Some(&k)).is_err());
        assert!(unwrap(&p, None).is_err());
        // Truncations never panic.
        for n in 0..p.len() {
            let _ = unwrap(&p[..n], Some(&k));
            let _ = unwrap(&p[..n], None);
        }
    }

    #[test]
    fn sequence_window() {
        let mut w = SeqWindow::default();
        assert!(!w.accept(0));
        assert!(w.accept(1));
        assert!(!w.accept(1), "a replay");
        assert!(w.accept(3));
        assert!(w.accept(2), "late but unseen");
        assert!(!w.accept(2));
        assert!(w.accept(3 + SeqWindow::WINDOW));
        assert!(!w.accept(3 + 2 * SeqWindow::WINDOW + 1), "too far ahead");
        assert!(!w.accept(3), "fell out of the window");
        assert!(w.accept(4 + SeqWindow::WINDOW), "just ahead");
        assert!(w.accept(5), "inside the window, unseen");

        // Around the wrap.
        let mut w = SeqWindow::default();
        assert!(w.accept(u32::MAX - 1));
        assert!(w.accept(1));
        assert!(w.accept(u32::MAX));
        assert!(!w.accept(u32::MAX));
    }

    #[test]
    fn outbound_sequence_skips_zero() {
        assert_eq!(next_seq(1), 2);
        assert_eq!(next_seq(u32::MAX), 1);
    }
}
