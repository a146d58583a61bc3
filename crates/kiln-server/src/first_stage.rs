//! iPXE's first-stage binaries: where kiln serves them from, and the
//! start-up check that every file kiln's DHCP would offer can be served.
//!
//! kiln's DHCP sends BIOS PXE clients `bios_file` (`undionly.kpxe`) and
//! UEFI PXE clients `uefi_file` (`snponly.efi`) by TFTP from this server,
//! and UEFI HTTP boot clients `uefi_file` at `/boot/file/` (see
//! `kiln_boot::firmware`). Both services look in their own directory first
//! (the TFTP root, the artifacts directory: an operator's own build wins)
//! and then, for the first-stage names only, in `[boot] ipxe_dir`, where
//! Debian's `ipxe` package installs them (/usr/lib/ipxe). So a server with
//! that package installed answers every client class with no further
//! configuration, and one that would send a client a file that is nowhere
//! (or by TFTP with TFTP off) refuses to start, saying which file, why,
//! and how to fix it — a machine that cannot boot says nothing useful.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, DhcpSettings};

/// Where Debian's `ipxe` package installs its binaries.
pub const DEBIAN_IPXE_DIR: &str = "/usr/lib/ipxe";

/// The first-stage names always served from `ipxe_dir` when the service's
/// own directory lacks them: iPXE for BIOS (`undionly.kpxe`, which uses
/// the NIC's PXE stack) and UEFI (`snponly.efi`, which uses the
/// firmware's network driver; `ipxe.efi`, which brings its own drivers).
pub const FIRST_STAGE_NAMES: &[&str] = &["undionly.kpxe", "snponly.efi", "ipxe.efi"];

/// The files served from `config.boot.ipxe_dir` (request path → file):
/// [`FIRST_STAGE_NAMES`] and the configured `bios_file` / `uefi_file`.
pub fn fallback_files(config: &Config) -> BTreeMap<PathBuf, PathBuf> {
    let mut names: Vec<&str> = FIRST_STAGE_NAMES.to_vec();
    if let Some(d) = &config.dhcp {
        names.extend([d.bios_file.as_str(), d.uefi_file.as_str()]);
    }
    names
        .into_iter()
        .filter_map(crate::boot_files::relative_path)
        .map(|rel| (rel.clone(), config.boot.ipxe_dir.join(rel)))
        .collect()
}

/// One file kiln's DHCP offers one class of client, and how it is fetched.
struct Offer<'a> {
    key: &'static str,
    name: &'a str,
    clients: &'static str,
    tftp: bool,
}

fn offers(d: &DhcpSettings) -> [Offer<'_>; 3] {
    [
        Offer {
            key: "bios_file",
            name: &d.bios_file,
            clients: "BIOS PXE clients",
            tftp: true,
        },
        Offer {
            key: "uefi_file",
            name: &d.uefi_file,
            clients: "UEFI PXE clients",
            tftp: true,
        },
        Offer {
            key: "uefi_file",
            name: &d.uefi_file,
            clients: "UEFI HTTP boot clients",
            tftp: false,
        },
    ]
}

/// Refuses a configuration whose DHCP would offer a file kiln cannot
/// serve; every problem is named, with its fix. Reads the file system.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    check_with(config, |p| p.is_file())
}

