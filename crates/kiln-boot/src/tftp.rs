//! TFTP without sockets: the packet codec (RFC 1350; OACK, RFC 2347), option
//! negotiation (blksize RFC 2348, timeout and tsize RFC 2349, windowsize
//! RFC 7440), the sender's state machine for a read transfer, and the
//! bounds that keep a client from holding the service hostage: how long a
//! silent client keeps a transfer slot ([`Timing`]) and how many slots one
//! client address may hold ([`Slots`]). All pure, so they are table-tested
//! and fuzzed (`fuzz/fuzz_targets/tftp_packet.rs`); `kiln-server`'s
//! listener only moves bytes between these and its sockets.
//!
//! Parsing borrows from the datagram (a DATA packet's payload is a slice of
//! it) and is strict where a sloppy reading could be dangerous (a filename
//! must be NUL-terminated UTF-8, an ACK is exactly four bytes) and lenient
//! where PXE ROMs are known to be sloppy (empty, dangling or undecodable
//! options after the mode are skipped, like tftpd-hpa does).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// The smallest and largest block sizes RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
pub const MAX_BLKSIZE: u16 = 65464;
/// RFC 1350's block size, used when none is negotiated.
pub const DEFAULT_BLKSIZE: u16 = 512;

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// One TFTP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data {
        block: u16,
        data: &'a [u8],
    },
    Ack(u16),
    Error {
        code: u16,
        message: &'a str,
    },
    /// Options the server accepted, as (name, value), in its order.
    Oack(Vec<(&'a str, &'a str)>),
}

/// A read or write request: what file, how, and the options asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a str,
    pub mode: Mode,
    /// (name, value) as the client sent them; [`negotiate`] interprets them.
    pub options: Vec<(&'a str, &'a str)>,
}

/// Transfer mode (RFC 1350). `mail` is obsolete; it parses so that the
/// server can refuse it by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Netascii,
    Octet,
    Mail,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }
}

/// Error codes of RFC 1350 and RFC 2347 (8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    DiskFull = 3,
    IllegalOperation = 4,
    UnknownTid = 5,
    FileExists = 6,
    NoSuchUser = 7,
    OptionRefused = 8,
}

/// Why a datagram is not a TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooShort,
    UnknownOpcode(u16),
    /// A string field (filename, mode, error message, option) has no NUL.
    Unterminated,
    /// The filename or an error message is not UTF-8.
    NotUtf8,
    EmptyFilename,
    UnknownMode,
    /// Bytes after a fixed-size packet (ACK) or after an error's message.
    TrailingBytes,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooShort => write!(f, "packet too short"),
            ParseError::UnknownOpcode(op) => write!(f, "unknown opcode {op}"),
            ParseError::Unterminated => write!(f, "a string field is not NUL-terminated"),
            ParseError::NotUtf8 => write!(f, "a string field is not UTF-8"),
            ParseError::EmptyFilename => write!(f, "empty filename"),
            ParseError::UnknownMode => write!(f, "unknown transfer mode (netascii or octet)"),
            ParseError::TrailingBytes => write!(f, "trailing bytes after the packet"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Splits off one NUL-terminated field.
fn field(bytes: &[u8]) -> Result<(&[u8], &[u8]), ParseError> {
    let nul = bytes.iter().position(|&b| b == 0).ok_or(ParseError::Unterminated)?;
    Ok((&bytes[..nul], &bytes[nul + 1..]))
}

fn utf8(bytes: &[u8]) -> Result<&str, ParseError> {
    std::str::from_utf8(bytes).map_err(|_| ParseError::NotUtf8)
}

/// (name, value) pairs after a request's mode or in an OACK. Empty names
/// (NUL padding), pairs that are not UTF-8 and a dangling name or
/// unterminated tail are skipped: options are advisory (RFC 2347).
fn options(mut rest: &[u8]) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    while let Ok((name, after)) = field(rest) {
        let Ok((value, after)) = field(after) else { break };
        rest = after;
        if let (false, Ok(n), Ok(v)) = (name.is_empty(), std::str::from_utf8(name), std::str::from_utf8(value)) {
            out.push((n, v));
        }
    }
    out
}

fn request(body: &[u8]) -> Result<Request<'_>, ParseError> {
    let (filename, rest) = field(body)?;
    let (mode, rest) = field(rest)?;
    let filename = utf8(filename)?;
    if filename.is_empty() {
        return Err(ParseError::EmptyFilename);
    }
    let mode = match mode.to_ascii_lowercase().as_slice() {
        b"netascii" => Mode::Netascii,
        b"octet" => Mode::Octet,
        b"mail" => Mode::Mail,
        _ => return Err(ParseError::UnknownMode),
    };
    Ok(Request {
        filename,
        mode,
        options: options(rest),
    })
}

