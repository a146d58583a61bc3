//! `kiln machine import FILE`: a whole rack from CSV or YAML in one call.
//! The file is checked row by row before anything is sent, and every bad
//! row is reported with its line number; then the server creates all
//! machines or none (its own row errors are mapped back to lines too).
//!
//! CSV: one row per machine with the columns in `CSV_COLUMNS`; `tags` holds
//! tags separated by `;` or spaces. A machine with several NICs repeats its
//! hostname on extra rows that fill only NIC columns. `bmc_ca_file` names a
//! PEM file (relative to the CSV file's directory) whose text becomes the
//! BMC's `ca_cert`: a certificate does not fit in a cell. A NIC row needs a
//! `mac`, or a switch-port identity (`circuit_id` and/or `remote_id`, as the
//! DHCP relay sends them) for a NIC whose MAC kiln learns on its first
//! relayed request (issue 15); the same holds for YAML's `nics`.
//! YAML: a list of machines (or `machines:` with the list), each as the API's
//! `MachineCreate` (`bmc.ca_cert` as a block scalar, `|`).

use std::collections::HashMap;
use std::path::Path;

use kiln_client::ClientError;
use kiln_types::machine::MachineCreate;
use serde_json::{Map, Value, json};

use crate::Ctx;
use crate::output::{Format, Out};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    Csv,
    Yaml,
}

/// The columns a CSV import understands.
pub const CSV_COLUMNS: &[&str] = &[
    "hostname",
    "fqdn",
    "kind",
    "state",
    "tags",
    "owner",
    "site",
    "rack",
    "protected",
    "maintenance",
    "ipv4",
    "ipv6",
    "mac",
    "nic_name",
    "switch",
    "port",
    "vlan",
    "circuit_id",
    "remote_id",
    "bmc_driver",
    "bmc_address",
    "bmc_user",
    "bmc_password",
    "bmc_insecure",
    "bmc_ca_file",
];
/// The BMC columns besides `bmc_driver`.
const BMC_COLUMNS: &[&str] = &["bmc_address", "bmc_user", "bmc_password", "bmc_insecure", "bmc_ca_file"];
const NIC_COLUMNS: &[&str] = &["mac", "nic_name", "switch", "port", "vlan", "circuit_id", "remote_id"];

/// A machine read from the file and the line it starts on.
#[derive(Debug)]
pub struct Parsed {
    pub line: usize,
    pub spec: MachineCreate,
}

/// Something wrong at a line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

fn to_spec(line: usize, value: Value, problems: &mut Vec<Problem>) -> Option<MachineCreate> {
    match serde_path_to_error::deserialize::<_, MachineCreate>(value) {
        Ok(spec) => {
            let issues = spec.validate();
            if issues.is_empty() {
                return Some(spec);
            }
            problems.extend(issues.into_iter().map(|message| Problem { line, message }));
            None
        }
        Err(e) => {
            let path = e.path().to_string();
            let message = if path == "." {
                e.into_inner().to_string()
            } else {
                format!("{path}: {}", e.into_inner())
            };
            problems.push(Problem { line, message });
            None
        }
    }
}

fn parse_bool(column: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "y" => Ok(true),
        "false" | "no" | "0" | "n" => Ok(false),
        _ => Err(format!("{column}: `{v}` is not true or false")),
    }
}

/// The NIC object of a CSV row, if it has a MAC or a switch-port identity.
fn csv_nic(cell: &dyn Fn(&str) -> Option<String>) -> Result<Option<Value>, String> {
    let mac = cell("mac");
    if mac.is_none() && cell("circuit_id").is_none() && cell("remote_id").is_none() {
        if NIC_COLUMNS.iter().any(|c| cell(c).is_some()) {
            return Err(
                "NIC columns are filled but the NIC has neither a `mac` nor a switch-port identity \
                 (`circuit_id` and/or `remote_id`)"
                    .into(),
            );
        }
        return Ok(None);
    }
    let mut nic = Map::new();
    if let Some(mac) = mac {
        nic.insert("mac".into(), json!(mac));
    }
    for (col, key) in [
        ("nic_name", "name"),
        ("switch", "switch"),
        ("port", "port"),
        ("circuit_id", "circuit_id"),
        ("remote_id", "remote_id"),
    ] {
        if let Some(v) = cell(col) {
            nic.insert(key.into(), json!(v));
        }
    }
    if let Some(v) = cell("vlan") {
        let vlan: u16 = v.parse().map_err(|_| format!("vlan: `{v}` is not a number 1-4094"))?;
        nic.insert("vlan".into(), json!(vlan));
    }
    Ok(Some(Value::Object(nic)))
}

