//! `kiln-agent`: the ramdisk's agent binary, and a tool to try its parts
//! by hand. Argument parsing and I/O glue only; the decisions are in the
//! library.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_agent::cmdline::{Cmdline, Mode};
use kiln_agent::execute::{self, DeployEnv};
use kiln_agent::image::{ExpectedImage, ImageFormat, Progress, Sha256, SyncOnFlush, WriteOptions, write_image};
use kiln_agent::inventory::{self, Inventory};
use kiln_agent::layout::{self, LayoutOptions};
use kiln_agent::server::{ControlPlane, Deadlines, HttpControlPlane};
use kiln_agent::system::HostSystem;
use kiln_agent::{discover, lldp};
use kiln_types::catalog::StorageLayout;

#[derive(Parser)]
#[command(name = "kiln-agent", version, about = "kiln's agent for the net-booted ramdisk")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What the ramdisk's init runs: reads the kernel command line and acts
    /// on its kiln.mode.
    Run {
        /// The kernel command line to read.
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// Where /proc, /sys and /dev are.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Listens for LLDP on interfaces and prints the neighbours seen, as
    /// JSON. Needs root.
    Lldp {
        /// An interface to listen on (repeat; default: every NIC with link).
        #[arg(long = "interface")]
        interfaces: Vec<String>,
        /// Seconds to listen at most.
        #[arg(long, default_value_t = 30)]
        wait: u64,
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Prints the machine's inventory as JSON.
    Inventory {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Prints the plan and commands for a storage layout on this machine's
    /// disks. Runs nothing unless `--apply` is given.
    Plan {
        /// flat, lvm, lvm_raid0, lvm_raid1, lvm_raid10, lvm_raid10s,
        /// lvm_hba, lvm_raid10_spare.
        #[arg(long)]
        layout: StorageLayout,
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Disks to use, in order (default: all the inventory shows).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// Swap size (`4G`, `512M`).
        #[arg(long, value_parser = parse_size)]
        swap: Option<u64>,
        /// Root size (default: all the space left).
        #[arg(long, value_parser = parse_size)]
        root_size: Option<u64>,
        /// The plan as JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The disk `flat` and `lvm_hba` put the OS on, by serial or WWN.
        #[arg(long, value_name = "SERIAL|WWN")]
        system_disk: Option<String>,
        /// Runs the commands too, as deploy mode does before it writes the
        /// image: DESTROYS what is on the plan's disks (and only theirs).
        /// For trying a layout on a machine in the ramdisk, and the tests.
        #[arg(long)]
        apply: bool,
    },
    /// Writes an image file to a disk (or file), checking format and
    /// SHA-256; a failed write leaves the target unbootable.
    WriteImage {
        /// The image file, or `-` for standard input.
        source: PathBuf,
        /// The disk (or file) to write.
        target: PathBuf,
        /// raw, raw+zstd or qcow2.
        #[arg(long)]
        format: ImageFormat,
        /// The image file's SHA-256 (64 hex digits).
        #[arg(long)]
        sha256: Sha256,
        /// The target reads as zeros already: skip writing zeros.
        #[arg(long)]
        zeroed: bool,
    },
}

/// `4G`, `512M`, `100K` (powers of 1024) or a number of bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let (number, shift) = match text.trim().to_ascii_uppercase() {
        t if t.ends_with('T') => (t[..t.len() - 1].to_string(), 40),
        t if t.ends_with('G') => (t[..t.len() - 1].to_string(), 30),
        t if t.ends_with('M') => (t[..t.len() - 1].to_string(), 20),
        t if t.ends_with('K') => (t[..t.len() - 1].to_string(), 10),
        t => (t, 0),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("`{text}` is not a size: give bytes or a number with K, M, G or T"))
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Command::Run { cmdline, root } => run(&cmdline, &root),
        Command::Inventory { root } => collect(&root).and_then(|inv| print_json(&inv)),
        Command::Lldp { interfaces, wait, root } => listen(&interfaces, wait, &root),
        Command::Plan {
            layout,
            root,
            disks,
            swap,
            root_size,
            json,
            system_disk,
            apply,
        } => plan(layout, &root, &disks, swap, root_size, json, system_disk, apply),
        Command::WriteImage {
            source,
            target,
            format,
            sha256,
            zeroed,
        } => write(&source, &target, format, sha256, zeroed),
    };
    if let Err(e) = result {
        // `kiln-agent plan | head` closing the pipe is not worth a word.
        let broken_pipe = e.chain().any(|c| {
            let kind = c.downcast_ref::<io::Error>().map(io::Error::kind).or_else(|| {
                c.downcast_ref::<serde_json::Error>()
                    .and_then(serde_json::Error::io_error_kind)
            });
            kind == Some(io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(1);
        }
        eprintln!("kiln-agent: {e:#}");
        std::process::exit(1);
    }
}

fn collect(root: &Path) -> Result<Inventory> {
    Ok(inventory::collect(root)?)
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Exit status that asks the ramdisk's init to reboot (0 powers off).
const EXIT_REBOOT: i32 = 10;

fn run(cmdline: &Path, root: &Path) -> Result<()> {
    let text = std::fs::read_to_string(cmdline).with_context(|| format!("cannot read {}", cmdline.display()))?;
    let cmdline = Cmdline::parse(&text)?;
    eprintln!("kiln-agent {}: {cmdline:?}", env!("CARGO_PKG_VERSION"));
    let token = cmdline
        .token
        .clone()
        .context("kiln.token is missing from the kernel command line: the server gives it with the boot")?;
    let mut server = HttpControlPlane::new(&cmdline.server, token, cmdline.job, Deadlines::default());
    let inventory = collect(root)?;
    match cmdline.mode {
        Mode::Discover => {
            let mac = discover::boot_mac(cmdline.boot_mac, &inventory)
                .context("this machine has no Ethernet NIC to name in the report")?;
            let nics = discover::lldp_nics(root, &inventory);
            if cmdline.lldp_secs > 0 && !nics.is_empty() {
                eprintln!(
                    "kiln-agent: listening for LLDP on {} NIC(s) for up to {} s",
                    nics.len(),
                    cmdline.lldp_secs
                );
            }
            let seen = lldp::capture::capture(&nics, Duration::from_secs(cmdline.lldp_secs)).unwrap_or_else(|e| {
                eprintln!("kiln-agent: cannot listen for LLDP: {e}");
                Default::default()
            });
            let lldp = discover::neighbors(&seen);
            for n in &lldp {
                eprintln!("kiln-agent: LLDP on {}: {} port {}", n.mac, n.switch, n.port);
            }
            let found = discover::discover(&mut server, &inventory, mac, lldp)?;
            eprintln!(
                "kiln-agent: discovered as {} ({}, {}); powering off",
                found.hostname,
                found.state,
                if found.created { "new" } else { "known" }
            );
            Ok(())
        }
        Mode::Deploy => {
            let plan = server.deploy_plan().context("cannot fetch the job's plan")?;
            // The new OS talks where the ramdisk does.
            let kernel_args = text
                .split_whitespace()
                .filter(|w| w.starts_with("console="))
                .map(String::from)
                .collect();
            let env = DeployEnv {
                target: PathBuf::from("/mnt/kiln"),
                kernel_args,
            };
            let done = execute::deploy(&mut server, &mut HostSystem, &plan, &inventory, &env)?;
            eprintln!(
                "kiln-agent: {} deployed on {} (bootloader on {}); rebooting",
                done.hostname,
                done.root_device,
                done.boot_disks.join(", ")
            );
            std::process::exit(EXIT_REBOOT);
        }
    }
}

fn listen(interfaces: &[String], wait: u64, root: &Path) -> Result<()> {
    let nics = if interfaces.is_empty() {
        discover::lldp_nics(root, &collect(root)?)
    } else {
        interfaces
            .iter()
            .map(|name| {
                let dir = root.join("sys/class/net").join(name);
                let read =
                    |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("no interface {name}"));
                Ok(lldp::capture::Listen {
                    ifindex: read("ifindex")?.trim().parse()?,
                    mac: read("address")?.trim().parse()?,
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    let seen = lldp::capture::capture(&nics, Duration::from_secs(wait)).context("cannot listen for LLDP")?;
    print_json(&discover::neighbors(&seen))
}

#[allow(clippy::too_many_arguments)]
fn plan(
    layout: StorageLayout,
    root: &Path,
    names: &[String],
    swap: Option<u64>,
    root_size: Option<u64>,
    json: bool,
    system_disk: Option<String>,
    apply: bool,
) -> Result<()> {
    let inventory = collect(root)?;
    let disks = if names.is_empty() {
        inventory.hardware.disks.clone()
    } else {
        names
            .iter()
            .map(|n| {
                let found = inventory.hardware.disks.iter().find(|d| d.name == *n);
                found.cloned().with_context(|| format!("no disk {n} in the inventory"))
            })
            .collect::<Result<_>>()?
    };
    let mut options = LayoutOptions::new(inventory.firmware);
    options.swap_bytes = swap.unwrap_or(0);
    options.root_bytes = root_size;
    options.system_disk = system_disk;
    let plan = layout::plan(layout, &disks, &options)?;
    if apply {
        let started = std::time::Instant::now();
        execute::lay_out(&mut HostSystem, &plan)?;
        eprintln!(
            "kiln-agent: {layout} laid out on {} in {:.1} s",
            plan.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(" "),
            started.elapsed().as_secs_f64()
        );
    }
    if json {
        return print_json(&plan);
    }
    // Written, not print!ed: a closed pipe (`| head`) is an error to
    // report, not a panic.
    let mut out = io::stdout().lock();
    write!(out, "{plan}")?;
    writeln!(out, "commands:")?;
    for c in &plan.commands {
        writeln!(out, "  {c}")?;
    }
    Ok(())
}

fn write(source: &Path, target: &Path, format: ImageFormat, sha256: Sha256, zeroed: bool) -> Result<()> {
    let (reader, file_bytes): (Box<dyn Read>, Option<u64>) = if source == Path::new("-") {
        (Box::new(io::stdin().lock()), None)
    } else {
        let file = File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
        let len = file.metadata()?.len();
        (Box::new(file), Some(len))
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(target)
        .with_context(|| format!("cannot open {}", target.display()))?;
    // A block device has a size to respect; a file grows.
    let target_bytes = if file.metadata()?.file_type().is_block_device() {
        Some(file.seek(SeekFrom::End(0))?)
    } else {
        None
    };
    let expected = ExpectedImage {
        format,
        sha256,
        file_bytes,
    };
    let options = WriteOptions {
        target_bytes,
        target_is_zeroed: zeroed,
        progress_every: Duration::from_secs(1),
        ..WriteOptions::default()
    };
    let tty = io::stderr().is_terminal();
    let mut show = |p: &Progress| {
        let percent = p.percent().map(|x| format!(" {x:.0}%")).unwrap_or_default();
        let line = format!(
            "{:.1} MiB written, {:.1} MiB/s{percent}",
            p.written_bytes as f64 / 1048576.0,
            p.rate_bytes_per_sec() / 1048576.0
        );
        if tty && !p.done {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{}{line}", if tty { "\r" } else { "" });
        }
    };
    let mut device = SyncOnFlush(file);
    let report = write_image(reader, &mut device, &expected, &options, &mut show)?;
    eprintln!(
        "wrote {} ({} bytes of {}, sha256 {}) in {:.1}s",
        target.display(),
        report.image_bytes,
        report.format,
        report.sha256,
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("4GB").is_err());
        assert!(parse_size("99999999T").is_err());
    }
}
