//! The reimage job (DESIGN.md, "Reimage, the main workflow"): each step is
//! idempotent — run twice, it gives the same result — so the engine may run
//! it again after any crash.
//!
//! BMC steps only set states (next boot device, power off, power on): a
//! power *cycle* sent twice would reboot an installer mid-write, an *off*
//! then *on* repeated is harmless. The net-boot arm lives from `arm` to the
//! installer's first report (`wait_installer`), and [`undo`] removes it and
//! sets the disk as boot device whenever the job ends early.

use chrono::{DateTime, Duration, Utc};
use kiln_store::{ArmRecord, StoreError};
use kiln_types::fit::{layout_fits, os_image_fits};
use kiln_types::job::{JobLogKind, ReimageSpec, Stage};
use kiln_types::machine::{BootPolicy, InstalledOs, MachineState};
use serde::Deserialize;

use crate::engine::{BmcAction, BmcError, Effects, Ending, Outcome, StepCx};

pub const STEPS: &[&str] = &[
    "validate",
    "pre_hooks",
    "arm",
    "boot_network",
    "power_off",
    "power_on",
    "wait_installer",
    "wait_base_installed",
    "wait_configured",
    "wait_finishing",
    "boot_disk",
    "wait_first_boot",
    "post_install",
    "post_hooks",
    "finish",
];

fn index(step: &str) -> u32 {
    STEPS.iter().position(|s| *s == step).expect("a reimage step") as u32
}

/// How long each wait may take before the job fails (`[jobs.reimage]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReimageTimeouts {
    /// Power on to stage 1 (the installer or agent started).
    pub installer_start_secs: u64,
    /// Stage 1 to 2 (the image or base system written).
    pub base_installed_secs: u64,
    /// Stage 2 to 3 (configuration written).
    pub configured_secs: u64,
    /// Stage 3 to 4 (finishing, about to reboot).
    pub finishing_secs: u64,
    /// Disk set as boot device to stage 5 (the new OS phoned home).
    pub first_boot_secs: u64,
    /// Pause before a BMC action that failed for a passing reason is tried
    /// again.
    pub bmc_retry_secs: u64,
}

impl Default for ReimageTimeouts {
    fn default() -> Self {
        ReimageTimeouts {
            installer_start_secs: 15 * 60,
            base_installed_secs: 60 * 60,
            configured_secs: 30 * 60,
            finishing_secs: 15 * 60,
            first_boot_secs: 20 * 60,
            bmc_retry_secs: 10,
        }
    }
}

/// Where a retry starts and with which stage. A job that ended anywhere
/// in the net boot and install (`arm` to `wait_finishing`) was disarmed and
/// its boot device set back to disk by the undo, so by default it starts
/// again at `arm`; elsewhere it starts at the step it ended in. A retry that
/// runs the installer again forgets the stages reported before, or the
/// waits would pass at once on the old ones.
pub fn retry_plan(ended_in: u32, from: Option<u32>, stage: Stage) -> (u32, Stage) {
    let last = STEPS.len() as u32 - 1;
    let from = from.unwrap_or_else(|| {
        let ended_in = ended_in.min(last);
        if (index("arm")..=index("wait_finishing")).contains(&ended_in) {
            index("arm")
        } else {
            ended_in
        }
    });
    let stage = if from <= index("wait_installer") {
        Stage::ACCEPTED
    } else {
        stage
    };
    (from.min(last), stage)
}

fn secs(n: u64) -> Duration {
    Duration::seconds(n as i64)
}

