//! Server configuration: a TOML file, `KILN_*` environment variables and
//! command-line flags, in rising precedence. Unknown keys in the file are
//! rejected with the key named. Every key is documented in docs/config.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The keys of the config file; each is also a flag and a `KILN_*` variable.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Directory for the embedded database, the secret key and artifacts.
    #[arg(long, env = "KILN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the API listens on (HOST:PORT).
    #[arg(long, env = "KILN_LISTEN")]
    pub listen: Option<String>,
    /// PostgreSQL URL; the embedded SQLite database is used when absent.
    #[arg(long, env = "KILN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Key that seals BMC passwords (default: DATA_DIR/secret.key).
    #[arg(long, env = "KILN_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Log filter (`info`, `kiln_server=debug`, …).
    #[arg(long, env = "KILN_LOG")]
    pub log: Option<String>,
    /// How the API is served: TLS, plain HTTP, trusted proxies (file only:
    /// `[api]`).
    #[arg(skip)]
    #[serde(default)]
    pub api: Option<ApiSettings>,
    /// Net boot: the boot decision and HTTP boot (file only: `[boot]`).
    #[arg(skip)]
    #[serde(default)]
    pub boot: Option<BootSettings>,
    /// Net boot: the DHCP service (file only: `[dhcp]`).
    #[arg(skip)]
    #[serde(default)]
    pub dhcp: Option<DhcpSettings>,
    /// Net boot: the TFTP service (file only: `[tftp]`; on beside `[dhcp]`
    /// unless `enabled = false`).
    #[arg(skip)]
    #[serde(default)]
    pub tftp: Option<crate::tftp::TftpSettings>,
    /// BMC calls: deadlines, concurrency, power sync, the command driver
    /// (file only: `[bmc]`, `[bmc.command]`).
    #[arg(skip)]
    #[serde(default)]
    pub bmc: Option<crate::bmc::BmcSettings>,
    /// Jobs: concurrency, leases, reimage timeouts (file only: `[jobs]`,
    /// `[jobs.reimage]`).
    #[arg(skip)]
    #[serde(default)]
    pub jobs: Option<kiln_workflow::EngineSettings>,
    /// Hooks run around reimages (file only: `[[hooks]]`, docs/hooks.md).
    #[arg(skip)]
    #[serde(default)]
    pub hooks: Option<Vec<kiln_workflow::hooks::HookConfig>>,
    /// How post-install tasks run (file only: `[post_install]`).
    #[arg(skip)]
    #[serde(default)]
    pub post_install: Option<kiln_workflow::post_install::PostInstallSettings>,
    /// Requests to URLs callers give (file only: `[outbound]`).
    #[arg(skip)]
    #[serde(default)]
    pub outbound: Option<crate::outbound::OutboundSettings>,
    /// API tokens: lifetimes, failed-authentication limit (file only: `[auth]`).
    #[arg(skip)]
    #[serde(default)]
    pub auth: Option<crate::auth::AuthSettings>,
}

/// `[api]`: how the API listener is served.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Serve the API over TLS: with `tls_cert`/`tls_key`, or a certificate
    /// kiln generates in DATA_DIR/tls. Default: on when a certificate is
    /// given, off otherwise (and then only loopback, or `allow_plain_http`).
    #[serde(default)]
    pub tls: Option<bool>,
    /// PEM certificate chain (leaf first) and its PEM private key.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Serve the API over plain HTTP on a non-loopback address (behind a
    /// TLS-terminating proxy, or on a network the operator trusts).
    #[serde(default)]
    pub allow_plain_http: bool,
    /// Peers (CIDRs) whose `X-Forwarded-For` names the client.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Where the API's TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// The operator's PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// Generated at first start into this directory (`cert.pem`, `key.pem`)
    /// and kept across restarts.
    Generated { dir: PathBuf },
}

