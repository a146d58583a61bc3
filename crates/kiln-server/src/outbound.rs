//! Outbound requests the server makes for a caller (a tenant's webhook, a
//! job's callback URL, any URL a caller gives): they must not reach the
//! control plane (SSRF).
//!
//! Two parts. [`check_addr`] is the pure policy over `std::net` types: it
//! refuses loopback, link-local (cloud metadata lives at 169.254.169.254),
//! unspecified, multicast, broadcast, documentation, benchmarking and
//! reserved addresses, IPv6 forms that embed a refused IPv4 address, the
//! server's own addresses, and private ranges unless the operator's
//! `[outbound] allow` lists them. [`OutboundClient`] is the thin I/O around
//! it: it resolves a URL's host once, checks every address, then connects
//! only to those addresses (so a second, different DNS answer — rebinding —
//! is never used), follows no redirect, goes through no proxy, and bounds
//! time and response size.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use kiln_workflow::hooks::error_chain;
use serde::Deserialize;

// ---------------------------------------------------------------------------
// The policy (pure)
// ---------------------------------------------------------------------------

/// Why an address is special, in the words an error message needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Unspecified,
    Loopback,
    /// 169.254/16 and fe80::/10: cloud metadata services answer here.
    LinkLocal,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    /// Reserved by the IETF or deprecated; the text says which.
    Reserved(&'static str),
    /// The only rule `[outbound] allow` can lift.
    Private,
}

impl Rule {
    /// Whether an operator's allowlist can permit an address under this rule.
    pub fn allowable(self) -> bool {
        self == Rule::Private
    }

    fn what(self) -> &'static str {
        match self {
            Rule::Unspecified => "the unspecified address",
            Rule::Loopback => "a loopback address",
            Rule::LinkLocal => "a link-local address (where cloud metadata services answer)",
            Rule::Multicast => "a multicast address",
            Rule::Broadcast => "the broadcast address",
            Rule::Documentation => "a documentation address",
            Rule::Benchmarking => "a benchmarking address",
            Rule::Reserved(what) => what,
            Rule::Private => "a private address",
        }
    }
}

/// How an IPv6 address carries an IPv4 one that the network may deliver to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embedding {
    /// `::ffff:a.b.c.d`: a dual-stack socket connects to the IPv4 address.
    Mapped,
    /// `::ffff:0:a.b.c.d` (SIIT, RFC 2765).
    Translated,
    /// `64:ff9b::a.b.c.d` (RFC 6052): a NAT64 gateway forwards to the IPv4
    /// address.
    Nat64,
    /// `2002:aabb:ccdd::/48`: a 6to4 relay forwards to the IPv4 address.
    SixToFour,
}

impl Embedding {
    fn what(self) -> &'static str {
        match self {
            Embedding::Mapped => "IPv4-mapped, ::ffff:0:0/96",
            Embedding::Translated => "IPv4-translated, ::ffff:0:0:0/96",
            Embedding::Nat64 => "NAT64, 64:ff9b::/96",
            Embedding::SixToFour => "6to4, 2002::/16",
        }
    }
}

/// Why [`check_addr`] refused an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub addr: IpAddr,
    pub reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// In a special-purpose range.
    Range { rule: Rule, range: IpNet },
    /// One of the kiln server's own addresses.
    Own,
    /// An IPv6 address that reaches an IPv4 address which is refused.
    Embeds { how: Embedding, inner: Box<Refusal> },
}

impl Refusal {
    /// Whether `[outbound] allow` could permit this address.
    pub fn allowable(&self) -> bool {
        match &self.reason {
            Reason::Range { rule, .. } => rule.allowable(),
            Reason::Own => false,
            Reason::Embeds { inner, .. } => inner.allowable(),
        }
    }

    /// The innermost rule (`None`: the server's own address).
    pub fn rule(&self) -> Option<Rule> {
        match &self.reason {
            Reason::Range { rule, .. } => Some(*rule),
            Reason::Own => None,
            Reason::Embeds { inner, .. } => inner.rule(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = self.addr;
        match &self.reason {
            Reason::Range { rule, range } if rule.allowable() => write!(
                f,
                "{addr} is {} ({range}), which outbound requests reach only when the server's operator lists it in `[outbound] allow`",
                rule.what()
            ),
            Reason::Range { rule, range } => {
                write!(
                    f,
                    "{addr} is {} ({range}), which outbound requests never reach",
                    rule.what()
                )
            }
            Reason::Own => write!(
                f,
                "{addr} is one of the kiln server's own addresses, which outbound requests never reach"
            ),
            Reason::Embeds { how, inner } => {
                write!(
                    f,
                    "{addr} embeds the IPv4 address {} ({}): {inner}",
                    inner.addr,
                    how.what()
                )
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// What [`check_addr`] checks against: the operator's allowlist and the
/// server's own addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundRules {
    /// Private ranges the operator permits (only [`Rule::Private`] yields).
    pub allow: Vec<IpNet>,
    /// The server's own addresses: never reached, whatever `allow` says.
    pub own: Vec<IpAddr>,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len))
}

#[allow(clippy::too_many_arguments)]
const fn v6(a: u16, b: u16, c: u16, d: u16, e: u16, f: u16, g: u16, h: u16, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), len))
}