/// Runs reimage step `step` of `cx.job`.
pub async fn run_step<E: Effects>(step: &str, cx: &mut StepCx<'_, E>) -> Outcome {
    let spec: ReimageSpec = match serde_json::from_value(cx.job.spec.clone()) {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
                "the job's stored request is unreadable ({e}); start a new reimage"
            ));
        }
    };
    let t = &cx.settings.reimage;
    let skip_for_no_pxe = spec.no_pxe
        && matches!(
            step,
            "arm"
                | "boot_network"
                | "power_off"
                | "power_on"
                | "wait_installer"
                | "wait_base_installed"
                | "wait_configured"
                | "wait_finishing"
                | "wait_first_boot"
        );
    if skip_for_no_pxe {
        cx.log(JobLogKind::Note, "skipped: --no-pxe (the OS is already written)");
        return Outcome::Next;
    }
    if matches!(step, "boot_network" | "boot_disk") && always_netboot(cx) {
        cx.log(
            JobLogKind::Note,
            "skipped: boot policy always-netboot (the machine always boots from the network and kiln's answer \
             decides: its installer while armed, its disk after)",
        );
        return Outcome::Next;
    }
    match step {
        "validate" => validate(cx, &spec).await,
        "pre_hooks" => hooks(cx, &spec, "pre_reimage").await,
        "arm" => arm(cx, &spec).await,
        "boot_network" => bmc(cx, BmcAction::BootNetworkOnce).await,
        "power_off" => bmc(cx, BmcAction::PowerOff).await,
        "power_on" => bmc(cx, BmcAction::PowerOn).await,
        "wait_installer" => {
            let out = wait_stage(cx, Stage::STARTED, t.installer_start_secs, INSTALLER_SILENT);
            if out == Outcome::Next {
                // Net boot is over: from now on the machine boots its disk.
                cx.disarm();
            }
            out
        }
        "wait_base_installed" => wait_stage(cx, Stage::BASE_INSTALLED, t.base_installed_secs, INSTALL_STALLED),
        "wait_configured" => wait_stage(cx, Stage::CONFIGURED, t.configured_secs, INSTALL_STALLED),
        "wait_finishing" => wait_stage(cx, Stage::FINISHING, t.finishing_secs, INSTALL_STALLED),
        "boot_disk" => bmc(cx, BmcAction::BootDisk).await,
        "wait_first_boot" => match wait_stage(cx, Stage::FIRST_BOOT, t.first_boot_secs, NEVER_PHONED_HOME) {
            Outcome::Next => record_installed_os(cx, &spec).await,
            other => other,
        },
        "post_install" => match cx.effects.post_install(cx.job, &spec).await {
            Ok(lines) => {
                lines.into_iter().for_each(|l| cx.log(JobLogKind::Note, l));
                Outcome::Next
            }
            Err(why) => fail(why),
        },
        "post_hooks" => hooks(cx, &spec, "post_reimage").await,
        "finish" => finish(cx, &spec).await,
        other => fail(format!("unknown step `{other}` (a newer server wrote this job?)")),
    }
}

/// The job's machine always boots from the network (as validated): its
/// boot device is never changed.
fn always_netboot<E>(cx: &StepCx<'_, E>) -> bool {
    cx.data.get("boot_policy").and_then(|p| p.as_str()) == Some(BootPolicy::AlwaysNetboot.as_str())
}

fn fail(reason: impl Into<String>) -> Outcome {
    Outcome::Fail { reason: reason.into() }
}

const INSTALLER_SILENT: &str = "the installer did not start: no stage 1 report. Check that the machine \
     net-boots (its console; `kiln boot explain HOST`) and that its BMC really powered it on";
const INSTALL_STALLED: &str = "the install stalled. Look at the machine's console and the job log";
const NEVER_PHONED_HOME: &str = "the new OS did not phone home (stage 5). Check that the machine boots \
     its disk and reaches kiln over the network";

async fn validate<E: Effects>(cx: &mut StepCx<'_, E>, spec: &ReimageSpec) -> Outcome {
    let Some(id) = cx.job.machine_id else {
        return fail("the machine was deleted");
    };
    let machine = match cx.store.get_machine(&id.to_string(), None).await {
        Ok(m) => m,
        Err(StoreError::NotFound { .. }) => return fail("the machine was deleted"),
        Err(e) => return retry(cx, format!("reading the machine failed: {e}")),
    };
    if machine.protected {
        return fail(format!(
            "{} is protected: clear the flag first (`kiln machine edit {} --protected false`)",
            machine.hostname, machine.hostname
        ));
    }
    if machine.maintenance {
        return fail(format!(
            "{} is in maintenance ({}): clear it first",
            machine.hostname,
            machine.maintenance_reason.as_deref().unwrap_or("no reason given")
        ));
    }
    // Issue 15: the server on the machine's port may not be the machine.
    if let Some(alert) = &machine.port_alert {
        return fail(format!("{}: {}", machine.hostname, alert.reason()));
    }
    let image = match cx.store.get_os_image(&spec.os_image).await {
        Ok(i) => i,
        Err(e) => return fail(format!("OS image {}: {e}", spec.os_label)),
    };
    // `--new` without an inventory: nothing to check the image against yet.
    let unchecked = spec.new && machine.hardware.is_none();
    if !unchecked && let Err(why) = os_image_fits(&machine, &image) {
        return fail(format!(
            "{} does not fit {}: {}",
            spec.os_label,
            machine.hostname,
            why.join("; ")
        ));
    }
    if let Some(layout) = spec.layout
        && !unchecked
        && let Err(why) = layout_fits(&machine, layout)
    {
        return fail(format!("layout {layout} does not fit {}: {why}", machine.hostname));
    }
    if !cx.data.contains_key("previous_state") {
        cx.set("previous_state", machine.state.as_str());
    }
    // The policy is the machine's at validation: an operator changing it
    // mid-job does not leave this job half one way, half the other.
    if !cx.data.contains_key("boot_policy") {
        cx.set("boot_policy", machine.boot_policy.as_str());
    }
    if spec.no_pxe {
        return Outcome::Next;
    }
    bmc(cx, BmcAction::Check).await
}

