//! Installer and first-boot files — Debian preseed, kickstart, cloud-init
//! user-data and meta-data (NoCloud), Ignition — rendered with minijinja
//! from a built-in template or an operator's, for one machine and one job.
//!
//! Values from users and clients (hostnames, SSH keys, scripts, anything the
//! agent reported) are *data*: they are passed in the context, never
//! rendered as templates, and every `{{ }}` is written through a formatter
//! that knows the file's format:
//!
//! - cloud-init and Ignition: every value is written as a YAML / JSON
//!   scalar or collection, whatever filters ran before (`|safe` included),
//!   so a value cannot add a key, a list item or a command;
//! - preseed and kickstart are line formats with shell inside: a value must
//!   come out of `|shell` (a single-quoted shell word), `|preseed` (a
//!   one-line answer) or `|b64`; a bare string is an error, and so is any
//!   value that would start a new line (a new preseed directive, a `%end`).
//!
//! Rendering is sandboxed: strict undefined variables, a fuel limit, no
//! loader (no `include` of other files), and the output is parsed again
//! (JSON, YAML, preseed lines) before it is returned.
//!
//! The files report install stages to kiln with the job's token; the URL
//! contract is in docs/architecture.md ("Net boot").

mod escape;
#[cfg(test)]
mod tests;

use std::fmt;

use kiln_types::Secret;
use kiln_types::catalog::{OsImage, StorageLayout};
use kiln_types::install::{CryptHash, SshPublicKey};
use kiln_types::machine::Machine;
use kiln_types::validate::Hostname;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};
use serde::Serialize;

pub use escape::{preseed_value, shell_quote};

/// Instructions a render may run. The built-ins use a few thousand; this
/// stops a runaway operator template long before it costs a second.
const FUEL: u64 = 200_000;
/// Post-install scripts above this are refused: they belong in a task.
const MAX_SCRIPT: usize = 64 * 1024;

/// Which file a template makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TemplateKind {
    Preseed,
    Kickstart,
    UserData,
    MetaData,
    Ignition,
}

impl TemplateKind {
    pub const ALL: [TemplateKind; 5] = [
        TemplateKind::Preseed,
        TemplateKind::Kickstart,
        TemplateKind::UserData,
        TemplateKind::MetaData,
        TemplateKind::Ignition,
    ];

    /// The kind named `s` (`preseed`, `kickstart`, `user-data`,
    /// `meta-data`, `ignition`).
    pub fn parse(s: &str) -> Option<TemplateKind> {
        TemplateKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TemplateKind::Preseed => "preseed",
            TemplateKind::Kickstart => "kickstart",
            TemplateKind::UserData => "user-data",
            TemplateKind::MetaData => "meta-data",
            TemplateKind::Ignition => "ignition",
        }
    }

    /// kiln's own template for this file.
    pub fn builtin(self) -> &'static str {
        match self {
            TemplateKind::Preseed => include_str!("../../templates/preseed.cfg.j2"),
            TemplateKind::Kickstart => include_str!("../../templates/kickstart.ks.j2"),
            TemplateKind::UserData => include_str!("../../templates/user-data.yaml.j2"),
            TemplateKind::MetaData => include_str!("../../templates/meta-data.yaml.j2"),
            TemplateKind::Ignition => include_str!("../../templates/ignition.json.j2"),
        }
    }

    fn format(self) -> Format {
        match self {
            TemplateKind::Preseed | TemplateKind::Kickstart => Format::Lines,
            TemplateKind::UserData | TemplateKind::MetaData => Format::Yaml,
            TemplateKind::Ignition => Format::Json,
        }
    }
}

impl fmt::Display for TemplateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How `{{ }}` output is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Only filter-made (safe) strings, numbers and booleans, on one line.
    Lines,
    /// Everything as a YAML flow value.
    Yaml,
    /// Everything as a JSON value.
    Json,
}

/// What the job asks of the install: the part of a reimage request the
/// installer files need. Every field is validated already (types), except
/// the script and the URLs, which `TemplateContext::new` checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallPlan {
    pub job_id: String,
    /// The job's one-time token, which stage reports carry.
    pub token: Secret,
    /// Overrides the machine's hostname for the new OS.
    pub hostname: Option<Hostname>,
    pub layout: Option<StorageLayout>,
    pub ssh_keys: Vec<SshPublicKey>,
    /// Only ever a hash: `password::hash_root_password` makes one from a
    /// plaintext, which is then dropped.
    pub root_password_hash: Option<CryptHash>,
    pub post_install_script: Option<String>,
    /// Called (POST, JSON) by the new OS once it reported stage 5, never
    /// by kiln: `TemplateContext::new` checks its characters, the API
    /// checked it against the outbound rules.
    pub callback_url: Option<String>,
}