/// IPv4 special-purpose ranges (IANA's registry, RFC 6890 and successors),
/// first match wins: a narrower range comes before the one holding it.
const V4_RANGES: &[(IpNet, Rule)] = &[
    (v4(0, 0, 0, 0, 32), Rule::Unspecified),
    (v4(0, 0, 0, 0, 8), Rule::Reserved("in \"this network\", reserved")),
    (v4(127, 0, 0, 0, 8), Rule::Loopback),
    (v4(169, 254, 0, 0, 16), Rule::LinkLocal),
    (v4(255, 255, 255, 255, 32), Rule::Broadcast),
    (v4(224, 0, 0, 0, 4), Rule::Multicast),
    (v4(240, 0, 0, 0, 4), Rule::Reserved("reserved for future use")),
    (v4(192, 0, 2, 0, 24), Rule::Documentation),
    (v4(198, 51, 100, 0, 24), Rule::Documentation),
    (v4(203, 0, 113, 0, 24), Rule::Documentation),
    (v4(198, 18, 0, 0, 15), Rule::Benchmarking),
    (v4(192, 0, 0, 0, 24), Rule::Reserved("an IETF protocol assignment")),
    (
        v4(192, 88, 99, 0, 24),
        Rule::Reserved("the deprecated 6to4 relay anycast range"),
    ),
    (v4(10, 0, 0, 0, 8), Rule::Private),
    (v4(172, 16, 0, 0, 12), Rule::Private),
    (v4(192, 168, 0, 0, 16), Rule::Private),
    (v4(100, 64, 0, 0, 10), Rule::Private),
];

/// IPv6 special-purpose ranges, first match wins. Embeddings are handled
/// before this table; anything outside global unicast (2000::/3) and the
/// ranges named here is refused as unassigned.
const V6_RANGES: &[(IpNet, Rule)] = &[
    (v6(0, 0, 0, 0, 0, 0, 0, 0, 128), Rule::Unspecified),
    (v6(0, 0, 0, 0, 0, 0, 0, 1, 128), Rule::Loopback),
    // IPv4-compatible addresses (::a.b.c.d): deprecated by RFC 4291 and
    // routed as plain IPv6 today, so no legitimate destination is one.
    (
        v6(0, 0, 0, 0, 0, 0, 0, 0, 96),
        Rule::Reserved("a deprecated IPv4-compatible address"),
    ),
    // Local-use NAT64 (RFC 8215): where its IPv4 address sits depends on
    // the prefix length the site chose, so it cannot be checked.
    (
        v6(0x64, 0xff9b, 1, 0, 0, 0, 0, 0, 48),
        Rule::Reserved("a local-use NAT64 address, whose IPv4 destination cannot be checked"),
    ),
    (v6(0xfe80, 0, 0, 0, 0, 0, 0, 0, 10), Rule::LinkLocal),
    (v6(0xff00, 0, 0, 0, 0, 0, 0, 0, 8), Rule::Multicast),
    (v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0, 32), Rule::Documentation),
    (v6(0x3fff, 0, 0, 0, 0, 0, 0, 0, 20), Rule::Documentation),
    (v6(0x2001, 0x2, 0, 0, 0, 0, 0, 0, 48), Rule::Benchmarking),
    // Teredo hides its IPv4 addresses (the client's is inverted), and where
    // its relay forwards cannot be checked.
    (
        v6(0x2001, 0, 0, 0, 0, 0, 0, 0, 32),
        Rule::Reserved("a Teredo tunnel address"),
    ),
    (
        v6(0x2001, 0, 0, 0, 0, 0, 0, 0, 23),
        Rule::Reserved("an IETF protocol assignment"),
    ),
    (
        v6(0x100, 0, 0, 0, 0, 0, 0, 0, 64),
        Rule::Reserved("a discard-only address"),
    ),
    (
        v6(0x5f00, 0, 0, 0, 0, 0, 0, 0, 16),
        Rule::Reserved("an SRv6 segment identifier"),
    ),
    (
        v6(0xfec0, 0, 0, 0, 0, 0, 0, 0, 10),
        Rule::Reserved("a deprecated site-local address"),
    ),
    (v6(0xfc00, 0, 0, 0, 0, 0, 0, 0, 7), Rule::Private),
];