impl<'a> Packet<'a> {
    /// Reads one datagram.
    pub fn parse(bytes: &'a [u8]) -> Result<Packet<'a>, ParseError> {
        if bytes.len() < 2 {
            return Err(ParseError::TooShort);
        }
        let opcode = u16::from_be_bytes([bytes[0], bytes[1]]);
        let body = &bytes[2..];
        let number = || -> Result<u16, ParseError> {
            match body {
                [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
                _ => Err(ParseError::TooShort),
            }
        };
        match opcode {
            OP_RRQ => Ok(Packet::Rrq(request(body)?)),
            OP_WRQ => Ok(Packet::Wrq(request(body)?)),
            OP_DATA => Ok(Packet::Data {
                block: number()?,
                data: &body[2..],
            }),
            OP_ACK => {
                let block = number()?;
                if body.len() > 2 {
                    return Err(ParseError::TrailingBytes);
                }
                Ok(Packet::Ack(block))
            }
            OP_ERROR => {
                let code = number()?;
                let (message, rest) = field(&body[2..])?;
                if !rest.is_empty() {
                    return Err(ParseError::TrailingBytes);
                }
                Ok(Packet::Error {
                    code,
                    message: utf8(message)?,
                })
            }
            OP_OACK => Ok(Packet::Oack(options(body))),
            op => Err(ParseError::UnknownOpcode(op)),
        }
    }

    /// Appends the datagram to `out`. Strings must not contain NUL (they
    /// would end the field early); nothing kiln sends does.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let cstr = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                let op = if matches!(self, Packet::Rrq(_)) { OP_RRQ } else { OP_WRQ };
                out.extend_from_slice(&op.to_be_bytes());
                cstr(out, r.filename);
                cstr(out, r.mode.name());
                for (n, v) in &r.options {
                    cstr(out, n);
                    cstr(out, v);
                }
            }
            Packet::Data { block, data } => {
                out.extend_from_slice(&data_header(*block));
                out.extend_from_slice(data);
            }
            Packet::Ack(block) => {
                out.extend_from_slice(&OP_ACK.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&OP_ERROR.to_be_bytes());
                out.extend_from_slice(&code.to_be_bytes());
                cstr(out, message);
            }
            Packet::Oack(opts) => {
                out.extend_from_slice(&OP_OACK.to_be_bytes());
                for (n, v) in opts {
                    cstr(out, n);
                    cstr(out, v);
                }
            }
        }
    }

    /// The datagram as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// The four bytes before a DATA packet's payload.
pub fn data_header(block: u16) -> [u8; 4] {
    let [o0, o1] = OP_DATA.to_be_bytes();
    let [b0, b1] = block.to_be_bytes();
    [o0, o1, b0, b1]
}

/// An ERROR datagram; the message is cut at a NUL.
pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    let message = message.split('\0').next().unwrap_or_default();
    Packet::Error {
        code: code as u16,
        message,
    }
    .to_vec()
}

/// What the server allows clients to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest block size granted (clients asking more get this).
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440 lets the server answer less).
    pub max_windowsize: u16,
    /// Longest retransmission timeout granted, in seconds (RFC 2349
    /// allows 1–255); a request for more is declined.
    pub max_timeout: u8,
}

/// [`Limits::max_timeout`] unless configured: U-Boot asks for 5 s; iPXE
/// and GRUB ask for none.
pub const DEFAULT_MAX_TIMEOUT: u8 = 10;

impl Default for Limits {
    fn default() -> Self {
        // A window of 64 blocks is past the point where larger windows
        // stop helping on a LAN (RFC 7440's measurements), and bounds what a
        // transfer sends unacknowledged.
        Limits {
            max_blksize: MAX_BLKSIZE,
            max_windowsize: 64,
            max_timeout: DEFAULT_MAX_TIMEOUT,
        }
    }
}

/// The outcome of option negotiation for one read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    /// Retransmission timeout the client asked for, in seconds.
    pub timeout: Option<u8>,
    /// The options to acknowledge, in the order the client sent them;
    /// empty: send no OACK, start with DATA 1 (RFC 1350).
    pub oack: Vec<(&'static str, u64)>,
}

impl Negotiated {
    /// The OACK datagram (empty if nothing was accepted).
    pub fn oack_packet(&self) -> Vec<u8> {
        if self.oack.is_empty() {
            return Vec::new();
        }
        let values: Vec<String> = self.oack.iter().map(|(_, v)| v.to_string()).collect();
        Packet::Oack(
            self.oack
                .iter()
                .zip(&values)
                .map(|((n, _), v)| (*n, v.as_str()))
                .collect(),
        )
        .to_vec()
    }
}

fn number(value: &str) -> Option<u64> {
    // Digits only (no sign, no spaces) and short enough not to overflow.
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Decides a read request's options against the file's size. Unknown
/// options and values out of their RFC's range are left out of the OACK
/// (the client then uses the default), and each option counts once.
pub fn negotiate(options: &[(&str, &str)], file_size: u64, limits: &Limits) -> Negotiated {
    let mut n = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: None,
        oack: Vec::new(),
    };
    let mut seen: Vec<&'static str> = Vec::new();
    for (name, value) in options {
        let name = name.to_ascii_lowercase();
        let accepted: Option<(&'static str, u64)> = match name.as_str() {
            "blksize" => number(value)
                .filter(|v| (u64::from(MIN_BLKSIZE)..=u64::from(MAX_BLKSIZE)).contains(v))
                .map(|v| ("blksize", v.min(u64::from(limits.max_blksize.max(MIN_BLKSIZE))))),
            // A timeout above the server's maximum is declined by leaving
            // it out of the OACK, not lowered and not refused with ERROR 8.
            // RFC 2349 says the OACK's timeout "must match" the request, so
            // a lower value is a protocol violation clients may abort on;
            // an ERROR would fail the boot of a PXE ROM that only asked.
            // Leaving an option out is RFC 2347's way to decline, which
            // every client handles (it must also talk to RFC 1350 servers,
            // and tftpd-hpa leaves out what it does not know): the client
            // keeps its own timeout and kiln resends at its default.
            "timeout" => number(value)
                .filter(|v| (1..=u64::from(limits.max_timeout)).contains(v))
                .map(|v| ("timeout", v)),
            // RFC 2349: a read request carries 0 and the server answers the
            // size; any other value is answered the same way.
            "tsize" => number(value).map(|_| ("tsize", file_size)),
            "windowsize" => number(value)
                .filter(|v| (1..=65535).contains(v))
                .map(|v| ("windowsize", v.min(u64::from(limits.max_windowsize.max(1))))),
            _ => None,
        };
        let Some((key, v)) = accepted else { continue };
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        // The ranges checked above make these conversions lossless.
        match key {
            "blksize" => n.blksize = v as u16,
            "timeout" => n.timeout = Some(v as u8),
            "windowsize" => n.windowsize = v as u16,
            _ => {}
        }
        n.oack.push((key, v));
    }
    n
}

