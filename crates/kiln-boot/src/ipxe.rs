//! iPXE scripts for each boot answer. iPXE expands `${…}` on every line and
//! reads `||`, `&&` and `#` as script syntax, and it has no quoting that
//! would make a value inert. So every value that reaches a script (URLs,
//! kernel arguments, the token, a hostname in a message) is checked against
//! a plain character set and refused otherwise — never escaped and hoped.

use crate::decision::BootAnswer;
use crate::installer;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("`{value}` cannot go into an iPXE script: {why}")]
    Unsafe { value: String, why: &'static str },
}

/// Characters that need no quoting anywhere in an iPXE command line.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?=,+@%[]".contains(c)
}

/// A kernel argument, URL or token: non-empty plain characters, no spaces.
pub fn check_arg(value: &str) -> Result<&str, ScriptError> {
    let bad = |why| {
        Err(ScriptError::Unsafe {
            value: value.chars().take(80).collect(),
            why,
        })
    };
    if value.is_empty() {
        return bad("it is empty");
    }
    if value.len() > 1024 {
        return bad("it is longer than 1024 characters");
    }
    if value.contains("${") || value.contains('$') {
        return bad("`$` would expand iPXE settings");
    }
    match value.chars().find(|c| !plain(*c)) {
        Some(c) if c.is_whitespace() || c.is_control() => bad("it contains white space or a control character"),
        Some(_) => bad("it contains a character outside A-Z a-z 0-9 - . _ ~ : / ? = , + @ % [ ]"),
        None => Ok(value),
    }
}

/// How to leave iPXE for the local disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

/// Discovery agent artifacts and where the agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentBoot {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: Vec<String>,
}

/// Renders `answer` as an iPXE script. `NoAnswer` renders a script that
/// says so and exits to the next boot device.
pub fn render(answer: &BootAnswer, firmware: Firmware, agent: &AgentBoot) -> Result<String, ScriptError> {
    let mut s = String::from("#!ipxe\n");
    // Hands control back to the firmware, which boots the next device. On
    // UEFI the status must be an error: EDK2-based firmware (OVMF, most
    // servers') takes a boot option that returns success as "the user is
    // done" and opens its setup menu instead of trying the next option.
    let give_up = match firmware {
        Firmware::Bios => "exit\n",
        Firmware::Uefi => "exit 1\n",
    };
    let exit_to_disk = |s: &mut String| match firmware {
        // On BIOS, sanboot of the first hard disk is surer.
        Firmware::Bios => s.push_str("sanboot --no-describe --drive 0x80 || exit\n"),
        Firmware::Uefi => s.push_str(give_up),
    };
    match answer {
        BootAnswer::NoAnswer { .. } => {
            s.push_str("echo kiln: this machine is not managed here\n");
            s.push_str(give_up);
        }
        BootAnswer::LocalDisk { .. } => {
            s.push_str("echo kiln: booting from local disk\n");
            exit_to_disk(&mut s);
        }
        BootAnswer::Discovery { .. } => {
            s.push_str("echo kiln: booting the discovery agent\n");
            kernel_lines(
                &mut s,
                firmware,
                &agent.kernel,
                std::slice::from_ref(&agent.initrd),
                &agent.cmdline,
                None,
            )?;
        }
        BootAnswer::Install {
            job_id,
            token,
            kernel,
            initrds,
            cmdline,
            ..
        } => {
            check_arg(job_id)?;
            s.push_str(&format!("echo kiln: job {job_id}: booting its installer\n"));
            // An installer's command line says where its token goes (the
            // preseed or kickstart URL); the deploy agent gets `kiln.token=`.
            let wants_token = cmdline.iter().any(|a| a.contains(installer::TOKEN));
            let cmdline: Vec<String> = cmdline
                .iter()
                .map(|a| a.replace(installer::TOKEN, token.expose()))
                .collect();
            let token_arg = (!wants_token).then(|| format!("kiln.token={}", token.expose()));
            kernel_lines(&mut s, firmware, kernel, initrds, &cmdline, token_arg.as_deref())?;
        }
    }
    Ok(s)
}