const GLOBAL_UNICAST: IpNet = v6(0x2000, 0, 0, 0, 0, 0, 0, 0, 3);

/// The IPv4 address an IPv6 address delivers to, for the forms that embed one.
fn embedded_v4(ip: Ipv6Addr) -> Option<(Embedding, Ipv4Addr)> {
    let s = ip.segments();
    let last32 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some((Embedding::Mapped, last32)),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some((Embedding::Translated, last32)),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some((Embedding::Nat64, last32)),
        [0x2002, a, b, ..] => Some((
            Embedding::SixToFour,
            Ipv4Addr::new((a >> 8) as u8, a as u8, (b >> 8) as u8, b as u8),
        )),
        _ => None,
    }
}

/// The special-purpose range `ip` lies in, if any (before the allowlist).
fn classify(ip: IpAddr) -> Option<(Rule, IpNet)> {
    let table = match ip {
        IpAddr::V4(_) => V4_RANGES,
        IpAddr::V6(_) => V6_RANGES,
    };
    if let Some((range, rule)) = table.iter().find(|(range, _)| range.contains(&ip)) {
        return Some((*rule, *range));
    }
    if ip.is_ipv6() && !GLOBAL_UNICAST.contains(&ip) {
        let range = IpNet::new(ip, 128).expect("128 is a valid IPv6 prefix length");
        return Some((
            Rule::Reserved("outside IPv6 global unicast (2000::/3), unassigned"),
            range,
        ));
    }
    None
}

/// Whether the server may open a connection to `ip` for a caller.
pub fn check_addr(ip: IpAddr, rules: &OutboundRules) -> Result<(), Refusal> {
    if let IpAddr::V6(v6) = ip
        && let Some((how, inner)) = embedded_v4(v6)
    {
        // The IPv6 form goes where the IPv4 address goes: judge that one.
        return check_addr(IpAddr::V4(inner), rules).map_err(|inner| Refusal {
            addr: ip,
            reason: Reason::Embeds {
                how,
                inner: Box::new(inner),
            },
        });
    }
    let special = classify(ip);
    if let Some((rule, range)) = special
        && !rule.allowable()
    {
        return Err(Refusal {
            addr: ip,
            reason: Reason::Range { rule, range },
        });
    }
    // Own addresses come before the allowlist: an operator who allows the
    // management network must not thereby allow the server itself.
    if rules.own.iter().any(|own| same_host(*own, ip)) {
        return Err(Refusal {
            addr: ip,
            reason: Reason::Own,
        });
    }
    match special {
        Some((rule, range)) if !rules.allow.iter().any(|net| net.contains(&ip)) => Err(Refusal {
            addr: ip,
            reason: Reason::Range { rule, range },
        }),
        _ => Ok(()),
    }
}

/// Equal, counting an IPv4-mapped IPv6 address as its IPv4 address (a
/// dual-stack listener reports either form).
fn same_host(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// One `[outbound] allow` entry: a CIDR (or a single address) that holds
/// private addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AllowedNet(pub IpNet);

impl TryFrom<String> for AllowedNet {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let text = text.trim();
        let net = match text.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => match text.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(format!(
                        "`{text}` is not a CIDR: write a network such as \"10.20.0.0/16\" or \"fd00:20::/48\", or one address"
                    ));
                }
            },
        };
        if net.trunc() != net {
            return Err(format!("`{text}` has host bits set: did you mean \"{}\"?", net.trunc()));
        }
        // A range that starts in a never-allowed range (0.0.0.0/0 starts at
        // the unspecified address, 127.0.0.0/8 is loopback) says the
        // operator expects it to allow what it cannot.
        let first = net.network();
        let probe = OutboundRules::default();
        if let Err(refusal) = check_addr(first, &probe)
            && !refusal.allowable()
        {
            return Err(format!(
                "`{text}` cannot be allowed: {refusal}; `[outbound] allow` lifts only the private-range rule (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7)"
            ));
        }
        let private: &[IpNet] = &[
            v4(10, 0, 0, 0, 8),
            v4(172, 16, 0, 0, 12),
            v4(192, 168, 0, 0, 16),
            v4(100, 64, 0, 0, 10),
            v6(0xfc00, 0, 0, 0, 0, 0, 0, 0, 7),
        ];
        if !private.iter().any(|p| p.contains(&net) || net.contains(p)) {
            return Err(format!(
                "`{text}` holds no private address, and public addresses need no entry: list ranges inside 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 or fc00::/7"
            ));
        }
        Ok(AllowedNet(net))
    }
}