/// How a read transfer waits for its client: how long before a resend,
/// how many resends, and the longest it waits without progress in all.
/// Together they bound how long a client that stops answering — or never
/// meant to answer — holds a transfer slot, whatever timeout it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Wait for an ACK this long before resending, unless the client
    /// negotiated `timeout`.
    pub retransmit: Duration,
    /// Resends of the OACK or of one window before the client is given up.
    pub max_retries: u32,
    /// The longest a transfer waits without progress (no new block
    /// acknowledged), whatever timeout was negotiated: resends are cut so
    /// that they fit.
    pub max_silence: Duration,
}

/// [`Timing::max_silence`] unless configured: far above what a client
/// without the timeout option needs (tftpd-hpa's 1 s × 6), and a client
/// that asked for the largest timeout granted still gets two resends.
pub const DEFAULT_MAX_SILENCE: Duration = Duration::from_secs(30);

impl Default for Timing {
    fn default() -> Self {
        // tftpd-hpa's defaults: 1 s, and about 6 s of silence ends it.
        Timing {
            retransmit: Duration::from_secs(1),
            max_retries: 5,
            max_silence: DEFAULT_MAX_SILENCE,
        }
    }
}

/// The retransmission one transfer uses (see [`Timing::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retransmit {
    pub interval: Duration,
    /// For [`ReadTransfer::new`].
    pub max_retries: u32,
}

impl Timing {
    /// The interval and retry budget for a transfer that negotiated
    /// `timeout` (seconds; `None`: the default interval). A transfer gives
    /// up after its first send and `max_retries` resends, each followed by
    /// one interval without progress, so `(max_retries + 1) × interval`
    /// never exceeds [`Timing::max_silence`].
    pub fn plan(&self, timeout: Option<u8>) -> Retransmit {
        let asked = timeout.map_or(self.retransmit, |s| Duration::from_secs(u64::from(s)));
        // A zero interval would resend in a busy loop; one above the
        // silence cap alone would break the bound.
        let interval = asked
            .max(Duration::from_millis(1))
            .min(self.max_silence.max(Duration::from_millis(1)));
        let sends = self.max_silence.as_nanos() / interval.as_nanos();
        let fit = u32::try_from(sends.saturating_sub(1)).unwrap_or(u32::MAX);
        Retransmit {
            interval,
            max_retries: self.max_retries.min(fit),
        }
    }
}

/// Transfer slots: at most `max_total` transfers at once, and at most
/// `max_per_client` for one client address, so that one host (or a
/// script on it, from as many ports as it likes) cannot take them all.
///
/// When every slot is taken, a request may take the slot of the oldest
/// transfer whose client has not acknowledged anything yet
/// ([`Slots::heard_from`] was never called for it): UDP source addresses
/// can be forged, and requests from forged addresses are never
/// acknowledged, since their answers go elsewhere. Without this, a few
/// dozen forged requests every few seconds would keep every slot; with
/// it, a real client is turned away only if every other transfer has
/// been heard from, or if more requests than there are slots arrive
/// between its request and its first ACK (a round trip).
///
/// Addresses are counted as the client sent from them, an IPv4-mapped
/// IPv6 address as its IPv4 one. IPv6 is counted per address, not per
/// /64: the machines of one provisioning network share their /64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    max_total: usize,
    max_per_client: usize,
    next: u64,
    /// By age: ids only grow.
    taken: BTreeMap<SlotId, Holder>,
    by_client: HashMap<IpAddr, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    client: IpAddr,
    heard: bool,
}

/// One transfer's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId(u64);

/// A slot given by [`Slots::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub id: SlotId,
    /// The transfer whose slot this was, never heard from: end it.
    pub evicted: Option<SlotId>,
}

/// Why [`Slots::take`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every slot is in use by a client that answers.
    Full { max_total: usize },
    /// This address holds its share already.
    Client { max_per_client: usize },
}

impl Busy {
    /// The TFTP ERROR's message: what happened and what to do.
    pub fn message(&self) -> String {
        match self {
            Busy::Full { max_total } => {
                format!("server busy: all {max_total} transfer slots are in use, try again")
            }
            Busy::Client { max_per_client } => format!(
                "server busy for this address: it already has {max_per_client} transfers running \
                 (the most one address may have); finish or abort one, then try again"
            ),
        }
    }
}

impl Slots {
    /// Limits of at least one slot (zero would refuse everything).
    pub fn new(max_total: usize, max_per_client: usize) -> Slots {
        Slots {
            max_total: max_total.max(1),
            max_per_client: max_per_client.max(1),
            next: 0,
            taken: BTreeMap::new(),
            by_client: HashMap::new(),
        }
    }