/// The validated `[api]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiConfig {
    /// `None`: plain HTTP (loopback, or allowed explicitly).
    pub tls: Option<TlsSource>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl ApiSettings {
    /// Pure: what `[api]` means for a server listening on `listen`, or
    /// what to write instead.
    fn resolve(self, listen: SocketAddr, data_dir: &Path) -> Result<ApiConfig, ConfigError> {
        let bad = |m: String| Err(ConfigError::Api(m));
        let files = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsSource::Files { cert, key }),
            (None, None) => None,
            _ => {
                return bad("tls_cert and tls_key go together: give both PEM files, or neither \
                     (with `tls = true` kiln then generates a certificate in DATA_DIR/tls)"
                    .into());
            }
        };
        let tls = match (self.tls, files) {
            (Some(false), Some(_)) => {
                return bad("`tls = false` but tls_cert/tls_key are set: remove one or the other".into());
            }
            (Some(false), None) => None,
            (_, Some(f)) => Some(f),
            (Some(true), None) => Some(TlsSource::Generated {
                dir: data_dir.join("tls"),
            }),
            (None, None) => None,
        };
        if tls.is_none() && !listen.ip().is_loopback() && !self.allow_plain_http {
            return bad(format!(
                "the API would listen on {listen}, which is not loopback, over plain HTTP (tokens would cross \
                 the network in clear). Set `tls = true` under [api] (kiln generates a certificate in \
                 DATA_DIR/tls and prints its fingerprint), or give `tls_cert` and `tls_key`; if a \
                 TLS-terminating proxy stands in front of kiln, set `allow_plain_http = true` instead. \
                 Or listen on 127.0.0.1"
            ));
        }
        Ok(ApiConfig {
            tls,
            trusted_proxies: self.trusted_proxies,
        })
    }
}

/// `[boot]`: what booting machines are told, and where HTTP boot finds
/// its files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSettings {
    /// Answer unknown machines (and enrolled ones never discovered) with the
    /// discovery agent. Off: unknown machines get no answer at all.
    #[serde(default)]
    pub discovery: bool,
    /// A plain-HTTP listener (HOST:PORT) serving only the boot routes and
    /// the token-carrying agent endpoints, for firmware and agents.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Base URL of kiln's HTTP boot as machines reach it. Default: the
    /// address of the interface (DHCP) or the Host a client asked (HTTP).
    #[serde(default)]
    pub http_base: Option<String>,
    /// Directory served at `/boot/file/` (default: DATA_DIR/artifacts).
    #[serde(default)]
    pub artifacts: Option<PathBuf>,
    /// Where iPXE's first-stage binaries are (`undionly.kpxe`,
    /// `snponly.efi`, `ipxe.efi`; Debian's `ipxe` package installs them
    /// here): served over HTTP and TFTP when the artifacts directory (the
    /// TFTP root) does not have a file of that name.
    #[serde(default = "default_ipxe_dir")]
    pub ipxe_dir: PathBuf,
    /// The discovery agent's kernel and initrd, relative to `artifacts`.
    #[serde(default = "default_agent_kernel")]
    pub agent_kernel: String,
    #[serde(default = "default_agent_initrd")]
    pub agent_initrd: String,
    /// Extra kernel arguments of the agent.
    #[serde(default = "default_agent_cmdline")]
    pub agent_cmdline: Vec<String>,
    /// Memory for artifacts served from RAM, in MiB (0: none).
    #[serde(default = "default_file_cache_mib")]
    pub file_cache_mib: u64,
    /// Larger artifacts are streamed from disk, in MiB.
    #[serde(default = "default_file_cache_max_file_mib")]
    pub file_cache_max_file_mib: u64,
    /// How long a discovery token is good for, in seconds (60 to 86400):
    /// from the boot script that gives it to the agent's report.
    #[serde(default = "default_discovery_token_secs")]
    pub discovery_token_secs: u64,
}

fn default_discovery_token_secs() -> u64 {
    // The agent reports within a minute or two of its boot (LLDP listens
    // for 35 s); 30 minutes also covers a slow firmware, a long kernel
    // download and the agent's own retries while the server is away.
    1800
}

fn default_file_cache_mib() -> u64 {
    1024
}

fn default_file_cache_max_file_mib() -> u64 {
    256
}

impl BootSettings {
    pub fn file_cache_limits(&self) -> crate::boot_files::CacheLimits {
        crate::boot_files::CacheLimits {
            total: self.file_cache_mib.saturating_mul(1 << 20),
            max_file: self.file_cache_max_file_mib.saturating_mul(1 << 20),
        }
    }
}

fn default_ipxe_dir() -> PathBuf {
    PathBuf::from(crate::first_stage::DEBIAN_IPXE_DIR)
}

fn default_agent_kernel() -> String {
    "vmlinuz".into()
}

