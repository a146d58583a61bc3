//! `kiln reimage HOST… --os OS …`: starts one reimage job per machine
//! through the API, prints a row per host (job id, or why it was refused),
//! and with `--watch` follows the jobs to their end.
//!
//! Everything read locally (SSH keys, the root password, the post-install
//! script) is read and checked before the first request, so a typo in a
//! path never leaves half of the hosts reimaging.

use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use kiln_types::catalog::StorageLayout;
use kiln_types::install::{CryptHash, SshPublicKey};
use kiln_types::job::{Job, ReimageRequest};
use kiln_types::{Hostname, Secret};
use serde::Serialize;

use crate::Ctx;
use crate::cmd::error_message;
use crate::cmd::machine::{MachineSelectors, resolve_hosts};
use crate::output::{Format, Out};
use crate::watch;

/// Reimage requests sent at once (each is a quick check and an insert).
const PARALLEL: usize = 8;

const EXAMPLES: &str = "\
Examples:
  kiln reimage web1 --os debian-12 --ssh-key @~/.ssh/id_ed25519.pub --watch
  kiln reimage db1001 db1002 --os debian-12 --layout lvm_raid1 --task motd -t CHG-1234
  kiln reimage --tag canary --os debian-13 --root-password-file ./root.pw
  kiln reimage web1 --os debian-12 --root-password -      # asks for it (or reads stdin)
  kiln reimage web1 --os debian-12 --no-pxe                # the OS is already on disk

Each host gets its own job (`kiln job list`); `kiln job watch ID` follows one
later and `kiln job cancel ID` stops it, leaving the machine booting its disk.
With --watch the exit code is 0 only when every job succeeded.";

#[derive(Debug, clap::Args)]
#[command(after_long_help = EXAMPLES)]
pub struct ReimageArgs {
    /// Hostnames or machine ids to reimage (or pick them with the selectors
    /// below).
    hosts: Vec<String>,
    #[command(flatten)]
    install: InstallArgs,
    /// Follow the jobs live until they end; exit 1 unless all succeed.
    #[arg(long)]
    watch: bool,

    #[command(flatten, next_help_heading = "Selecting machines")]
    select: MachineSelectors,
}

/// What each machine gets: shared by `kiln reimage` and `kiln rollout start`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// OS image: NAME, NAME-VERSION or its id (`kiln os list`; `kiln
    /// machine offer HOST` lists those that fit).
    #[arg(long, value_name = "OS", help_heading = "Install")]
    os: String,
    /// Storage layout (`kiln layouts`).
    #[arg(long, value_name = "LAYOUT", help_heading = "Install")]
    layout: Option<StorageLayout>,
    /// The new OS's hostname; the machine is renamed when the reimage
    /// succeeds. One host only.
    #[arg(long, value_name = "NAME", help_heading = "Install")]
    hostname: Option<Hostname>,
    /// The OS is already written: skip the net boot and the install stages,
    /// boot the disk and go on with the post-install work.
    #[arg(long, help_heading = "Install")]
    no_pxe: bool,
    /// A new machine, never installed: skip the checks that need its
    /// hardware inventory while it has none, and the pre-reimage hooks.
    #[arg(long, help_heading = "Install")]
    new: bool,

    /// SSH public key for root, or @FILE for every key in FILE (repeat for
    /// more).
    #[arg(long = "ssh-key", value_name = "KEY|@FILE", help_heading = "Access")]
    ssh_keys: Vec<String>,
    /// Root password: `-` asks for it on a terminal, or reads it from stdin.
    /// Never the password itself: every user can read arguments in `ps`.
    #[arg(
        long,
        value_name = "-",
        help_heading = "Access",
        conflicts_with_all = ["root_password_file", "root_password_hash"]
    )]
    root_password: Option<String>,
    /// Root password from the first line of FILE (`-`: stdin).
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Access",
        conflicts_with = "root_password_hash"
    )]
    root_password_file: Option<PathBuf>,
    /// Root password as a SHA-512 crypt hash (`$6$…`, e.g. from `mkpasswd
    /// -m sha-512`).
    #[arg(long, value_name = "HASH", help_heading = "Access")]
    root_password_hash: Option<CryptHash>,

    /// Post-install task from the catalog, by name (`kiln task list`;
    /// repeat for more, run in order).
    #[arg(long = "task", value_name = "NAME", help_heading = "Afterwards")]
    tasks: Vec<String>,
    /// A script of your own, run by the new OS itself at its first boot
    /// (never on the kiln server); its exit status and the end of its
    /// output come back with install stage 5.
    #[arg(long, value_name = "FILE", help_heading = "Afterwards")]
    post_install_script: Option<PathBuf>,
    /// URL the new OS calls (POST, JSON {job_id, hostname, stage,
    /// post_install_exit}) once it reported stage 5; checked against the
    /// server's outbound rules.
    #[arg(long, value_name = "URL", help_heading = "Afterwards")]
    callback_url: Option<String>,
    /// Do not run the configured pre- and post-reimage hooks.
    #[arg(long, help_heading = "Afterwards")]
    no_hooks: bool,

    /// The change ticket the reimages belong to (shown to hooks and in the
    /// audit log).
    #[arg(long, short = 't', value_name = "TICKET")]
    ticket: Option<String>,
}