/// The machine takes the new OS's hostname (if the reimage gave one) and
/// is `deployed`. Renaming again to the same name changes nothing.
async fn finish<E: Effects>(cx: &mut StepCx<'_, E>, spec: &ReimageSpec) -> Outcome {
    let Some(id) = cx.job.machine_id else {
        return fail("the machine was deleted");
    };
    let machine = match cx.store.get_machine(&id.to_string(), None).await {
        Ok(m) => m,
        Err(e) => return retry(cx, format!("reading the machine failed: {e}")),
    };
    if machine.hostname != spec.hostname {
        let patch = kiln_types::machine::MachinePatch {
            hostname: Some(spec.hostname.clone()),
            ..Default::default()
        };
        let actor = kiln_store::Actor::new(format!("job {}", cx.job.id));
        if let Err(e) = cx
            .store
            .update_machine(&actor, &id.to_string(), patch, None, None)
            .await
        {
            return fail(format!(
                "renaming {} to {} failed: {e}",
                machine.hostname, spec.hostname
            ));
        }
        cx.log(
            JobLogKind::Note,
            format!("renamed {} to {}", machine.hostname, spec.hostname),
        );
    }
    cx.set_machine_state(MachineState::Deployed);
    Outcome::Next
}

/// The new OS phoned home: the machine now runs `spec`'s image, and its
/// record says so (what lists filter by). The image's name and version as
/// the catalog has them now; the job's own label if it was deleted since.
async fn record_installed_os<E: Effects>(cx: &mut StepCx<'_, E>, spec: &ReimageSpec) -> Outcome {
    let Some(id) = cx.job.machine_id else {
        return fail("the machine was deleted");
    };
    let image = match cx.store.get_os_image(&spec.os_image).await {
        Ok(i) => i,
        Err(StoreError::NotFound { .. }) => {
            cx.log(
                JobLogKind::Note,
                format!(
                    "{} was deleted from the catalog since: the machine's installed OS is not recorded",
                    spec.os_label
                ),
            );
            return Outcome::Next;
        }
        Err(e) => return retry(cx, format!("reading the OS image failed: {e}")),
    };
    let (name, version, sha256) = (image.name, image.version, image.sha256);
    let os = InstalledOs {
        os_image: image.id,
        name,
        version,
        sha256,
        job_id: cx.job.id,
        installed_at: cx.now,
    };
    let actor = kiln_store::Actor::new(format!("job {}", cx.job.id));
    match cx.store.record_installed_os(&actor, id, &os).await {
        Ok(_) => {
            cx.log(
                JobLogKind::Note,
                format!("{} now runs {} {}", cx.job.hostname, os.name, os.version),
            );
            Outcome::Next
        }
        Err(StoreError::NotFound { .. }) => fail("the machine was deleted"),
        Err(e) => retry(cx, format!("recording the installed OS failed: {e}")),
    }
}

async fn hooks<E: Effects>(cx: &mut StepCx<'_, E>, spec: &ReimageSpec, event: &'static str) -> Outcome {
    if spec.no_hooks {
        cx.log(JobLogKind::Note, "skipped: --no-hooks");
        return Outcome::Next;
    }
    if spec.new && event == "pre_reimage" {
        cx.log(
            JobLogKind::Note,
            "skipped: --new (the machine is in no monitoring or pool yet)",
        );
        return Outcome::Next;
    }
    match cx.effects.run_hooks(event, cx.job).await {
        Ok(lines) => {
            lines.into_iter().for_each(|l| cx.log(JobLogKind::Note, l));
            Outcome::Next
        }
        Err(why) => fail(why),
    }
}

