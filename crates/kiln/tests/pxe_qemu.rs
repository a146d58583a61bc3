//! QEMU VMs (software emulation, SeaBIOS, QEMU's own iPXE ROM) net-boot from
//! kiln on a bridge and tap in a namespace the test makes: kiln's DHCP
//! recognises the iPXE client and sends it to kiln's HTTP script. A deployed
//! machine with no armed job is told to boot its disk; an unknown machine,
//! with discovery on, boots the agent's kernel and initrd served by kiln.
//! Both are asserted on the serial console. Beside a DHCP server kiln does
//! not own (busybox udhcpd), kiln in proxy mode gives the boot file alone.
//! QEMU is stopped by PID.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KERNEL: &str = "/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/linux";
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// One VM at a time: software emulation on two cores is slow enough.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[derive(Clone, Copy, PartialEq, Eq)]
enum Firmware {
    SeaBios,
    Uefi,
}

/// A namespace with a bridge (10.78.0.1/24) and a tap on it, and kiln
/// serving DHCP and HTTP boot there.
struct Lab {
    ns: Netns,
    dir: tempfile::TempDir,
    token: String,
    server: Option<Proc>,
    _router: Proc,
}

const TAP: &str = "kqtap0";
const BRIDGE: &str = "kqbr0";

/// kiln's `[dhcp]` section: all of DHCP, or proxy beside another server.
const FULL_DHCP: &str = "[dhcp]\nmode = \"full\"\ninterfaces = [\"kqbr0\"]\n\n\
     [[dhcp.subnet]]\nnetwork = \"10.78.0.0/24\"\npool = [\"10.78.0.100\", \"10.78.0.120\"]\n\
     routers = [\"10.78.0.1\"]\nlease_time = 600\n";
const PROXY_DHCP: &str = "[dhcp]\nmode = \"proxy\"\ninterfaces = [\"kqbr0\"]\n";