/// Parses a CSV import; `base` is the directory `bmc_ca_file` paths are
/// relative to (the CSV file's own).
pub fn parse_csv(text: &str, base: &Path) -> Result<Vec<Parsed>, Vec<Problem>> {
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        // Comments are skipped below rather than by the reader, whose line
        // count leaves comment lines out.
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = match rdr.headers() {
        Ok(h) => h.iter().map(|s| s.to_ascii_lowercase()).collect(),
        Err(e) => {
            return Err(vec![Problem {
                line: 1,
                message: format!("cannot read the header: {e}"),
            }]);
        }
    };
    let unknown: Vec<&String> = headers.iter().filter(|h| !CSV_COLUMNS.contains(&h.as_str())).collect();
    if !unknown.is_empty() {
        return Err(vec![Problem {
            line: 1,
            message: format!(
                "unknown column{} {}: the columns are {}",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.iter().map(|u| format!("`{u}`")).collect::<Vec<_>>().join(", "),
                CSV_COLUMNS.join(", ")
            ),
        }]);
    }
    if !headers.iter().any(|h| h == "hostname") {
        return Err(vec![Problem {
            line: 1,
            message: "the header has no `hostname` column".into(),
        }]);
    }
    let mut problems = vec![];
    // (line, object) per machine, in file order; NIC rows merge by hostname.
    let mut machines: Vec<(usize, Map<String, Value>)> = vec![];
    let mut by_host: HashMap<String, usize> = HashMap::new();
    for record in rdr.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                problems.push(Problem {
                    line,
                    message: format!("unreadable row: {e}"),
                });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.get(0).is_some_and(|f| f.starts_with('#')) {
            continue;
        }
        if record.len() != headers.len() {
            problems.push(Problem {
                line,
                message: format!("{} fields, the header has {}", record.len(), headers.len()),
            });
            continue;
        }
        let cell = |name: &str| -> Option<String> {
            headers
                .iter()
                .position(|h| h == name)
                .and_then(|i| record.get(i))
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let Some(hostname) = cell("hostname") else {
            problems.push(Problem {
                line,
                message: "hostname is empty".into(),
            });
            continue;
        };
        let nic = match csv_nic(&cell) {
            Ok(n) => n,
            Err(message) => {
                problems.push(Problem { line, message });
                continue;
            }
        };
        let key = hostname.to_ascii_lowercase();
        if let Some(&i) = by_host.get(&key) {
            // A further NIC of a machine already seen.
            let extra: Vec<&str> = CSV_COLUMNS
                .iter()
                .copied()
                .filter(|c| *c != "hostname" && !NIC_COLUMNS.contains(c) && cell(c).is_some())
                .collect();
            if !extra.is_empty() {
                problems.push(Problem {
                    line,
                    message: format!(
                        "hostname {hostname} already appears on line {}; a repeated row may only add a NIC, but it also sets {}",
                        machines[i].0,
                        extra.join(", ")
                    ),
                });
                continue;
            }
            match nic {
                Some(n) => machines[i]
                    .1
                    .get_mut("nics")
                    .and_then(Value::as_array_mut)
                    .map(|a| a.push(n))
                    .unwrap_or(()),
                None => problems.push(Problem {
                    line,
                    message: format!("hostname {hostname} already appears on line {}", machines[i].0),
                }),
            }
            continue;
        }
        let mut m = Map::new();
        m.insert("hostname".into(), json!(hostname));
        for col in ["fqdn", "kind", "state", "owner", "site", "rack", "ipv4", "ipv6"] {
            if let Some(v) = cell(col) {
                m.insert(col.into(), json!(v));
            }
        }
        if let Some(tags) = cell("tags") {
            let tags: Vec<&str> = tags
                .split(|c: char| c == ';' || c.is_whitespace())
                .filter(|t| !t.is_empty())
                .collect();
            m.insert("tags".into(), json!(tags));
        }
        let mut bad = false;
        for col in ["protected", "maintenance"] {
            if let Some(v) = cell(col) {
                match parse_bool(col, &v) {
                    Ok(b) => {
                        m.insert(col.into(), json!(b));
                    }
                    Err(message) => {
                        problems.push(Problem { line, message });
                        bad = true;
                    }
                }
            }
        }
        if let Some(driver) = cell("bmc_driver") {
            let mut bmc = Map::new();
            bmc.insert("driver".into(), json!(driver));
            bmc.insert("address".into(), json!(cell("bmc_address").unwrap_or_default()));
            if let Some(u) = cell("bmc_user") {
                bmc.insert("username".into(), json!(u));
            }
            if let Some(p) = cell("bmc_password") {
                bmc.insert("password".into(), json!(p));
            }
            if let Some(v) = cell("bmc_insecure") {
                match parse_bool("bmc_insecure", &v) {
                    Ok(b) => {
                        bmc.insert("insecure".into(), json!(b));
                    }
                    Err(message) => {
                        problems.push(Problem { line, message });
                        bad = true;
                    }
                }
            }
            if let Some(f) = cell("bmc_ca_file") {
                let path = base.join(&f);
                match std::fs::read_to_string(&path) {
                    Ok(pem) => {
                        bmc.insert("ca_cert".into(), json!(pem));
                    }
                    Err(e) => {
                        problems.push(Problem {
                            line,
                            message: format!("bmc_ca_file: cannot read {}: {e}", path.display()),
                        });
                        bad = true;
                    }
                }
            }
            m.insert("bmc".into(), Value::Object(bmc));
        } else if BMC_COLUMNS.iter().any(|c| cell(c).is_some()) {
            problems.push(Problem {
                line,
                message: "BMC columns are filled but `bmc_driver` is empty".into(),
            });
            bad = true;
        }
        m.insert("nics".into(), Value::Array(nic.into_iter().collect()));
        if !bad {
            by_host.insert(key, machines.len());
            machines.push((line, m));
        }
    }
    let mut parsed = vec![];
    for (line, m) in machines {
        if let Some(spec) = to_spec(line, Value::Object(m), &mut problems) {
            parsed.push(Parsed { line, spec });
        }
    }
    if problems.is_empty() {
        Ok(parsed)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(problems)
    }
}