/// One host's row: its job, or why none was started.
#[derive(Debug, Serialize)]
struct Started {
    hostname: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<Job>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub async fn run(a: ReimageArgs, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let request = a.install.request()?;
    let password = a.install.password().await?;
    let client = ctx.client()?;
    let hosts = resolve_hosts(&client, &a.hosts, &a.select).await?;
    if a.install.hostname.is_some() && hosts.len() > 1 {
        anyhow::bail!("--hostname is for one machine; {} were named or selected", hosts.len());
    }
    let mut requests = Vec::with_capacity(hosts.len());
    for host in hosts {
        let mut req = request.clone();
        // Hashed here, so the plaintext never leaves this process; a fresh
        // salt per machine, so equal passwords do not show as equal hashes.
        if let Some(pw) = &password {
            req.root_password_hash = Some(kiln_boot::password::hash_root_password(pw).map_err(|e| anyhow::anyhow!(e))?);
        }
        requests.push((host, req));
    }
    let started: Vec<Started> = futures::stream::iter(requests.into_iter().map(|(host, req)| {
        let client = client.clone();
        async move {
            match client.reimage(&host, &req).await {
                Ok(job) => Started {
                    hostname: host,
                    ok: true,
                    job: Some(job),
                    error: None,
                },
                Err(e) => Started {
                    hostname: host,
                    ok: false,
                    job: None,
                    error: Some(error_message(&e)),
                },
            }
        }
    }))
    .buffered(PARALLEL)
    .collect()
    .await;

    let refused: Vec<String> = started.iter().filter(|s| !s.ok).map(Started::why).collect();
    let refusal = match refused.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        many => Some(format!(
            "{} of {} machines were not reimaged: {}",
            many.len(),
            started.len(),
            many.join("; ")
        )),
    };
    // A lone host that was refused: the error says it all, a table of one
    // row would only repeat it.
    let lone_refusal = started.len() == 1 && refusal.is_some();
    if out.format == Format::Table && !lone_refusal {
        print_table(&started, out)?;
    }
    if !a.watch {
        if out.format == Format::Json {
            out.json(&started)?;
        }
        return refusal.map_or(Ok(()), |r| Err(anyhow::anyhow!(r)));
    }

    let jobs: Vec<Job> = started.iter().filter_map(|s| s.job.clone()).collect();
    let watched = if jobs.is_empty() {
        vec![]
    } else {
        if out.format == Format::Table {
            out.line("")?;
        }
        watch::watch(&client, jobs, out).await?
    };
    if out.format == Format::Json {
        // Each started host with its job's final state.
        let mut finals = watched.iter().map(|w| w.job().clone());
        let rows: Vec<Started> = started
            .into_iter()
            .map(|s| match s.job {
                Some(_) => Started {
                    job: finals.next(),
                    ..s
                },
                None => s,
            })
            .collect();
        out.json(&rows)?;
    }
    match (refusal, watch::outcome(&watched)) {
        (None, result) => result,
        (Some(r), Ok(())) => Err(anyhow::anyhow!(r)),
        (Some(r), Err(e)) => Err(anyhow::anyhow!("{r}; {e}")),
    }
}

impl Started {
    /// Why the host was refused, naming it (the API's message often does
    /// already: `web1 already has an active job …`).
    fn why(&self) -> String {
        let error = self.error.as_deref().unwrap_or("refused");
        if error.starts_with(&self.hostname) {
            error.to_string()
        } else {
            format!("{}: {error}", self.hostname)
        }
    }
}

fn print_table(started: &[Started], out: &mut Out) -> anyhow::Result<()> {
    let rows = started
        .iter()
        .map(|s| match &s.job {
            Some(job) => vec![
                s.hostname.clone(),
                job.id.to_string(),
                job.state.to_string(),
                String::new(),
            ],
            None => vec![
                s.hostname.clone(),
                "-".into(),
                "not started".into(),
                s.error.clone().unwrap_or_default(),
            ],
        })
        .collect();
    out.table(started, &["HOSTNAME", "JOB", "STATE", "ERROR"], rows)
}

impl InstallArgs {
    /// The root password, if one is to be set (asked for, or read from a
    /// file or stdin); never taken from the command line.
    pub async fn password(&self) -> anyhow::Result<Option<Secret>> {
        Ok(match (&self.root_password, &self.root_password_file) {
            (Some(dash), _) if dash != "-" => anyhow::bail!(
                "--root-password takes `-` (then the password is asked for, or read from stdin), not the \
                 password itself: every user can read command lines in `ps`; or use --root-password-file FILE"
            ),
            (Some(_), _) => Some(read_password(None).await?),
            (None, Some(file)) => Some(read_password(Some(file)).await?),
            (None, None) => None,
        })
    }