    /// Takes a slot for `client` — a free one, else the oldest one whose
    /// client was never heard from — or says why not. Each slot given
    /// needs its [`Slots::release`].
    pub fn take(&mut self, client: IpAddr) -> Result<Taken, Busy> {
        let client = client.to_canonical();
        let held = self.held_by(client);
        // The address's own limit first: that refusal tells a greedy host
        // it is the cause, and is the same whether the server is full.
        if held >= self.max_per_client {
            return Err(Busy::Client {
                max_per_client: self.max_per_client,
            });
        }
        let mut evicted = None;
        if self.taken.len() >= self.max_total {
            let Some(oldest) = self.taken.iter().find(|(_, h)| !h.heard).map(|(id, _)| *id) else {
                return Err(Busy::Full {
                    max_total: self.max_total,
                });
            };
            self.release(oldest);
            evicted = Some(oldest);
        }
        let id = SlotId(self.next);
        self.next += 1;
        self.taken.insert(id, Holder { client, heard: false });
        *self.by_client.entry(client).or_insert(0) += 1;
        Ok(Taken { id, evicted })
    }

    /// The transfer in `id` has been acknowledged by its client: its slot
    /// is no longer taken for a newcomer.
    pub fn heard_from(&mut self, id: SlotId) {
        if let Some(h) = self.taken.get_mut(&id) {
            h.heard = true;
        }
    }

    /// Gives back a slot; nothing if it was taken for another already.
    pub fn release(&mut self, id: SlotId) {
        let Some(h) = self.taken.remove(&id) else { return };
        if let Some(held) = self.by_client.get_mut(&h.client) {
            *held -= 1;
            if *held == 0 {
                // Forget idle addresses: the map stays as small as the
                // transfers running, however many addresses came by.
                self.by_client.remove(&h.client);
            }
        }
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.max_total - self.taken.len()
    }

    /// Slots `client` holds now.
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.by_client.get(&client.to_canonical()).copied().unwrap_or(0)
    }
}

/// The bytes a netascii transfer sends for `data`: LF becomes CR LF and a
/// bare CR becomes CR NUL (RFC 1350 via RFC 764).
pub fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            b => out.push(b),
        }
    }
    out
}

/// What the sender does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send (again) the OACK, then wait.
    SendOack,
    /// Send blocks `first ..first + count` (1-based indices; the wire number
    /// is the index modulo 65536), then wait.
    Send { first: u64, count: u64 },
    /// Keep waiting: the packet changed nothing.
    Wait,
    /// The last block is acknowledged.
    Done,
    /// Retries are used up: the client is gone.
    GiveUp,
}

/// The sending side of a read transfer (RFC 1350 lock-step, or windows of
/// RFC 7440), without I/O or clocks: the caller sends what a [`Step`] says
/// and reports ACKs and timeouts.
///
/// Blocks have 1-based indices; a file of `len` bytes is `len / blksize + 1`
/// blocks, the last one short (possibly empty). Wire block numbers wrap
/// from 65535 to 0, as tftpd-hpa and iPXE expect for files above
/// 65535 blocks. Index 0 stands for the OACK, which ACK 0 answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadTransfer {
    /// First unacknowledged index (0 while the OACK is unanswered).
    base: u64,
    /// Blocks sent from `base` and not yet acknowledged.
    in_flight: u64,
    last: u64,
    window: u64,
    retries: u32,
    max_retries: u32,
    /// An ACK has moved the transfer on: the client is really there.
    heard: bool,
}

impl ReadTransfer {
    pub fn new(len: u64, blksize: u16, windowsize: u16, oack: bool, max_retries: u32) -> ReadTransfer {
        ReadTransfer {
            base: if oack { 0 } else { 1 },
            in_flight: 0,
            last: len / u64::from(blksize.max(1)) + 1,
            window: u64::from(windowsize.max(1)),
            retries: 0,
            max_retries,
            heard: false,
        }
    }

    /// Whether an ACK has moved the transfer on, which only a client that
    /// receives what kiln sends can do (see [`Slots::take`]).
    pub fn heard_from(&self) -> bool {
        self.heard
    }

    /// The number of DATA blocks the transfer sends.
    pub fn blocks(&self) -> u64 {
        self.last
    }

    fn send_window(&mut self) -> Step {
        if self.base == 0 {
            self.in_flight = 1;
            return Step::SendOack;
        }
        self.in_flight = self.window.min(self.last - self.base + 1);
        Step::Send {
            first: self.base,
            count: self.in_flight,
        }
    }

    /// The first thing to send.
    pub fn start(&mut self) -> Step {
        self.send_window()
    }

    /// An ACK arrived with wire number `block`.
    pub fn on_ack(&mut self, block: u16) -> Step {
        if self.base > self.last {
            return Step::Done;
        }
        // How far past the last acknowledged index this ACK reaches; the
        // window is below 65536, so the wire number is unambiguous.
        let acked_before = self.base.wrapping_sub(1) as u16;
        let delta = u64::from(block.wrapping_sub(acked_before));
        if delta == 0 && self.window > 1 && self.base > 0 {
            // RFC 7440: a receiver that missed the window's first block
            // acknowledges the one before it; send the window again now
            // rather than after a timeout. Counted as a retry, so duplicate
            // ACKs cannot make the transfer go on forever.
            return self.on_timeout();
        }
        if delta == 0 || delta > self.in_flight {
            // A duplicate or stale ACK. Answering it would double every
            // following block (the Sorcerer's Apprentice, RFC 1123 4.2.3.1).
            return Step::Wait;
        }
        self.base += delta;
        self.retries = 0;
        self.heard = true;
        if self.base > self.last {
            self.in_flight = 0;
            return Step::Done;
        }
        self.send_window()
    }