fn default_agent_initrd() -> String {
    "kiln-agent.cpio.gz".into()
}

fn default_agent_cmdline() -> Vec<String> {
    // The last console= is /dev/console: serial, where a headless server's
    // output is read (and a test asserts).
    vec!["console=tty0".into(), "console=ttyS0,115200".into()]
}

impl Default for BootSettings {
    fn default() -> Self {
        BootSettings {
            discovery: false,
            listen: None,
            http_base: None,
            artifacts: None,
            ipxe_dir: default_ipxe_dir(),
            agent_kernel: default_agent_kernel(),
            agent_initrd: default_agent_initrd(),
            agent_cmdline: default_agent_cmdline(),
            file_cache_mib: default_file_cache_mib(),
            file_cache_max_file_mib: default_file_cache_max_file_mib(),
            discovery_token_secs: default_discovery_token_secs(),
        }
    }
}

/// `[dhcp]`: kiln's DHCPv4 service. Absent: kiln serves no DHCP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSettings {
    /// `full` (addresses and boot) or `proxy` (boot information only).
    pub mode: kiln_boot::dhcp::Mode,
    /// Interfaces to serve on, by name.
    pub interfaces: Vec<String>,
    /// UDP port to listen on. Anything but 67 is for tests and the demo
    /// (relays send to 67): with it kiln serves relays on loopback without
    /// privileges.
    #[serde(default = "default_dhcp_port")]
    pub port: u16,
    /// First-stage file for BIOS PXE clients.
    #[serde(default = "default_bios_file")]
    pub bios_file: String,
    /// First-stage file for UEFI clients.
    #[serde(default = "default_uefi_file")]
    pub uefi_file: String,
    #[serde(default, rename = "subnet")]
    pub subnets: Vec<kiln_boot::dhcp::Subnet>,
}

fn default_dhcp_port() -> u16 {
    crate::dhcp::SERVER_PORT
}

fn default_bios_file() -> String {
    kiln_boot::firmware::FirstStageFiles::default().bios
}

fn default_uefi_file() -> String {
    kiln_boot::firmware::FirstStageFiles::default().uefi
}

impl DhcpSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Dhcp(m));
        if self.interfaces.is_empty() {
            return bad("`interfaces` is empty: name the interfaces to serve on".into());
        }
        if self.mode == kiln_boot::dhcp::Mode::Full && self.subnets.is_empty() {
            return bad("full mode needs at least one [[dhcp.subnet]]".into());
        }
        for s in &self.subnets {
            s.validate().map_err(|e| ConfigError::Dhcp(e.to_string()))?;
        }
        Ok(())
    }
}

impl Settings {
    /// `self` with the values of `over` wherever `over` has one.
    fn overlay(self, over: Settings) -> Settings {
        Settings {
            data_dir: over.data_dir.or(self.data_dir),
            listen: over.listen.or(self.listen),
            database_url: over.database_url.or(self.database_url),
            secret_key_file: over.secret_key_file.or(self.secret_key_file),
            log: over.log.or(self.log),
            api: over.api.or(self.api),
            boot: over.boot.or(self.boot),
            dhcp: over.dhcp.or(self.dhcp),
            tftp: over.tftp.or(self.tftp),
            bmc: over.bmc.or(self.bmc),
            jobs: over.jobs.or(self.jobs),
            hooks: over.hooks.or(self.hooks),
            post_install: over.post_install.or(self.post_install),
            outbound: over.outbound.or(self.outbound),
            auth: over.auth.or(self.auth),
        }
    }
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub database_url: Option<String>,
    pub secret_key_file: PathBuf,
    pub log: String,
    pub api: ApiConfig,
    pub boot: BootSettings,
    pub dhcp: Option<DhcpSettings>,
    /// `None`: no TFTP. On when `[tftp]` is given or `[dhcp]` is (whose
    /// PXE clients are sent their first stage by TFTP), unless
    /// `[tftp] enabled = false`.
    pub tftp: Option<crate::tftp::TftpSettings>,
    pub bmc: crate::bmc::BmcSettings,
    pub jobs: kiln_workflow::EngineSettings,
    pub hooks: Vec<kiln_workflow::hooks::HookConfig>,
    pub post_install: kiln_workflow::post_install::PostInstallSettings,
    pub outbound: crate::outbound::OutboundSettings,
    pub auth: crate::auth::AuthSettings,
}