/// `[outbound]`: requests the server makes to URLs callers give.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundSettings {
    /// Private ranges outbound requests may reach (a tenant's webhook
    /// receiver on the management network, say).
    #[serde(default)]
    pub allow: Vec<AllowedNet>,
    /// Name resolution plus the TCP (and TLS) connection.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// The whole request, resolution to the last byte of the answer.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Largest answer body read; a longer one fails the request.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
}

fn default_connect_timeout_secs() -> u64 {
    5
}

fn default_timeout_secs() -> u64 {
    10
}

fn default_max_response_bytes() -> u64 {
    64 << 10
}

impl Default for OutboundSettings {
    fn default() -> Self {
        OutboundSettings {
            allow: vec![],
            connect_timeout_secs: default_connect_timeout_secs(),
            timeout_secs: default_timeout_secs(),
            max_response_bytes: default_max_response_bytes(),
        }
    }
}

impl OutboundSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=60).contains(&self.connect_timeout_secs) {
            return Err(format!(
                "connect_timeout_secs = {} is out of range: give 1 to 60",
                self.connect_timeout_secs
            ));
        }
        if !(1..=300).contains(&self.timeout_secs) {
            return Err(format!(
                "timeout_secs = {} is out of range: give 1 to 300",
                self.timeout_secs
            ));
        }
        if self.max_response_bytes > 16 << 20 {
            return Err(format!(
                "max_response_bytes = {} is too large: give at most 16777216 (16 MiB)",
                self.max_response_bytes
            ));
        }
        Ok(())
    }

    fn allow_nets(&self) -> Vec<IpNet> {
        self.allow.iter().map(|a| a.0).collect()
    }
}

// ---------------------------------------------------------------------------
// URLs (pure)
// ---------------------------------------------------------------------------

/// Why a URL was not called, worded to follow a field name in an API error
/// (`callback_url: …`).
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    // The text itself is not repeated: a URL's query may hold a token.
    #[error("not a URL ({0}): write it as http(s)://HOST[:PORT]/PATH")]
    NotUrl(String),
    #[error("scheme `{0}` is not allowed: use http:// or https://")]
    Scheme(String),
    #[error("the URL carries a user name or password, which kiln does not send: put credentials in the path or query")]
    UserInfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("cannot resolve `{host}`: {reason}")]
    Resolve { host: String, reason: String },
    #[error("`{host}` resolves to no address")]
    NoAddress { host: String },
    #[error("{0}")]
    RefusedAddress(Refusal),
    #[error("`{host}` resolves to {}: {refusal}", refusal.addr)]
    RefusedName { host: String, refusal: Refusal },
    #[error("the server's own addresses cannot be read, so no outbound request is made: {0}")]
    OwnAddresses(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no answer within {0} s")]
    Timeout(u64),
    #[error("the request failed: {0}")]
    Request(String),
    #[error("answered {status} with a redirect to `{location}`, which kiln does not follow: give the final URL")]
    Redirect { status: u16, location: String },
    #[error("answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the answer is larger than {limit} bytes (`[outbound] max_response_bytes`)")]
    TooLarge { limit: u64 },
}

impl OutboundError {
    /// A refusal by the address policy (as opposed to a failed request).
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            OutboundError::RefusedAddress(r) | OutboundError::RefusedName { refusal: r, .. } => Some(r),
            _ => None,
        }
    }
}

/// Where a URL points before any name is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Ip(IpAddr),
    Name(String),
}