    /// No ACK within the timeout.
    pub fn on_timeout(&mut self) -> Step {
        // A timer that fires after the last ACK (found by the tftp_packet
        // fuzz target: the window's size was computed below zero).
        if self.base > self.last {
            return Step::Done;
        }
        if self.retries >= self.max_retries {
            return Step::GiveUp;
        }
        self.retries += 1;
        self.send_window()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_after_the_last_ack_sends_nothing() {
        // One block, no options: block 1, ACK 1, then the timer fires.
        let mut t = ReadTransfer::new(100, 512, 1, false, 3);
        assert!(matches!(t.start(), Step::Send { first: 1, count: 1 }));
        assert!(matches!(t.on_ack(1), Step::Done));
        assert!(matches!(t.on_timeout(), Step::Done));
        assert!(matches!(t.on_ack(1), Step::Done));
    }

    fn rrq(filename: &str, mode: Mode, options: &[(&'static str, &'static str)]) -> Vec<u8> {
        Packet::Rrq(Request {
            filename,
            mode,
            options: options.to_vec(),
        })
        .to_vec()
    }

    #[test]
    fn parses_every_packet_kind() {
        let cases: Vec<(&[u8], Result<Packet<'_>, ParseError>)> = vec![
            (
                b"\0\x01ipxe.efi\0octet\0",
                Ok(Packet::Rrq(Request {
                    filename: "ipxe.efi",
                    mode: Mode::Octet,
                    options: vec![],
                })),
            ),
            (
                b"\0\x01/a/b\0NetASCII\0blksize\x001468\0tsize\x000\0",
                Ok(Packet::Rrq(Request {
                    filename: "/a/b",
                    mode: Mode::Netascii,
                    options: vec![("blksize", "1468"), ("tsize", "0")],
                })),
            ),
            (
                b"\0\x02up\0octet\0",
                Ok(Packet::Wrq(Request {
                    filename: "up",
                    mode: Mode::Octet,
                    options: vec![],
                })),
            ),
            (b"\0\x03\0\x07abc", Ok(Packet::Data { block: 7, data: b"abc" })),
            (
                b"\0\x03\xff\xff",
                Ok(Packet::Data {
                    block: 65535,
                    data: b"",
                }),
            ),
            (b"\0\x04\x01\x02", Ok(Packet::Ack(0x0102))),
            (
                b"\0\x05\0\x01not found\0",
                Ok(Packet::Error {
                    code: 1,
                    message: "not found",
                }),
            ),
            (b"\0\x06blksize\x001468\0", Ok(Packet::Oack(vec![("blksize", "1468")]))),
            (b"\0\x06", Ok(Packet::Oack(vec![]))),
        ];
        for (bytes, want) in cases {
            assert_eq!(Packet::parse(bytes), want, "{bytes:?}");
        }
    }

    #[test]
    fn refuses_malformed_packets() {
        let cases: &[(&[u8], ParseError)] = &[
            (b"", ParseError::TooShort),
            (b"\0", ParseError::TooShort),
            (b"\0\x07", ParseError::UnknownOpcode(7)),
            (b"\0\0", ParseError::UnknownOpcode(0)),
            (b"\0\x01", ParseError::Unterminated),
            (b"\0\x01file", ParseError::Unterminated),
            (b"\0\x01file\0octet", ParseError::Unterminated),
            (b"\0\x01\0octet\0", ParseError::EmptyFilename),
            (b"\0\x01f\xff\0octet\0", ParseError::NotUtf8),
            (b"\0\x01file\0binary\0", ParseError::UnknownMode),
            (b"\0\x03\0", ParseError::TooShort),
            (b"\0\x04\0", ParseError::TooShort),
            (b"\0\x04\0\x01\0", ParseError::TrailingBytes),
            (b"\0\x05\0\x01", ParseError::Unterminated),
            (b"\0\x05\0\x01oops", ParseError::Unterminated),
            (b"\0\x05\0\x01oops\0x", ParseError::TrailingBytes),
            (b"\0\x05\0\x01\xc3\0", ParseError::NotUtf8),
        ];
        for (bytes, want) in cases {
            assert_eq!(Packet::parse(bytes).as_ref(), Err(want), "{bytes:?}");
        }
    }

    #[test]
    fn sloppy_options_are_skipped_not_fatal() {
        // NUL padding, a dangling name, a non-UTF-8 pair, an unterminated tail.
        let bytes = b"\0\x01f\0octet\0\0\0blksize\x001024\0\xff\0x\0tsize\0";
        match Packet::parse(bytes).unwrap() {
            Packet::Rrq(r) => assert_eq!(r.options, vec![("blksize", "1024")]),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn encoding_round_trips() {
        let packets = [
            Packet::Rrq(Request {
                filename: "x/y.efi",
                mode: Mode::Octet,
                options: vec![("windowsize", "8")],
            }),
            Packet::Wrq(Request {
                filename: "w",
                mode: Mode::Mail,
                options: vec![],
            }),
            Packet::Data { block: 9, data: b"hi" },
            Packet::Ack(65535),
            Packet::Error { code: 8, message: "no" },
            Packet::Oack(vec![("tsize", "12"), ("blksize", "8")]),
        ];
        for p in packets {
            assert_eq!(Packet::parse(&p.to_vec()), Ok(p.clone()));
        }
        assert_eq!(&rrq("a", Mode::Octet, &[])[..], b"\0\x01a\0octet\0");
        assert_eq!(
            error_packet(ErrorCode::AccessViolation, "no\0more"),
            b"\0\x05\0\x02no\0"
        );
    }

    #[test]
    fn negotiation_table() {
        let l = Limits {
            max_blksize: 1468,
            max_windowsize: 16,
            max_timeout: 10,
        };
        type Case = (
            &'static [(&'static str, &'static str)],
            u16,
            u16,
            Option<u8>,
            &'static [(&'static str, u64)],
        );
        let cases: &[Case] = &[
            (&[], 512, 1, None, &[]),
            (&[("blksize", "1024")], 1024, 1, None, &[("blksize", 1024)]),
            (&[("BLKSIZE", "9000")], 1468, 1, None, &[("blksize", 1468)]), // capped
            (&[("blksize", "7")], 512, 1, None, &[]),                      // below RFC 2348's range
            (&[("blksize", "65465")], 512, 1, None, &[]),
            (&[("blksize", "-1")], 512, 1, None, &[]),
            (&[("blksize", " 512")], 512, 1, None, &[]),
            (&[("blksize", "99999999999999999999999")], 512, 1, None, &[]),
            (&[("tsize", "0")], 512, 1, None, &[("tsize", 4242)]),
            (&[("tsize", "x")], 512, 1, None, &[]),
            (&[("timeout", "3")], 512, 1, Some(3), &[("timeout", 3)]),
            (&[("timeout", "0")], 512, 1, None, &[]),
            (&[("timeout", "256")], 512, 1, None, &[]),
            (&[("timeout", "10")], 512, 1, Some(10), &[("timeout", 10)]), // the server's maximum
            // Issue 14: above the maximum, declined by leaving it out.
            (&[("timeout", "11")], 512, 1, None, &[]),
            (&[("timeout", "255")], 512, 1, None, &[]),
            (
                &[("timeout", "255"), ("timeout", "5")],
                512,
                1,
                Some(5),
                &[("timeout", 5)],
            ),
            (
                &[("timeout", "255"), ("tsize", "0"), ("blksize", "1468")],
                1468,
                1,
                None,
                &[("tsize", 4242), ("blksize", 1468)],
            ),
            (&[("windowsize", "4")], 512, 4, None, &[("windowsize", 4)]),
            (&[("windowsize", "100")], 512, 16, None, &[("windowsize", 16)]),
            (&[("windowsize", "0")], 512, 1, None, &[]),
            (&[("multicast", ""), ("rollover", "0")], 512, 1, None, &[]),
            // the first of a repeated option counts
            (
                &[("blksize", "800"), ("blksize", "900")],
                800,
                1,
                None,
                &[("blksize", 800)],
            ),
            (
                &[("tsize", "0"), ("blksize", "1468"), ("windowsize", "8")],
                1468,
                8,
                None,
                &[("tsize", 4242), ("blksize", 1468), ("windowsize", 8)],
            ),
        ];
        for (opts, blksize, windowsize, timeout, oack) in cases {
            let n = negotiate(opts, 4242, &l);
            assert_eq!(
                (n.blksize, n.windowsize, n.timeout, n.oack.as_slice()),
                (*blksize, *windowsize, *timeout, *oack),
                "{opts:?}"
            );
        }
        let n = negotiate(&[("tsize", "0"), ("blksize", "1468")], 10, &l);
        assert_eq!(
            Packet::parse(&n.oack_packet()),
            Ok(Packet::Oack(vec![("tsize", "10"), ("blksize", "1468")]))
        );
        assert!(negotiate(&[], 10, &l).oack_packet().is_empty());
    }

    #[test]
    fn retransmission_fits_the_silence_cap() {
        let t = Timing {
            retransmit: Duration::from_secs(1),
            max_retries: 5,
            max_silence: Duration::from_secs(30),
        };
        let secs = Duration::from_secs;
        // (negotiated timeout, interval, retries)
        let cases: &[(Option<u8>, Duration, u32)] = &[
            (None, secs(1), 5),    // tftpd-hpa's 1 s × 6: the retry cap binds
            (Some(1), secs(1), 5), //
            (Some(5), secs(5), 5), // U-Boot's: 30 s exactly
            (Some(6), secs(6), 4), // the silence cap binds
            (Some(10), secs(10), 2),
            (Some(15), secs(15), 1),
            (Some(30), secs(30), 0),  // one send, then give up
            (Some(255), secs(30), 0), // never longer than the cap, even if granted
        ];
        for (timeout, interval, retries) in cases {
            let r = t.plan(*timeout);
            assert_eq!((r.interval, r.max_retries), (*interval, *retries), "{timeout:?}");
        }
        // The test suite's fast timing: 200 ms, 3 resends, 1 s cap.
        let fast = Timing {
            retransmit: Duration::from_millis(200),
            max_retries: 3,
            max_silence: secs(1),
        };
        assert_eq!(fast.plan(None).max_retries, 3);
        assert_eq!(fast.plan(Some(1)).max_retries, 0);
        // A zero interval would spin; a zero cap still sends once.
        let zero = Timing {
            retransmit: Duration::ZERO,
            max_retries: 2,
            max_silence: Duration::ZERO,
        };
        assert_eq!(zero.plan(None).interval, Duration::from_millis(1));
    }

    /// Issue 14: a request with `timeout=255` that is never acknowledged
    /// held its slot for 6 × 255 s. Negotiation, plan and state machine
    /// together, with the server's defaults: the option is declined, and
    /// the transfer gives up after 6 s.
    #[test]
    fn a_silent_client_asking_for_255_s_is_given_up_in_seconds() {
        let timing = Timing::default();
        for (options, most) in [
            (&[("timeout", "255"), ("tsize", "0")][..], Duration::from_secs(6)),
            // The largest timeout granted: the silence cap binds.
            (&[("timeout", "10")][..], DEFAULT_MAX_SILENCE),
        ] {
            let n = negotiate(options, 1 << 20, &Limits::default());
            let plan = timing.plan(n.timeout);
            let mut t = ReadTransfer::new(1 << 20, n.blksize, n.windowsize, !n.oack.is_empty(), plan.max_retries);
            assert_eq!(t.start(), Step::SendOack);
            let mut silent = plan.interval;
            while t.on_timeout() != Step::GiveUp {
                silent += plan.interval;
            }
            assert_eq!(silent, most, "{options:?}");
            assert!(silent <= timing.max_silence);
        }
    }

    #[test]
    fn slots_per_client_and_in_all() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        let mut s = Slots::new(5, 2);
        assert_eq!(s.free(), 5);
        let take = |s: &mut Slots, who| {
            let t = s.take(who).unwrap();
            assert_eq!(t.evicted, None);
            s.heard_from(t.id);
            t.id
        };
        let a1 = take(&mut s, a);
        take(&mut s, a);
        let refused = s.take(a).unwrap_err();
        assert_eq!(refused, Busy::Client { max_per_client: 2 });
        assert!(refused.message().contains("this address") && refused.message().contains('2'));
        // The same host as an IPv4-mapped IPv6 address (a listener on [::]).
        assert_eq!(s.take(ip("::ffff:10.0.0.1")), Err(Busy::Client { max_per_client: 2 }));
        assert_eq!(s.held_by(a), 2);
        assert_eq!(s.free(), 3, "refusals take nothing");
        let b1 = take(&mut s, b);
        let b2 = take(&mut s, b);
        let c1 = take(&mut s, c);
        assert_eq!(s.free(), 0);
        let full = s.take(ip("10.0.0.4")).unwrap_err();
        assert_eq!(full, Busy::Full { max_total: 5 });
        assert!(full.message().contains("busy"));
        // The address's own limit is named first, full or not.
        assert_eq!(s.take(a), Err(Busy::Client { max_per_client: 2 }));
        s.release(a1);
        s.release(a1);
        assert_eq!((s.free(), s.held_by(a)), (1, 1), "released once");
        let d1 = take(&mut s, ip("10.0.0.4"));
        let a2 = s.taken.keys().next().copied().unwrap();
        for x in [a2, b1, b2, c1, d1] {
            s.release(x);
        }
        assert_eq!(s.free(), 5);
        assert!(s.by_client.is_empty(), "idle addresses are forgotten");
        // Zero limits would refuse every client: they mean one.
        let mut one = Slots::new(0, 0);
        let t = one.take(a).unwrap();
        one.heard_from(t.id);
        assert_eq!(one.take(b), Err(Busy::Full { max_total: 1 }));
    }