/// The first-boot script every installer file puts into the new OS
/// (`/var/lib/kiln/firstboot.sh`): fixed text that reads the job's values
/// from `/etc/kiln-firstboot.env` (`job.firstboot_env`).
pub const FIRSTBOOT_SCRIPT: &str = include_str!("../../templates/firstboot.sh");

/// The longest callback URL taken.
const MAX_CALLBACK_URL: usize = 2048;

/// Checks the form of a job's callback URL as the new OS gets it (a line
/// of `/etc/kiln-firstboot.env`): http(s), not too long, no spaces or
/// control characters (a newline would start another line there). The API
/// checks the same when a reimage is asked for, with the outbound rules.
pub fn check_callback_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_CALLBACK_URL
        || !(url.starts_with("http://") || url.starts_with("https://"))
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "the callback URL must be an http:// or https:// URL of at most {MAX_CALLBACK_URL} characters, \
             without spaces or control characters"
        ));
    }
    Ok(())
}

/// Everything a template sees, under four names: `machine`, `os`, `job`,
/// `kiln`. Optional values are `none`, never missing, so that a typo is an
/// undefined-variable error rather than an empty string.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateContext {
    pub machine: MachineVars,
    pub os: OsVars,
    pub job: JobVars,
    pub kiln: KilnVars,
}

