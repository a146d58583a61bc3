//! The installer path of a reimage: what a machine net-boots to install an
//! OS image of kind `installer` (Debian's d-i, or Anaconda for the RedHat
//! family) and the kernel command line that makes the installer fetch
//! kiln's preseed or kickstart for its job.
//!
//! **Where the kernel and initrd are.** The image's `source` names the
//! installer's kernel *directory*: a path under the server's artifacts
//! directory (served at `/boot/file/`) or an `http(s)://` URL. The files in
//! it are named by the installer's own convention:
//!
//! | flavor | kernel | initrd | e.g. |
//! | --- | --- | --- | --- |
//! | preseed (Debian, Ubuntu) | `linux` | `initrd.gz` | `debian-installer-12-netboot-amd64`'s `…/debian-installer/amd64/` |
//! | kickstart (RHEL, Rocky, Alma, CentOS, Fedora, Oracle) | `vmlinuz` | `initrd.img` | a tree's `images/pxeboot/` |
//!
//! Anaconda also needs its install tree: when `source` is a tree's
//! `…/images/pxeboot`, the tree goes on the command line as `inst.repo=`;
//! otherwise the kickstart must name it (`url --url=…`).
//!
//! **Preseed or kickstart.** An image with an operator's template of one
//! kind and not the other uses that kind; otherwise the OS name decides
//! (the RedHat family above → kickstart, anything else → preseed).
//!
//! **The base URL and the token are not known when the job arms** (a
//! machine may reach kiln at another address than the one the job saw,
//! and the token must not be stored with the arm). The arm's command line
//! holds two placeholders instead: [`BASE_URL`], filled by the server with
//! the base URL the booting machine reached kiln at, and [`TOKEN`], filled
//! by the iPXE renderer with the job token — the script is the only place
//! the token reaches the machine. Both contain `{`, which
//! [`crate::ipxe::check_arg`] refuses, so a placeholder left unfilled can
//! never reach a machine.

use kiln_types::catalog::{OsImage, OsKind};

use crate::ipxe::check_arg;
use crate::templates::TemplateKind;

/// Placeholder for kiln's base URL as the booting machine reaches it.
pub const BASE_URL: &str = "{kiln.base_url}";
/// Placeholder for the job token.
pub const TOKEN: &str = "{kiln.token}";

/// Which answer file the installer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Debian's installer (d-i): `url=` → `/boot/job/ID/preseed`.
    Preseed,
    /// Anaconda: `inst.ks=` → `/boot/job/ID/kickstart`.
    Kickstart,
}

/// OS names (lowercase, or their prefix before `-`/`_`) installed with a
/// kickstart.
const KICKSTART_OSES: [&str; 11] = [
    "rhel",
    "redhat",
    "centos",
    "rocky",
    "rockylinux",
    "alma",
    "almalinux",
    "fedora",
    "oracle",
    "oraclelinux",
    "ol",
];

impl Flavor {
    /// The flavor of `image` (see the module doc).
    pub fn of(image: &OsImage) -> Flavor {
        let has = |k: TemplateKind| image.templates.contains_key(k.as_str());
        match (has(TemplateKind::Preseed), has(TemplateKind::Kickstart)) {
            (true, false) => return Flavor::Preseed,
            (false, true) => return Flavor::Kickstart,
            _ => {}
        }
        let name = image.name.to_ascii_lowercase();
        let family = name.split(['-', '_']).next().unwrap_or_default();
        if KICKSTART_OSES.contains(&family) {
            Flavor::Kickstart
        } else {
            Flavor::Preseed
        }
    }

    /// The answer file this installer fetches.
    pub fn template(self) -> TemplateKind {
        match self {
            Flavor::Preseed => TemplateKind::Preseed,
            Flavor::Kickstart => TemplateKind::Kickstart,
        }
    }

