//! The kernel command line the ramdisk was booted with: which server to talk
//! to, in which mode, for which job, with which token.
//!
//! The server puts `kiln.server=URL kiln.mode=discover|deploy kiln.job=ID
//! kiln.token=TOKEN` on the kernel's command line (`kiln-server`'s
//! `boot_http.rs` for discovery, `jobs.rs` and the iPXE script for a
//! deploy); the agent
//! reads `/proc/cmdline` and keeps only the `kiln.*` words. Everything else
//! (`console=`, `initrd=`, `BOOT_IMAGE=`, …) belongs to the kernel and is
//! ignored. The token never shows itself: [`Cmdline`]'s `Debug` redacts it.

use std::collections::BTreeMap;
use std::fmt;

use kiln_types::{JobId, MacAddr, Secret};

/// What the agent was booted to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inventory the machine, report it, power off.
    Discover,
    /// Check identity, lay out the disks, write the job's image.
    Deploy,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Discover => "discover",
            Mode::Deploy => "deploy",
        }
    }
}

/// The agent's settings from the kernel command line, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// The server's base URL (`http://10.0.0.1:8080`), without a trailing `/`.
    pub server: String,
    pub mode: Mode,
    /// The job this boot belongs to; always present in deploy mode.
    pub job: Option<JobId>,
    /// The job's token (deploy), or the discovery token of the boot NIC
    /// (discover); always present in deploy mode.
    pub token: Option<Secret>,
    /// The NIC the machine booted from (`BOOTIF=`, as kiln and pxelinux
    /// write it: `52:54:00:12:34:56` or `01-52-54-00-12-34-56`), if given.
    pub boot_mac: Option<MacAddr>,
    /// How long discovery listens for LLDP (`kiln.lldp_secs=`, default
    /// [`DEFAULT_LLDP_SECS`]; 0 does not listen).
    pub lldp_secs: u64,
}

/// Switches send LLDP every 30 s by default: 10 s finds a third of them at
/// once, and most on a second discovery.
pub const DEFAULT_LLDP_SECS: u64 = 10;

// By hand so the token cannot leak through `{:?}` in a log line or a panic.
impl fmt::Debug for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cmdline")
            .field("server", &self.server)
            .field("mode", &self.mode)
            .field("job", &self.job)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("boot_mac", &self.boot_mac)
            .field("lldp_secs", &self.lldp_secs)
            .finish()
    }
}

