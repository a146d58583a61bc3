//! The `kiln` command line: `kiln server` and the verbs that talk to a
//! server over the REST API (URL in `KILN_URL`, token in `KILN_TOKEN`, or a
//! CLI config file). A library, so tests drive every verb in-process.

mod cmd;
pub mod import;
pub mod output;
pub mod watch;

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use kiln_client::{Client, ClientError};
use output::{Format, Out};
use serde::Deserialize;

pub use cmd::demo::seed_demo_fleet;

pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "kiln: the control plane for the whole life of datacenter servers"
)]
pub struct Cli {
    /// Server URL (or KILN_URL, or `url` in the CLI config file).
    #[arg(long, global = true, env = "KILN_URL")]
    pub url: Option<String>,
    /// API token (or KILN_TOKEN, or `token` in the CLI config file).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Pin an https:// server's certificate: sha256:HEX, as the server
    /// prints it at start (or KILN_FINGERPRINT, or `fingerprint` in the CLI
    /// config file).
    #[arg(long, global = true, env = "KILN_FINGERPRINT", value_name = "sha256:HEX")]
    pub fingerprint: Option<String>,
    /// Trust an https:// server whose certificate this CA (PEM) signed (or
    /// KILN_CA_FILE, or `ca_file` in the CLI config file).
    #[arg(long, global = true, env = "KILN_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(
        long,
        short = 'o',
        global = true,
        env = "KILN_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Run the kiln server.
    Server(cmd::server::ServerArgs),
    /// Run a demo: a server on the embedded database with a simulated rack
    /// enrolled, and an admin token printed.
    Demo(cmd::demo::DemoArgs),
    /// Machines: enroll, list, show, edit, remove, import.
    #[command(subcommand)]
    Machine(cmd::machine::MachineCmd),
    /// OS images in the catalog.
    #[command(subcommand)]
    Os(cmd::catalog::OsCmd),
    /// Post-install tasks.
    #[command(subcommand)]
    Task(cmd::catalog::TaskCmd),
    /// Storage layouts and the disks each needs.
    Layouts,
    /// Subnets: add, list, show, edit, remove.
    #[command(subcommand)]
    Subnet(cmd::network::SubnetCmd),
    /// A machine's network (interfaces, bonds, VLANs, addresses): show,
    /// set, and the cloud-init network-config it renders to.
    #[command(subcommand)]
    Network(cmd::network::NetworkCmd),
    /// Sites.
    #[command(subcommand)]
    Site(cmd::org::SiteCmd),
    /// Racks.
    #[command(subcommand)]
    Rack(cmd::org::RackCmd),
    /// Tenants.
    #[command(subcommand)]
    Tenant(cmd::org::TenantCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(cmd::org::TokenCmd),
    /// Net boot: `kiln boot explain HOST|MAC`.
    #[command(subcommand)]
    Boot(cmd::org::BootCmd),
    /// Power through each machine's BMC: status, on, off, cycle, reset, soft-off.
    #[command(subcommand)]
    Power(cmd::power::PowerCmd),
    /// Set the next boot device through each machine's BMC.
    Bootdev(cmd::power::BootdevArgs),
    /// BMC diagnostics: `kiln bmc check HOST…`.
    #[command(subcommand)]
    Bmc(cmd::power::BmcCmd),
    /// Reinstall machines: one job per host, followed live with --watch.
    Reimage(cmd::reimage::ReimageArgs),
    /// Jobs (reimages): list, show, watch, cancel, pause, resume, retry.
    #[command(subcommand)]
    Job(cmd::job::JobCmd),
    /// Reimage a selection a few at a time: start, list, show, watch,
    /// pause, resume, abort.
    #[command(subcommand)]
    Rollout(cmd::rollout::RolloutCmd),
    /// The net-boot ramdisk: `kiln ramdisk build --agent PATH`.
    #[command(subcommand)]
    Ramdisk(cmd::ramdisk::RamdiskCmd),
    /// DHCP leases.
    Leases {
        /// Include expired leases.
        #[arg(long)]
        all: bool,
    },
    /// The audit log: who changed what, newest first.
    Events(cmd::org::EventsArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `~/.config/kiln/cli.toml` (or `KILN_CLI_CONFIG`): where the CLI finds its
/// server and token when the environment does not say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CliConfig {
    url: Option<String>,
    token: Option<String>,
    fingerprint: Option<String>,
    ca_file: Option<PathBuf>,
}

fn cli_config() -> anyhow::Result<CliConfig> {
    let path = match std::env::var_os("KILN_CLI_CONFIG") {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("XDG_CONFIG_HOME").or_else(|| {
            std::env::var_os("HOME").map(|h| {
                let mut p = PathBuf::from(h);
                p.push(".config");
                p.into_os_string()
            })
        }) {
            Some(base) => PathBuf::from(base).join("kiln/cli.toml"),
            None => return Ok(CliConfig::default()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("CLI config {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Connection settings for verbs that talk to a server.
#[derive(Debug)]
pub struct Ctx {
    url: Option<String>,
    token: Option<String>,
    fingerprint: Option<String>,
    ca_file: Option<PathBuf>,
}

impl Ctx {
    pub fn new(url: Option<String>, token: Option<String>) -> Ctx {
        Ctx {
            url,
            token,
            fingerprint: None,
            ca_file: None,
        }
    }

    /// The same, trusting an https:// server by `fingerprint` (`sha256:HEX`)
    /// or the CA in `ca_file`.
    pub fn with_trust(self, fingerprint: Option<String>, ca_file: Option<PathBuf>) -> Ctx {
        Ctx {
            fingerprint,
            ca_file,
            ..self
        }
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        let file = if self.url.is_none() || self.token.is_none() {
            cli_config()?
        } else {
            CliConfig::default()
        };
        let from_env = self.url.is_some();
        let url = self.url.clone().or(file.url).unwrap_or_else(|| DEFAULT_URL.to_string());
        let token = self.token.clone().or(file.token);
        if token.is_none() {
            anyhow::bail!(
                "no API token: set KILN_TOKEN (a fresh install makes its first one with \
                 `kiln token create --data-dir DIR --role admin`)"
            );
        }
        // A pin or CA from the config file goes with the file's URL only:
        // it names that server's certificate, not another's.
        let (fingerprint, ca_file) = match (&self.fingerprint, &self.ca_file, from_env) {
            (None, None, false) => (file.fingerprint, file.ca_file),
            _ => (self.fingerprint.clone(), self.ca_file.clone()),
        };
        let trust = trust_for(&url, fingerprint.as_deref(), ca_file)?;
        Ok(Client::with_trust(&url, token, &trust)?)
    }
}

/// How to trust the server at `url`: a pin or a CA only make sense over
/// https, and one of them at most.
fn trust_for(url: &str, fingerprint: Option<&str>, ca_file: Option<PathBuf>) -> anyhow::Result<kiln_client::Trust> {
    use kiln_client::Trust;
    let https = url.starts_with("https://");
    if !https && (fingerprint.is_some() || ca_file.is_some()) {
        // Going on would send the token in clear while the user believes
        // the server is pinned.
        anyhow::bail!(
            "KILN_FINGERPRINT or KILN_CA_FILE is set, but the server URL {url} is not https://: \
             use https://… for a server with TLS, or unset them for a plain-HTTP one"
        );
    }
    Ok(match (fingerprint, ca_file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give KILN_FINGERPRINT or KILN_CA_FILE, not both: a pinned certificate needs no CA")
        }
        (Some(fp), None) => Trust::Fingerprint(
            kiln_client::parse_fingerprint(fp).map_err(|e| anyhow::anyhow!("KILN_FINGERPRINT: {e}"))?,
        ),
        (None, Some(ca)) => Trust::CaFile(ca),
        (None, None) => Trust::System,
    })
}

/// Runs the CLI with `args` (including the program name), writing results
/// to `w`, which is taken not to be a terminal (progress comes as plain
/// lines). Returns the process exit code.
pub async fn run(args: Vec<String>, w: Box<dyn std::io::Write + Send>) -> i32 {
    run_on(args, w, false).await
}

/// Runs the CLI on the process's stdout; when that is a terminal, job
/// progress is redrawn in place.
pub async fn run_stdout(args: Vec<String>) -> i32 {
    use std::io::IsTerminal;
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb");
    run_on(args, Box::new(stdout), terminal).await
}

async fn run_on(args: Vec<String>, w: Box<dyn std::io::Write + Send>, terminal: bool) -> i32 {
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let mut out = Out {
        format: cli.output,
        w,
        terminal,
    };
    let ctx = Ctx {
        url: cli.url.clone(),
        token: cli.token.clone(),
        fingerprint: cli.fingerprint.clone(),
        ca_file: cli.ca_file.clone(),
    };
    match dispatch(cli.command, &ctx, &mut out).await {
        Ok(()) => 0,
        // `kiln machine list -o json | head` closed the pipe: not an error.
        Err(e) if is_broken_pipe(&e) => 0,
        // Ctrl-C while watching: the jobs go on, say how to follow them again.
        Err(e) if e.is::<watch::StoppedWatching>() => {
            eprintln!("{e}");
            130
        }
        Err(e) => {
            report(&e);
            1
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>().and_then(|j| j.io_error_kind())
                == Some(std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints an error for a human: the message, each row detail, the causes.
pub fn report(e: &anyhow::Error) {
    if let Some(ClientError::Api { error, .. }) = e.downcast_ref::<ClientError>() {
        eprintln!("error: {}", error.message);
        for d in &error.details {
            let at = match (&d.index, &d.field) {
                (Some(i), Some(f)) => format!("row {i}, {f}: "),
                (Some(i), None) => format!("row {i}: "),
                (None, Some(f)) => format!("{f}: "),
                (None, None) => String::new(),
            };
            eprintln!("  {at}{}", d.message);
        }
        return;
    }
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

/// Runs one parsed command (what [`run`] does after parsing; tests call it to
/// see the error a verb returns).
pub async fn dispatch(command: Command, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    match command {
        Command::Server(args) => cmd::server::run(args).await,
        Command::Demo(args) => cmd::demo::run(args, out).await,
        Command::Machine(c) => cmd::machine::run(c, ctx, out).await,
        Command::Os(c) => cmd::catalog::run_os(c, ctx, out).await,
        Command::Task(c) => cmd::catalog::run_task(c, ctx, out).await,
        Command::Layouts => cmd::catalog::layouts(ctx, out).await,
        Command::Subnet(c) => cmd::network::run_subnet(c, ctx, out).await,
        Command::Network(c) => cmd::network::run_network(c, ctx, out).await,
        Command::Site(c) => cmd::org::run_site(c, ctx, out).await,
        Command::Rack(c) => cmd::org::run_rack(c, ctx, out).await,
        Command::Tenant(c) => cmd::org::run_tenant(c, ctx, out).await,
        Command::Token(c) => cmd::org::run_token(c, ctx, out).await,
        Command::Events(a) => cmd::org::events(a, ctx, out).await,
        Command::Leases { all } => cmd::org::leases(all, ctx, out).await,
        Command::Boot(c) => cmd::org::boot(c, ctx, out).await,
        Command::Power(c) => cmd::power::power(c, ctx, out).await,
        Command::Bootdev(a) => cmd::power::bootdev(a, ctx, out).await,
        Command::Bmc(c) => cmd::power::bmc(c, ctx, out).await,
        Command::Reimage(a) => cmd::reimage::run(a, ctx, out).await,
        Command::Job(c) => cmd::job::run(c, ctx, out).await,
        Command::Rollout(c) => cmd::rollout::run(c, ctx, out).await,
        Command::Ramdisk(c) => cmd::ramdisk::run(c, out).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut out.w);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap's own checks of the whole command tree (unique argument names
    /// across flattened groups, and so on), which otherwise fire only when
    /// a debug build parses the faulty subcommand.
    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