/// Lines where the items of the outermost YAML sequence start.
fn yaml_item_lines(text: &str) -> Vec<usize> {
    let dashes: Vec<(usize, usize)> = text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let trimmed = l.trim_start();
            (trimmed == "-" || trimmed.starts_with("- ")).then(|| (i + 1, l.len() - trimmed.len()))
        })
        .collect();
    let Some(min) = dashes.iter().map(|(_, indent)| *indent).min() else {
        return vec![];
    };
    dashes
        .into_iter()
        .filter(|(_, indent)| *indent == min)
        .map(|(line, _)| line)
        .collect()
}

pub fn parse_yaml(text: &str) -> Result<Vec<Parsed>, Vec<Problem>> {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
        vec![Problem {
            line: e.location().map_or(0, |l| l.line()),
            message: format!("not valid YAML: {e}"),
        }]
    })?;
    let items = match doc {
        serde_yaml_ng::Value::Sequence(items) => items,
        serde_yaml_ng::Value::Mapping(mut m) => match m.remove("machines") {
            Some(serde_yaml_ng::Value::Sequence(items)) if m.is_empty() => items,
            _ => {
                return Err(vec![Problem {
                    line: 1,
                    message: "expected a list of machines, or `machines:` holding one (and nothing else)".into(),
                }]);
            }
        },
        _ => {
            return Err(vec![Problem {
                line: 1,
                message: "expected a list of machines".into(),
            }]);
        }
    };
    let lines = yaml_item_lines(text);
    let count = items.len();
    let line_of = |i: usize| if lines.len() == count { lines[i] } else { 0 };
    let mut problems = vec![];
    let mut parsed = vec![];
    for (i, item) in items.into_iter().enumerate() {
        let line = line_of(i);
        let value = match serde_json::to_value(&item) {
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    line,
                    message: format!("item {}: {e}", i + 1),
                });
                continue;
            }
        };
        let before = problems.len();
        if let Some(spec) = to_spec(line, value, &mut problems) {
            parsed.push(Parsed { line, spec });
        } else if line == 0 {
            for p in &mut problems[before..] {
                p.message = format!("item {}: {}", i + 1, p.message);
            }
        }
    }
    if problems.is_empty() { Ok(parsed) } else { Err(problems) }
}