/// Checks what can be checked without the network: scheme, user info, host;
/// an address literal is checked against `rules` here too.
pub fn parse_url(text: &str, rules: &OutboundRules) -> Result<(reqwest::Url, Target, u16), OutboundError> {
    let url = reqwest::Url::parse(text.trim()).map_err(|e| OutboundError::NotUrl(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(OutboundError::Scheme(shown(url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(OutboundError::UserInfo);
    }
    let port = url.port_or_known_default().ok_or(OutboundError::NoHost)?;
    // The URL parser already turned `127.1`, `2130706433` and `0x7f.1`
    // into 127.0.0.1, so every spelling of an address is checked as one.
    let host = url.host_str().unwrap_or_default();
    let target = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Target::Ip(IpAddr::V6(
            v6.parse()
                .map_err(|_| OutboundError::NotUrl("invalid IPv6 address".into()))?,
        ))
    } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
        Target::Ip(IpAddr::V4(v4))
    } else if host.is_empty() {
        return Err(OutboundError::NoHost);
    } else {
        Target::Name(host.to_string())
    };
    if let Target::Ip(ip) = target {
        check_addr(ip, rules).map_err(OutboundError::RefusedAddress)?;
    }
    Ok((url, target, port))
}

/// A caller's text in an error message: on one line and not too long.
fn shown(text: &str) -> String {
    let one_line: String = text.chars().flat_map(char::escape_debug).collect();
    if one_line.chars().count() > 200 {
        format!("{}…", one_line.chars().take(200).collect::<String>())
    } else {
        one_line
    }
}

// ---------------------------------------------------------------------------
// The client (thin I/O)
// ---------------------------------------------------------------------------

/// Name resolution, injectable so tests can answer differently each time.
pub trait Resolver: Send + Sync + fmt::Debug {
    fn lookup(&self, host: &str, port: u16) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>>;
}

/// The system resolver (getaddrinfo, through tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(&self, host: &str, port: u16) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
        let host = host.to_owned();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// A URL that passed the rules, with the only addresses it may be called on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedUrl {
    url: reqwest::Url,
    /// The name to pin (`None`: the URL names an address).
    name: Option<String>,
    addrs: Vec<SocketAddr>,
}

impl CheckedUrl {
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Every address the request may connect to.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

/// A 2xx answer, its body read up to `[outbound] max_response_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The server's client for URLs callers give. Build it once
/// ([`OutboundClient::from_config`]) and share it.
#[derive(Debug, Clone)]
pub struct OutboundClient {
    settings: OutboundSettings,
    /// The server's listen addresses (its interfaces are read at each check:
    /// addresses come and go).
    listen: Vec<IpAddr>,
    resolver: Arc<dyn Resolver>,
    tls: rustls::ClientConfig,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the outbound HTTP client: {0}")]
pub struct OutboundSetupError(String);

impl OutboundClient {
    /// The server's client: `[outbound]` and every address the server
    /// listens on (the API's; pass others, such as a TLS listener's).
    pub fn from_config(config: &crate::Config) -> Result<OutboundClient, OutboundSetupError> {
        OutboundClient::new(config.outbound.clone(), vec![config.listen.ip()])
    }

    pub fn new(settings: OutboundSettings, listen: Vec<IpAddr>) -> Result<OutboundClient, OutboundSetupError> {
        settings.validate().map_err(OutboundSetupError)?;
        // rustls on ring like the rest of kiln (root Cargo.toml), verifying
        // against the system's trusted roots.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(|e| OutboundSetupError(format!("cannot load the system's trusted certificates: {e}")))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OutboundSetupError(format!("TLS set-up failed: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(OutboundClient {
            settings,
            listen,
            resolver: Arc::new(SystemResolver),
            tls,
        })
    }

    /// The same client resolving names through `resolver` (tests).
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolver>) -> OutboundClient {
        self.resolver = resolver;
        self
    }

    /// The rules as they stand now: the allowlist, the listen addresses and
    /// every address (and broadcast address) on the host's interfaces.
    pub fn rules(&self) -> Result<OutboundRules, OutboundError> {
        let mut own = self.listen.clone();
        own.extend(interface_addrs().map_err(OutboundError::OwnAddresses)?);
        own.sort();
        own.dedup();
        Ok(OutboundRules {
            allow: self.settings.allow_nets(),
            own,
        })
    }

    /// Resolves `url`'s host once and checks every address it resolves to;
    /// the result names the only addresses a request may use. For request
    /// validation too: the error reads well after `callback_url: `.
    pub async fn check_url(&self, url: &str) -> Result<CheckedUrl, OutboundError> {
        let rules = self.rules()?;
        let (url, target, port) = parse_url(url, &rules)?;
        let name = match target {
            Target::Ip(ip) => {
                return Ok(CheckedUrl {
                    url,
                    name: None,
                    addrs: vec![SocketAddr::new(ip, port)],
                });
            }
            Target::Name(name) => name,
        };
        let wait = Duration::from_secs(self.settings.connect_timeout_secs);
        let mut ips = match tokio::time::timeout(wait, self.resolver.lookup(&name, port)).await {
            Ok(Ok(ips)) => ips,
            Ok(Err(e)) => {
                return Err(OutboundError::Resolve {
                    host: name,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(OutboundError::Resolve {
                    host: name,
                    reason: format!("no answer within {} s", wait.as_secs()),
                });
            }
        };
        ips.sort();
        ips.dedup();
        if ips.is_empty() {
            return Err(OutboundError::NoAddress { host: name });
        }
        // Every address must pass: the connector may try any of them.
        for ip in &ips {
            check_addr(*ip, &rules).map_err(|refusal| OutboundError::RefusedName {
                host: name.clone(),
                refusal,
            })?;
        }
        Ok(CheckedUrl {
            url,
            name: Some(name),
            addrs: ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(),
        })
    }

    /// POSTs `body` as JSON to `url` after [`check_url`](Self::check_url).
    /// Only a 2xx answer is `Ok`; a redirect is an error naming where it
    /// pointed.
    pub async fn post_json<T: serde::Serialize + ?Sized>(
        &self,
        url: &str,
        body: &T,
    ) -> Result<OutboundResponse, OutboundError> {
        let bytes =
            serde_json::to_vec(body).map_err(|e| OutboundError::Request(format!("cannot encode the body: {e}")))?;
        let total = Duration::from_secs(self.settings.timeout_secs);
        // One deadline over resolution, connection, and the answer's body.
        match tokio::time::timeout(total, async {
            let checked = self.check_url(url).await?;
            self.send(&checked, bytes).await
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(OutboundError::Timeout(self.settings.timeout_secs)),
        }
    }

    /// Sends to a URL checked moments ago, connecting only to its addresses.
    async fn send(&self, checked: &CheckedUrl, body: Vec<u8>) -> Result<OutboundResponse, OutboundError> {
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(self.tls.clone())
            // A proxy (HTTP_PROXY in the environment) would connect for us,
            // to whatever it resolves: never use one.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(self.settings.connect_timeout_secs))
            .timeout(Duration::from_secs(self.settings.timeout_secs))
            .pool_max_idle_per_host(0)
            // Any name lookup but the pinned one fails.
            .dns_resolver(Arc::new(NoLookups))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
        if let Some(name) = &checked.name {
            builder = builder.resolve_to_addrs(name, &checked.addrs);
        }
        let client = builder.build().map_err(|e| OutboundError::Request(error_chain(&e)))?;
        tracing::debug!(host = ?checked.name, addrs = ?checked.addrs, "outbound request");
        let mut resp = client
            .post(checked.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.request_error(e))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| shown(&String::from_utf8_lossy(l.as_bytes())))
                .unwrap_or_else(|| "(no Location)".into());
            return Err(OutboundError::Redirect {
                status: status.as_u16(),
                location,
            });
        }
        let limit = self.settings.max_response_bytes;
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(OutboundError::TooLarge { limit });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.request_error(e))? {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(OutboundError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(OutboundError::Status {
                status: status.as_u16(),
                body: shown(text.trim()),
            });
        }
        Ok(OutboundResponse {
            status: status.as_u16(),
            body,
        })
    }

    fn request_error(&self, e: reqwest::Error) -> OutboundError {
        // Without the URL: its query may hold a token.
        let e = e.without_url();
        if e.is_timeout() {
            OutboundError::Timeout(self.settings.timeout_secs)
        } else if e.is_connect() {
            OutboundError::Connect(error_chain(&e))
        } else {
            OutboundError::Request(error_chain(&e))
        }
    }
}

/// The resolver the request client gets: the checked name is pinned with
/// `resolve_to_addrs`, so reaching this means something else was looked up.
#[derive(Debug)]
struct NoLookups;

impl reqwest::dns::Resolve for NoLookups {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        Box::pin(
            async move { Err(format!("`{name}` was not checked by the outbound rules, so it is not resolved").into()) },
        )
    }
}