/// `script` with every token's value replaced by `[redacted]`: the
/// `kiln.token=` argument of the deploy and discovery agents, and a
/// `token=` query parameter inside any word (an installer's `url=` or
/// `inst.ks=`). For showing a script to people and logs.
pub fn redact(script: &str) -> String {
    script
        .split('\n')
        .map(|line| line.split(' ').map(redact_word).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn redact_word(word: &str) -> String {
    const HIDDEN: &str = "[redacted]";
    if word.starts_with("kiln.token=") {
        return format!("kiln.token={HIDDEN}");
    }
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(i) = rest.find("token=") {
        let at_param = i > 0 && matches!(rest.as_bytes()[i - 1], b'?' | b'&' | b';');
        let value_start = i + "token=".len();
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if at_param {
            let end = rest.find(['&', ';', '#']).unwrap_or(rest.len());
            out.push_str(HIDDEN);
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// `kernel`, `initrd` and `boot` lines. On UEFI, iPXE hands initrds to
/// the kernel's EFI stub as files, which the stub loads only when the
/// command line names them (`initrd=NAME`); so each initrd gets a name of
/// ours and is named on the kernel line.
fn kernel_lines(
    s: &mut String,
    firmware: Firmware,
    kernel: &str,
    initrds: &[String],
    cmdline: &[String],
    token: Option<&str>,
) -> Result<(), ScriptError> {
    let names: Vec<String> = (0..initrds.len()).map(|i| format!("initrd{i}")).collect();
    let mut line = format!("kernel {}", check_arg(kernel)?);
    if firmware == Firmware::Uefi {
        for name in &names {
            line.push_str(&format!(" initrd={name}"));
        }
    }
    for arg in cmdline.iter().map(String::as_str).chain(token) {
        line.push(' ');
        line.push_str(check_arg(arg)?);
    }
    s.push_str(&line);
    s.push('\n');
    for (initrd, name) in initrds.iter().zip(&names) {
        match firmware {
            Firmware::Uefi => s.push_str(&format!("initrd --name {name} {}\n", check_arg(initrd)?)),
            Firmware::Bios => s.push_str(&format!("initrd {}\n", check_arg(initrd)?)),
        }
    }
    s.push_str("boot\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::Secret;

    /// Parses a script the way iPXE reads it, enough to prove what it will
    /// run: one known command per line, and no setting expansion or
    /// command chaining anywhere except our own `|| exit`.
    fn commands(script: &str) -> Vec<Vec<String>> {
        let mut lines = script.lines();
        assert_eq!(lines.next(), Some("#!ipxe"));
        lines
            .map(|l| {
                assert!(!l.contains('$'), "expansion in {l:?}");
                assert!(!l.contains('#'), "comment in {l:?}");
                assert!(!l.contains("&&"), "chaining in {l:?}");
                assert!(!l.contains("||") || l.ends_with("|| exit"), "chaining in {l:?}");
                let words: Vec<String> = l.split(' ').map(str::to_string).collect();
                assert!(
                    ["echo", "kernel", "initrd", "boot", "exit", "sanboot"].contains(&words[0].as_str()),
                    "unexpected command in {l:?}"
                );
                words
            })
            .collect()
    }

    fn agent() -> AgentBoot {
        AgentBoot {
            kernel: "http://10.0.0.1:7070/boot/file/vmlinuz".into(),
            initrd: "http://10.0.0.1:7070/boot/file/agent.cpio.gz".into(),
            cmdline: vec!["console=ttyS0,115200".into(), "kiln.mode=discover".into()],
        }
    }

    fn install(cmdline: Vec<String>, token: &str) -> BootAnswer {
        BootAnswer::Install {
            job_id: "job-7".into(),
            token: Secret::new(token),
            kernel: "http://10.0.0.1:7070/boot/file/di/linux".into(),
            initrds: vec!["http://10.0.0.1:7070/boot/file/di/initrd.gz".into()],
            cmdline,
            reason: String::new(),
        }
    }

    #[test]
    fn local_disk_never_loads_a_kernel() {
        for fw in [Firmware::Bios, Firmware::Uefi] {
            let s = render(&BootAnswer::LocalDisk { reason: "x".into() }, fw, &agent()).unwrap();
            let cmds = commands(&s);
            assert!(cmds.iter().all(|c| c[0] != "kernel" && c[0] != "boot"), "{s}");
        }
        let s = render(&BootAnswer::NoAnswer { reason: "x".into() }, Firmware::Bios, &agent()).unwrap();
        assert!(commands(&s).iter().all(|c| c[0] != "kernel"));
    }

    #[test]
    fn on_uefi_ipxe_gives_up_with_an_error_so_the_firmware_boots_the_next_option() {
        // EDK2 (OVMF, most servers) opens its setup menu when a boot option
        // returns success: the QEMU UEFI test booted into it before.
        for answer in [
            BootAnswer::LocalDisk { reason: "x".into() },
            BootAnswer::NoAnswer { reason: "x".into() },
        ] {
            let s = render(&answer, Firmware::Uefi, &agent()).unwrap();
            let cmds = commands(&s);
            assert_eq!(cmds.last().unwrap(), &["exit", "1"], "{s}");
            assert!(!cmds.iter().any(|c| c == &["exit"]), "{s}");
        }
    }

    #[test]
    fn install_script_has_the_job_token_once() {
        let s = render(
            &install(vec!["priority=critical".into()], "tok-123"),
            Firmware::Uefi,
            &agent(),
        )
        .unwrap();
        let cmds = commands(&s);
        let kernel = cmds.iter().find(|c| c[0] == "kernel").unwrap();
        assert_eq!(kernel[1], "http://10.0.0.1:7070/boot/file/di/linux");
        assert_eq!(
            &kernel[2..],
            ["initrd=initrd0", "priority=critical", "kiln.token=tok-123"]
        );
        let initrds: Vec<_> = cmds.iter().filter(|c| c[0] == "initrd").collect();
        assert_eq!(initrds.len(), 1);
        assert_eq!(
            initrds[0][1..],
            ["--name", "initrd0", "http://10.0.0.1:7070/boot/file/di/initrd.gz"]
        );
        assert_eq!(cmds.last().unwrap()[0], "boot");
        // On BIOS iPXE passes the initrd itself: no names.
        let s = render(&install(vec![], "tok"), Firmware::Bios, &agent()).unwrap();
        assert!(
            s.contains("\ninitrd http://10.0.0.1:7070/boot/file/di/initrd.gz\n"),
            "{s}"
        );
        assert!(!s.contains("initrd="), "{s}");
    }

    /// An installer's arm names where the token goes: it is put there (in
    /// the preseed URL), once, and no `kiln.token=` is added — d-i would
    /// not need it, and after `---` it would reach the installed system.
    #[test]
    fn an_installer_gets_its_token_in_the_preseed_url_only() {
        let cmdline = vec![
            "auto=true".to_string(),
            format!(
                "url=http://10.0.0.1:7070/boot/job/job-7/preseed?token={}",
                installer::TOKEN
            ),
            "---".to_string(),
            "console=ttyS0,115200".to_string(),
        ];
        for fw in [Firmware::Bios, Firmware::Uefi] {
            let s = render(&install(cmdline.clone(), "kj_tok-1"), fw, &agent()).unwrap();
            let cmds = commands(&s);
            let kernel = cmds.iter().find(|c| c[0] == "kernel").unwrap();
            assert!(
                kernel.contains(&"url=http://10.0.0.1:7070/boot/job/job-7/preseed?token=kj_tok-1".to_string()),
                "{s}"
            );
            assert_eq!(kernel.last().unwrap(), "console=ttyS0,115200", "{s}");
            assert_eq!(s.matches("kj_tok-1").count(), 1, "{s}");
            assert!(!s.contains("kiln.token") && !s.contains('{'), "{s}");
        }
        // A token that could add a command is refused wherever it goes.
        assert!(render(&install(cmdline, "tok&&shell"), Firmware::Bios, &agent()).is_err());
        // A placeholder nobody filled (the base URL) never reaches a script.
        let unfilled = vec![format!("url={}/boot/job/job-7/preseed", installer::BASE_URL)];
        assert!(render(&install(unfilled, "tok"), Firmware::Bios, &agent()).is_err());
    }

    #[test]
    fn redact_hides_every_token() {
        let s = "#!ipxe\nkernel http://x/linux url=http://x/boot/job/7/preseed?token=kj_abc-_1 \
                 inst.ks=http://x/ks?a=1&token=kj_def;b=2 kiln.token=kj_ghi notoken=keep\nboot";
        let r = redact(s);
        for secret in ["kj_abc-_1", "kj_def", "kj_ghi"] {
            assert!(!r.contains(secret), "{r}");
        }
        assert!(r.contains("url=http://x/boot/job/7/preseed?token=[redacted]"), "{r}");
        assert!(r.contains("inst.ks=http://x/ks?a=1&token=[redacted];b=2"), "{r}");
        assert!(r.contains("kiln.token=[redacted]"), "{r}");
        assert!(r.contains("notoken=keep"), "{r}");
        assert!(
            r.starts_with("#!ipxe\nkernel http://x/linux ") && r.ends_with("\nboot"),
            "{r}"
        );
    }

    #[test]
    fn injection_attempts_are_refused() {
        for evil in [
            "quiet\nshell",
            "quiet || shell",
            "x=${net0/mac}",
            "a&&b",
            "#comment",
            "two words",
            "semi;colon",
            "",
            "tab\there",
            "quote\"d",
        ] {
            let r = render(&install(vec![evil.into()], "tok"), Firmware::Bios, &agent());
            assert!(r.is_err(), "{evil:?} got through: {r:?}");
        }
        assert!(render(&install(vec![], "tok\nshell"), Firmware::Bios, &agent()).is_err());
        let mut bad_agent = agent();
        bad_agent.kernel = "http://x/${root-path}".into();
        assert!(
            render(
                &BootAnswer::Discovery { reason: String::new() },
                Firmware::Bios,
                &bad_agent
            )
            .is_err()
        );
    }
}
