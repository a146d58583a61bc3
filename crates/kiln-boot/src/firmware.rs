//! Which first-stage boot file a client gets, from what it says about
//! itself in DHCP: client architecture (option 93, RFC 4578), vendor class
//! (option 60: `PXEClient…` or `HTTPClient…`) and user class (option 77:
//! `iPXE` once iPXE itself asks).

use serde::Serialize;

/// What kind of boot client sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Client {
    /// Legacy BIOS PXE ROM: gets `undionly.kpxe` by TFTP.
    BiosPxe,
    /// UEFI PXE on x86-64: gets an iPXE EFI binary by TFTP.
    UefiPxe,
    /// UEFI HTTP boot on x86-64: gets an HTTP URL of an EFI binary.
    UefiHttp,
    /// iPXE itself (second round): gets its HTTP script; `efi` when it
    /// runs on UEFI firmware.
    Ipxe { efi: bool },
    /// A plain DHCP client (an OS, an agent's udhcpc): no boot file.
    Plain,
    /// A boot client kiln has no first stage for (ARM, IA32, …).
    Unsupported { arch: u16 },
}

/// Classifies a request. `arch` is option 93's first value, `vendor_class`
/// option 60, `ipxe` whether option 77 says `iPXE` or option 175 is present.
pub fn classify(arch: Option<u16>, vendor_class: Option<&str>, ipxe: bool) -> Client {
    if ipxe {
        return Client::Ipxe {
            efi: matches!(arch, Some(6 | 7 | 9 | 10 | 11 | 15 | 16 | 19)),
        };
    }
    let vendor = vendor_class.unwrap_or("");
    let http = vendor.starts_with("HTTPClient");
    let pxe = vendor.starts_with("PXEClient");
    match (arch, http, pxe) {
        (Some(16), _, _) | (Some(7 | 9), true, _) => Client::UefiHttp,
        (Some(0), _, _) => Client::BiosPxe,
        (Some(7 | 9), false, _) => Client::UefiPxe,
        (Some(other), _, _) => Client::Unsupported { arch: other },
        (None, _, true) => Client::BiosPxe,
        (None, true, false) => Client::UefiHttp,
        (None, false, false) => Client::Plain,
    }
}

/// Names of the first-stage files (configurable; Debian's `ipxe` package
/// installs these under /usr/lib/ipxe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstStageFiles {
    pub bios: String,
    pub uefi: String,
}

impl Default for FirstStageFiles {
    fn default() -> Self {
        FirstStageFiles {
            bios: "undionly.kpxe".into(),
            uefi: "snponly.efi".into(),
        }
    }
}

/// What goes into the DHCP answer's boot fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "via")]
pub enum FirstStage {
    /// `file` from TFTP on next-server.
    Tftp { file: String },
    /// A URL (UEFI HTTP boot, or iPXE's script); UEFI HTTP clients also need
    /// vendor class `HTTPClient` echoed in option 60.
    Http { url: String },
}

/// The first stage for `client`. `http_base` is kiln's boot URL
/// (`http://10.0.0.1:7070`); `mac` identifies the machine in the script URL.
pub fn first_stage(client: Client, files: &FirstStageFiles, http_base: &str, mac: &str) -> Option<FirstStage> {
    match client {
        Client::BiosPxe => Some(FirstStage::Tftp {
            file: files.bios.clone(),
        }),
        Client::UefiPxe => Some(FirstStage::Tftp {
            file: files.uefi.clone(),
        }),
        Client::UefiHttp => Some(FirstStage::Http {
            url: format!("{http_base}/boot/file/{}", files.uefi),
        }),
        Client::Ipxe { efi } => Some(FirstStage::Http {
            url: format!(
                // iPXE expands `${…}` in the file name it is given: the
                // SMBIOS UUID and serial let HTTP boot know a machine whose
                // MAC is not in the inventory.
                "{http_base}/boot/ipxe?mac={mac}&uuid=${{uuid}}&serial=${{serial:uristring}}&platform={}",
                if efi { "efi" } else { "pcbios" }
            ),
        }),
        Client::Plain | Client::Unsupported { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_table() {
        let rows = [
            (
                Some(0),
                Some("PXEClient:Arch:00000:UNDI:002001"),
                false,
                Client::BiosPxe,
            ),
            (
                Some(7),
                Some("PXEClient:Arch:00007:UNDI:003016"),
                false,
                Client::UefiPxe,
            ),
            (
                Some(9),
                Some("PXEClient:Arch:00009:UNDI:003016"),
                false,
                Client::UefiPxe,
            ),
            (
                Some(16),
                Some("HTTPClient:Arch:00016:UNDI:003001"),
                false,
                Client::UefiHttp,
            ),
            (Some(7), Some("HTTPClient:Arch:00007"), false, Client::UefiHttp),
            (Some(0), Some("PXEClient:Arch:00000"), true, Client::Ipxe { efi: false }),
            (Some(7), Some("PXEClient:Arch:00007"), true, Client::Ipxe { efi: true }),
            (
                Some(11),
                Some("PXEClient:Arch:00011"),
                false,
                Client::Unsupported { arch: 11 },
            ),
            (None, Some("PXEClient"), false, Client::BiosPxe),
            (None, Some("udhcp 1.36.1"), false, Client::Plain),
            (None, None, false, Client::Plain),
        ];
        for (arch, vendor, ipxe, want) in rows {
            assert_eq!(classify(arch, vendor, ipxe), want, "{arch:?} {vendor:?} {ipxe}");
        }
    }

    #[test]
    fn first_stages() {
        let f = FirstStageFiles::default();
        let base = "http://10.0.0.1:7070";
        let mac = "52:54:00:00:00:01";
        assert_eq!(
            first_stage(Client::BiosPxe, &f, base, mac),
            Some(FirstStage::Tftp {
                file: "undionly.kpxe".into()
            })
        );
        assert_eq!(
            first_stage(Client::UefiPxe, &f, base, mac),
            Some(FirstStage::Tftp {
                file: "snponly.efi".into()
            })
        );
        assert_eq!(
            first_stage(Client::Ipxe { efi: true }, &f, base, mac),
            Some(FirstStage::Http {
                url: "http://10.0.0.1:7070/boot/ipxe?mac=52:54:00:00:00:01&uuid=${uuid}&serial=${serial:uristring}&platform=efi"
                    .into()
            })
        );
        assert_eq!(
            first_stage(Client::UefiHttp, &f, base, mac),
            Some(FirstStage::Http {
                url: "http://10.0.0.1:7070/boot/file/snponly.efi".into()
            })
        );
        assert_eq!(first_stage(Client::Plain, &f, base, mac), None);
    }
}