/// Reads and checks `path`; every problem is returned, nothing is sent.
pub fn parse_file(path: &Path, format: Option<ImportFormat>) -> anyhow::Result<Result<Vec<Parsed>, Vec<Problem>>> {
    let format = match format {
        Some(f) => f,
        None => match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => ImportFormat::Csv,
            Some("yaml" | "yml") => ImportFormat::Yaml,
            _ => anyhow::bail!(
                "cannot tell the format of {} from its name: give --format csv or --format yaml",
                path.display()
            ),
        },
    };
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(match format {
        ImportFormat::Csv => parse_csv(&text, base),
        ImportFormat::Yaml => parse_yaml(&text),
    })
}

fn fail(path: &Path, problems: &[Problem]) -> anyhow::Error {
    let mut msg = format!(
        "{}: {} problem{}; nothing was imported",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        msg.push_str(&format!("\n  {p}"));
    }
    anyhow::anyhow!(msg)
}

pub async fn run(
    path: &Path,
    format: Option<ImportFormat>,
    dry_run: bool,
    ctx: &Ctx,
    out: &mut Out,
) -> anyhow::Result<()> {
    let parsed = parse_file(path, format)?.map_err(|problems| fail(path, &problems))?;
    if parsed.is_empty() {
        anyhow::bail!("{}: no machines in the file", path.display());
    }
    if dry_run {
        return out.line(format!(
            "{}: {} machines are valid (dry run: nothing sent)",
            path.display(),
            parsed.len()
        ));
    }
    let lines: Vec<usize> = parsed.iter().map(|p| p.line).collect();
    let specs = parsed.into_iter().map(|p| p.spec).collect();
    match ctx.client()?.bulk_create_machines(specs).await {
        Ok(created) => match out.format {
            Format::Json => out.json(&created),
            Format::Table => out.line(format!("imported {} machines from {}", created.len(), path.display())),
        },
        Err(ClientError::Api { error, .. }) if !error.details.is_empty() => {
            let problems: Vec<Problem> = error
                .details
                .iter()
                .map(|d| Problem {
                    line: d.index.and_then(|i| lines.get(i).copied()).unwrap_or(0),
                    message: match &d.field {
                        Some(f) => format!("{f}: {}", d.message),
                        None => d.message.clone(),
                    },
                })
                .collect();
            Err(fail(path, &problems))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_and_extra_nics() {
        let text = "hostname,rack,tags,mac,switch,port,bmc_driver,bmc_address\n\
                    # a comment\n\
                    db1001,a1,db;bm,52:54:00:00:00:01,asw-a1,xe-0/0/1,ipmi,10.0.0.1\n\
                    db1001,,,52:54:00:00:00:02,asw-a1,xe-0/0/2,,\n\
                    db1002,a1,db,52:54:00:00:00:03,,,,\n";
        let parsed = parse_csv(text, Path::new(".")).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].line, 3);
        assert_eq!(parsed[0].spec.nics.len(), 2);
        assert_eq!(parsed[0].spec.tags.len(), 2);
        assert_eq!(parsed[1].line, 5);
    }

    #[test]
    fn nics_enrolled_by_switch_port_need_no_mac() {
        // Issue 15 (seed 000): racks cabled in the inventory, no MAC written down.
        let text = "hostname,mac,switch,port,circuit_id,remote_id\n\
                    r1,,asw-a1,xe-0/0/1,asw-a1:xe-0/0/1,\n\
                    r2,,,,,asw-a1-port2\n\
                    r3,,asw-a1,xe-0/0/3,,\n";
        let problems = parse_csv(text, Path::new(".")).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0].line, 4);
        assert!(
            problems[0]
                .message
                .contains("neither a `mac` nor a switch-port identity"),
            "{problems:#?}"
        );
        let ok = text.lines().take(3).collect::<Vec<_>>().join("\n");
        let parsed = parse_csv(&ok, Path::new(".")).unwrap();
        let r1 = &parsed[0].spec.nics[0];
        assert_eq!((r1.mac, r1.circuit_id.as_deref()), (None, Some("asw-a1:xe-0/0/1")));
        assert_eq!(parsed[1].spec.nics[0].remote_id.as_deref(), Some("asw-a1-port2"));
        let yaml = "- hostname: y1\n  nics:\n  - circuit_id: ge-0/0/9\n- hostname: y2\n  nics:\n  - switch: asw1\n";
        let problems = parse_yaml(yaml).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].message.contains("needs a `mac` or a switch-port identity"),
            "{problems:#?}"
        );
    }

    #[test]
    fn every_bad_csv_row_is_reported_with_its_line() {
        let text = "hostname,mac,ipv4,vlan,protected\n\
                    ok1,52:54:00:00:00:01,10.0.0.1,,\n\
                    bad_host,52:54:00:00:00:02,,,\n\
                    ok2,zz:54:00:00:00:03,,,\n\
                    ok3,52:54:00:00:00:04,10.0.0.999,,\n\
                    ok4,52:54:00:00:00:05,,99999,\n\
                    ok5,52:54:00:00:00:06,,,maybe\n\
                    ,52:54:00:00:00:07,,,\n";
        let problems = parse_csv(text, Path::new(".")).unwrap_err();
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7, 8], "{problems:#?}");
        assert!(problems[0].message.contains("invalid hostname `bad_host`"));
        assert!(problems[1].message.contains("nics[0].mac: invalid MAC address"));
        assert!(problems[2].message.contains("ipv4"));
        assert!(problems[3].message.contains("vlan"));
        assert!(problems[4].message.contains("not true or false"));
        assert!(problems[5].message.contains("hostname is empty"));
    }

    #[test]
    fn csv_bmc_tls_columns() {
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.path().join("site-ca.pem"), pem).unwrap();
        let text = "hostname,bmc_driver,bmc_address,bmc_insecure,bmc_ca_file\n\
                    rf1,redfish,https://10.0.0.1,,site-ca.pem\n\
                    rf2,redfish,https://10.0.0.2,yes,\n\
                    rf3,redfish,https://10.0.0.3,,missing.pem\n\
                    ip1,ipmi,10.0.0.4,true,\n\
                    ip2,,,,site-ca.pem\n";
        let problems = parse_csv(text, dir.path()).unwrap_err();
        let got: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.message.as_str())).collect();
        assert_eq!(got.len(), 3, "{got:#?}");
        assert_eq!(got[0].0, 4);
        assert!(
            got[0].1.contains("bmc_ca_file: cannot read") && got[0].1.contains("missing.pem"),
            "{got:?}"
        );
        assert_eq!(got[1].0, 5);
        assert!(got[1].1.contains("applies to the redfish driver only"), "{got:?}");
        assert_eq!(got[2], (6, "BMC columns are filled but `bmc_driver` is empty"));
        let ok = parse_csv(&text.lines().take(3).collect::<Vec<_>>().join("\n"), dir.path()).unwrap();
        let b0 = ok[0].spec.bmc.as_ref().unwrap();
        assert_eq!((b0.insecure, b0.ca_cert.as_deref()), (false, Some(pem)));
        let b1 = ok[1].spec.bmc.as_ref().unwrap();
        assert_eq!((b1.insecure, b1.ca_cert.as_deref()), (true, None));
    }

    #[test]
    fn unknown_csv_columns_are_named() {
        let problems = parse_csv("hostname,colour\nh1,red\n", Path::new(".")).unwrap_err();
        assert!(problems[0].message.contains("unknown column `colour`"), "{problems:?}");
    }

    #[test]
    fn yaml_lines_point_at_items() {
        let text = "machines:\n- hostname: a1\n  nics:\n  - mac: 52:54:00:00:00:01\n- hostname: a2\n  colour: red\n- hostname: a3\n  nics:\n  - mac: nope\n";
        let problems = parse_yaml(text).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].line, 5);
        assert!(problems[0].message.contains("unknown field `colour`"));
        assert_eq!(problems[1].line, 7);
        assert!(problems[1].message.contains("nics[0].mac"));
        let ok = parse_yaml("- hostname: b1\n- hostname: b2\n  tags: [x]\n").unwrap();
        assert_eq!(ok.iter().map(|p| p.line).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn broken_yaml_says_where() {
        let problems = parse_yaml("- hostname: a\n  nics: [\n").unwrap_err();
        assert!(problems[0].message.contains("not valid YAML"));
        assert!(problems[0].line > 0);
    }
}