async fn arm<E: Effects>(cx: &mut StepCx<'_, E>, spec: &ReimageSpec) -> Outcome {
    let Some(machine_id) = cx.job.machine_id else {
        return fail("the machine was deleted");
    };
    let image = match cx.store.get_os_image(&spec.os_image).await {
        Ok(i) => i,
        Err(e) => return fail(format!("OS image {}: {e}", spec.os_label)),
    };
    let machine = match cx.store.get_machine(&machine_id.to_string(), None).await {
        Ok(m) => m,
        Err(StoreError::NotFound { .. }) => return fail("the machine was deleted"),
        Err(e) => return retry(cx, format!("reading the machine failed: {e}")),
    };
    let plan = match cx.effects.netboot_plan(cx.job, spec, &image, &machine) {
        Ok(p) => p,
        Err(why) => return fail(why),
    };
    // Void by itself a while after the installer should have started, in
    // case nothing disarms it (the job is stuck, the store lost a write).
    let expires_at = cx.now + secs(cx.settings.reimage.installer_start_secs) + Duration::minutes(10);
    cx.arm(ArmRecord {
        machine_id,
        job_id: cx.job.id,
        kernel: plan.kernel,
        initrds: plan.initrds,
        cmdline: plan.cmdline,
        expires_at,
        consumed: false,
    });
    let was_deployed = cx.data.get("previous_state").and_then(|s| s.as_str()) == Some("deployed");
    cx.set_machine_state(if was_deployed {
        MachineState::Reimaging
    } else {
        MachineState::Deploying
    });
    cx.log(
        JobLogKind::Note,
        format!("armed until {}", expires_at.format("%H:%M:%S UTC")),
    );
    Outcome::Next
}

async fn bmc<E: Effects>(cx: &mut StepCx<'_, E>, action: BmcAction) -> Outcome {
    let Some(machine) = cx.job.machine_id else {
        return fail("the machine was deleted");
    };
    match cx.effects.bmc(machine, action).await {
        Ok(()) => Outcome::Next,
        Err(BmcError {
            message,
            retryable: true,
        }) => retry(cx, format!("BMC: {message}")),
        Err(BmcError { message, .. }) => fail(format!("BMC: {message}")),
    }
}

fn retry<E>(cx: &StepCx<'_, E>, reason: String) -> Outcome {
    Outcome::Retry {
        after: std::time::Duration::from_secs(cx.settings.reimage.bmc_retry_secs),
        reason,
    }
}

/// Next once `stage` was reported; else wait until the step's deadline,
/// then fail with `silent`.
fn wait_stage<E>(cx: &mut StepCx<'_, E>, stage: Stage, timeout_secs: u64, silent: &str) -> Outcome {
    if cx.job.stage >= stage {
        return Outcome::Next;
    }
    let deadline: DateTime<Utc> = cx.job.step_started_at + secs(timeout_secs);
    if cx.now >= deadline {
        return fail(format!(
            "no stage {stage} report within {}: {silent}",
            human(timeout_secs)
        ));
    }
    Outcome::Wait {
        until: deadline,
        reason: format!("waiting for stage {stage}"),
    }
}

fn human(secs: u64) -> String {
    match secs {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Leaves the machine safe after the job ended early: disarmed, booting its
/// disk, and in a state that says what happened. Idempotent.
pub async fn undo<E: Effects>(cx: &mut StepCx<'_, E>, ending: Ending) {
    let step = cx.job.step_index;
    let spec: Option<ReimageSpec> = serde_json::from_value(cx.job.spec.clone()).ok();
    let no_pxe = spec.as_ref().is_some_and(|s| s.no_pxe);
    if step >= index("arm") {
        cx.disarm();
    }
    // From the moment "next boot: network" may have been sent until the
    // disk was set back, the BMC may still point at the network.
    if !no_pxe
        && !always_netboot(cx)
        && (index("boot_network")..=index("boot_disk")).contains(&step)
        && let Some(machine) = cx.job.machine_id
        && let Err(e) = cx.effects.bmc(machine, BmcAction::BootDisk).await
    {
        cx.log(
            JobLogKind::Note,
            format!(
                "could not set the boot device back to disk ({}); the machine is disarmed, so a net boot \
                 still gets its local disk",
                e.message
            ),
        );
    }
    if step > index("arm") {
        let previous = cx
            .data
            .get("previous_state")
            .and_then(|s| s.as_str())
            .and_then(|s| s.parse::<MachineState>().ok());
        let disk_touched = cx.job.stage >= Stage::BASE_INSTALLED;
        cx.set_machine_state(match (ending, previous) {
            (Ending::Cancelled, Some(previous)) if !disk_touched => previous,
            _ => MachineState::Failed,
        });
    }
    // The failure hooks undo what the pre-reimage hooks did (a downtime, a
    // depool): for a cancelled job too, once those ran.
    let pre_hooks_ran = step > index("pre_hooks") || (ending == Ending::Failed && step == index("pre_hooks"));
    if pre_hooks_ran && !spec.as_ref().is_some_and(|s| s.no_hooks) {
        match cx.effects.run_hooks("failure", cx.job).await {
            Ok(lines) => lines.into_iter().for_each(|l| cx.log(JobLogKind::Note, l)),
            Err(why) => cx.log(JobLogKind::Note, format!("failure hook: {why}")),
        }
    }
}