    /// Kernel and initrd file names in the image's `source` directory.
    pub fn files(self) -> (&'static str, &'static str) {
        match self {
            Flavor::Preseed => ("linux", "initrd.gz"),
            Flavor::Kickstart => ("vmlinuz", "initrd.img"),
        }
    }
}

/// Where the kernel directory of an installer image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Relative to the artifacts directory (no leading `/`, no trailing one).
    Artifacts(String),
    /// An `http://` or `https://` URL (no trailing `/`).
    Url(String),
}

impl Source {
    /// `source` of an installer image, checked: a URL, or a path under the
    /// artifacts directory without `.` / `..` / empty segments; either of
    /// characters an iPXE script takes as they are.
    pub fn parse(source: &str) -> Result<Source, String> {
        let s = source.trim().trim_end_matches('/');
        let bad = |why: &str| {
            Err(format!(
                "installer source `{}`: {why}; give the directory holding the installer's kernel \
                 and initrd, under the artifacts directory or as an http(s) URL",
                source.chars().take(120).collect::<String>()
            ))
        };
        if s.is_empty() {
            return bad("it is empty");
        }
        if let Err(e) = check_arg(s) {
            return bad(&e.to_string());
        }
        if s.contains('?') || s.contains('=') {
            return bad("a directory has no query");
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Source::Url(s.to_string()));
        }
        if s.contains("://") {
            return bad("only http:// and https:// URLs are served to the installer");
        }
        let rel = s.trim_start_matches('/');
        if rel.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
            return bad("a path under the artifacts directory has no empty, `.` or `..` parts");
        }
        Ok(Source::Artifacts(rel.to_string()))
    }

    /// The install tree a RedHat-style `…/images/pxeboot` directory is in,
    /// as a URL (under [`BASE_URL`]`/boot/file/` for the artifacts).
    pub fn tree(&self) -> Option<String> {
        let (Source::Artifacts(dir) | Source::Url(dir)) = self;
        let tree = dir.strip_suffix("/images/pxeboot")?;
        if tree.is_empty() || tree.ends_with('/') {
            return None;
        }
        Some(match self {
            Source::Artifacts(_) => format!("{BASE_URL}/boot/file/{tree}"),
            Source::Url(_) => tree.to_string(),
        })
    }

    /// `file` in this directory: an artifacts path or a URL.
    pub fn join(&self, file: &str) -> String {
        match self {
            Source::Artifacts(dir) | Source::Url(dir) => format!("{dir}/{file}"),
        }
    }
}

/// What the arm of an installer reimage holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallerBoot {
    pub flavor: Flavor,
    /// An artifacts path or an http(s) URL.
    pub kernel: String,
    pub initrd: String,
    /// With the [`BASE_URL`] and [`TOKEN`] placeholders.
    pub cmdline: Vec<String>,
}

/// The net boot of installer `image` for job `job_id`: its kernel and
/// initrd, and a command line that makes the installer fetch the job's
/// answer file unattended. `hostname` and `domain` go on the command line
/// because d-i configures the network (and asks for them) before it has
/// read the preseed; `console` (the `console=` arguments of `[boot]
/// agent_cmdline`) comes after d-i's `---`, so the installed system keeps
/// it — and nothing else: d-i copies only what follows `---` into the new
/// system's boot loader, so the token never lands there.
pub fn boot(
    image: &OsImage,
    job_id: &str,
    hostname: &str,
    domain: Option<&str>,
    console: &[String],
) -> Result<InstallerBoot, String> {
    if image.kind != OsKind::Installer {
        return Err(format!("{} {} is not an installer image", image.name, image.version));
    }
    let source = Source::parse(&image.source)?;
    let flavor = Flavor::of(image);
    let (kernel, initrd) = flavor.files();
    let file_url = format!(
        "{BASE_URL}/boot/job/{job_id}/{}?token={TOKEN}",
        flavor.template().as_str()
    );
    let mut cmdline: Vec<String> = match flavor {
        Flavor::Preseed => {
            let mut c = vec![
                "auto=true".to_string(),
                "priority=critical".to_string(),
                format!("url={file_url}"),
                "interface=auto".to_string(),
                format!("hostname={hostname}"),
            ];
            c.extend(domain.map(|d| format!("domain={d}")));
            c.push("---".into());
            c
        }
        Flavor::Kickstart => {
            let mut c = vec![format!("inst.ks={file_url}"), "inst.text".to_string()];
            // Anaconda loads its second stage from the install tree; a
            // source that is a tree's `images/pxeboot` names the tree.
            c.extend(source.tree().map(|t| format!("inst.repo={t}")));
            c
        }
    };
    cmdline.extend(console.iter().filter(|a| a.starts_with("console=")).cloned());
    // Everything but the placeholders must already be fit for a script.
    for arg in &cmdline {
        check_arg(&fill(arg, "http://x", "t")).map_err(|e| format!("installer command line: {e}"))?;
    }
    Ok(InstallerBoot {
        flavor,
        kernel: source.join(kernel),
        initrd: source.join(initrd),
        cmdline,
    })
}