impl Lab {
    fn new(tag: &str, boot_section: &str, dhcp_section: &str, artifacts: impl FnOnce(&Path)) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let ns = Netns::new(format!("kq{tag}{}", std::process::id() % 100_000));
        let router = ns.bridge_with_tap(BRIDGE, "10.78.0.1/24", TAP);
        let data = dir.path().join("data");
        let art = dir.path().join("artifacts");
        std::fs::create_dir_all(&art).unwrap();
        artifacts(&art);
        let token = bootstrap_token(&data);
        let config = dir.path().join("kiln.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n[api]\nallow_plain_http = true\n\n\
                 [boot]\nhttp_base = \"http://10.78.0.1:7070\"\nartifacts = \"{}\"\n{boot_section}\n\n{dhcp_section}",
                data.display(),
                art.display()
            ),
        )
        .unwrap();
        let server = start_server(&ns.0, &config, dir.path(), "DHCP listening");
        Lab {
            ns,
            dir,
            token,
            server: Some(server),
            _router: router,
        }
    }

    fn server_log(&self) -> String {
        self.server.as_ref().map(|s| s.log_text()).unwrap_or_default()
    }

    /// Starts a VM with `mac` whose first boot device is the network.
    fn boot_vm(&self, mac: &str, firmware: Firmware) -> (Proc, PathBuf) {
        let console = self.dir.path().join("console.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.0, "qemu-system-x86_64"]);
        if firmware == Firmware::Uefi {
            cmd.args(["-bios", OVMF]);
        }
        let qemu = cmd
            .args([
                "-name",
                "kiln-pxe-test",
                "-accel",
                "tcg",
                "-machine",
                "pc,graphics=off",
                "-cpu",
                "qemu64",
            ])
            .args([
                "-smp",
                "1",
                "-m",
                "384",
                "-display",
                "none",
                "-vga",
                "none",
                "-monitor",
                "none",
                "-nodefaults",
            ])
            .args(["-no-reboot"])
            .args([
                "-chardev",
                &format!("file,id=ser0,path={}", console.display()),
                "-serial",
                "chardev:ser0",
            ])
            .args(["-netdev", &format!("tap,id=n0,ifname={TAP},script=no,downscript=no")])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac},bootindex=1")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("qemu.log")).unwrap())
            .spawn()
            .unwrap();
        (
            Proc {
                child: qemu,
                log: console.clone(),
            },
            console,
        )
    }

    /// The console once it shows `needle`, or panics with it and the log.
    /// Kernels decompress slowly under TCG.
    fn wait_console(&self, console: &Path, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let text = strip_ansi(&std::fs::read(console).unwrap_or_default());
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` never appeared.\nconsole:\n{text}\nserver log:\n{}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_deployed_machine_that_pxe_boots_is_sent_to_its_disk() {
    require_root_and(&[("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu seabios")]);
    let lab = Lab::new("d", "", FULL_DHCP, |_| {});
    let mac = "52:54:00:78:00:01";
    kiln(
        &lab.ns.0,
        &lab.token,
        &[
            "machine",
            "add",
            "--hostname",
            "vm1",
            "--mac",
            mac,
            "--ipv4",
            "10.78.0.21",
            "--state",
            "deployed",
        ],
    );
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (vm, console) = lab.boot_vm(mac, Firmware::SeaBios);
    let text = lab.wait_console(&console, "kiln: booting from local disk");
    assert!(text.contains("10.78.0.21"), "it got its inventory address:\n{text}");
    assert!(!text.contains("kernel"), "no kernel was loaded:\n{text}");
    let log = lab.server_log();
    assert!(log.contains("vm1 (52:54:00:78:00:01): ack 10.78.0.21"), "{log}");
    drop(vm);
}

/// A tiny initrd: busybox, and an /init that prints its kernel command line
/// to the console and powers off.
fn test_initrd(out: &Path) {
    let stage = out.parent().unwrap().join("initrd-stage");
    std::fs::create_dir_all(stage.join("bin")).unwrap();
    std::fs::create_dir_all(stage.join("dev")).unwrap();
    std::fs::create_dir_all(stage.join("proc")).unwrap();
    let busybox = String::from_utf8(run(Command::new("sh").args(["-c", "command -v busybox"])).stdout).unwrap();
    std::fs::copy(busybox.trim(), stage.join("bin/busybox")).unwrap();
    run(Command::new("mknod")
        .arg(stage.join("dev/console"))
        .args(["c", "5", "1"]));
    let init = stage.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         echo \"KILN-TEST-AGENT cmdline: $(/bin/busybox cat /proc/cmdline)\"\n/bin/busybox poweroff -f\n",
    )
    .unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | busybox cpio -o -H newc 2>/dev/null | gzip -9 > {}",
        stage.display(),
        out.display()
    )));
}

/// The site's own DHCP server for proxy mode: busybox udhcpd on the
/// bridge, addresses 10.78.0.150-160, no boot options at all.
fn site_dhcp(lab: &Lab) -> Proc {
    let conf = lab.dir.path().join("udhcpd.conf");
    let leases = lab.dir.path().join("udhcpd.leases");
    std::fs::write(&leases, "").unwrap();
    std::fs::write(
        &conf,
        format!(
            "start 10.78.0.150\nend 10.78.0.160\ninterface {BRIDGE}\nlease_file {}\n\
             option subnet 255.255.255.0\noption router 10.78.0.1\noption lease 600\n",
            leases.display()
        ),
    )
    .unwrap();
    let log = lab.dir.path().join("udhcpd.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns.0, "busybox", "udhcpd", "-f"])
        .arg(&conf)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(lab.dir.path().join("udhcpd.err")).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// The agent's test kernel and initrd in kiln's artifacts.
fn agent_artifacts(art: &Path) {
    assert!(
        Path::new(KERNEL).exists(),
        "{KERNEL} is missing: apt-get install debian-installer-12-netboot-amd64 (scripts/test does)"
    );
    std::fs::copy(KERNEL, art.join("vmlinuz")).unwrap();
    test_initrd(&art.join("kiln-agent.cpio.gz"));
}

#[test]
fn beside_the_sites_dhcp_a_proxy_gives_the_boot_file() {
    require_root_and(&[
        ("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu seabios"),
        ("busybox", "busybox-static"),
    ]);
    let lab = Lab::new("p", "discovery = true", PROXY_DHCP, agent_artifacts);
    let log = lab.server_log();
    assert!(log.contains("PXE boot server listening"), "port 4011 is served:\n{log}");
    let _site = site_dhcp(&lab);
    let mac = "52:54:00:78:00:97";
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (vm, console) = lab.boot_vm(mac, Firmware::SeaBios);
    let text = lab.wait_console(&console, "KILN-TEST-AGENT cmdline:");
    assert!(
        text.contains("10.78.0.15"),
        "the address came from the site's server (10.78.0.150-160):\n{text}"
    );
    let line = text.lines().find(|l| l.contains("KILN-TEST-AGENT cmdline:")).unwrap();
    assert!(line.contains("kiln.mode=discover"), "{line}");
    let log = lab.server_log();
    assert!(log.contains(&format!("unknown {mac}: proxy Offer")), "{log}");
    assert!(
        log.contains(&format!("unknown {mac}: proxy Ack")),
        "the boot file came from the boot server port:\n{log}"
    );
    assert!(!log.contains(": ack 10.78.0."), "kiln gave no address:\n{log}");
    drop(vm);
}

fn discovery_boot(tag: &str, firmware: Firmware, mac: &str) {
    let mut tools = vec![
        ("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu seabios"),
        ("busybox", "busybox-static"),
    ];
    if firmware == Firmware::Uefi {
        tools.push(("test -e /usr/share/ovmf/OVMF.fd && echo", "ovmf"));
    }
    require_root_and(&tools);
    let lab = Lab::new(tag, "discovery = true", FULL_DHCP, agent_artifacts);
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (vm, console) = lab.boot_vm(mac, firmware);
    let text = lab.wait_console(&console, "KILN-TEST-AGENT cmdline:");
    let line = text.lines().find(|l| l.contains("KILN-TEST-AGENT cmdline:")).unwrap();
    assert!(line.contains("kiln.mode=discover"), "{line}");
    assert!(line.contains("kiln.server=http://10.78.0.1:7070"), "{line}");
    let log = lab.server_log();
    assert!(
        log.contains(&format!("unknown {mac}: ack 10.78.0.10")),
        "a pool address:\n{log}"
    );
    let platform = if firmware == Firmware::Uefi { "efi" } else { "pcbios" };
    assert!(
        log.contains(&format!("platform={platform}")),
        "the script URL says the firmware:\n{log}"
    );
    // iPXE expanded ${uuid} in the URL kiln's DHCP gave it: the firmware's
    // SMBIOS UUID reached HTTP boot (how a machine whose MAC kiln does not
    // know is still recognised).
    let request = log
        .lines()
        .find(|l| l.contains("ipxe script"))
        .unwrap_or_else(|| panic!("no script request:\n{log}"));
    // The log may be coloured: the value is the first quoted text after
    // the field's name.
    let uuid = request
        .split_once("uuid")
        .and_then(|(_, rest)| rest.split_once('"'))
        .and_then(|(_, value)| value.get(..36))
        .unwrap_or_else(|| panic!("no uuid in the request: {request}"));
    assert!(uuid.parse::<uuid::Uuid>().is_ok(), "not expanded: {request}");
    drop(vm);
}

#[test]
fn an_unknown_bios_machine_boots_the_discovery_agent_served_by_kiln() {
    discovery_boot("a", Firmware::SeaBios, "52:54:00:78:00:99");
}

#[test]
fn an_unknown_uefi_machine_boots_the_discovery_agent_served_by_kiln() {
    discovery_boot("u", Firmware::Uefi, "52:54:00:78:00:98");
}