impl Config {
    /// Where HTTP boot's files live.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.boot
            .artifacts
            .clone()
            .unwrap_or_else(|| self.data_dir.join("artifacts"))
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/kiln";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("listen address `{0}` is not HOST:PORT (for example 127.0.0.1:7070)")]
    Listen(String),
    #[error("[api]: {0}")]
    Api(String),
    #[error("[dhcp]: {0}")]
    Dhcp(String),
    #[error("[boot]: {0}")]
    Boot(String),
    #[error("[tftp]: {0}")]
    Tftp(String),
    /// A file kiln's DHCP would offer that kiln cannot serve
    /// ([`crate::first_stage::check`]).
    #[error("boot files: {0}")]
    BootFiles(String),
    #[error("[[hooks]]: {0}")]
    Hooks(String),
    #[error("[post_install]: {0}")]
    PostInstall(String),
    #[error("[bmc]: {0}")]
    Bmc(String),
    #[error("[outbound]: {0}")]
    Outbound(String),
    #[error("[auth]: {0}")]
    Auth(String),
    #[error(
        "database_url must start with postgres:// or postgresql:// (leave it out for the embedded SQLite database)"
    )]
    DatabaseUrl,
}

impl Config {
    /// Reads `file` (if any) and lays `flags` (flags and environment) over it.
    pub fn load(file: Option<&Path>, flags: Settings) -> Result<Config, ConfigError> {
        let from_file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read { path: path.into(), err })?;
                toml::from_str::<Settings>(&text).map_err(|e| ConfigError::Parse {
                    path: path.into(),
                    message: e.to_string().trim().replace('\n', " "),
                })?
            }
            None => Settings::default(),
        };
        Config::from_settings(from_file.overlay(flags))
    }

    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let data_dir = s.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let listen_text = s.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text
            .parse()
            .map_err(|_| ConfigError::Listen(listen_text.clone()))?;
        if let Some(url) = &s.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::DatabaseUrl);
        }
        if let Some(d) = &s.dhcp {
            d.validate()?;
        }
        if let Some(t) = &s.tftp {
            t.validate().map_err(ConfigError::Tftp)?;
        }
        if let Some(b) = &s.boot {
            for (what, arg) in std::iter::once(("agent_kernel", &b.agent_kernel))
                .chain(std::iter::once(("agent_initrd", &b.agent_initrd)))
                .chain(b.agent_cmdline.iter().map(|a| ("agent_cmdline", a)))
            {
                kiln_boot::ipxe::check_arg(arg).map_err(|e| ConfigError::Boot(format!("{what}: {e}")))?;
            }
            if let Some(base) = &b.http_base {
                check_http_base(base).map_err(|e| ConfigError::Boot(format!("http_base: {e}")))?;
            }
            if !(60..=86_400).contains(&b.discovery_token_secs) {
                return Err(ConfigError::Boot(format!(
                    "discovery_token_secs = {} is out of range: give 60 to 86400 (seconds a discovery token is good for)",
                    b.discovery_token_secs
                )));
            }
        }
        let api = s.api.unwrap_or_default().resolve(listen, &data_dir)?;
        if api.tls.is_some()
            && s.dhcp.is_some()
            && s.boot
                .as_ref()
                .is_none_or(|b| b.listen.is_none() && b.http_base.is_none())
        {
            // DHCP would point firmware at the API's port, which speaks TLS
            // with a certificate firmware has no way to trust.
            return Err(ConfigError::Boot(
                "[dhcp] sends firmware to kiln's HTTP boot, but the API is served over TLS, which firmware \
                 cannot verify: set `listen` under [boot] (a plain-HTTP boot listener, e.g. \"0.0.0.0:8080\"), \
                 or `http_base`"
                    .into(),
            ));
        }
        let bmc = s.bmc.unwrap_or_default();
        bmc.validate().map_err(ConfigError::Bmc)?;
        let auth = s.auth.unwrap_or_default();
        auth.validate().map_err(ConfigError::Auth)?;
        let hooks = s.hooks.unwrap_or_default();
        kiln_workflow::hooks::HookRunner::new(hooks.clone()).map_err(|e| ConfigError::Hooks(e.to_string()))?;
        let post_install = s.post_install.unwrap_or_default();
        let problems = post_install.validate();
        if !problems.is_empty() {
            return Err(ConfigError::PostInstall(problems.join("; ")));
        }
        let outbound = s.outbound.unwrap_or_default();
        outbound.validate().map_err(ConfigError::Outbound)?;
        Ok(Config {
            outbound,
            api,
            bmc,
            jobs: s.jobs.unwrap_or_default(),
            hooks,
            post_install,
            auth,
            boot: s.boot.unwrap_or_default(),
            tftp: match s.tftp {
                Some(t) => t.enabled.then_some(t),
                None => s.dhcp.is_some().then(crate::tftp::TftpSettings::default),
            },
            dhcp: s.dhcp,
            secret_key_file: s.secret_key_file.unwrap_or_else(|| data_dir.join("secret.key")),
            data_dir,
            listen,
            database_url: s.database_url,
            log: s.log.unwrap_or_else(|| "info".to_string()),
        })
    }
}

