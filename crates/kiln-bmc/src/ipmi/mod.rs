//! The IPMI driver: IPMI 2.0 over LAN (RMCP+, "lanplus"), spoken natively.
//!
//! - `codec`, `crypto`, `suite`, `cmd`, `fru`: pure functions from bytes to
//!   values and back, table-tested;
//! - `client`: the thin async UDP session on tokio;
//! - [`IpmiDriver`]: the [`BmcDriver`] for one BMC, opening a session per
//!   call and closing it afterwards.
//!
//! Why our own module rather than a crate, the cipher suite policy and the
//! retry rule are in `docs/bmc.md`.

pub mod client;
pub mod cmd;
pub mod codec;
pub mod crypto;
pub mod fru;
pub mod suite;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use futures::future::BoxFuture;

pub use client::{IpmiConfig, Retry, Session};

use crate::{
    BmcDriver, BmcError, BootDevice, BootFirmware, BootPersistence, Identity, Password, PowerAction, PowerState,
};

/// The IPMI-over-LAN port.
pub const DEFAULT_PORT: u16 = 623;

/// The IPMI driver for one BMC.
#[derive(Debug, Clone)]
pub struct IpmiDriver {
    cfg: IpmiConfig,
}

impl IpmiDriver {
    /// A driver for the BMC at `address` (`host` or `host:port`, port 623
    /// by default; `[v6]:port` for IPv6), with default timing: 1 s per try,
    /// 3 tries, 20 s per call.
    pub fn new(address: &str, username: &str, password: Password) -> Result<Self, BmcError> {
        let addr = resolve(address)?;
        Ok(IpmiDriver {
            cfg: IpmiConfig {
                name: address.to_string(),
                addr,
                username: username.to_string(),
                password,
                kg: None,
                privilege: cmd::PRIV_ADMIN,
                try_timeout: Duration::from_secs(1),
                tries: 3,
                deadline: Duration::from_secs(20),
            },
        })
    }

    pub fn from_config(cfg: IpmiConfig) -> Self {
        IpmiDriver { cfg }
    }

    /// Sets the per-try wait, the number of tries and the per-call budget.
    pub fn with_timing(mut self, try_timeout: Duration, tries: u32, deadline: Duration) -> Self {
        self.cfg.try_timeout = try_timeout;
        self.cfg.tries = tries.max(1);
        self.cfg.deadline = deadline;
        self
    }

    pub fn with_kg(mut self, kg: Password) -> Self {
        self.cfg.kg = Some(kg);
        self
    }

    pub fn config(&self) -> &IpmiConfig {
        &self.cfg
    }

    /// Opens a session, runs `f` in it and closes it, whatever `f` returned.
    async fn with_session<T>(&self, f: impl AsyncFnOnce(&mut Session) -> Result<T, BmcError>) -> Result<T, BmcError> {
        let mut s = Session::open(&self.cfg).await?;
        let out = f(&mut s).await;
        s.close().await;
        out
    }

    fn failed(&self, step: &str, cc: u8) -> BmcError {
        let why = client::completion_name(cc);
        match cc {
            0xd4 => BmcError::AuthFailed {
                bmc: self.cfg.name.clone(),
                user: self.cfg.username.clone(),
                reason: format!("{step}: {why}; give the user operator or administrator rights"),
            },
            0xc1 | 0x80 => BmcError::Unsupported {
                bmc: self.cfg.name.clone(),
                what: format!("{step} ({why})"),
            },
            _ => BmcError::Protocol {
                bmc: self.cfg.name.clone(),
                step: step.to_string(),
                detail: format!("completion code {cc:#04x} ({why})"),
            },
        }
    }

    /// Which cipher suite a session with this BMC uses (for `bmc check`).
    pub async fn negotiated_suite(&self) -> Result<u8, BmcError> {
        self.with_session(async |s: &mut Session| Ok(s.suite().id())).await
    }

    /// The five boot-flag bytes (parameter 5) as the BMC reports them.
    pub async fn boot_flags(&self) -> Result<[u8; 5], BmcError> {
        let step = "Get System Boot Options (boot flags)";
        self.with_session(async |s: &mut Session| {
            let r = s.call(step, &cmd::get_boot_flags(), Retry::Idempotent).await?;
            if r.completion != 0 {
                return Err(self.failed(step, r.completion));
            }
            cmd::parse_boot_flags(&r.data).map_err(|detail| BmcError::Protocol {
                bmc: self.cfg.name.clone(),
                step: step.into(),
                detail,
            })
        })
        .await
    }