/// Why the command line cannot be used. Each message names the `kiln.*` key
/// at fault and what it should look like; none quotes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("kiln.{key} is missing from the kernel command line{hint}")]
    Missing { key: &'static str, hint: String },
    #[error("kiln.{key} is given twice with different values: give it once")]
    Conflict { key: &'static str },
    #[error("kiln.{key} is empty")]
    Empty { key: &'static str },
    #[error("kiln.server `{0}` is not a URL: expected http://HOST[:PORT] or https://HOST[:PORT]")]
    BadServer(String),
    #[error("kiln.mode `{0}` is not a mode: expected discover or deploy")]
    BadMode(String),
    #[error("kiln.job `{0}` is not a job id: expected a UUID")]
    BadJob(String),
    #[error("BOOTIF `{0}` is not a MAC address: expected 52:54:00:12:34:56 or 01-52-54-00-12-34-56")]
    BadBootIf(String),
    #[error("kiln.lldp_secs `{0}` is not a number of seconds")]
    BadLldpSecs(String),
    #[error("the kernel command line has an unclosed double quote")]
    UnclosedQuote,
}

/// The keys the agent knows; any other `kiln.*` word is most likely a typo,
/// which an error about a missing key then points out.
const KEYS: [&str; 5] = ["server", "mode", "job", "token", "lldp_secs"];

/// Splits a command line into words the way the kernel does: on
/// whitespace, with double quotes grouping (and removed), so
/// `kiln.token="a b"` is one word with the value `a b`.
fn words(line: &str) -> Result<Vec<String>, CmdlineError> {
    let mut out = vec![];
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err(CmdlineError::UnclosedQuote);
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

impl Cmdline {
    /// Parses a kernel command line (the text of `/proc/cmdline`).
    pub fn parse(line: &str) -> Result<Cmdline, CmdlineError> {
        let mut found: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut unknown = vec![];
        let mut boot_mac = None;
        for word in words(line)? {
            if let Some(value) = word.strip_prefix("BOOTIF=") {
                boot_mac = Some(parse_bootif(value)?);
                continue;
            }
            let Some(rest) = word.strip_prefix("kiln.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            let Some(key) = KEYS.iter().copied().find(|k| *k == key) else {
                unknown.push(format!("kiln.{key}"));
                continue;
            };
            // The same key twice is harmless when it agrees (an iPXE script
            // and a bootloader both adding it); when it differs, guessing
            // which one wins could send the agent to the wrong job.
            if let Some(before) = found.get(key) {
                if *before != value {
                    return Err(CmdlineError::Conflict { key });
                }
                continue;
            }
            if value.is_empty() {
                return Err(CmdlineError::Empty { key });
            }
            found.insert(key, value.to_string());
        }
        let missing = |key: &'static str| {
            let hint = if unknown.is_empty() {
                String::new()
            } else {
                format!(" (it has {}: a typo?)", unknown.join(", "))
            };
            CmdlineError::Missing { key, hint }
        };

        let server = found.remove("server").ok_or_else(|| missing("server"))?;
        let server = check_server(&server)?;
        let mode = match found.remove("mode").ok_or_else(|| missing("mode"))?.as_str() {
            "discover" => Mode::Discover,
            "deploy" => Mode::Deploy,
            other => return Err(CmdlineError::BadMode(other.to_string())),
        };
        let job = match found.remove("job") {
            Some(text) => Some(text.parse::<JobId>().map_err(|_| CmdlineError::BadJob(text))?),
            None => None,
        };
        let token = found.remove("token").map(Secret::new);
        let lldp_secs = match found.remove("lldp_secs") {
            Some(text) => text.parse::<u64>().map_err(|_| CmdlineError::BadLldpSecs(text))?,
            None => DEFAULT_LLDP_SECS,
        };
        // A deploy writes disks: it must know its job, and the server must
        // be able to tell that the agent speaks for that job.
        if mode == Mode::Deploy {
            if job.is_none() {
                return Err(missing("job"));
            }
            if token.is_none() {
                return Err(missing("token"));
            }
        }
        Ok(Cmdline {
            server,
            mode,
            job,
            token,
            boot_mac,
            lldp_secs,
        })
    }
}

/// `BOOTIF`'s MAC; pxelinux prefixes the ARP hardware type (`01-`).
fn parse_bootif(value: &str) -> Result<MacAddr, CmdlineError> {
    let mac = match value.split('-').count() {
        7 => value.split_once('-').map_or(value, |(_, rest)| rest),
        _ => value,
    };
    mac.parse().map_err(|_| CmdlineError::BadBootIf(value.to_string()))
}

/// Checks the server URL's shape and drops a trailing `/`, so paths can be
/// appended with `format!("{server}/api/…")`.
fn check_server(url: &str) -> Result<String, CmdlineError> {
    let bad = || CmdlineError::BadServer(url.to_string());
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(bad());
    }
    Ok(url.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "0190f5b0-7d1e-7c3a-9a4e-2f6b8c1d2e3f";

    #[test]
    fn deploy_line_with_kernel_noise() {
        let line = format!(
            "BOOT_IMAGE=/vmlinuz console=ttyS0,115200n8 initrd=initrd.gz kiln.server=http://10.0.0.1:8080/ \
             kiln.mode=deploy kiln.job={JOB} kiln.token=s3cr3t-token quiet\n"
        );
        let c = Cmdline::parse(&line).unwrap();
        assert_eq!(c.server, "http://10.0.0.1:8080");
        assert_eq!(c.mode, Mode::Deploy);
        assert_eq!(c.job.unwrap().to_string(), JOB);
        assert_eq!(c.token.as_ref().unwrap().expose(), "s3cr3t-token");
    }

    #[test]
    fn discover_needs_no_job_or_token() {
        let c = Cmdline::parse("kiln.server=https://kiln.example kiln.mode=discover").unwrap();
        assert_eq!(c.mode, Mode::Discover);
        assert!(c.job.is_none() && c.token.is_none());
    }

    #[test]
    fn lldp_wait_has_a_default_and_can_be_off() {
        let base = "kiln.server=http://h kiln.mode=discover";
        assert_eq!(Cmdline::parse(base).unwrap().lldp_secs, DEFAULT_LLDP_SECS);
        assert_eq!(
            Cmdline::parse(&format!("{base} kiln.lldp_secs=0")).unwrap().lldp_secs,
            0
        );
        let e = Cmdline::parse(&format!("{base} kiln.lldp_secs=5s")).unwrap_err();
        assert_eq!(e, CmdlineError::BadLldpSecs("5s".into()));
    }

    #[test]
    fn bootif_in_both_spellings() {
        let base = "kiln.server=http://h kiln.mode=discover";
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        for bootif in ["52:54:00:12:34:56", "01-52-54-00-12-34-56", "52-54-00-12-34-56"] {
            let c = Cmdline::parse(&format!("{base} BOOTIF={bootif}")).unwrap();
            assert_eq!(c.boot_mac, Some(mac), "{bootif}");
        }
        assert_eq!(Cmdline::parse(base).unwrap().boot_mac, None);
        let e = Cmdline::parse(&format!("{base} BOOTIF=01-52-54")).unwrap_err();
        assert!(e.to_string().contains("BOOTIF `01-52-54`"), "{e}");
    }

    #[test]
    fn quoted_values_keep_their_spaces() {
        let c = Cmdline::parse(r#"kiln.server=http://h "kiln.mode=discover" kiln.token="a b""#).unwrap();
        assert_eq!(c.token.unwrap().expose(), "a b");
        assert_eq!(
            Cmdline::parse(r#"kiln.token="open"#).unwrap_err(),
            CmdlineError::UnclosedQuote
        );
    }

    #[test]
    fn errors_name_what_is_missing_or_wrong() {
        let cases: &[(&str, &str)] = &[
            ("", "kiln.server is missing"),
            ("kiln.mode=deploy", "kiln.server is missing"),
            ("kiln.server=http://h", "kiln.mode is missing"),
            (
                "kiln.server=http://h kiln.mode=deploy kiln.token=t",
                "kiln.job is missing",
            ),
            (
                &format!("kiln.server=http://h kiln.mode=deploy kiln.job={JOB}"),
                "kiln.token is missing",
            ),
            ("kiln.sever=http://h kiln.mode=deploy", "(it has kiln.sever: a typo?)"),
            ("kiln.server=10.0.0.1:8080 kiln.mode=discover", "not a URL"),
            ("kiln.server=http:// kiln.mode=discover", "not a URL"),
            ("kiln.server=http://h kiln.mode=install", "`install` is not a mode"),
            (
                "kiln.server=http://h kiln.mode=deploy kiln.job=42",
                "`42` is not a job id",
            ),
            ("kiln.server= kiln.mode=discover", "kiln.server is empty"),
            ("kiln.server=http://a kiln.server=http://b", "given twice"),
        ];
        for (line, says) in cases {
            let e = Cmdline::parse(line).unwrap_err().to_string();
            assert!(e.contains(says), "{line:?}: `{e}` does not say `{says}`");
        }
        // The same value twice is fine.
        assert!(Cmdline::parse("kiln.server=http://a kiln.server=http://a kiln.mode=discover").is_ok());
    }

    #[test]
    fn the_token_never_shows() {
        let line = format!("kiln.server=http://h kiln.mode=deploy kiln.job={JOB} kiln.token=canary-hunter2");
        let c = Cmdline::parse(&line).unwrap();
        assert!(!format!("{c:?}").contains("canary"), "{c:?}");
        assert!(format!("{c:?}").contains("[redacted]"));
        // Nor in an error about another key.
        let e = Cmdline::parse("kiln.token=canary-hunter2 kiln.server=http://h kiln.mode=deploy").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("canary"));
    }

    proptest::proptest! {
        /// Any line of arbitrary text never panics, and words that are not
        /// `kiln.*` never change the result.
        #[test]
        fn noise_is_ignored(noise in proptest::collection::vec("[a-zA-Z0-9_.,=/-]{0,12}", 0..8)) {
            let noise: Vec<String> = noise.into_iter().filter(|w| !w.starts_with("kiln.")).collect();
            let base = "kiln.server=http://10.1.2.3 kiln.mode=discover";
            let with_noise = format!("{} {base} {}", noise.join(" "), noise.join(" "));
            proptest::prop_assert_eq!(Cmdline::parse(base), Cmdline::parse(&with_noise));
        }

        #[test]
        fn never_panics(line in "\\PC{0,200}") {
            let _ = Cmdline::parse(&line);
        }
    }
}
