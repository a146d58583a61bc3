//! The boot decision (DESIGN.md, "The boot decision"): every DHCP, TFTP and
//! HTTP boot request is answered from `decide`, so a machine gets an
//! installer only while a job has armed it, and boots its disk otherwise.
//!
//! The machine's boot policy changes why it asks, not what it is told: a
//! `disk` machine net-boots only when a job set its next boot to the
//! network (or by accident), an `always-netboot` one on every boot, so for
//! it the local-disk answer is the normal way to its installed OS. Either
//! way an install is answered only while armed.

use chrono::{DateTime, Utc};
use kiln_types::machine::{BootPolicy as MachineBootPolicy, Machine, MachineState};
use kiln_types::{MachineId, Secret};
use serde::Serialize;

/// What a job armed for one machine's next net boot: the kernel, initrd and
/// command line of its installer or deploy agent, and the one-time token
/// that agent reports with. It exists only between "next boot: network" and
/// "installer started"; the job disarms it then, or when it fails or is
/// cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetbootArm {
    pub job_id: String,
    pub machine_id: MachineId,
    pub token: Secret,
    pub kernel: String,
    pub initrds: Vec<String>,
    /// Kernel arguments; checked again when rendered (`ipxe::check_arg`).
    pub cmdline: Vec<String>,
    /// After this the arm is void even if nobody disarmed it.
    pub expires_at: DateTime<Utc>,
    /// The installer or agent has started (stage 1): net boot is over.
    pub consumed: bool,
}

/// The configuration the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPolicy {
    /// Answer unknown machines (and known ones never discovered) with the
    /// discovery agent. Off: unknown machines get no answer at all, so
    /// another DHCP server on the segment may serve them.
    pub discovery: bool,
}

/// What the machine is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum BootAnswer {
    /// Stay silent: not ours.
    NoAnswer { reason: String },
    /// Boot the agent in discovery mode (inventory, then power off; it
    /// writes nothing to disk).
    Discovery { reason: String },
    /// Boot this job's installer or deploy agent.
    Install {
        job_id: String,
        #[serde(skip)]
        token: Secret,
        kernel: String,
        initrds: Vec<String>,
        cmdline: Vec<String>,
        reason: String,
    },
    /// Boot from the local disk: never an installer.
    LocalDisk { reason: String },
}

impl BootAnswer {
    pub fn reason(&self) -> &str {
        match self {
            BootAnswer::NoAnswer { reason }
            | BootAnswer::Discovery { reason }
            | BootAnswer::Install { reason, .. }
            | BootAnswer::LocalDisk { reason } => reason,
        }
    }
}