/// `arg` with both placeholders filled (for checks and tests; the server
/// fills [`BASE_URL`], the iPXE renderer [`TOKEN`]).
pub fn fill(arg: &str, base_url: &str, token: &str) -> String {
    arg.replace(BASE_URL, base_url).replace(TOKEN, token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::OsImageId;
    use kiln_types::catalog::Arch;

    fn image(name: &str, source: &str) -> OsImage {
        OsImage {
            id: OsImageId::new(),
            name: name.into(),
            version: "12".into(),
            arch: Arch::X86_64,
            kind: OsKind::Installer,
            tags: vec![],
            min_ram_bytes: 0,
            min_disk_bytes: 0,
            source: source.into(),
            sha256: None,
            format: Default::default(),
            content: Default::default(),
            templates: Default::default(),
            created_at: chrono::Utc::now(),
        }
    }

    fn console() -> Vec<String> {
        vec![
            "console=tty0".into(),
            "console=ttyS0,115200".into(),
            "kiln.debug".into(),
        ]
    }

    const JOB: &str = "0190c5e2-7b1a-7cc3-9a4e-3f1d2c3b4a59";

    #[test]
    fn debian_boots_linux_and_initrd_gz_with_the_preseed_url() {
        let b = boot(
            &image("debian", "di/bookworm/amd64/"),
            JOB,
            "web1",
            Some("eqiad.example.net"),
            &console(),
        )
        .unwrap();
        assert_eq!(b.flavor, Flavor::Preseed);
        assert_eq!(b.kernel, "di/bookworm/amd64/linux");
        assert_eq!(b.initrd, "di/bookworm/amd64/initrd.gz");
        assert_eq!(
            b.cmdline,
            [
                "auto=true",
                "priority=critical",
                &format!("url={{kiln.base_url}}/boot/job/{JOB}/preseed?token={{kiln.token}}"),
                "interface=auto",
                "hostname=web1",
                "domain=eqiad.example.net",
                "---",
                "console=tty0",
                "console=ttyS0,115200",
            ]
        );
        let filled: Vec<String> = b
            .cmdline
            .iter()
            .map(|a| fill(a, "http://10.0.0.1:7070", "kj_tok-en_"))
            .collect();
        assert!(filled.contains(&format!(
            "url=http://10.0.0.1:7070/boot/job/{JOB}/preseed?token=kj_tok-en_"
        )));
        for a in &filled {
            check_arg(a).unwrap();
        }
        // Nothing after `---` (what d-i copies into the new system) holds
        // the token or the URL.
        let after = filled.iter().skip_while(|a| *a != "---").skip(1);
        assert!(after.clone().all(|a| a.starts_with("console=")), "{filled:?}");
        // No domain: no domain= argument.
        let b = boot(&image("debian", "di"), JOB, "web1", None, &[]).unwrap();
        assert!(!b.cmdline.iter().any(|a| a.starts_with("domain=")));
        assert_eq!(b.cmdline.last().unwrap(), "---");
    }

    #[test]
    fn the_redhat_family_gets_a_kickstart() {
        for name in ["rocky", "RHEL", "almalinux", "fedora", "centos-stream", "ol"] {
            let b = boot(
                &image(name, "https://mirror.example/os/images/pxeboot"),
                JOB,
                "h",
                None,
                &console(),
            )
            .unwrap();
            assert_eq!(b.flavor, Flavor::Kickstart, "{name}");
            assert_eq!(b.kernel, "https://mirror.example/os/images/pxeboot/vmlinuz");
            assert_eq!(b.initrd, "https://mirror.example/os/images/pxeboot/initrd.img");
            assert_eq!(
                b.cmdline,
                [
                    &format!("inst.ks={{kiln.base_url}}/boot/job/{JOB}/kickstart?token={{kiln.token}}"),
                    "inst.text",
                    "inst.repo=https://mirror.example/os",
                    "console=tty0",
                    "console=ttyS0,115200",
                ]
            );
        }
        // A tree under the artifacts is served from there; a directory
        // that is no tree's pxeboot names no repository.
        let b = boot(&image("rocky", "rocky/9/images/pxeboot"), JOB, "h", None, &[]).unwrap();
        assert_eq!(b.cmdline[2], "inst.repo={kiln.base_url}/boot/file/rocky/9");
        let b = boot(&image("rocky", "rocky-9-pxe"), JOB, "h", None, &[]).unwrap();
        assert!(
            !b.cmdline.iter().any(|a| a.starts_with("inst.repo=")),
            "{:?}",
            b.cmdline
        );
        for name in ["debian", "ubuntu", "rockstar", "olive"] {
            assert_eq!(Flavor::of(&image(name, "x")), Flavor::Preseed, "{name}");
        }
    }

    #[test]
    fn a_template_of_one_kind_decides_the_flavor() {
        let mut i = image("debian", "x");
        i.templates.insert("kickstart".into(), "text\n".into());
        assert_eq!(Flavor::of(&i), Flavor::Kickstart);
        let mut i = image("rocky", "x");
        i.templates.insert("preseed".into(), "d-i x string y\n".into());
        assert_eq!(Flavor::of(&i), Flavor::Preseed);
        // Both, or neither: the name decides.
        i.templates.insert("kickstart".into(), "text\n".into());
        assert_eq!(Flavor::of(&i), Flavor::Kickstart);
    }

    #[test]
    fn sources_are_checked() {
        assert_eq!(
            Source::parse("/di/amd64/").unwrap(),
            Source::Artifacts("di/amd64".into())
        );
        assert_eq!(
            Source::parse("http://10.0.0.2/d-i").unwrap(),
            Source::Url("http://10.0.0.2/d-i".into())
        );
        for bad in [
            "",
            "/",
            "../etc",
            "di/../../etc",
            "di//amd64",
            "./di",
            "di amd64",
            "ftp://mirror/di",
            "file:///usr/lib",
            "http://x/${net0/mac}",
            "http://x/di?x=1",
            "di\nshell",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = boot(&image("debian", "../x"), JOB, "h", None, &[]).unwrap_err();
        assert!(e.contains("installer source `../x`"), "{e}");
        let mut disk = image("debian", "x");
        disk.kind = OsKind::DiskImage;
        assert!(boot(&disk, JOB, "h", None, &[]).is_err());
    }

    #[test]
    fn unfit_values_are_refused() {
        assert!(boot(&image("debian", "di"), JOB, "we b1", None, &[]).is_err());
        assert!(boot(&image("debian", "di"), "x&y", "h", None, &[]).is_err());
        assert!(boot(&image("debian", "di"), JOB, "h", Some("a;b"), &[]).is_err());
        // An unfilled placeholder never passes the script check.
        assert!(check_arg(BASE_URL).is_err() && check_arg(TOKEN).is_err());
    }
}
