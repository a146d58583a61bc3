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
    /// Net boot: the boot decision and HTTP boot (file only: `[boot]`).
    #[arg(skip)]
    #[serde(default)]
    pub boot: Option<BootSettings>,
    /// Net boot: the DHCP service (file only: `[dhcp]`).
    #[arg(skip)]
    #[serde(default)]
    pub dhcp: Option<DhcpSettings>,
    /// Net boot: the TFTP service (file only: `[tftp]`).
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
    /// API tokens: lifetimes, failed-authentication limit (file only: `[auth]`).
    #[arg(skip)]
    #[serde(default)]
    pub auth: Option<crate::auth::AuthSettings>,
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
    /// Base URL of kiln's HTTP boot as machines reach it. Default: the
    /// address of the interface (DHCP) or the Host a client asked (HTTP).
    #[serde(default)]
    pub http_base: Option<String>,
    /// Directory served at `/boot/file/` (default: DATA_DIR/artifacts).
    #[serde(default)]
    pub artifacts: Option<PathBuf>,
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
            http_base: None,
            artifacts: None,
            agent_kernel: default_agent_kernel(),
            agent_initrd: default_agent_initrd(),
            agent_cmdline: default_agent_cmdline(),
            file_cache_mib: default_file_cache_mib(),
            file_cache_max_file_mib: default_file_cache_max_file_mib(),
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
            boot: over.boot.or(self.boot),
            dhcp: over.dhcp.or(self.dhcp),
            tftp: over.tftp.or(self.tftp),
            bmc: over.bmc.or(self.bmc),
            jobs: over.jobs.or(self.jobs),
            hooks: over.hooks.or(self.hooks),
            post_install: over.post_install.or(self.post_install),
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
    pub boot: BootSettings,
    pub dhcp: Option<DhcpSettings>,
    pub tftp: Option<crate::tftp::TftpSettings>,
    pub bmc: crate::bmc::BmcSettings,
    pub jobs: kiln_workflow::EngineSettings,
    pub hooks: Vec<kiln_workflow::hooks::HookConfig>,
    pub post_install: kiln_workflow::post_install::PostInstallSettings,
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
    #[error("[dhcp]: {0}")]
    Dhcp(String),
    #[error("[boot]: {0}")]
    Boot(String),
    #[error("[[hooks]]: {0}")]
    Hooks(String),
    #[error("[post_install]: {0}")]
    PostInstall(String),
    #[error("[bmc]: {0}")]
    Bmc(String),
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
        if let Some(b) = &s.boot {
            for (what, arg) in std::iter::once(("agent_kernel", &b.agent_kernel))
                .chain(std::iter::once(("agent_initrd", &b.agent_initrd)))
                .chain(b.agent_cmdline.iter().map(|a| ("agent_cmdline", a)))
            {
                kiln_boot::ipxe::check_arg(arg).map_err(|e| ConfigError::Boot(format!("{what}: {e}")))?;
            }
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
        Ok(Config {
            bmc,
            jobs: s.jobs.unwrap_or_default(),
            hooks,
            post_install,
            auth,
            boot: s.boot.unwrap_or_default(),
            dhcp: s.dhcp,
            tftp: s.tftp,
            secret_key_file: s.secret_key_file.unwrap_or_else(|| data_dir.join("secret.key")),
            data_dir,
            listen,
            database_url: s.database_url,
            log: s.log.unwrap_or_else(|| "info".to_string()),
        })
    }
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