/// Checks `[boot] http_base` as the places it goes need it: iPXE scripts,
/// kernel command lines and installer files (which take only plain URL
/// characters), so that a bad value stops the start rather than every
/// later boot.
fn check_http_base(base: &str) -> Result<(), String> {
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .ok_or_else(|| format!("`{base}` must start with http:// or https:// (e.g. http://10.0.0.1:7070)"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("`{base}` names no host (e.g. http://10.0.0.1:7070)"));
    }
    if let Some(bad) = base
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._:/[]".contains(*c)))
    {
        return Err(format!(
            "`{base}` has the character {bad:?}: machines get this URL in iPXE scripts and kernel \
             command lines, which take only A-Z a-z 0-9 and - . _ : / [ ] (no query, no user)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn flags_override_the_file() {
        let (_d, path) = file("data_dir = \"/srv/kiln\"\nlisten = \"0.0.0.0:80\"\n");
        let flags = Settings {
            listen: Some("127.0.0.1:9000".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&path), flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/kiln"));
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.secret_key_file, PathBuf::from("/srv/kiln/secret.key"));
    }

    #[test]
    fn file_cache_limits() {
        let c = Config::load(None, Settings::default()).unwrap();
        assert_eq!(
            c.boot.file_cache_limits(),
            crate::boot_files::CacheLimits {
                total: 1 << 30,
                max_file: 256 << 20
            }
        );
        let (_d, path) = file("[boot]\nfile_cache_mib = 0\nfile_cache_max_file_mib = 8\n");
        let c = Config::load(Some(&path), Settings::default()).unwrap();
        assert_eq!(c.boot.file_cache_limits().total, 0);
        assert_eq!(c.boot.file_cache_limits().max_file, 8 << 20);
    }

    #[test]
    fn unknown_keys_are_named() {
        let (_d, path) = file("data_dir = \"/x\"\nlisten_addr = \"1.2.3.4:5\"\n");
        let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(e.contains("listen_addr"), "{e}");
    }

    #[test]
    fn dhcp_section() {
        let (_d, path) = file(
            "[dhcp]\nmode = \"full\"\ninterfaces = [\"br0\"]\n\n[[dhcp.subnet]]\nnetwork = \"10.0.0.0/24\"\npool = [\"10.0.0.100\", \"10.0.0.200\"]\n",
        );
        let c = Config::load(Some(&path), Settings::default()).unwrap();
        let d = c.dhcp.unwrap();
        assert_eq!(d.subnets.len(), 1);
        assert_eq!(d.bios_file, "undionly.kpxe");
        let (_d, path) = file("[dhcp]\nmode = \"full\"\ninterfaces = [\"br0\"]\n");
        let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(e.contains("at least one [[dhcp.subnet]]"), "{e}");
        let (_d, path) = file("[dhcp]\nmode = \"full\"\ninterfaces = [\"br0\"]\nleases = 1\n");
        let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(e.contains("leases"), "{e}");
        let (_d, path) = file(
            "[dhcp]\nmode = \"full\"\ninterfaces = [\"br0\"]\n[[dhcp.subnet]]\nnetwork = \"10.0.0.0/24\"\npool = [\"10.0.1.1\", \"10.0.1.9\"]\n",
        );
        let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(e.contains("pool"), "{e}");
    }

    #[test]
    fn tftp_section() {
        let (_d, path) = file("[tftp]\nroot = \"/srv/tftp\"\n");
        let t = Config::load(Some(&path), Settings::default()).unwrap().tftp.unwrap();
        assert_eq!(
            (
                t.max_transfers,
                t.max_per_client,
                t.max_timeout_secs,
                t.max_retries,
                t.max_silence_secs
            ),
            (64, 4, 10, 5, 30),
            "the documented defaults"
        );
        let (_d, path) = file("[tftp]\nmax_per_client = 2\nmax_timeout_secs = 5\nmax_silence_secs = 12\n");
        let b = Config::load(Some(&path), Settings::default())
            .unwrap()
            .tftp
            .unwrap()
            .bounds();
        assert_eq!((b.max_per_client, b.limits.max_timeout), (2, 5));
        assert_eq!(b.timing.max_silence, std::time::Duration::from_secs(12));
        for (text, want) in [
            ("max_per_client = 0", "max_per_client is 0"),
            ("max_transfers = 0", "max_transfers is 0"),
            ("max_timeout_secs = 0", "max_timeout_secs is 0"),
            ("max_timeout_secs = 256", "max_timeout_secs"),
            ("max_silence_secs = 5", "raise max_silence_secs"),
            ("max_silence = 5", "max_silence"),
        ] {
            let (_d, path) = file(&format!("[tftp]\n{text}\n"));
            let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn bmc_section() {
        let c = Config::load(None, Settings::default()).unwrap();
        assert_eq!(c.bmc.sync_interval_secs, 0, "power sync is off unless asked for");
        assert!(c.bmc.command.is_none());
        let (_d, path) = file(
            "[bmc]\ndeadline_secs = 5\nmax_concurrent = 8\n[bmc.command]\npower_on = [\"/usr/local/bin/pdu\", \"on\", \"{hostname}\"]\n",
        );
        let c = Config::load(Some(&path), Settings::default()).unwrap();
        assert_eq!(c.bmc.deadline_secs, 5);
        assert_eq!(c.bmc.command.unwrap().power_on.unwrap()[2], "{hostname}");
        for (text, want) in [
            (
                "[bmc.command]\npower_on = [\"/bin/pdu\", \"{password}\"]\n",
                "never put into arguments",
            ),
            ("[bmc.command]\npower_of = [\"/bin/pdu\"]\n", "power_of"),
            ("[bmc]\nauth_failure_limit = 5\n", "auth_failure_limit"),
            ("[bmc]\nmax_concurrent = 0\n", "max_concurrent"),
        ] {
            let (_d, path) = file(text);
            let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn http_base_is_checked_at_start() {
        for (base, want) in [
            ("10.0.0.1:7070", "must start with http://"),
            ("http://", "names no host"),
            ("http://10.0.0.1:7070/?x=1", "the character '?'"),
            ("http://user@boot:7070", "the character '@'"),
            ("http://boot 7070", "the character ' '"),
        ] {
            let (_d, path) = file(&format!("[boot]\nhttp_base = \"{base}\"\n"));
            let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
            assert!(e.contains("http_base") && e.contains(want), "{base}: {e}");
        }
        for base in [
            "http://10.0.0.1:7070",
            "https://boot.example.net/kiln/",
            "http://[fd00::1]:7070",
        ] {
            let (_d, path) = file(&format!("[boot]\nhttp_base = \"{base}\"\n"));
            assert!(Config::load(Some(&path), Settings::default()).is_ok(), "{base}");
        }
    }

    #[test]
    fn outbound_section() {
        let c = Config::load(None, Settings::default()).unwrap();
        assert!(c.outbound.allow.is_empty(), "no private range is allowed unless listed");
        let (_d, path) = file("[outbound]\nallow = [\"10.20.0.0/16\", \"fd00:20::/48\"]\ntimeout_secs = 5\n");
        let c = Config::load(Some(&path), Settings::default()).unwrap();
        assert_eq!(c.outbound.allow.len(), 2);
        assert_eq!(c.outbound.timeout_secs, 5);
        for (text, want) in [
            ("[outbound]\nallow = [\"127.0.0.0/8\"]\n", "cannot be allowed"),
            ("[outbound]\nallow = [\"10.20.0.1/16\"]\n", "10.20.0.0/16"),
            ("[outbound]\nallow = [\"intranet\"]\n", "not a CIDR"),
            ("[outbound]\ntimeout_secs = 0\n", "timeout_secs"),
            ("[outbound]\nallowed = []\n", "allowed"),
        ] {
            let (_d, path) = file(text);
            let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn plain_http_off_loopback_needs_an_explicit_allow() {
        // Loopback: plain HTTP, as the demo and the tests run.
        let c = Config::load(None, Settings::default()).unwrap();
        assert_eq!(c.api.tls, None);
        let public = |file_text: &str| {
            let (_d, path) = file(file_text);
            Config::load(
                Some(&path),
                Settings {
                    listen: Some("0.0.0.0:7070".into()),
                    data_dir: Some("/srv/kiln".into()),
                    ..Default::default()
                },
            )
        };
        let e = public("").unwrap_err().to_string();
        assert!(e.contains("0.0.0.0:7070, which is not loopback"), "{e}");
        assert!(
            e.contains("`tls = true`") && e.contains("allow_plain_http = true"),
            "{e}"
        );
        let e = public("[api]\ntls = false\n").unwrap_err().to_string();
        assert!(e.contains("not loopback"), "{e}");
        let c = public("[api]\nallow_plain_http = true\n").unwrap();
        assert_eq!(c.api.tls, None);
        let c = public("[api]\ntls = true\n").unwrap();
        assert_eq!(
            c.api.tls,
            Some(TlsSource::Generated {
                dir: "/srv/kiln/tls".into()
            })
        );
        let c = public("[api]\ntls_cert = \"/etc/kiln/c.pem\"\ntls_key = \"/etc/kiln/k.pem\"\n").unwrap();
        assert_eq!(
            c.api.tls,
            Some(TlsSource::Files {
                cert: "/etc/kiln/c.pem".into(),
                key: "/etc/kiln/k.pem".into()
            })
        );
        for (text, want) in [
            ("[api]\ntls_cert = \"/c.pem\"\n", "go together"),
            (
                "[api]\ntls = false\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n",
                "remove one or the other",
            ),
            ("[api]\ntrusted_proxies = [\"10.0.0.0/33\"]\n", "trusted_proxies"),
            ("[api]\ntls = true\ntsl_cert = \"/c.pem\"\n", "tsl_cert"),
        ] {
            let e = public(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let c = public("[api]\ntls = true\ntrusted_proxies = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n").unwrap();
        assert_eq!(c.api.trusted_proxies.len(), 2);
    }

    #[test]
    fn dhcp_beside_a_tls_api_needs_a_plain_boot_url() {
        let dhcp = "[dhcp]\nmode = \"proxy\"\ninterfaces = [\"br0\"]\n";
        let (_d, path) = file(&format!("[api]\ntls = true\n{dhcp}"));
        let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(e.contains("set `listen` under [boot]"), "{e}");
        let (_d, path) = file(&format!("[api]\ntls = true\n[boot]\nlisten = \"0.0.0.0:8080\"\n{dhcp}"));
        let c = Config::load(Some(&path), Settings::default()).unwrap();
        assert_eq!(c.boot.listen, Some("0.0.0.0:8080".parse().unwrap()));
        let (_d, path) = file("[boot]\nlisten = \"0.0.0.0\"\n");
        let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn auth_section() {
        let c = Config::load(None, Settings::default()).unwrap();
        assert_eq!(c.auth.failures_per_minute, 30);
        assert_eq!(c.auth.max_token_lifetime_days, 365);
        let (_d, path) = file("[auth]\nfailures_per_minute = 5\nmax_token_lifetime_days = 0\n");
        let c = Config::load(Some(&path), Settings::default()).unwrap();
        assert_eq!((c.auth.failures_per_minute, c.auth.max_token_lifetime_days), (5, 0));
        let (_d, path) = file("[auth]\nfailures_per_hour = 5\n");
        let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(e.contains("failures_per_hour"), "{e}");
        let (_d, path) = file("[auth]\nmax_token_lifetime_days = 4000000000\n");
        let e = Config::load(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(e.contains("[auth]") && e.contains("at most 36500"), "{e}");
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let e = Config::from_settings(Settings {
            listen: Some("localhost".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("HOST:PORT"), "{e}");
        let e = Config::from_settings(Settings {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("postgres://"), "{e}");
    }
}