/// [`check`] with `is_file` deciding what exists (pure for the tests'
/// tables).
pub fn check_with(config: &Config, is_file: impl Fn(&Path) -> bool) -> Result<(), ConfigError> {
    let Some(dhcp) = &config.dhcp else {
        return Ok(()); // kiln offers nothing
    };
    let ipxe = &config.boot.ipxe_dir;
    let artifacts = config.artifacts_dir();
    let mut problems: Vec<String> = Vec::new();
    let mut say = |p: String| {
        if !problems.contains(&p) {
            problems.push(p);
        }
    };
    for o in offers(dhcp) {
        let Some(rel) = crate::boot_files::relative_path(o.name) else {
            say(format!(
                "[dhcp] {} = \"{}\" is not a file name kiln can serve (a relative path, no `..`, no \
                 leading or doubled /): give a name like \"snponly.efi\"",
                o.key, o.name
            ));
            continue;
        };
        let in_ipxe = is_file(&ipxe.join(&rel));
        if o.tftp {
            let Some(tftp) = &config.tftp else {
                say(format!(
                    "[dhcp] sends {} `{}` by TFTP from this server, but TFTP is off (`enabled = false` \
                     under [tftp]): remove `enabled = false` (kiln then serves iPXE from {})",
                    o.clients,
                    o.name,
                    ipxe.display()
                ));
                continue;
            };
            if !in_ipxe && !is_file(&tftp.root.join(&rel)) {
                say(format!(
                    "[dhcp] {} = \"{}\": {} are sent it by TFTP, but it is neither in the TFTP root {} nor \
                     in {} ([boot] ipxe_dir): install Debian's iPXE (apt-get install ipxe), or put {} \
                     in {}",
                    o.key,
                    o.name,
                    o.clients,
                    tftp.root.display(),
                    ipxe.display(),
                    o.name,
                    tftp.root.display()
                ));
            }
        } else if !in_ipxe && !is_file(&artifacts.join(&rel)) {
            say(format!(
                "[dhcp] {} = \"{}\": {} are sent /boot/file/{}, but it is neither in the artifacts \
                 directory {} nor in {} ([boot] ipxe_dir): install Debian's iPXE (apt-get install \
                 ipxe), or put {} in {}",
                o.key,
                o.name,
                o.clients,
                o.name,
                artifacts.display(),
                ipxe.display(),
                o.name,
                artifacts.display()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::BootFiles(problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// A config from TOML (the data directory is /srv/kiln).
    fn config(text: &str) -> Config {
        let mut s: Settings = toml::from_str(text).unwrap();
        s.data_dir = Some("/srv/kiln".into());
        Config::from_settings(s).unwrap()
    }

    const DHCP: &str = "[dhcp]\nmode = \"proxy\"\ninterfaces = [\"br0\"]\n";

    /// Debian's ipxe package: these three files in /usr/lib/ipxe.
    fn debian(p: &Path) -> bool {
        FIRST_STAGE_NAMES
            .iter()
            .any(|n| p == Path::new(DEBIAN_IPXE_DIR).join(n))
    }

    fn refusal(c: &Config, is_file: impl Fn(&Path) -> bool) -> String {
        check_with(c, is_file).unwrap_err().to_string()
    }

    #[test]
    fn with_debians_ipxe_every_client_class_is_served_with_no_more_configuration() {
        let c = config(DHCP);
        let t = c.tftp.as_ref().expect("TFTP is on beside DHCP");
        assert_eq!(t.root, Path::new(DEBIAN_IPXE_DIR));
        assert!(check_with(&c, debian).is_ok());
        // No DHCP: nothing is offered, nothing is checked, TFTP stays off.
        let c = config("");
        assert!(c.tftp.is_none());
        assert!(check_with(&c, |_| false).is_ok());
        // TFTP asked for without DHCP runs.
        assert!(config("[tftp]\nroot = \"/srv/tftp\"\n").tftp.is_some());
    }

    #[test]
    fn a_file_missing_from_every_source_is_refused_with_its_fix() {
        let e = refusal(&config(DHCP), |_| false);
        assert!(e.starts_with("boot files: "), "{e}");
        for want in [
            "[dhcp] bios_file = \"undionly.kpxe\": BIOS PXE clients are sent it by TFTP, but it is neither in \
             the TFTP root /usr/lib/ipxe nor in /usr/lib/ipxe ([boot] ipxe_dir): install Debian's iPXE \
             (apt-get install ipxe), or put undionly.kpxe in /usr/lib/ipxe",
            "UEFI PXE clients are sent it by TFTP",
            "UEFI HTTP boot clients are sent /boot/file/snponly.efi, but it is neither in the artifacts \
             directory /srv/kiln/artifacts nor in /usr/lib/ipxe",
        ] {
            assert!(e.contains(want), "`{want}` is not in: {e}");
        }
        // A name no source has, the rest present.
        let c = config(&format!("{DHCP}uefi_file = \"ipxe-custom.efi\"\n"));
        let e = refusal(&c, debian);
        assert!(e.contains("uefi_file = \"ipxe-custom.efi\": UEFI PXE clients"), "{e}");
        assert!(e.contains("UEFI HTTP boot clients"), "{e}");
        assert!(!e.contains("bios_file"), "{e}");
    }

    #[test]
    fn an_operators_own_directories_serve_what_debian_lacks() {
        let c = config(&format!(
            "{DHCP}uefi_file = \"ipxe-custom.efi\"\n[tftp]\nroot = \"/srv/tftp\"\n[boot]\nartifacts = \"/srv/art\"\n"
        ));
        let custom_in = |dirs: &'static [&'static str]| {
            move |p: &Path| debian(p) || dirs.iter().any(|d| p == Path::new(d).join("ipxe-custom.efi"))
        };
        assert!(check_with(&c, custom_in(&["/srv/tftp", "/srv/art"])).is_ok());
        let e = refusal(&c, custom_in(&["/srv/tftp"]));
        assert!(
            e.contains("UEFI HTTP boot clients") && e.contains("put ipxe-custom.efi in /srv/art"),
            "{e}"
        );
        assert!(!e.contains("UEFI PXE clients"), "{e}");
        let e = refusal(&c, custom_in(&["/srv/art"]));
        assert!(
            e.contains("UEFI PXE clients") && e.contains("put ipxe-custom.efi in /srv/tftp"),
            "{e}"
        );
        // Without Debian's package, the TFTP root must hold the BIOS file too.
        let e = refusal(&c, |p| p.starts_with("/srv") && p.ends_with("ipxe-custom.efi"));
        assert!(e.contains("bios_file = \"undionly.kpxe\""), "{e}");
        // Another ipxe_dir is where the fallback looks.
        let c = config(&format!("{DHCP}[boot]\nipxe_dir = \"/opt/ipxe\"\n"));
        assert!(check_with(&c, |p| p.starts_with("/opt/ipxe")).is_ok());
        // The TFTP root is still /usr/lib/ipxe; HTTP has only /opt/ipxe.
        let e = refusal(&c, debian);
        assert!(
            e.contains("UEFI HTTP boot clients") && !e.contains("PXE clients"),
            "{e}"
        );
        let e = refusal(&c, |p| p.starts_with("/usr/lib/ipxe") && !p.ends_with("snponly.efi"));
        assert!(e.contains("nor in /opt/ipxe ([boot] ipxe_dir)"), "{e}");
    }

    #[test]
    fn pxe_clients_sent_to_tftp_with_tftp_off_are_refused() {
        let c = config(&format!("{DHCP}[tftp]\nenabled = false\n"));
        assert!(c.tftp.is_none());
        let e = refusal(&c, debian);
        assert!(
            e.contains(
                "[dhcp] sends BIOS PXE clients `undionly.kpxe` by TFTP from this server, but TFTP is off \
                 (`enabled = false` under [tftp]): remove `enabled = false`"
            ),
            "{e}"
        );
        assert!(e.contains("UEFI PXE clients `snponly.efi`"), "{e}");
        assert!(!e.contains("HTTP boot"), "HTTP boot is served: {e}");
        // Without DHCP, TFTP may be off.
        assert!(config("[tftp]\nenabled = false\n").tftp.is_none());
    }

    #[test]
    fn a_name_that_is_not_a_plain_path_is_refused() {
        for bad in ["../etc/shadow", "/usr/lib/ipxe/snponly.efi", "a//b", ""] {
            let c = config(&format!("{DHCP}bios_file = \"{bad}\"\n"));
            let e = refusal(&c, |_| true);
            assert!(
                e.contains(&format!("bios_file = \"{bad}\" is not a file name kiln can serve")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_fallback_holds_the_first_stage_names_and_the_configured_ones() {
        let c = config(&format!(
            "{DHCP}bios_file = \"custom.kpxe\"\n[boot]\nipxe_dir = \"/opt/ipxe\"\n"
        ));
        let f = fallback_files(&c);
        let got: Vec<(&str, &str)> = f
            .iter()
            .map(|(k, v)| (k.to_str().unwrap(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("custom.kpxe", "/opt/ipxe/custom.kpxe"),
                ("ipxe.efi", "/opt/ipxe/ipxe.efi"),
                ("snponly.efi", "/opt/ipxe/snponly.efi"),
                ("undionly.kpxe", "/opt/ipxe/undionly.kpxe"),
            ]
        );
    }
}