/// Every address on the host's interfaces, with their broadcast addresses.
fn interface_addrs() -> Result<Vec<IpAddr>, String> {
    let mut out = vec![];
    for ifa in nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))? {
        for sa in [ifa.address, ifa.broadcast].into_iter().flatten() {
            if let Some(v4) = sa.as_sockaddr_in() {
                out.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                out.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rules(allow: &[&str], own: &[&str]) -> OutboundRules {
        OutboundRules {
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            own: own.iter().map(|a| ip(a)).collect(),
        }
    }

    /// Every row: address, the rule that refuses it with no allowlist
    /// (`None`: permitted), and whether `[outbound] allow` may lift it.
    #[test]
    fn the_address_table() {
        use Rule::*;
        let reserved = |_: &str| Reserved("");
        let table: &[(&str, Option<Rule>)] = &[
            // Public addresses pass.
            ("93.184.215.14", None),
            ("1.1.1.1", None),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001:80b::200e", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("192.0.3.1", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::808:808", None),
            ("2002:808:808::1", None),
            // Never allowed.
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(reserved("this network"))),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.0.1", Some(LinkLocal)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(reserved("future"))),
            ("192.0.2.1", Some(Documentation)),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("198.18.0.1", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("192.0.0.8", Some(reserved("ietf"))),
            ("192.88.99.1", Some(reserved("6to4 relay"))),
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("ff02::1", Some(Multicast)),
            ("ff05::1:3", Some(Multicast)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("2001:2::1", Some(Benchmarking)),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Some(reserved("teredo"))),
            ("2001:10::1", Some(reserved("ietf"))),
            ("100::1", Some(reserved("discard"))),
            ("5f00::1", Some(reserved("srv6"))),
            ("fec0::1", Some(reserved("site-local"))),
            ("::7f00:1", Some(reserved("ipv4-compatible"))),
            ("::808:808", Some(reserved("ipv4-compatible"))),
            ("4000::1", Some(reserved("unassigned"))),
            ("e000::1", Some(reserved("unassigned"))),
            // Embeddings of refused IPv4 addresses.
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:0:127.0.0.1", Some(Loopback)),
            ("64:ff9b::7f00:1", Some(Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            ("64:ff9b:1::a9fe:a9fe", Some(reserved("local-use nat64"))),
            ("64:ff9b:1::808:808", Some(reserved("local-use nat64"))),
            ("2002:7f00:1::1", Some(Loopback)),
            ("2002:a9fe:a9fe::", Some(LinkLocal)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("::ffff:255.255.255.255", Some(Broadcast)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("2002:c0a8:101::1", Some(Private)),
            // Private: refused unless allowed.
            ("10.0.0.1", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.254", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(Private)),
            ("100.127.255.254", Some(Private)),
            ("fc00::1", Some(Private)),
            ("fd12:3456::1", Some(Private)),
        ];
        let none = OutboundRules::default();
        for (addr, want) in table {
            let got = check_addr(ip(addr), &none);
            match (want, &got) {
                (None, Ok(())) => {}
                (Some(Reserved(_)), Err(r)) => {
                    assert!(matches!(r.rule(), Some(Reserved(_))), "{addr}: {r:?}");
                    assert!(!r.allowable(), "{addr}");
                }
                (Some(rule), Err(r)) => {
                    assert_eq!(r.rule(), Some(*rule), "{addr}: {r}");
                    assert_eq!(r.allowable(), *rule == Private, "{addr}");
                }
                _ => panic!("{addr}: expected {want:?}, got {got:?}"),
            }
        }
    }

    /// Every IPv6 form that delivers to an IPv4 address is judged exactly
    /// like that address: the range bounds of the table and a spread of
    /// pseudo-random addresses, under rules with an allowlist and own
    /// addresses.
    #[test]
    fn an_embedded_ipv4_address_is_judged_like_itself() {
        let r = rules(&["10.20.0.0/16"], &["10.20.0.1", "93.184.215.14"]);
        let mut addrs: Vec<Ipv4Addr> = vec![];
        for (range, _) in V4_RANGES {
            if let (IpAddr::V4(lo), IpAddr::V4(hi)) = (range.network(), range.broadcast()) {
                for a in [u32::from(lo), u32::from(hi)] {
                    addrs.extend([a.wrapping_sub(1), a, a.wrapping_add(1)].map(Ipv4Addr::from));
                }
            }
        }
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..50_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            addrs.push(Ipv4Addr::from(x));
        }
        addrs.extend(["10.20.0.1", "10.20.0.2", "93.184.215.14"].map(|a| a.parse::<Ipv4Addr>().unwrap()));
        let (mut refused, mut passed) = (0, 0);
        for a in addrs {
            let want = check_addr(IpAddr::V4(a), &r).map_err(|e| e.rule());
            if want.is_ok() {
                passed += 1
            } else {
                refused += 1
            }
            let [o0, o1, o2, o3] = a.octets();
            let (hi, lo) = (u16::from_be_bytes([o0, o1]), u16::from_be_bytes([o2, o3]));
            for form in [
                a.to_ipv6_mapped(),
                Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, hi, lo),
                Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo),
                Ipv6Addr::new(0x2002, hi, lo, 0, 0, 0, 0, 1),
            ] {
                let got = check_addr(IpAddr::V6(form), &r).map_err(|e| e.rule());
                assert_eq!(got, want, "{form} (of {a})");
            }
        }
        assert!(
            refused > 1000 && passed > 1000,
            "both outcomes are exercised: {refused} refused, {passed} passed"
        );
    }

    #[test]
    fn the_allowlist_lifts_only_private_ranges() {
        let r = rules(&["10.20.0.0/16", "fd00:20::/48", "0.0.0.0/0", "::/0"], &[]);
        assert_eq!(check_addr(ip("10.20.3.4"), &r), Ok(()));
        assert_eq!(
            check_addr(ip("::ffff:10.20.3.4"), &r),
            Ok(()),
            "the mapped form goes where the IPv4 one goes"
        );
        assert_eq!(check_addr(ip("fd00:20::5"), &r), Ok(()));
        // A catch-all allowlist (which config refuses anyway) still lifts
        // nothing but the private rule.
        for never in [
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "0.0.0.0",
            "224.0.0.1",
            "::ffff:127.0.0.1",
        ] {
            assert!(check_addr(ip(never), &r).is_err(), "{never}");
        }
        let r = rules(&["10.20.0.0/16"], &[]);
        assert!(check_addr(ip("10.21.0.1"), &r).is_err(), "outside the allowed range");
        assert!(check_addr(ip("192.168.0.1"), &r).is_err());
    }

    #[test]
    fn own_addresses_are_refused_even_when_allowed_or_public() {
        let r = rules(&["10.20.0.0/16"], &["10.20.0.1", "93.184.215.14", "::ffff:10.20.0.9"]);
        for own in [
            "10.20.0.1",
            "::ffff:10.20.0.1",
            "93.184.215.14",
            "10.20.0.9",
            "64:ff9b::a14:1",
        ] {
            let e = check_addr(ip(own), &r).unwrap_err();
            assert_eq!(e.rule(), None, "{own}: {e}");
            assert!(!e.allowable());
            assert!(e.to_string().contains("own addresses"), "{e}");
        }
        assert_eq!(check_addr(ip("10.20.0.2"), &r), Ok(()));
    }

    #[test]
    fn refusals_say_which_rule_and_how_to_allow() {
        let none = OutboundRules::default();
        let e = check_addr(ip("10.1.2.3"), &none).unwrap_err().to_string();
        assert_eq!(
            e,
            "10.1.2.3 is a private address (10.0.0.0/8), which outbound requests reach only when the server's operator lists it in `[outbound] allow`"
        );
        let e = check_addr(ip("169.254.169.254"), &none).unwrap_err().to_string();
        assert!(
            e.contains("link-local") && e.contains("169.254.0.0/16") && e.contains("never"),
            "{e}"
        );
        assert!(!e.contains("allow"), "{e}");
        let e = check_addr(ip("::ffff:127.0.0.1"), &none).unwrap_err().to_string();
        assert_eq!(
            e,
            "::ffff:127.0.0.1 embeds the IPv4 address 127.0.0.1 (IPv4-mapped, ::ffff:0:0/96): 127.0.0.1 is a loopback address (127.0.0.0/8), which outbound requests never reach"
        );
    }

    #[test]
    fn allow_entries_are_checked_at_load() {
        let ok = |s: &str| AllowedNet::try_from(s.to_string()).map(|a| a.0.to_string());
        assert_eq!(ok("10.20.0.0/16"), Ok("10.20.0.0/16".into()));
        assert_eq!(ok("10.20.0.7"), Ok("10.20.0.7/32".into()));
        assert_eq!(ok("fd00:20::/48"), Ok("fd00:20::/48".into()));
        assert_eq!(
            ok("10.0.0.0/7"),
            Ok("10.0.0.0/7".into()),
            "wider than a private range, but holds one"
        );
        for (bad, says) in [
            ("10.20.0.5/16", "did you mean \"10.20.0.0/16\""),
            ("10.20.0.0/33", "not a CIDR"),
            ("intranet", "not a CIDR"),
            ("127.0.0.0/8", "cannot be allowed"),
            ("169.254.169.254/32", "cannot be allowed"),
            ("0.0.0.0/0", "cannot be allowed"),
            ("::/0", "cannot be allowed"),
            ("fe80::/10", "cannot be allowed"),
            ("8.8.8.0/24", "public addresses need no entry"),
        ] {
            let e = ok(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn urls_are_checked_before_any_lookup() {
        let none = OutboundRules::default();
        let p = |s: &str| parse_url(s, &none);
        assert!(
            matches!(p("https://hooks.example.com/x?t=1"), Ok((_, Target::Name(n), 443)) if n == "hooks.example.com")
        );
        assert!(matches!(p("http://93.184.215.14:8080/"), Ok((_, Target::Ip(_), 8080))));
        for (bad, says) in [
            ("ftp://example.com/", "scheme `ftp`"),
            ("file:///etc/passwd", "scheme `file`"),
            ("gopher://example.com/", "scheme `gopher`"),
            ("http://user:pw@example.com/", "user name or password"),
            ("http://user@example.com/", "user name or password"),
            ("not a url", "not a URL (relative URL without a base)"),
            ("http://127.0.0.1/", "loopback"),
            ("http://[::1]:8080/", "loopback"),
            ("http://[::ffff:7f00:1]/", "loopback"),
            ("http://169.254.169.254/latest/meta-data/", "link-local"),
            // Other spellings of 127.0.0.1 the URL parser normalizes.
            ("http://2130706433/", "loopback"),
            ("http://0x7f.1/", "loopback"),
            ("http://127.1/", "loopback"),
            ("http://0/", "unspecified"),
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn settings_are_bounded() {
        let s = OutboundSettings::default();
        assert_eq!(s.validate(), Ok(()));
        let e = OutboundSettings {
            timeout_secs: 0,
            ..OutboundSettings::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("timeout_secs"), "{e}");
        let e = OutboundSettings {
            max_response_bytes: 1 << 30,
            ..OutboundSettings::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("max_response_bytes"), "{e}");
    }
}