/// The decision. `arm` is the armed job of `machine`, if any; an arm for
/// another machine is ignored (and said so).
pub fn decide(
    machine: Option<&Machine>,
    arm: Option<&NetbootArm>,
    policy: BootPolicy,
    now: DateTime<Utc>,
) -> BootAnswer {
    let Some(m) = machine else {
        return if policy.discovery {
            BootAnswer::Discovery {
                reason: "unknown machine, discovery is on".into(),
            }
        } else {
            BootAnswer::NoAnswer {
                reason: "unknown machine, discovery is off".into(),
            }
        };
    };
    let disk = |why: String| BootAnswer::LocalDisk {
        reason: format!("{}: {why}", m.hostname),
    };
    // A swapped server (issue 15): the port showed another MAC, and until an
    // operator confirms it nothing is installed on it, armed or not.
    if let Some(alert) = &m.port_alert {
        return disk(alert.reason());
    }
    if let Some(arm) = arm {
        if arm.machine_id != m.id {
            return disk(format!("job {} is armed for another machine", arm.job_id));
        }
        if m.protected {
            return disk(format!(
                "protected: job {} is armed but a protected machine is never reinstalled",
                arm.job_id
            ));
        }
        if m.maintenance {
            return disk(format!("in maintenance: job {} is armed but waits", arm.job_id));
        }
        if arm.consumed {
            return disk(format!("job {} already started its installer", arm.job_id));
        }
        if now >= arm.expires_at {
            return disk(format!(
                "job {} was armed until {}",
                arm.job_id,
                arm.expires_at.format("%Y-%m-%d %H:%M:%S UTC")
            ));
        }
        return BootAnswer::Install {
            job_id: arm.job_id.clone(),
            token: arm.token.clone(),
            kernel: arm.kernel.clone(),
            initrds: arm.initrds.clone(),
            cmdline: arm.cmdline.clone(),
            reason: format!("{}: job {} is armed for net boot", m.hostname, arm.job_id),
        };
    }
    match m.state {
        // An owned machine is never changed by discovery (its report would
        // be refused), so it is not booted into the agent either.
        MachineState::New | MachineState::Discovering
            if policy.discovery && !m.protected && !m.maintenance && m.owner.is_none() =>
        {
            BootAnswer::Discovery {
                reason: format!("{}: {} and not yet discovered, discovery is on", m.hostname, m.state),
            }
        }
        state => match m.boot_policy {
            MachineBootPolicy::AlwaysNetboot => disk(format!(
                "{state}, always-netboot and no job armed: kiln's answer is its local disk"
            )),
            MachineBootPolicy::Disk => disk(format!("{state}, no job armed for net boot")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn machine(state: MachineState) -> Machine {
        Machine::sketch("m1", kiln_types::machine::MachineKind::Physical, state)
    }

    fn arm(for_machine: MachineId, now: DateTime<Utc>) -> NetbootArm {
        NetbootArm {
            job_id: "job-1".into(),
            machine_id: for_machine,
            token: Secret::new("one-time"),
            kernel: "http://kiln/a/vmlinuz".into(),
            initrds: vec!["http://kiln/a/initrd".into()],
            cmdline: vec!["console=ttyS0".into()],
            expires_at: now + Duration::minutes(30),
            consumed: false,
        }
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        Silent,
        Discovery,
        Install,
        Disk,
    }

    fn kind(a: &BootAnswer) -> Want {
        match a {
            BootAnswer::NoAnswer { .. } => Want::Silent,
            BootAnswer::Discovery { .. } => Want::Discovery,
            BootAnswer::Install { .. } => Want::Install,
            BootAnswer::LocalDisk { .. } => Want::Disk,
        }
    }

    #[test]
    fn every_row_of_the_table() {
        let now = Utc::now();
        let on = BootPolicy { discovery: true };
        let off = BootPolicy { discovery: false };
        let deployed = machine(MachineState::Deployed);
        let ready = machine(MachineState::Ready);
        let new = machine(MachineState::New);
        let failed = machine(MachineState::Failed);
        let mut owned_discovering = machine(MachineState::Discovering);
        owned_discovering.owner = Some("acme".into());
        let mut protected = machine(MachineState::Reimaging);
        protected.protected = true;
        let mut maint = machine(MachineState::Reimaging);
        maint.maintenance = true;
        let reimaging = machine(MachineState::Reimaging);
        let live = arm(reimaging.id, now);
        let mut consumed = arm(reimaging.id, now);
        consumed.consumed = true;
        let mut expired = arm(reimaging.id, now);
        expired.expires_at = now - Duration::seconds(1);
        let foreign = arm(MachineId::new(), now);
        // Issue 15: a port that showed another MAC is never installed.
        let alert = kiln_types::machine::PortAlert {
            circuit_id: Some("ge-0/0/1".into()),
            remote_id: None,
            recorded_mac: "52:54:00:15:00:01".parse().unwrap(),
            seen_mac: "52:54:00:15:00:02".parse().unwrap(),
            seen_at: now,
        };
        let mut swapped = machine(MachineState::Reimaging);
        swapped.port_alert = Some(alert.clone());
        let swapped_arm = arm(swapped.id, now);
        let mut swapped_new = machine(MachineState::New);
        swapped_new.port_alert = Some(alert);
        let protected_arm = arm(protected.id, now);
        let maint_arm = arm(maint.id, now);

        type Row<'a> = (&'a str, Option<&'a Machine>, Option<&'a NetbootArm>, BootPolicy, Want);
        let rows: Vec<Row> = vec![
            ("unknown MAC, discovery off", None, None, off, Want::Silent),
            ("unknown MAC, discovery on", None, None, on, Want::Discovery),
            (
                "deployed machine PXE-boots by accident",
                Some(&deployed),
                None,
                on,
                Want::Disk,
            ),
            (
                "deployed machine, discovery off",
                Some(&deployed),
                None,
                off,
                Want::Disk,
            ),
            ("ready machine without a job", Some(&ready), None, on, Want::Disk),
            ("failed machine", Some(&failed), None, on, Want::Disk),
            (
                "enrolled, never discovered, discovery on",
                Some(&new),
                None,
                on,
                Want::Discovery,
            ),
            (
                "a tenant's machine, discovering: never the agent",
                Some(&owned_discovering),
                None,
                on,
                Want::Disk,
            ),
            (
                "enrolled, never discovered, discovery off",
                Some(&new),
                None,
                off,
                Want::Disk,
            ),
            (
                "armed job waiting for its net boot",
                Some(&reimaging),
                Some(&live),
                off,
                Want::Install,
            ),
            (
                "installer already started",
                Some(&reimaging),
                Some(&consumed),
                on,
                Want::Disk,
            ),
            ("arm expired", Some(&reimaging), Some(&expired), on, Want::Disk),
            (
                "arm for another machine",
                Some(&reimaging),
                Some(&foreign),
                on,
                Want::Disk,
            ),
            (
                "protected machine with an arm",
                Some(&protected),
                Some(&protected_arm),
                on,
                Want::Disk,
            ),
            (
                "machine in maintenance with an arm",
                Some(&maint),
                Some(&maint_arm),
                on,
                Want::Disk,
            ),
            (
                "port flagged (swapped server) with an arm",
                Some(&swapped),
                Some(&swapped_arm),
                on,
                Want::Disk,
            ),
            (
                "port flagged, never discovered: no agent either",
                Some(&swapped_new),
                None,
                on,
                Want::Disk,
            ),
        ];
        for (name, m, a, policy, want) in rows {
            let got = decide(m, a, policy, now);
            assert_eq!(kind(&got), want, "{name}: {got:?}");
            assert!(!got.reason().is_empty(), "{name}: no reason");
        }
    }

    /// Seed 004: an always-netboot machine asks kiln on every boot and is
    /// told its disk unless an install is armed — never an installer
    /// otherwise, in any state.
    #[test]
    fn an_always_netboot_machine_boots_its_disk_unless_armed() {
        let now = Utc::now();
        let on = BootPolicy { discovery: true };
        for state in MachineState::ALL.iter().copied() {
            let mut m = machine(state);
            m.boot_policy = MachineBootPolicy::AlwaysNetboot;
            let got = decide(Some(&m), None, on, now);
            let want = if matches!(state, MachineState::New | MachineState::Discovering) {
                Want::Discovery
            } else {
                Want::Disk
            };
            assert_eq!(kind(&got), want, "{state}: {got:?}");
            if want == Want::Disk {
                assert!(got.reason().contains("always-netboot"), "{}", got.reason());
            }
            let live = arm(m.id, now);
            assert_eq!(kind(&decide(Some(&m), Some(&live), on, now)), Want::Install, "{state}");
            let mut consumed = arm(m.id, now);
            consumed.consumed = true;
            assert_eq!(kind(&decide(Some(&m), Some(&consumed), on, now)), Want::Disk, "{state}");
        }
        // The disk policy's answer says why it is asked at all.
        let got = decide(Some(&machine(MachineState::Deployed)), None, on, now);
        assert!(!got.reason().contains("always-netboot"), "{}", got.reason());
    }

    #[test]
    fn install_carries_the_job_and_its_token() {
        let now = Utc::now();
        let m = machine(MachineState::Reimaging);
        let a = arm(m.id, now);
        match decide(Some(&m), Some(&a), BootPolicy { discovery: false }, now) {
            BootAnswer::Install {
                job_id, token, kernel, ..
            } => {
                assert_eq!(job_id, "job-1");
                assert_eq!(token.expose(), "one-time");
                assert_eq!(kernel, "http://kiln/a/vmlinuz");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_token_is_not_serialized() {
        let now = Utc::now();
        let m = machine(MachineState::Reimaging);
        let a = arm(m.id, now);
        let json = serde_json::to_string(&decide(Some(&m), Some(&a), BootPolicy { discovery: false }, now)).unwrap();
        assert!(!json.contains("one-time"), "{json}");
        assert!(json.contains("\"answer\":\"install\""), "{json}");
    }
}
