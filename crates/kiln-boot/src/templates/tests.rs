//! Every built-in renders and parses; hostile values arrive as data; an
//! operator's mistakes are errors that name the template and the line.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use kiln_types::catalog::{Arch, OsImage, OsKind, StorageLayout};
use kiln_types::machine::{Dmi, Hardware, Machine, MachineKind, MachineState, Nic};
use kiln_types::{OsImageId, Secret};

use super::*;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBo1DFLOjhJu9VihAJLwnWUkTo81xeod3+XAAIuQa9Py alice@laptop";
const HASH: &str = "$6$saltsalt$8iYtNHxjWRl.NF6oNZ5tF.iKFlQREaXBLlSmZKP6dy9l5z3vsooWNW0/GZ6Nej73/TFug6pIPSqbJoCT6dfnj.";
const TOKEN: &str = "kiln_Zm9vYmFyYmF6cXV4LXRva2VuX3NlY3JldA";
/// Everything a tenant could put in a key comment or a script to escape
/// its context: quotes, substitutions, template syntax, new directives.
const HOSTILE: &str = "x' \"; reboot; echo '$(touch /tmp/kiln-pwned) `touch /tmp/kiln-pwned` {{ 7*7 }} {% raw %} \\";
/// A tenant's callback URL with shell syntax in it: the new OS reads it
/// as data.
const CALLBACK: &str = "https://billing.example.com/cb?a='$(touch${IFS}/tmp/kiln-pwned)'&b=`id`";
const SCRIPT: &str = "#!/bin/sh\necho '{{ 7*7 }}' \"$(hostname)\"\n%end\nd-i preseed/late_command string reboot\n- [reboot]\n}, \"x\": 1\n\\";