    /// Issue 14, with forged source addresses: requests never acknowledged
    /// hold slots only until someone else needs them, oldest first, and
    /// never a slot whose client has answered.
    #[test]
    fn a_full_table_gives_the_oldest_silent_slot_away() {
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let mut s = Slots::new(3, 1);
        let first = s.take(ip(1)).unwrap().id;
        let answered = s.take(ip(2)).unwrap().id;
        s.heard_from(answered);
        let third = s.take(ip(3)).unwrap().id;
        let t = s.take(ip(4)).unwrap();
        assert_eq!(t.evicted, Some(first), "the oldest never heard from");
        assert_eq!((s.held_by(ip(1)), s.held_by(ip(4)), s.free()), (0, 1, 0));
        s.release(first); // its transfer ends later: changes nothing
        assert_eq!(s.free(), 0);
        let t5 = s.take(ip(5)).unwrap();
        assert_eq!(t5.evicted, Some(third), "not the one heard from");
        s.heard_from(t.id);
        s.heard_from(t5.id);
        assert_eq!(s.take(ip(6)), Err(Busy::Full { max_total: 3 }), "all answered");
        // An address at its limit takes nothing, not even a silent slot.
        let mut s = Slots::new(2, 1);
        s.take(ip(1)).unwrap();
        s.take(ip(2)).unwrap();
        assert_eq!(s.take(ip(1)), Err(Busy::Client { max_per_client: 1 }));
        assert_eq!(s.held_by(ip(2)), 1);
    }

