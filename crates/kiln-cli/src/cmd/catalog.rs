//! `kiln os|task|layouts`.

use std::path::PathBuf;

use clap::Subcommand;
use kiln_types::agent::ImageFormat;
use kiln_types::catalog::{
    Arch, ImageContent, OsImageCreate, OsImagePatch, OsKind, PlatformTag, TaskCreate, TaskKind, TaskPatch,
};
use kiln_types::fit::human_bytes;

use crate::Ctx;
use crate::output::{Out, opt};

#[derive(Debug, Subcommand)]
pub enum OsCmd {
    /// Add an OS image to the catalog.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "x86_64")]
        arch: Arch,
        /// disk-image or installer.
        #[arg(long)]
        kind: OsKind,
        /// Platform tag: bm, vm, gpu, vgpu (repeat for more).
        #[arg(long)]
        tag: Vec<PlatformTag>,
        /// Minimum RAM (`8G`, `512M`, bytes).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        min_ram: u64,
        /// Minimum disk (`20G`, bytes).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        min_disk: u64,
        /// URL or path of the image.
        #[arg(long)]
        source: String,
        /// SHA-256 of the image (required for disk images).
        #[arg(long)]
        sha256: Option<String>,
        /// How the image file is encoded: raw, raw+zstd or qcow2 (default:
        /// from the source's name: .qcow2, .zst, else raw).
        #[arg(long)]
        format: Option<ImageFormat>,
        /// What the disk image holds: filesystem (a root filesystem kiln
        /// lays out disks for) or whole-disk (its own partition table and
        /// bootloader, as distributions publish; flat layout only).
        #[arg(long, default_value = "filesystem")]
        content: ImageContent,
        /// An installer template of the image: KIND=FILE, KIND one of
        /// preseed, kickstart, user-data, meta-data, ignition (repeatable).
        #[arg(long = "template", value_name = "KIND=FILE", value_parser = parse_template)]
        templates: Vec<(String, String)>,
    },
    /// Change an image; what is not given is kept (`--tag` replaces all tags).
    Edit {
        key: String,
        #[arg(long)]
        kind: Option<OsKind>,
        #[arg(long)]
        tag: Vec<PlatformTag>,
        #[arg(long, value_parser = parse_size)]
        min_ram: Option<u64>,
        #[arg(long, value_parser = parse_size)]
        min_disk: Option<u64>,
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        sha256: Option<String>,
        /// raw, raw+zstd or qcow2 (with only --source: from its name).
        #[arg(long)]
        format: Option<ImageFormat>,
        /// filesystem or whole-disk.
        #[arg(long)]
        content: Option<ImageContent>,
        /// Replace the image's templates with these KIND=FILE (repeatable).
        #[arg(long = "template", value_name = "KIND=FILE", value_parser = parse_template, conflicts_with = "no_templates")]
        templates: Vec<(String, String)>,
        /// Remove all the image's templates (kiln's built-in ones apply).
        #[arg(long)]
        no_templates: bool,
    },
    /// List OS images.
    List,
    /// Show one image (id, NAME-VERSION or NAME).
    Show { key: String },
    /// Remove an image.
    Rm { key: String },
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Add a post-install task from a file.
    Add {
        #[arg(long)]
        name: String,
        /// ansible or script.
        #[arg(long)]
        kind: TaskKind,
        #[arg(long)]
        tag: Vec<PlatformTag>,
        /// The playbook or script.
        #[arg(long)]
        file: PathBuf,
    },
    /// Change a task (`--file` replaces its content, `--tag` all its tags).
    Edit {
        key: String,
        #[arg(long)]
        kind: Option<TaskKind>,
        #[arg(long)]
        tag: Vec<PlatformTag>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    List,
    Show {
        key: String,
    },
    Rm {
        key: String,
    },
}