    /// The request every host gets (without the root password, which is
    /// hashed per host), from the arguments and the files they name.
    pub fn request(&self) -> anyhow::Result<ReimageRequest> {
        let mut ssh_keys = vec![];
        for arg in &self.ssh_keys {
            ssh_keys.extend(ssh_keys_from(arg)?);
        }
        let post_install_script = match &self.post_install_script {
            Some(path) => {
                let script = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read the post-install script {}: {e}", path.display()))?;
                if script.trim().is_empty() {
                    anyhow::bail!("the post-install script {} is empty", path.display());
                }
                Some(script)
            }
            None => None,
        };
        Ok(ReimageRequest {
            os: self.os.clone(),
            layout: self.layout,
            hostname: self.hostname.clone(),
            ssh_keys,
            root_password: None,
            root_password_hash: self.root_password_hash.clone(),
            tasks: self.tasks.clone(),
            post_install_script,
            callback_url: self.callback_url.clone(),
            ticket: self.ticket.clone(),
            no_pxe: self.no_pxe,
            no_hooks: self.no_hooks,
            new: self.new,
        })
    }
}

/// `~/x` with the home directory: after `@` the shell does not expand it.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// The keys of one `--ssh-key`: the key itself, or with `@FILE` every key
/// line of FILE (an `authorized_keys` or a `.pub` file; blank lines and
/// `#` comments are skipped).
fn ssh_keys_from(arg: &str) -> anyhow::Result<Vec<SshPublicKey>> {
    let Some(file) = arg.strip_prefix('@') else {
        let key = arg
            .parse()
            .map_err(|e| anyhow::anyhow!("--ssh-key: {e} (give a public key, or @FILE to read keys from a file)"))?;
        return Ok(vec![key]);
    };
    let path = expand_home(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("--ssh-key: cannot read {}: {e}", path.display()))?;
    let mut keys = vec![];
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(
            line.parse()
                .map_err(|e| anyhow::anyhow!("--ssh-key: {} line {}: {e}", path.display(), n + 1))?,
        );
    }
    if keys.is_empty() {
        anyhow::bail!("--ssh-key: {} holds no key", path.display());
    }
    Ok(keys)
}

/// The root password from `file` (`-` or `None`: stdin). On a terminal it
/// is asked for twice, without echo; otherwise the first line is taken.
async fn read_password(file: Option<&Path>) -> anyhow::Result<Secret> {
    let file = file.filter(|f| *f != Path::new("-")).map(Path::to_path_buf);
    let (password, from) = tokio::task::spawn_blocking(move || -> anyhow::Result<(String, String)> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("cannot read the root password from {}: {e}", path.display()))?;
            return Ok((first_line(&text), path.display().to_string()));
        }
        if std::io::stdin().is_terminal() {
            let first = prompt_hidden("root password: ")?;
            let again = prompt_hidden("again: ")?;
            if first != again {
                anyhow::bail!("the two root passwords differ");
            }
            return Ok((first, "the prompt".into()));
        }
        let mut text = String::new();
        std::io::stdin()
            .lock()
            .read_to_string(&mut text)
            .map_err(|e| anyhow::anyhow!("cannot read the root password from stdin: {e}"))?;
        Ok((first_line(&text), "stdin".into()))
    })
    .await??;
    if password.is_empty() {
        anyhow::bail!("the root password from {from} is empty");
    }
    Ok(Secret::new(password))
}

/// The first line without its line ending (a password may hold spaces).
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").to_string()
}

/// Asks on stderr and reads a line from the terminal on stdin with echo off.
fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin)?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    // Still echo the newline, so the next prompt starts on its own line.
    quiet.local_modes.insert(LocalModes::ECHONL);
    eprint!("{prompt}");
    tcsetattr(&stdin, OptionalActions::Flush, &quiet)?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    // Echo comes back whether or not the read worked.
    tcsetattr(&stdin, OptionalActions::Now, &saved)?;
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBkWfjXkG3dPfz3vYHtmn6JhyWqIuh0SLAdY3mbmCqrg ops@example";

    #[test]
    fn ssh_keys_come_from_the_argument_or_a_file() {
        assert_eq!(ssh_keys_from(KEY).unwrap().len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, format!("# team keys\n{KEY}\n\n{KEY} other\n")).unwrap();
        assert_eq!(ssh_keys_from(&format!("@{}", file.display())).unwrap().len(), 2);
        std::fs::write(&file, format!("{KEY}\nnot a key\n")).unwrap();
        let e = ssh_keys_from(&format!("@{}", file.display())).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = ssh_keys_from("@/nonexistent/keys").unwrap_err().to_string();
        assert!(e.contains("cannot read /nonexistent/keys"), "{e}");
    }

    #[test]
    fn a_password_file_gives_its_first_line() {
        assert_eq!(first_line("s3cret pass\nsecond\n"), "s3cret pass");
        assert_eq!(first_line("crlf\r\n"), "crlf");
        assert_eq!(first_line(""), "");
    }

    #[test]
    fn home_is_expanded_after_the_at() {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        if let Some(home) = home {
            assert_eq!(expand_home("~/.ssh/id.pub"), home.join(".ssh/id.pub"));
        }
        assert_eq!(expand_home("/etc/keys"), PathBuf::from("/etc/keys"));
    }
}