    #[test]
    fn netascii_conversion() {
        assert_eq!(to_netascii(b"a\nb\rc\r\n"), b"a\r\nb\r\0c\r\0\r\n");
        assert_eq!(to_netascii(b""), b"");
    }

    #[test]
    fn lock_step_transfer() {
        // 1024 bytes at 512: blocks 1, 2 and an empty 3.
        let mut t = ReadTransfer::new(1024, 512, 1, false, 2);
        assert_eq!(t.blocks(), 3);
        assert_eq!(t.start(), Step::Send { first: 1, count: 1 });
        assert_eq!(t.on_ack(0), Step::Wait, "stale");
        assert_eq!(t.on_timeout(), Step::Send { first: 1, count: 1 });
        assert!(!t.heard_from(), "a stale ACK and a timeout prove nothing");
        assert_eq!(t.on_ack(1), Step::Send { first: 2, count: 1 });
        assert!(t.heard_from());
        assert_eq!(t.on_ack(1), Step::Wait, "duplicate: no Sorcerer's Apprentice");
        assert_eq!(t.on_ack(5), Step::Wait, "from the future");
        assert_eq!(t.on_timeout(), Step::Send { first: 2, count: 1 });
        assert_eq!(t.on_timeout(), Step::Send { first: 2, count: 1 });
        assert_eq!(
            t.on_ack(2),
            Step::Send { first: 3, count: 1 },
            "progress resets the retries"
        );
        assert_eq!(t.on_timeout(), Step::Send { first: 3, count: 1 });
        assert_eq!(t.on_timeout(), Step::Send { first: 3, count: 1 });
        assert_eq!(t.on_timeout(), Step::GiveUp);
        let mut t = ReadTransfer::new(1000, 512, 1, false, 0);
        t.start();
        assert_eq!(t.on_ack(1), Step::Send { first: 2, count: 1 });
        assert_eq!(t.on_ack(2), Step::Done);
        assert_eq!(t.on_ack(2), Step::Done);
    }