fn machine() -> Machine {
    let mut m = Machine::sketch("db1001", MachineKind::Physical, MachineState::Ready);
    m.fqdn = Some("db1001.eqiad.example.net".parse().unwrap());
    m.ipv4 = Some("10.64.0.11".parse().unwrap());
    m.nics = vec![Nic {
        mac: Some("52:54:00:12:34:56".parse().unwrap()),
        name: Some(HOSTILE.into()),
        switch: None,
        port: None,
        vlan: None,
        circuit_id: None,
        remote_id: None,
    }];
    m.hardware = Some(Hardware {
        dmi: Some(Dmi {
            serial: Some(format!("SN1\n{HOSTILE}")),
            uuid: Some("4c4c4544-0042-3510-8052-b4c04f4d4d32".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    m
}

fn os(kind: OsKind) -> OsImage {
    OsImage {
        id: OsImageId::new(),
        name: "debian".into(),
        version: "12".into(),
        arch: Arch::X86_64,
        kind,
        tags: vec![],
        min_ram_bytes: 0,
        min_disk_bytes: 0,
        source: "http://mirror/debian".into(),
        sha256: None,
        format: Default::default(),
        content: Default::default(),
        templates: Default::default(),
        created_at: chrono::Utc::now(),
    }
}

fn plan(hostile: bool) -> InstallPlan {
    let key = if hostile {
        format!("{} {HOSTILE}", &KEY[..KEY.len() - 13])
    } else {
        KEY.to_string()
    };
    InstallPlan {
        job_id: "0190c5e2-7b1a-7cc3-9a4e-3f1d2c3b4a59".into(),
        token: Secret::new(TOKEN),
        hostname: None,
        layout: Some(StorageLayout::Lvm),
        ssh_keys: vec![key.parse().unwrap(), KEY.parse().unwrap()],
        root_password_hash: Some(HASH.parse().unwrap()),
        post_install_script: Some(if hostile {
            SCRIPT.into()
        } else {
            "#!/bin/sh\necho hi\n".into()
        }),
        callback_url: Some(
            if hostile {
                CALLBACK
            } else {
                "https://billing.example.com/cb"
            }
            .into(),
        ),
    }
}

fn ctx(plan: &InstallPlan) -> TemplateContext {
    TemplateContext::new(&machine(), &os(OsKind::Installer), plan, "http://10.64.0.1:7070/").unwrap()
}

fn bare() -> InstallPlan {
    InstallPlan {
        layout: None,
        ssh_keys: vec![],
        root_password_hash: None,
        post_install_script: None,
        callback_url: None,
        ..plan(false)
    }
}

fn directive<'a>(lines: &'a [(usize, String)], question: &str) -> Option<&'a str> {
    lines.iter().find_map(|(_, l)| {
        let mut f = l.splitn(4, char::is_whitespace);
        let (_, q, _) = (f.next(), f.next()?, f.next());
        (q == question).then(|| f.next().unwrap_or("").trim_start())
    })
}

fn b64(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

/// The late script a preseed carries, decoded.
fn late_script(preseed: &str) -> String {
    let lines = preseed_lines(preseed);
    let late = directive(&lines, "preseed/late_command").expect("a late_command");
    let word = late.split_whitespace().nth(2).unwrap();
    b64(word.trim_matches('\''))
}

fn sh_syntax_ok(script: &str) {
    let out = Command::new("sh").arg("-n").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "sh -n: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The words sh makes of `args` (quoting as kickstart's shlex reads it).
fn sh_words(args: &str) -> Vec<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("set -f; for w in {args}; do printf '%s\\0' \"$w\"; done"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_terminator('\0')
        .map(String::from)
        .collect()
}

#[test]
fn every_builtin_renders_for_a_full_and_a_bare_plan() {
    for kind in TemplateKind::ALL {
        for p in [plan(false), plan(true), bare()] {
            let out = render(kind, None, &ctx(&p)).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert!(out.ends_with('\n'), "{kind} does not end with a line break");
        }
    }
}

#[test]
fn preseed_keeps_hostile_values_as_data() {
    let benign = render(TemplateKind::Preseed, None, &ctx(&plan(false))).unwrap();
    let hostile = render(TemplateKind::Preseed, None, &ctx(&plan(true))).unwrap();
    let (b, h) = (preseed_lines(&benign), preseed_lines(&hostile));
    // No directive added, none changed except the base64 late command.
    let questions = |l: &[(usize, String)]| -> Vec<String> {
        l.iter()
            .map(|(_, s)| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(questions(&b), questions(&h));
    for (_, line) in &h {
        assert!(line.split_whitespace().count() >= 3, "{line}");
    }
    assert_eq!(directive(&h, "netcfg/get_hostname"), Some("db1001"));
    assert_eq!(directive(&h, "netcfg/get_domain"), Some("eqiad.example.net"));
    assert_eq!(directive(&h, "passwd/root-password-crypted"), Some(HASH));
    assert_eq!(directive(&h, "partman-auto/method"), Some("lvm"));
    let early = directive(&h, "preseed/early_command").unwrap();
    sh_syntax_ok(early);
    assert!(early.contains("/api/v1/jobs/0190c5e2-7b1a-7cc3-9a4e-3f1d2c3b4a59/stages/1"));

    let late = late_script(&hostile);
    sh_syntax_ok(&late);
    assert!(!late.contains("49"), "a value was rendered as a template");
}

/// Runs the late script with stand-ins for the installer's commands and
/// `/target` in a scratch directory: the keys and the script arrive byte
/// for byte, and nothing the values say is executed.
#[test]
fn preseed_late_script_runs_and_writes_values_intact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let target = root.join("target");
    let bin = root.join("bin");
    for d in ["root", "etc/systemd/system"] {
        std::fs::create_dir_all(target.join(d)).unwrap();
    }
    std::fs::create_dir_all(&bin).unwrap();
    let log = root.join("calls");
    let stub = |name: &str| {
        let p = bin.join(name);
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nprintf '{name}' >> {0}; printf ' [%s]' \"$@\" >> {0}; echo >> {0}\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    for name in ["wget", "in-target", "reboot", "touch", "hostname"] {
        stub(name);
    }
    let hostile = render(TemplateKind::Preseed, None, &ctx(&plan(true))).unwrap();
    let script = late_script(&hostile).replace("/target/", &format!("{}/", target.display()));
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let keys = std::fs::read_to_string(target.join("root/.ssh/authorized_keys")).unwrap();
    let expected: Vec<String> = plan(true).ssh_keys.iter().map(|k| k.as_str().to_string()).collect();
    assert_eq!(keys.lines().collect::<Vec<_>>(), expected);
    assert_eq!(
        std::fs::read_to_string(target.join("var/lib/kiln/post-install.sh")).unwrap(),
        SCRIPT
    );
    assert_eq!(
        std::fs::read_to_string(target.join("var/lib/kiln/firstboot.sh")).unwrap(),
        FIRSTBOOT_SCRIPT
    );
    let env = std::fs::read_to_string(target.join("etc/kiln-firstboot.env")).unwrap();
    assert_eq!(
        env,
        format!(
            "KILN_STAGE_URL=http://10.64.0.1:7070/api/v1/jobs/0190c5e2-7b1a-7cc3-9a4e-3f1d2c3b4a59/stages\n\
             KILN_TOKEN={TOKEN}\nKILN_JOB_ID=0190c5e2-7b1a-7cc3-9a4e-3f1d2c3b4a59\nKILN_CALLBACK_URL={CALLBACK}\n"
        )
    );
    let unit = std::fs::read_to_string(target.join("etc/systemd/system/kiln-firstboot.service")).unwrap();
    assert!(unit.contains("ExecStart=/var/lib/kiln/firstboot.sh"), "{unit}");

    // The script is not run during the install: it waits for the first boot.
    let calls = std::fs::read_to_string(&log).unwrap();
    let commands: Vec<&str> = calls.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(commands, ["wget", "wget", "in-target", "wget"], "{calls}");
    let auth = format!("[--header=Authorization: Bearer {TOKEN}]");
    for (line, n) in calls.lines().filter(|l| l.starts_with("wget")).zip([2, 3, 4]) {
        assert!(line.contains(&auth), "{line}");
        assert!(line.ends_with(&format!("/stages/{n}]")), "{line}");
    }
    assert!(!Path::new("/tmp/kiln-pwned").exists());
}

#[test]
fn kickstart_keeps_hostile_values_as_data() {
    let out = render(TemplateKind::Kickstart, None, &ctx(&plan(true))).unwrap();
    // No value opened or closed a section: exactly the template's three.
    let sections: Vec<&str> = out.lines().filter(|l| l.starts_with('%')).collect();
    assert_eq!(sections, ["%packages", "%end", "%pre", "%end", "%post", "%end"]);
    let sshkeys: Vec<Vec<String>> = out
        .lines()
        .filter_map(|l| l.strip_prefix("sshkey "))
        .map(sh_words)
        .collect();
    let expected: Vec<Vec<String>> = plan(true)
        .ssh_keys
        .iter()
        .map(|k| vec!["--username=root".to_string(), k.as_str().to_string()])
        .collect();
    assert_eq!(sshkeys, expected);
    let rootpw = out.lines().find_map(|l| l.strip_prefix("rootpw ")).unwrap();
    assert_eq!(sh_words(rootpw), ["--iscrypted", HASH]);
    let post = out.split("%post\n").nth(1).unwrap().split("\n%end").next().unwrap();
    sh_syntax_ok(post);
    let b64_line = post
        .lines()
        .find(|l| l.starts_with("printf '%s' ") && l.contains("base64 -d"))
        .unwrap();
    assert_eq!(
        b64(sh_words(
            b64_line
                .split(" | ")
                .next()
                .unwrap()
                .strip_prefix("printf '%s' ")
                .unwrap()
        )[0]
        .as_str()),
        SCRIPT
    );
}

#[test]
fn cloud_init_keeps_hostile_values_as_data() {
    let p = plan(true);
    let out = render(TemplateKind::UserData, None, &ctx(&p)).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
    let keys: Vec<&str> = doc["ssh_authorized_keys"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, p.ssh_keys.iter().map(|k| k.as_str()).collect::<Vec<_>>());
    assert_eq!(doc["hostname"].as_str(), Some("db1001"));
    assert_eq!(doc["fqdn"].as_str(), Some("db1001.eqiad.example.net"));
    assert_eq!(doc["chpasswd"]["users"][0]["password"].as_str(), Some(HASH));
    let files = doc["write_files"].as_sequence().unwrap();
    let file = |i: usize| {
        assert_eq!(files[i]["encoding"].as_str(), Some("b64"));
        (
            files[i]["path"].as_str().unwrap(),
            b64(files[i]["content"].as_str().unwrap()),
        )
    };
    assert_eq!(files.len(), 3, "a value added a file");
    let (path, env) = file(0);
    assert_eq!(path, "/etc/kiln-firstboot.env");
    assert!(env.ends_with(&format!("KILN_CALLBACK_URL={CALLBACK}\n")), "{env}");
    assert_eq!(file(1), ("/var/lib/kiln/firstboot.sh", FIRSTBOOT_SCRIPT.to_string()));
    assert_eq!(file(2), ("/var/lib/kiln/post-install.sh", SCRIPT.to_string()));
    let runcmd = doc["runcmd"].as_sequence().unwrap();
    assert_eq!(runcmd.len(), 1, "a value added a command");
    assert_eq!(runcmd[0][0].as_str(), Some("/var/lib/kiln/firstboot.sh"));
    let top: Vec<&str> = doc.as_mapping().unwrap().keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        top,
        [
            "hostname",
            "fqdn",
            "preserve_hostname",
            "disable_root",
            "ssh_pwauth",
            "ssh_authorized_keys",
            "chpasswd",
            "write_files",
            "runcmd"
        ]
    );

    let meta: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&render(TemplateKind::MetaData, None, &ctx(&p)).unwrap()).unwrap();
    assert_eq!(
        meta["instance-id"].as_str(),
        Some("kiln-0190c5e2-7b1a-7cc3-9a4e-3f1d2c3b4a59")
    );
    assert_eq!(meta["local-hostname"].as_str(), Some("db1001"));
}

#[test]
fn ignition_keeps_hostile_values_as_data() {
    let p = plan(true);
    let out = render(TemplateKind::Ignition, None, &ctx(&p)).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["ignition"]["version"], "3.4.0");
    let user = &doc["passwd"]["users"][0];
    assert_eq!(user["passwordHash"], HASH);
    assert_eq!(user["sshAuthorizedKeys"], serde_json::json!(p.ssh_keys));
    let files = doc["storage"]["files"].as_array().unwrap();
    let data = |i: usize| {
        b64(files[i]["contents"]["source"]
            .as_str()
            .unwrap()
            .strip_prefix("data:;base64,")
            .unwrap())
    };
    assert_eq!(data(0), "db1001\n");
    assert!(data(1).contains(&format!("KILN_TOKEN={TOKEN}\n")));
    assert!(data(1).ends_with(&format!("KILN_CALLBACK_URL={CALLBACK}\n")));
    assert_eq!(data(2), FIRSTBOOT_SCRIPT);
    assert_eq!(data(3), SCRIPT);
    assert_eq!(files[3]["path"], "/var/lib/kiln/post-install.sh");
    let units = doc["systemd"]["units"].as_array().unwrap();
    assert_eq!(units.len(), 1);
    assert!(
        units[0]["contents"]
            .as_str()
            .unwrap()
            .contains("ExecStart=/var/lib/kiln/firstboot.sh")
    );
    // Bare plan: no hash key at all, an empty key list.
    let bare: serde_json::Value =
        serde_json::from_str(&render(TemplateKind::Ignition, None, &ctx(&bare())).unwrap()).unwrap();
    assert!(bare["passwd"]["users"][0].get("passwordHash").is_none());
    assert_eq!(bare["systemd"]["units"].as_array().unwrap().len(), 1);
    assert_eq!(bare["storage"]["files"].as_array().unwrap().len(), 3);
}

/// An operator's template gets the same protection: client-reported values
/// (DMI serial, NIC names) cannot break out even through `|safe`.
#[test]
fn operator_templates_cannot_unescape_values() {
    let c = ctx(&plan(true));
    let out = render(
        TemplateKind::UserData,
        Some("#cloud-config\nserial: {{ machine.serial|safe }}\nnic: {{ machine.nics[0].name }}\n"),
        &c,
    )
    .unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
    assert_eq!(doc["serial"].as_str(), c.machine.serial.as_deref());
    assert_eq!(doc["nic"].as_str(), Some(HOSTILE));
    assert_eq!(doc.as_mapping().unwrap().len(), 2);

    let ks = render(
        TemplateKind::Kickstart,
        Some("text\n%post\necho {{ machine.nics[0].name|shell }}\n%end\n"),
        &c,
    )
    .unwrap();
    let line = ks.lines().find_map(|l| l.strip_prefix("echo ")).unwrap();
    assert_eq!(sh_words(line), [HOSTILE]);

    // A multi-line value cannot reach a line format, filtered or not.
    for src in [
        "d-i x/y string {{ machine.serial|preseed }}\n",
        "d-i x/y string {{ machine.serial|shell }}\n",
        "d-i x/y string {{ machine.serial|safe }}\n",
    ] {
        let e = render(TemplateKind::Preseed, Some(src), &c).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(e.contains("new line") || e.contains("line break"), "{e}");
    }
}

#[test]
fn a_bare_value_in_a_line_format_is_an_error_that_does_not_leak() {
    let c = ctx(&plan(false));
    let e = render(TemplateKind::Preseed, Some("# x\nd-i a/b string {{ job.token }}\n"), &c).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("the preseed template of debian 12, line 2"), "{msg}");
    assert!(msg.contains("|shell"), "{msg}");
    assert!(!msg.contains(TOKEN), "{msg}");
}

#[test]
fn undefined_variables_are_errors() {
    let c = ctx(&plan(false));
    for src in [
        "{{ job.nope|shell }}",
        "{% if jobs %}x{% endif %}",
        "{{ machine.hostname|shell }} {{ nope|shell }}",
    ] {
        let e = render(TemplateKind::Kickstart, Some(src), &c).unwrap_err();
        assert!(matches!(e, TemplateError::Render { line: 1, .. }), "{src}: {e}");
        assert!(e.to_string().contains("undefined"), "{e}");
    }
    // `none` is defined: an optional value can be tested.
    assert!(
        render(
            TemplateKind::Kickstart,
            Some("{% if job.post_install_script is none %}x{% endif %}"),
            &ctx(&bare())
        )
        .is_ok()
    );
}

#[test]
fn syntax_errors_name_template_and_line() {
    let e = render(
        TemplateKind::Preseed,
        Some("# one\n# two\nd-i a/b string {{ machine.hostname|preseed }\n"),
        &ctx(&plan(false)),
    )
    .unwrap_err();
    assert!(matches!(e, TemplateError::Syntax { line: 3, .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("the preseed template of debian 12, line 3: syntax error"),
        "{e}"
    );
    let e = check(TemplateKind::Ignition, "{\n{% for x in y %}\n").unwrap_err();
    assert!(e.to_string().contains("this ignition template, line"), "{e}");
    for kind in TemplateKind::ALL {
        check(kind, kind.builtin()).unwrap();
    }
}

#[test]
fn runaway_templates_run_out_of_fuel() {
    let c = ctx(&plan(false));
    let e = render(
        TemplateKind::Kickstart,
        Some("{% for i in range(100000000) %}{% endfor %}"),
        &c,
    )
    .unwrap_err();
    assert!(matches!(e, TemplateError::Render { .. }), "{e}");
    let e = render(
        TemplateKind::Kickstart,
        Some("text\n{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"),
        &c,
    )
    .unwrap_err();
    assert!(e.to_string().contains("fuel"), "{e}");
    assert!(matches!(e, TemplateError::Render { line: 2, .. }), "{e}");
}

#[test]
fn rendered_files_are_checked() {
    let c = ctx(&plan(false));
    let e = render(
        TemplateKind::Ignition,
        Some("{\"ignition\": {\"version\": \"2.2.0\"}}"),
        &c,
    )
    .unwrap_err();
    assert!(matches!(e, TemplateError::Output { .. }), "{e}");
    assert!(render(TemplateKind::UserData, Some("hostname: x\n"), &c).is_err());
    assert!(render(TemplateKind::Preseed, Some("d-i only-two\n"), &c).is_err());
    assert!(render(TemplateKind::Kickstart, Some("%post\necho\n"), &c).is_err());
    // A quoted value in YAML is quoted twice: caught here, not at boot.
    assert!(
        render(
            TemplateKind::MetaData,
            Some("local-hostname: \"{{ machine.hostname }}\"\n"),
            &c
        )
        .is_err()
    );
}

#[test]
fn builtins_refuse_layouts_they_cannot_make() {
    let p = InstallPlan {
        layout: Some(StorageLayout::LvmRaid1),
        ..plan(false)
    };
    for kind in [TemplateKind::Preseed, TemplateKind::Kickstart] {
        let e = render(kind, None, &ctx(&p)).unwrap_err().to_string();
        assert!(e.contains("lvm_raid1") && e.contains("built-in"), "{e}");
    }
}

#[test]
fn hostname_override_and_context_checks() {
    let p = InstallPlan {
        hostname: Some("web2001".parse().unwrap()),
        ..plan(false)
    };
    let c = ctx(&p);
    assert_eq!(c.machine.hostname, "web2001");
    assert_eq!(c.machine.fqdn.as_deref(), Some("web2001.eqiad.example.net"));
    assert!(!format!("{c:?}").contains(TOKEN));

    let m = machine();
    let o = os(OsKind::Installer);
    for url in ["ftp://x", "http://x/$(id)", "http://x y", ""] {
        assert!(TemplateContext::new(&m, &o, &p, url).is_err(), "{url}");
    }
    let bad_token = InstallPlan {
        token: Secret::new("a b"),
        ..plan(false)
    };
    let e = TemplateContext::new(&m, &o, &bad_token, "http://x")
        .unwrap_err()
        .to_string();
    assert!(!e.contains("a b"), "{e}");
    let bad_job = InstallPlan {
        job_id: "x/../y".into(),
        ..plan(false)
    };
    assert!(TemplateContext::new(&m, &o, &bad_job, "http://x").is_err());
    let big = InstallPlan {
        post_install_script: Some("x".repeat(MAX_SCRIPT + 1)),
        ..plan(false)
    };
    assert!(TemplateContext::new(&m, &o, &big, "http://x").is_err());
}

/// The real peer for stage 1: the early command, run by the Debian
/// installer's own shell and wget (from the netboot initrd, in a chroot),
/// reaches a listener on loopback with the path and token of the contract;
/// the late command's script decodes and parses with the installer's
/// busybox.
/// Needs root and `debian-installer-12-netboot-amd64` (scripts/test
/// installs it); skipped otherwise.
#[test]
fn debian_installer_wget_reports_stage_1() {
    let initrd = Path::new("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/initrd.gz");
    // Only root may chroot.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !initrd.exists() || !root {
        eprintln!(
            "skipped: needs root and the Debian installer's netboot initrd at {}",
            initrd.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unpack = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && zcat {} | busybox cpio -id 2>/dev/null",
            dir.path().display(),
            initrd.display()
        ))
        .status()
        .unwrap();
    assert!(unpack.success(), "unpacking the initrd needs zcat and busybox cpio");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&req).into_owned()
    });

    let p = plan(true);
    let c = TemplateContext::new(
        &machine(),
        &os(OsKind::Installer),
        &p,
        &format!("http://127.0.0.1:{port}"),
    )
    .unwrap();
    let preseed = render(TemplateKind::Preseed, None, &c).unwrap();
    let early = directive(&preseed_lines(&preseed), "preseed/early_command")
        .unwrap()
        .to_string();
    let out = Command::new("chroot")
        .arg(dir.path())
        .args(["/bin/sh", "-c", &early])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let req = server.join().unwrap();
    let first = req.lines().next().unwrap();
    assert_eq!(
        first,
        "POST /api/v1/jobs/0190c5e2-7b1a-7cc3-9a4e-3f1d2c3b4a59/stages/1 HTTP/1.1"
    );
    assert!(
        req.lines().any(|l| l == format!("Authorization: Bearer {TOKEN}")),
        "{req}"
    );

    // The late_command as d-i runs it: its busybox decodes the script
    // byte for byte, and its shell parses it.
    let late = directive(&preseed_lines(&preseed), "preseed/late_command")
        .unwrap()
        .to_string();
    let decode = late.split(" > /tmp/kiln-late.sh").next().unwrap();
    let out = Command::new("chroot")
        .arg(dir.path())
        .args(["/bin/sh", "-c", decode])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = String::from_utf8(out.stdout).unwrap();
    assert_eq!(script, late_script(&preseed));
    let out = Command::new("chroot")
        .arg(dir.path())
        .args(["/bin/sh", "-n", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// kiln's first-boot script as the new OS runs it: the job's script runs
/// there (not on a kiln server), stage 5 carries its exit status and
/// output with the job's token, then the callback is called with JSON; a
/// second run does nothing.
#[test]
fn firstboot_runs_the_script_reports_stage_5_then_calls_back() {
    use std::io::{BufRead, BufReader, Read, Write};
    let root = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut requests = vec![];
        for _ in 0..2 {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            reader
                .get_mut()
                .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                .unwrap();
            requests.push((head, String::from_utf8(body).unwrap()));
        }
        requests
    });
    let job = "0190c5e2-7b1a-7cc3-9a4e-3f1d2c3b4a59";
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::create_dir_all(root.path().join("var/lib/kiln")).unwrap();
    std::fs::write(
        root.path().join("etc/kiln-firstboot.env"),
        format!(
            "KILN_STAGE_URL=http://127.0.0.1:{port}/api/v1/jobs/{job}/stages\nKILN_TOKEN={TOKEN}\n\
             KILN_JOB_ID={job}\nKILN_CALLBACK_URL=http://127.0.0.1:{port}/cb?x='$(touch${{IFS}}/tmp/kiln-pwned)'\n"
        ),
    )
    .unwrap();
    let marker = root.path().join("ran-in-the-new-os");
    std::fs::write(
        root.path().join("var/lib/kiln/post-install.sh"),
        format!("#!/bin/sh\ntouch {}\necho installing agent\nexit 3\n", marker.display()),
    )
    .unwrap();
    let script = root.path().join("firstboot.sh");
    std::fs::write(&script, FIRSTBOOT_SCRIPT).unwrap();
    let run = || {
        Command::new("sh")
            .arg(&script)
            .env("KILN_FIRSTBOOT_ROOT", root.path())
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(marker.exists(), "the job's script ran where the first boot runs");
    let requests = server.join().unwrap();
    let (head, body) = &requests[0];
    assert!(
        head.starts_with(&format!("POST /api/v1/jobs/{job}/stages/5 ")),
        "{head}"
    );
    assert!(head.contains(&format!("Authorization: Bearer {TOKEN}")), "{head}");
    assert_eq!(body, "first boot; post-install script exit 3: installing agent");
    let (head, body) = &requests[1];
    assert!(
        head.starts_with("POST /cb?x='$(touch${IFS}/tmp/kiln-pwned)' "),
        "{head}"
    );
    assert!(
        !head.contains("Authorization"),
        "the callback never gets the job's token: {head}"
    );
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["job_id"], job);
    assert_eq!(json["stage"], 5);
    assert_eq!(json["post_install_exit"], 3);
    assert!(!Path::new("/tmp/kiln-pwned").exists());
    assert!(stdout.contains("kiln-firstboot: stage 5 reported"), "{stdout}");
    assert!(stdout.contains("kiln-firstboot: callback called"), "{stdout}");
    // The token is gone; a second boot does nothing.
    assert!(!root.path().join("etc/kiln-firstboot.env").exists());
    std::fs::remove_file(&marker).unwrap();
    let again = run();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    assert!(!marker.exists());
}

/// The install NIC's static address from the inventory reaches d-i's netcfg
/// (re-run by the early command, since d-i fetched the preseed over DHCP)
/// and anaconda's `network` line; without one, both keep DHCP.
#[test]
fn installers_get_the_install_nics_static_address() {
    let net = crate::network::InstallNetwork {
        mac: "52:54:00:12:34:56".into(),
        interface: "lan0".into(),
        address: "10.0.0.7".into(),
        prefix_len: 24,
        netmask: "255.255.255.0".into(),
        gateway: Some("10.0.0.1".into()),
        nameservers: Some("10.0.0.53 10.0.0.54".into()),
        nameservers_csv: Some("10.0.0.53,10.0.0.54".into()),
    };
    let p = bare();
    let with = ctx(&p).with_install_network(Some(net));
    let preseed = render(TemplateKind::Preseed, None, &with).unwrap();
    let lines = preseed_lines(&preseed);
    assert_eq!(directive(&lines, "netcfg/choose_interface"), Some("52:54:00:12:34:56"));
    assert_eq!(directive(&lines, "netcfg/disable_autoconfig"), Some("true"));
    assert_eq!(directive(&lines, "netcfg/get_ipaddress"), Some("10.0.0.7"));
    assert_eq!(directive(&lines, "netcfg/get_netmask"), Some("255.255.255.0"));
    assert_eq!(directive(&lines, "netcfg/get_gateway"), Some("10.0.0.1"));
    assert_eq!(directive(&lines, "netcfg/get_nameservers"), Some("10.0.0.53 10.0.0.54"));
    assert_eq!(directive(&lines, "netcfg/confirm_static"), Some("true"));
    assert!(
        directive(&lines, "preseed/early_command")
            .unwrap()
            .ends_with("; kill-all-dhcp; netcfg"),
        "{preseed}"
    );
    let ks = render(TemplateKind::Kickstart, None, &with).unwrap();
    let line = ks.lines().find(|l| l.starts_with("network ")).unwrap();
    assert_eq!(
        line,
        "network --device='52:54:00:12:34:56' --bootproto=static --ip='10.0.0.7' --netmask='255.255.255.0' \
         --gateway='10.0.0.1' --nameserver='10.0.0.53,10.0.0.54' --activate --onboot=yes --hostname='db1001.eqiad.example.net'"
    );

    let dhcp = render(TemplateKind::Preseed, None, &ctx(&p)).unwrap();
    let lines = preseed_lines(&dhcp);
    assert_eq!(directive(&lines, "netcfg/choose_interface"), Some("auto"));
    assert!(directive(&lines, "netcfg/get_ipaddress").is_none());
    assert!(!directive(&lines, "preseed/early_command").unwrap().contains("netcfg"));
    let ks = render(TemplateKind::Kickstart, None, &ctx(&p)).unwrap();
    assert!(ks.lines().any(|l| l.starts_with("network --bootproto=dhcp")), "{ks}");
}