/// `8G`, `8GiB`, `512M`, `1T` or plain bytes; units are binary.
/// `KIND=FILE` → (kind, the file's text).
fn parse_template(s: &str) -> Result<(String, String), String> {
    let (kind, file) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KIND=FILE (e.g. preseed=./preseed.cfg.j2)"))?;
    if !kiln_types::catalog::TEMPLATE_KINDS.contains(&kind) {
        return Err(format!(
            "`{kind}` is not a template kind; expected one of {}",
            kiln_types::catalog::TEMPLATE_KINDS.join(", ")
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read the {kind} template {file}: {e}"))?;
    Ok((kind.to_string(), text))
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 8G or 512M"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn tags(t: &[PlatformTag]) -> String {
    if t.is_empty() {
        "-".into()
    } else {
        t.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
    }
}

pub async fn run_os(c: OsCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let show = |i: &kiln_types::catalog::OsImage, out: &mut Out| {
        out.record(
            i,
            vec![
                ("name", i.name.clone()),
                ("version", i.version.clone()),
                ("arch", i.arch.to_string()),
                ("kind", i.kind.to_string()),
                ("tags", tags(&i.tags)),
                ("min ram", human_bytes(i.min_ram_bytes)),
                ("min disk", human_bytes(i.min_disk_bytes)),
                ("source", i.source.clone()),
                ("sha256", opt(&i.sha256)),
                ("format", i.format.to_string()),
                ("content", i.content.to_string()),
                (
                    "templates",
                    if i.templates.is_empty() {
                        "built-in".into()
                    } else {
                        i.templates.keys().cloned().collect::<Vec<_>>().join(",")
                    },
                ),
                ("id", i.id.to_string()),
            ],
        )
    };
    match c {
        OsCmd::Add {
            name,
            version,
            arch,
            kind,
            tag,
            min_ram,
            min_disk,
            source,
            sha256,
            format,
            content,
            templates,
        } => {
            let i = client
                .create_os_image(&OsImageCreate {
                    name,
                    version,
                    arch,
                    kind,
                    tags: tag,
                    min_ram_bytes: min_ram,
                    min_disk_bytes: min_disk,
                    source,
                    sha256,
                    format,
                    content,
                    templates: templates.into_iter().collect(),
                })
                .await?;
            show(&i, out)
        }
        OsCmd::Edit {
            key,
            kind,
            tag,
            min_ram,
            min_disk,
            source,
            sha256,
            format,
            content,
            templates,
            no_templates,
        } => {
            let patch = OsImagePatch {
                kind,
                tags: (!tag.is_empty()).then_some(tag),
                min_ram_bytes: min_ram,
                min_disk_bytes: min_disk,
                source,
                sha256,
                format,
                content,
                templates: (no_templates || !templates.is_empty()).then(|| templates.into_iter().collect()),
            };
            show(&client.update_os_image(&key, &patch).await?, out)
        }
        OsCmd::List => {
            let images = client.list_os_images().await?;
            let rows = images
                .iter()
                .map(|i| {
                    vec![
                        format!("{}-{}", i.name, i.version),
                        i.arch.to_string(),
                        i.kind.to_string(),
                        tags(&i.tags),
                        human_bytes(i.min_ram_bytes),
                        human_bytes(i.min_disk_bytes),
                    ]
                })
                .collect();
            out.table(&images, &["IMAGE", "ARCH", "KIND", "TAGS", "MIN RAM", "MIN DISK"], rows)
        }
        OsCmd::Show { key } => show(&client.get_os_image(&key).await?, out),
        OsCmd::Rm { key } => {
            client.delete_os_image(&key).await?;
            out.line(format!("removed {key}"))
        }
    }
}

pub async fn run_task(c: TaskCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    match c {
        TaskCmd::Add { name, kind, tag, file } => {
            let content =
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let t = client
                .create_task(&TaskCreate {
                    name,
                    kind,
                    tags: tag,
                    content,
                })
                .await?;
            out.record(
                &t,
                vec![
                    ("task", t.name.clone()),
                    ("kind", t.kind.to_string()),
                    ("id", t.id.to_string()),
                ],
            )
        }
        TaskCmd::Edit { key, kind, tag, file } => {
            let content = match file {
                Some(f) => {
                    Some(std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?)
                }
                None => None,
            };
            let patch = TaskPatch {
                kind,
                tags: (!tag.is_empty()).then_some(tag),
                content,
            };
            let t = client.update_task(&key, &patch).await?;
            out.record(
                &t,
                vec![
                    ("task", t.name.clone()),
                    ("kind", t.kind.to_string()),
                    ("id", t.id.to_string()),
                ],
            )
        }
        TaskCmd::List => {
            let list = client.list_tasks().await?;
            let rows = list
                .iter()
                .map(|t| vec![t.name.clone(), t.kind.to_string(), tags(&t.tags)])
                .collect();
            out.table(&list, &["TASK", "KIND", "TAGS"], rows)
        }
        TaskCmd::Show { key } => {
            let t = client.get_task(&key).await?;
            out.record(
                &t,
                vec![
                    ("task", t.name.clone()),
                    ("kind", t.kind.to_string()),
                    ("tags", tags(&t.tags)),
                    ("content", t.content.clone()),
                ],
            )
        }
        TaskCmd::Rm { key } => {
            client.delete_task(&key).await?;
            out.line(format!("removed {key}"))
        }
    }
}

pub async fn layouts(ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let list = ctx.client()?.list_layouts().await?;
    let rows = list
        .iter()
        .map(|l| {
            let r = &l.rule;
            let mut need = format!(">= {} disks", r.min_disks);
            if r.pairs {
                need.push_str(", in pairs");
            }
            if r.spare {
                need.push_str(", + 1 spare");
            }
            if r.one_disk {
                need.push_str(", OS on one (the system disk)");
            }
            vec![l.name.to_string(), need, l.description.clone()]
        })
        .collect();
    out.table(&list, &["LAYOUT", "NEEDS", "WHAT"], rows)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("8X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("G").is_err());
    }
}