    /// The system's serial from FRU device 0: the product area's, else the
    /// board area's. A BMC without FRU data, or with data kiln cannot read,
    /// has no serial (`None`, logged) rather than a failed identity; only a
    /// BMC that stops answering fails the call.
    async fn fru_serial(&self, s: &mut Session) -> Result<Option<String>, BmcError> {
        let step = "Get FRU Inventory Area Info";
        let r = s
            .call(step, &fru::get_area_info(fru::SYSTEM_FRU), Retry::Idempotent)
            .await?;
        if r.completion != 0 {
            tracing::debug!(bmc = %self.cfg.name, cc = r.completion, "no FRU inventory: no serial");
            return Ok(None);
        }
        let (size, by_words) = match fru::parse_area_info(&r.data) {
            Ok(info) => info,
            Err(e) => return Ok(self.no_serial(&e)),
        };
        if by_words {
            return Ok(self.no_serial("the FRU device is word-addressed, which kiln does not read"));
        }
        let size = size.min(fru::MAX_FRU_SIZE);
        let mut chunk = fru::READ_CHUNK;
        let header = match self.read_fru(s, 0, 8, size, &mut chunk).await? {
            Ok(h) => h,
            Err(e) => return Ok(self.no_serial(&e)),
        };
        let header = match fru::parse_header(&header) {
            Ok(h) => h,
            Err(e) => return Ok(self.no_serial(&e)),
        };
        let areas: [(Option<usize>, fru::SerialOf); 2] =
            [(header.product, fru::product_serial), (header.board, fru::board_serial)];
        for (offset, serial_of) in areas {
            let Some(offset) = offset else { continue };
            let area = match self.read_fru(s, offset, 2, size, &mut chunk).await? {
                Ok(first) => match fru::area_len(&first) {
                    Ok(len) => self.read_fru(s, offset, len, size, &mut chunk).await?,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match area.and_then(|a| serial_of(&a)) {
                Ok(Some(serial)) => return Ok(Some(serial)),
                Ok(None) => {}
                Err(e) => {
                    self.no_serial(&e);
                }
            }
        }
        Ok(None)
    }

    fn no_serial(&self, why: &str) -> Option<String> {
        tracing::debug!(bmc = %self.cfg.name, why, "FRU data unreadable: no serial");
        None
    }

    /// `len` bytes of FRU device 0 from `offset`, `chunk` at a time (halved
    /// when the BMC says that is too many). The outer error is the BMC not
    /// answering; the inner one, data kiln cannot use.
    async fn read_fru(
        &self,
        s: &mut Session,
        offset: usize,
        len: usize,
        size: usize,
        chunk: &mut u8,
    ) -> Result<Result<Vec<u8>, String>, BmcError> {
        let step = "Read FRU Data";
        if offset + len > size {
            return Ok(Err(format!(
                "{len} bytes at {offset} run past the {size}-byte FRU image"
            )));
        }
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let at = offset + out.len();
            let want = (*chunk as usize).min(len - out.len()) as u8;
            let r = s
                .call(
                    step,
                    &fru::read_data(fru::SYSTEM_FRU, at as u16, want),
                    Retry::Idempotent,
                )
                .await?;
            match r.completion {
                0 => match fru::parse_read(&r.data) {
                    Ok(d) => out.extend_from_slice(d),
                    Err(e) => return Ok(Err(e)),
                },
                // Request or answer too long for this BMC: ask for less.
                0xc7 | 0xc8 | 0xca if *chunk > 4 => *chunk /= 2,
                cc => {
                    return Ok(Err(format!(
                        "{step} at {at}: completion code {cc:#04x} ({})",
                        client::completion_name(cc)
                    )));
                }
            }
        }
        out.truncate(len);
        Ok(Ok(out))
    }

    async fn chassis_status(&self, s: &mut Session) -> Result<PowerState, BmcError> {
        let step = "Get Chassis Status";
        let r = s.call(step, &cmd::get_chassis_status(), Retry::Idempotent).await?;
        if r.completion != 0 {
            return Err(self.failed(step, r.completion));
        }
        cmd::parse_chassis_status(&r.data).map_err(|detail| BmcError::Protocol {
            bmc: self.cfg.name.clone(),
            step: step.into(),
            detail,
        })
    }
}

/// `host`, `host:port` or `[v6]:port` → a socket address.
pub fn resolve(address: &str) -> Result<SocketAddr, BmcError> {
    let bad = |detail: String| BmcError::Config {
        bmc: address.to_string(),
        detail,
    };
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let with_port = if address.contains(':') {
        address.to_string()
    } else {
        format!("{address}:{DEFAULT_PORT}")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve the BMC address: {e}")))?
        .next()
        .ok_or_else(|| bad("the BMC address resolves to nothing".into()))
}

impl BmcDriver for IpmiDriver {
    fn power_status(&self) -> BoxFuture<'_, Result<PowerState, BmcError>> {
        Box::pin(self.with_session(async |s: &mut Session| self.chassis_status(s).await))
    }

    fn power(&self, action: PowerAction) -> BoxFuture<'_, Result<(), BmcError>> {
        Box::pin(self.with_session(async move |s: &mut Session| {
            let step = format!("Chassis Control ({action})");
            // On and off set a state and may be resent; cycle, reset and
            // soft off act, and are sent once (see client.rs).
            let retry = if action.is_idempotent() {
                Retry::Idempotent
            } else {
                Retry::Never
            };
            let r = s.call(&step, &cmd::chassis_control(action), retry).await?;
            if r.completion != 0 {
                return Err(self.failed(&step, r.completion));
            }
            Ok(())
        }))
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        persistence: BootPersistence,
        firmware: BootFirmware,
    ) -> BoxFuture<'_, Result<(), BmcError>> {
        // Refused before any session: a device IPMI cannot name costs the
        // BMC no login.
        let Some(flags) = cmd::boot_flags(device, persistence, firmware) else {
            return Box::pin(std::future::ready(Err(BmcError::Unsupported {
                bmc: self.cfg.name.clone(),
                what: "UEFI HTTP boot is unsupported by the ipmi driver (IPMI boot flags have no such device); \
                       use the network device (PXE), or the redfish driver"
                    .into(),
            })));
        };
        Box::pin(self.with_session(async move |s: &mut Session| {
            let step = "Set System Boot Options (boot flags)";
            // Writing the same flags twice leaves the same flags: retryable.
            let r = s.call(step, &cmd::set_boot_flags(flags), Retry::Idempotent).await?;
            if r.completion != 0 {
                return Err(self.failed(step, r.completion));
            }
            // Mark the boot info unacknowledged so the firmware acts on it.
            // Not every BMC has parameter 4 (ipmi_sim has not): a BMC that
            // says "not supported" still boots from the flags.
            let step = "Set System Boot Options (boot info acknowledge)";
            let r = s.call(step, &cmd::set_boot_info_ack(), Retry::Idempotent).await?;
            match r.completion {
                0x00 | 0x80 | 0xc1 | 0xcc | 0xd5 => Ok(()),
                cc => Err(self.failed(step, cc)),
            }
        }))
    }

    fn identity(&self) -> BoxFuture<'_, Result<Identity, BmcError>> {
        Box::pin(self.with_session(async |s: &mut Session| {
            let step = "Get System GUID";
            let r = s.call(step, &cmd::get_system_guid(), Retry::Idempotent).await?;
            let uuid = match r.completion {
                0 => Some(cmd::parse_guid(&r.data).map_err(|detail| BmcError::Protocol {
                    bmc: self.cfg.name.clone(),
                    step: step.into(),
                    detail,
                })?),
                0xc1 | 0xd5 => None,
                cc => return Err(self.failed(step, cc)),
            };
            // IPMI has the serial only in the FRU inventory.
            let serial = self.fru_serial(s).await?;
            Ok(Identity { serial, uuid })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_port_623() {
        assert_eq!(resolve("10.0.0.5").unwrap(), "10.0.0.5:623".parse().unwrap());
        assert_eq!(resolve("10.0.0.5:6230").unwrap(), "10.0.0.5:6230".parse().unwrap());
        assert_eq!(resolve("[::1]:700").unwrap(), "[::1]:700".parse().unwrap());
        assert_eq!(resolve("::1").unwrap(), "[::1]:623".parse().unwrap());
        assert_eq!(resolve("localhost").unwrap().port(), 623);
        assert!(matches!(resolve("no such host.invalid"), Err(BmcError::Config { .. })));
    }

    #[tokio::test]
    async fn uefi_http_is_refused_before_any_packet() {
        // Nothing listens on a silent socket: had the driver sent anything,
        // it would time out instead of answering at once.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let d = IpmiDriver::new(&silent.local_addr().unwrap().to_string(), "root", Password::new("pw")).unwrap();
        let e = d
            .set_boot_device(BootDevice::UefiHttp, BootPersistence::Once, BootFirmware::Uefi)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), crate::BmcErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("unsupported by the ipmi driver"), "{e}");
        let mut buf = [0u8; 64];
        silent.set_nonblocking(true).unwrap();
        assert!(silent.recv(&mut buf).is_err(), "no packet reached the BMC");
    }

    #[test]
    fn the_password_never_shows() {
        let d = IpmiDriver::new("127.0.0.1", "root", Password::new("canary-hunter2"))
            .unwrap()
            .with_kg(Password::new("canary-kg"));
        let shown = format!("{d:?} {:?}", d.config());
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