#[derive(Debug, Clone, Serialize)]
pub struct MachineVars {
    pub id: String,
    /// The plan's hostname when it has one, else the machine's.
    pub hostname: String,
    pub fqdn: Option<String>,
    pub domain: Option<String>,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    pub macs: Vec<String>,
    pub nics: Vec<NicVars>,
    /// From the hardware inventory (DMI), as the agent reported it.
    pub serial: Option<String>,
    pub uuid: Option<String>,
    pub tags: Vec<String>,
    pub owner: Option<String>,
    pub site: Option<String>,
    pub rack: Option<String>,
    /// The install NIC's static IPv4 settings from the inventory's network
    /// ([`crate::network::install_network`]); `none`: DHCP. Set with
    /// [`TemplateContext::with_install_network`].
    pub network: Option<crate::network::InstallNetwork>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NicVars {
    pub mac: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OsVars {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub kind: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobVars {
    pub id: String,
    pub layout: Option<StorageLayout>,
    pub ssh_keys: Vec<SshPublicKey>,
    pub root_password_hash: Option<CryptHash>,
    pub post_install_script: Option<String>,
    pub callback_url: Option<String>,
    /// `{kiln.base_url}/api/v1/jobs/{job.id}/stages`: a stage report is a
    /// POST to `{stage_url}/{n}`.
    pub stage_url: String,
    pub token: Secret,
    /// The content of `/etc/kiln-firstboot.env` (mode 0600), which
    /// [`FIRSTBOOT_SCRIPT`] reads: `KILN_STAGE_URL`, `KILN_TOKEN`,
    /// `KILN_JOB_ID` and, if the job has one, `KILN_CALLBACK_URL`, one
    /// `KEY=value` line each. It holds the token.
    pub firstboot_env: Secret,
}

#[derive(Debug, Clone, Serialize)]
pub struct KilnVars {
    pub base_url: String,
    /// [`FIRSTBOOT_SCRIPT`].
    pub firstboot_script: &'static str,
}

impl TemplateContext {
    /// The context for `machine` installing `os` under `plan`; `base_url`
    /// is where the installer reaches kiln (`http://10.0.0.1:7070`).
    pub fn new(machine: &Machine, os: &OsImage, plan: &InstallPlan, base_url: &str) -> Result<Self, TemplateError> {
        let base_url = base_url.trim_end_matches('/');
        // These go unquoted into environment files that shells source and
        // systemd reads: keep them to characters that are plain in both.
        plain("kiln base URL", base_url, |c| {
            c.is_ascii_alphanumeric() || "-._:/[]".contains(c)
        })?;
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(TemplateError::Input(format!(
                "kiln base URL `{base_url}` must start with http:// or https://"
            )));
        }
        plain("job id", &plan.job_id, |c| c.is_ascii_alphanumeric() || c == '-')?;
        // Tokens are `kiln_` + base64url; say nothing of the value itself.
        if plan.token.expose().is_empty()
            || !plan
                .token
                .expose()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(TemplateError::Input(
                "the job token must be non-empty base64url (A-Z a-z 0-9 - _)".into(),
            ));
        }
        if let Some(script) = &plan.post_install_script {
            if script.len() > MAX_SCRIPT {
                return Err(TemplateError::Input(format!(
                    "the post-install script has {} bytes, more than {MAX_SCRIPT}: make it a task",
                    script.len()
                )));
            }
            if script.contains('\0') {
                return Err(TemplateError::Input(
                    "the post-install script contains a NUL byte".into(),
                ));
            }
        }

        if let Some(url) = &plan.callback_url {
            check_callback_url(url).map_err(TemplateError::Input)?;
        }
        let stage_url = format!("{base_url}/api/v1/jobs/{}/stages", plan.job_id);
        let mut env = format!(
            "KILN_STAGE_URL={stage_url}\nKILN_TOKEN={}\nKILN_JOB_ID={}\n",
            plan.token.expose(),
            plan.job_id
        );
        if let Some(url) = &plan.callback_url {
            env.push_str(&format!("KILN_CALLBACK_URL={url}\n"));
        }

        let hostname = plan.hostname.as_ref().unwrap_or(&machine.hostname).as_str().to_string();
        let domain = machine
            .fqdn
            .as_ref()
            .and_then(|f| f.as_str().split_once('.'))
            .map(|(_, d)| d.to_string());
        let fqdn = domain.as_ref().map(|d| format!("{hostname}.{d}"));
        let dmi = machine.hardware.as_ref().and_then(|h| h.dmi.as_ref());
        Ok(TemplateContext {
            machine: MachineVars {
                id: machine.id.to_string(),
                hostname,
                fqdn,
                domain,
                ipv4: machine.ipv4.map(|a| a.to_string()),
                ipv6: machine.ipv6.map(|a| a.to_string()),
                // A NIC enrolled by switch port has no MAC until kiln learned it.
                macs: machine
                    .nics
                    .iter()
                    .filter_map(|n| n.mac)
                    .map(|m| m.to_string())
                    .collect(),
                nics: machine
                    .nics
                    .iter()
                    .filter_map(|n| n.mac.map(|m| (n, m)))
                    .map(|(n, mac)| NicVars {
                        mac: mac.to_string(),
                        name: n.name.clone(),
                    })
                    .collect(),
                serial: dmi.and_then(|d| d.serial.clone()),
                uuid: dmi.and_then(|d| d.uuid.clone()),
                tags: machine.tags.iter().map(|t| t.as_str().to_string()).collect(),
                owner: machine.owner.clone(),
                site: machine.site.clone(),
                rack: machine.rack.clone(),
                network: None,
            },
            os: OsVars {
                name: os.name.clone(),
                version: os.version.clone(),
                arch: os.arch.as_str().to_string(),
                kind: os.kind.as_str().to_string(),
            },
            job: JobVars {
                id: plan.job_id.clone(),
                layout: plan.layout,
                ssh_keys: plan.ssh_keys.clone(),
                root_password_hash: plan.root_password_hash.clone(),
                post_install_script: plan.post_install_script.clone(),
                callback_url: plan.callback_url.clone(),
                stage_url,
                token: plan.token.clone(),
                firstboot_env: Secret::new(env),
            },
            kiln: KilnVars {
                base_url: base_url.to_string(),
                firstboot_script: FIRSTBOOT_SCRIPT,
            },
        })
    }
}

impl TemplateContext {
    /// The context with the install NIC's static settings (`None`: DHCP).
    pub fn with_install_network(mut self, network: Option<crate::network::InstallNetwork>) -> Self {
        self.machine.network = network;
        self
    }
}

fn plain(what: &str, value: &str, ok: impl Fn(char) -> bool) -> Result<(), TemplateError> {
    if value.is_empty() || value.len() > 512 || !value.chars().all(ok) {
        return Err(TemplateError::Input(format!(
            "{what} `{}` is empty, too long or has a character that is not plain",
            value.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// What went wrong. Messages name the template and the line, quote the
/// template's own text where it helps, and never a rendered value (which
/// may be the token or a password hash).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("{template}, line {line}: syntax error: {detail}")]
    Syntax {
        template: String,
        line: usize,
        detail: String,
    },
    #[error("{template}, line {line}: {detail}")]
    Render {
        template: String,
        line: usize,
        detail: String,
    },
    #[error("{template} rendered a file that is not valid {format}: {detail}")]
    Output {
        template: String,
        format: &'static str,
        detail: String,
    },
    #[error("{0}")]
    Input(String),
}

/// A name for error messages: which kind, built-in or whose.
fn template_name(kind: TemplateKind, operator: bool, os: &OsVars) -> String {
    if operator {
        format!("the {kind} template of {} {}", os.name, os.version)
    } else {
        format!("kiln's built-in {kind} template")
    }
}

/// Renders the file of `kind` for `ctx`, from the operator's `source` when
/// the OS image has one, else from the built-in template.
pub fn render(kind: TemplateKind, source: Option<&str>, ctx: &TemplateContext) -> Result<String, TemplateError> {
    let name = template_name(kind, source.is_some(), &ctx.os);
    let source = source.unwrap_or(kind.builtin());
    let env = environment(kind);
    let tmpl = env
        .template_from_named_str(kind.as_str(), source)
        .map_err(|e| to_error(&name, source, e))?;
    let out = tmpl
        .render(Value::from(Serde(ctx)))
        .map_err(|e| to_error(&name, source, e))?;
    check_output(kind, &out).map_err(|(format, detail)| TemplateError::Output {
        template: name,
        format,
        detail,
    })?;
    Ok(out)
}

/// Checks an operator's template for syntax errors, before it is stored.
pub fn check(kind: TemplateKind, source: &str) -> Result<(), TemplateError> {
    let env = environment(kind);
    env.template_from_named_str(kind.as_str(), source)
        .map(|_| ())
        .map_err(|e| to_error(&format!("this {kind} template"), source, e))
}

fn environment(kind: TemplateKind) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(32);
    // Debug mode would print the variables' values (the token) in errors.
    env.set_debug(false);
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
            .expect("the default delimiters are valid"),
    );
    // Escaping is the formatter's job, by format; these built-ins would
    // only confuse it: `|escape` is HTML, and `|tojson` marks JSON safe,
    // which is not safe in a shell command.
    env.remove_filter("escape");
    env.remove_filter("e");
    env.remove_filter("tojson");
    let format = kind.format();
    env.set_formatter(move |out, _state, value| {
        let text = format_value(format, value)?;
        out.write_str(&text).map_err(Error::from)
    });
    env.add_filter("shell", filter_shell);
    env.add_filter("preseed", filter_preseed);
    env.add_filter("b64", filter_b64);
    env.add_function("fail", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env
}

fn format_value(format: Format, value: &Value) -> Result<String, Error> {
    let invalid = |msg: &str| Error::new(ErrorKind::InvalidOperation, msg.to_string());
    match format {
        Format::Lines => {
            let text = match value.kind() {
                ValueKind::String if value.is_safe() => value.as_str().unwrap_or_default().to_string(),
                ValueKind::Number | ValueKind::Bool => value.to_string(),
                _ => {
                    return Err(invalid(
                        "a value is written without an escaping filter: use |shell in a command, \
                         |preseed for a preseed answer, |b64 for a script",
                    ));
                }
            };
            if text.contains(['\n', '\r']) {
                return Err(invalid("a value would start a new line (a new directive): refused"));
            }
            if text.ends_with('\\') {
                return Err(invalid(
                    "a value ends with `\\`, which would join the next line: refused",
                ));
            }
            Ok(text)
        }
        Format::Yaml | Format::Json => {
            let json = serde_json::to_value(value)
                .map_err(|e| invalid(&format!("a value cannot be written as {format:?}: {e}")))?;
            if format == Format::Json {
                Ok(json.to_string())
            } else {
                let mut out = String::new();
                escape::yaml_value(&json, &mut out);
                Ok(out)
            }
        }
    }
}

/// `|shell`: one single-quoted shell word (a list: one word per item).
fn filter_shell(value: Value) -> Result<Value, Error> {
    let quote = |v: &Value| -> Result<String, Error> {
        let s = scalar_text(v, "shell")?;
        shell_quote(&s).map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
    };
    let text = if value.kind() == ValueKind::Seq {
        value
            .try_iter()?
            .map(|v| quote(&v))
            .collect::<Result<Vec<_>, _>>()?
            .join(" ")
    } else {
        quote(&value)?
    };
    Ok(Value::from_safe_string(text))
}

/// `|preseed`: a one-line preseed answer, written as is.
fn filter_preseed(value: Value) -> Result<Value, Error> {
    let s = scalar_text(&value, "preseed")?;
    preseed_value(&s).map_err(|e| Error::new(ErrorKind::InvalidOperation, e))?;
    Ok(Value::from_safe_string(s))
}

/// `|b64`: standard base64, for scripts and data URLs.
fn filter_b64(value: Value) -> Result<Value, Error> {
    use base64::Engine;
    let s = scalar_text(&value, "b64")?;
    Ok(Value::from_safe_string(
        base64::engine::general_purpose::STANDARD.encode(s),
    ))
}

/// The text of a string or number; anything else (none, a map) is an
/// error rather than `none` or `{…}` turning up in a file.
fn scalar_text(value: &Value, filter: &str) -> Result<String, Error> {
    match value.kind() {
        ValueKind::Undefined => Err(Error::new(
            ErrorKind::UndefinedError,
            format!("|{filter} was given a variable the context does not have"),
        )),
        ValueKind::String => Ok(value.as_str().unwrap_or_default().to_string()),
        ValueKind::Number | ValueKind::Bool => Ok(value.to_string()),
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("|{filter} takes a string or a number, not {kind}"),
        )),
    }
}

/// A minijinja error as ours, with the template's own text at the error
/// (not the values, which debug mode would print).
fn to_error(name: &str, source: &str, e: Error) -> TemplateError {
    let line = e.line().unwrap_or(0);
    let syntax = e.kind() == ErrorKind::SyntaxError;
    let mut detail = match e.detail() {
        Some(d) if syntax => d.to_string(),
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    // `fail("…")` says everything itself.
    if let Some(text) = e.range().and_then(|r| source.get(r))
        && !text.is_empty()
        && !text.starts_with("fail(")
        && text.len() <= 120
    {
        detail.push_str(&format!(" (at `{text}`)"));
    }
    if e.kind() == ErrorKind::OutOfFuel {
        detail.push_str(&format!(": the template ran more than {FUEL} instructions"));
    }
    if syntax {
        TemplateError::Syntax {
            template: name.to_string(),
            line,
            detail,
        }
    } else {
        TemplateError::Render {
            template: name.to_string(),
            line,
            detail,
        }
    }
}

/// Parses the rendered file once more, so that a mistake in an operator's
/// template is found here and not by an installer half an hour later.
fn check_output(kind: TemplateKind, out: &str) -> Result<(), (&'static str, String)> {
    match kind.format() {
        Format::Json => {
            let doc: serde_json::Value = serde_json::from_str(out).map_err(|e| ("JSON", e.to_string()))?;
            let version = doc.pointer("/ignition/version").and_then(|v| v.as_str()).unwrap_or("");
            if !version.starts_with("3.") {
                return Err(("Ignition", "`ignition.version` must be a 3.x spec version".into()));
            }
        }
        Format::Yaml => {
            if kind == TemplateKind::UserData && !out.starts_with("#cloud-config\n") {
                return Err(("cloud-config", "the first line must be `#cloud-config`".into()));
            }
            let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(out).map_err(|e| ("YAML", e.to_string()))?;
            if !doc.is_mapping() {
                return Err(("YAML", "the document must be a mapping of keys".into()));
            }
        }
        Format::Lines if kind == TemplateKind::Preseed => {
            const TYPES: [&str; 9] = [
                "string",
                "boolean",
                "select",
                "multiselect",
                "note",
                "password",
                "text",
                "title",
                "error",
            ];
            for (n, line) in preseed_lines(out) {
                let fields: Vec<&str> = line.split_whitespace().take(3).collect();
                if fields.len() < 3 || !TYPES.contains(&fields[2]) {
                    return Err((
                        "preseed",
                        format!("line {n} is not `owner question type [value]` with a debconf type"),
                    ));
                }
            }
        }
        Format::Lines => {
            let mut open: Option<usize> = None;
            for (i, line) in out.lines().enumerate() {
                let word = line.split_whitespace().next().unwrap_or("");
                if ["%pre", "%post", "%packages", "%onerror", "%traceback"].contains(&word) {
                    if let Some(start) = open {
                        return Err(("kickstart", format!("the section of line {start} has no %end")));
                    }
                    open = Some(i + 1);
                } else if word == "%end" {
                    open = None;
                }
            }
            if let Some(start) = open {
                return Err(("kickstart", format!("the section of line {start} has no %end")));
            }
        }
    }
    Ok(())
}

/// The directives of a preseed file as debconf reads them: a line ending
/// in `\` continues on the next; blank lines and `#` comments are skipped.
/// Each comes with the number of its first line.
pub fn preseed_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let (n, mut acc) = current.take().unwrap_or((i + 1, String::new()));
        if let Some(head) = line.strip_suffix('\\') {
            acc.push_str(head);
            current = Some((n, acc));
            continue;
        }
        acc.push_str(line);
        let t = acc.trim_start();
        if !t.is_empty() && !t.starts_with('#') {
            out.push((n, t.to_string()));
        }
    }
    if let Some((n, acc)) = current {
        out.push((n, acc));
    }
    out
}