    #[test]
    fn oack_then_windows() {
        // 10 blocks of 8 bytes + an empty 11th, window 4.
        let mut t = ReadTransfer::new(80, 8, 4, true, 3);
        assert_eq!(t.start(), Step::SendOack);
        assert_eq!(t.on_ack(1), Step::Wait, "only ACK 0 answers the OACK");
        assert_eq!(t.on_timeout(), Step::SendOack);
        assert!(!t.heard_from());
        assert_eq!(t.on_ack(0), Step::Send { first: 1, count: 4 });
        assert!(t.heard_from(), "ACK 0 answers the OACK");
        // The client got 1 and 2, lost 3: it acks 2 and the next window starts at 3.
        assert_eq!(t.on_ack(2), Step::Send { first: 3, count: 4 });
        // It lost 3 again and re-acks 2: resend at once.
        assert_eq!(t.on_ack(2), Step::Send { first: 3, count: 4 });
        assert_eq!(t.on_ack(6), Step::Send { first: 7, count: 4 });
        assert_eq!(t.on_ack(10), Step::Send { first: 11, count: 1 });
        assert_eq!(t.on_ack(11), Step::Done);
    }

    #[test]
    fn block_numbers_roll_over() {
        let blk = 8u16;
        let mut t = ReadTransfer::new(70_000 * u64::from(blk), blk, 4, false, 1);
        assert_eq!(t.blocks(), 70_001);
        let mut step = t.start();
        let mut acked = 0u64;
        while let Step::Send { first, count } = step {
            let last = first + count - 1;
            acked = last;
            step = t.on_ack(last as u16); // the wire number wraps
        }
        assert_eq!(step, Step::Done);
        assert_eq!(acked, 70_001);
        // Around the wrap: base 65535, window 4 covers wire 65535, 0, 1, 2.
        let mut t = ReadTransfer::new(100_000 * 8, 8, 4, false, 1);
        t.base = 65535;
        t.in_flight = 4;
        assert_eq!(t.on_ack(0), Step::Send { first: 65537, count: 4 });
        assert_eq!(t.on_ack(65535), Step::Wait, "before the window");
    }
}

#[cfg(test)]
mod timing_properties {
    //! Whatever the configuration and the client's timeout, a silent
    //! client is given up within the silence cap.

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn silence_never_exceeds_the_cap(
            retransmit_ms in 0u64..100_000,
            max_retries in 0u32..1000,
            max_silence_ms in 1u64..1_000_000,
            timeout in proptest::option::of(1u8..=255),
        ) {
            let timing = Timing {
                retransmit: Duration::from_millis(retransmit_ms),
                max_retries,
                max_silence: Duration::from_millis(max_silence_ms),
            };
            let r = timing.plan(timeout);
            prop_assert!(r.interval > Duration::ZERO);
            prop_assert!(r.max_retries <= max_retries);
            prop_assert!(r.interval * (r.max_retries + 1) <= timing.max_silence);
            // The client's timeout is kept whenever it fits the cap.
            let asked = timeout.map_or(timing.retransmit, |s| Duration::from_secs(u64::from(s)));
            if asked > Duration::ZERO && asked <= timing.max_silence {
                prop_assert_eq!(r.interval, asked);
            }
        }
    }
}

#[cfg(test)]
mod robustness {
    //! Thousands of random and mutated datagrams through the parser: none
    //! panics, and whatever parses encodes back to an equal packet.

    use super::*;

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_and_mutated_packets_never_panic() {
        let seeds: Vec<Vec<u8>> = vec![
            b"\0\x01ipxe.efi\0octet\0blksize\x001468\0tsize\x000\0windowsize\x004\0".to_vec(),
            b"\0\x02x\0netascii\0".to_vec(),
            b"\0\x04\0\x01".to_vec(),
            b"\0\x05\0\x08refused\0".to_vec(),
            b"\0\x06blksize\x00512\0".to_vec(),
        ];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut parsed = 0;
        for i in 0..50_000 {
            let bytes: Vec<u8> = if i % 3 == 0 {
                let len = (rng.next() % 80) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut b = seeds[(rng.next() as usize) % seeds.len()].clone();
                for _ in 0..=(rng.next() % 4) {
                    let at = (rng.next() as usize) % b.len();
                    b[at] = if rng.next().is_multiple_of(2) {
                        0
                    } else {
                        rng.next() as u8
                    };
                }
                if rng.next().is_multiple_of(4) {
                    b.truncate((rng.next() as usize) % b.len());
                }
                b
            };
            if let Ok(p) = Packet::parse(&bytes) {
                parsed += 1;
                let again = p.to_vec();
                assert_eq!(Packet::parse(&again), Ok(p.clone()), "{bytes:?}");
                if let Packet::Rrq(r) = &p {
                    let n = negotiate(&r.options, 1 << 20, &Limits::default());
                    let mut t = ReadTransfer::new(1 << 20, n.blksize, n.windowsize, !n.oack.is_empty(), 3);
                    t.start();
                    t.on_ack(rng.next() as u16);
                }
            }
        }
        assert!(parsed > 1000, "the mutations should keep many packets valid ({parsed})");
    }
}
