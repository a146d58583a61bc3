#!/bin/sh
# /init of kiln's ramdisk (busybox sh). Written into the archive by
# `kiln ramdisk build`; the contract is in docs/ramdisk.md.
#
#   kiln.mode=…  bring up the network (BOOTIF= picks the NIC), run
#                /bin/kiln-agent run; its exit code decides:
#                0 power off, 10 reboot, anything else power off after 10 s
#   root=…       assemble md RAID, activate LVM, mount root= on /newroot,
#                switch_root to ${init:-/sbin/init} (the test OS's initrd)
#   neither      print the command line and power off
#
# Every line on the console starts with "kiln-init:".

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# lvm and dmsetup: there is no udev here to make device nodes.
export DM_DISABLE_UDEV=1
# The agent's children may inherit descriptors; lvm would warn on each.
export LVM_SUPPRESS_FD_WARNINGS=1

mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p /run/lvm /run/lock/lvm /run/mdadm
exec </dev/console >/dev/console 2>&1

say() { echo "kiln-init: $*"; }

# The value of a kernel command line word KEY=VALUE (the last one wins).
# set -f: a `*` on the command line must not expand to file names.
arg() {
    set -f
    v=
    for w in $CMDLINE; do
        case "$w" in "$1="*) v="${w#*=}" ;; esac
    done
    set +f
    echo "$v"
}
has_arg() {
    set -f
    found=1
    for w in $CMDLINE; do
        case "$w" in "$1="*) found=0 ;; esac
    done
    set +f
    return $found
}

# Power off (or reboot) for good, whatever else happens.
finish() {
    sync
    case "$1" in
    reboot) say "rebooting"; reboot -f ;;
    *) say "powering off"; poweroff -f ;;
    esac
    sleep 5
    echo o >/proc/sysrq-trigger
    while :; do sleep 60; done
}

# A failure: on a console someone types at, Enter within 10 s gives a
# shell; otherwise (no one there, or the shell exits) power off.
fail() {
    say "$*"
    say "press Enter within 10 s for a shell; powering off otherwise"
    if read -t 10 _ 2>/dev/null; then
        setsid cttyhack sh
    fi
    finish poweroff
}

CMDLINE=$(cat /proc/cmdline)
say "started, kernel $(uname -r)"

# Modules: the list the build put in, each with its dependencies; a
# module this machine has no hardware for loads and stays idle, one that
# is missing or fails (ipmi_si without a BMC) is skipped quietly.
n=0
for m in $(cat /etc/kiln/modules); do
    modprobe -q "$m" 2>/dev/null && n=$((n + 1))
done
say "modules loaded: $n of $(wc -l </etc/kiln/modules) ($(cut -d' ' -f1 /proc/modules | wc -l) in the kernel)"

# UEFI variables, for efibootmgr (the agent's NVRAM boot entry): only on
# UEFI firmware, and only if the kernel did not mount them itself.
if [ -d /sys/firmware/efi/efivars ] && ! grep -q " /sys/firmware/efi/efivars " /proc/mounts; then
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null ||
        say "cannot mount efivarfs: no NVRAM boot entry will be written"
fi

ip link set lo up 2>/dev/null

# MAC from BOOTIF= (52:54:00:aa:bb:cc or pxelinux's 01-52-54-00-aa-bb-cc),
# lowercase with colons; empty if not given.
bootif_mac() {
    b=$(arg BOOTIF | tr 'A-F-' 'a-f:')
    case "$b" in
    01:??:??:??:??:??:??) echo "${b#01:}" ;;
    ??:??:??:??:??:??) echo "$b" ;;
    esac
}

# The Ethernet NICs to try: the BOOTIF one, else all of them.
nics() {
    want=$(bootif_mac)
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] && continue
        [ -e "$d/device" ] || continue               # virtual
        [ "$(cat "$d/type" 2>/dev/null)" = 1 ] || continue  # not Ethernet
        if [ -n "$want" ]; then
            [ "$(cat "$d/address")" = "$want" ] && echo "$n"
        else
            echo "$n"
        fi
    done
}

# DHCP on the NICs until one has a lease, for up to ~20 s.
network() {
    want=$(bootif_mac)
    list=
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        list=$(nics)
        [ -n "$list" ] && break
        sleep 0.5
    done
    if [ -z "$list" ]; then
        if [ -n "$want" ]; then say "no NIC with BOOTIF's MAC $want"; else say "no Ethernet NIC found"; fi
        return 1
    fi
    for n in $list; do ip link set "$n" up; done
    say "dhcp on $(echo $list) ${want:+(BOOTIF $want)}"
    end=$(($(cut -d. -f1 /proc/uptime) + 20))
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        for n in $list; do
            # -n: give up rather than go to the background; -q: exit once
            # bound (the lease outlives the ramdisk's few minutes).
            if udhcpc -i "$n" -n -q -t 3 -T 1 -s /etc/kiln/udhcpc.script >/tmp/udhcpc.log 2>&1; then
                say "dhcp on $n: $(cat /run/kiln-net 2>/dev/null)"
                return 0
            fi
        done
    done
    say "no DHCP lease on $(echo $list) within 20 s"
    return 1
}

if has_arg kiln.mode; then
    say "kiln.mode=$(arg kiln.mode)"
    network || say "continuing without a network: the agent will say what it cannot reach"
    say "running kiln-agent"
    /bin/kiln-agent run
    rc=$?
    case $rc in
    0) say "kiln-agent done"; finish poweroff ;;
    10) say "kiln-agent asks for a reboot"; finish reboot ;;
    *)
        say "kiln-agent failed (exit $rc); powering off in 10 s"
        sleep 10
        finish poweroff
        ;;
    esac
fi

if has_arg root; then
    root=$(arg root)
    fstype=$(arg rootfstype)
    say "root=$root"
    if mdadm --assemble --scan >/tmp/mdadm.log 2>&1; then
        say "md: $(grep -c '^md' /proc/mdstat) array(s) running"
    fi
    lvm vgchange -ay --sysinit >/tmp/lvm.log 2>&1
    vgs=$(grep -c 'now active' /tmp/lvm.log)
    [ "$vgs" -gt 0 ] && say "lvm: $vgs volume group(s) active"
    dev=
    end=$(($(cut -d. -f1 /proc/uptime) + 10))
    degraded=
    while :; do
        case "$root" in
        UUID=* | LABEL=*) dev=$(blkid -l -o device -t "$root" 2>/dev/null) ;;
        /dev/*) [ -b "$root" ] && dev=$root ;;
        *) fail "root=$root: expected /dev/…, UUID=… or LABEL=…" ;;
        esac
        [ -n "$dev" ] && break
        if [ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ]; then
            fail "root device $root did not appear within 10 s (block devices: $(ls /sys/class/block | tr '\n' ' '))"
        fi
        sleep 0.5
        # A disk that came late may hold arrays or volumes.
        mdadm --assemble --scan >/dev/null 2>&1
        # A mirror with a disk gone is assembled but not started (mdadm
        # waits for the missing half). After 3 s start what is there, as
        # Debian's initramfs does, so the machine boots with either disk
        # of a mirrored layout gone.
        if [ -z "$degraded" ] && [ "$(cut -d. -f1 /proc/uptime)" -ge $((end - 7)) ]; then
            degraded=1
            for md in /dev/md[0-9]* /dev/md/*; do
                [ -b "$md" ] || continue
                md=$(readlink -f "$md")
                grep -q "^${md##*/} : inactive" /proc/mdstat 2>/dev/null || continue
                mdadm --run "$md" >/dev/null 2>&1 && say "md: $md started degraded"
            done
        fi
        lvm vgchange -ay --sysinit >/dev/null 2>&1
    done
    mkdir -p /newroot
    ro=-w
    set -f
    for w in $CMDLINE; do [ "$w" = ro ] && ro=-r; done
    set +f
    if ! mount $ro -t "${fstype:-ext4}" "$dev" /newroot; then
        fail "cannot mount $dev (${fstype:-ext4}) on /newroot"
    fi
    init=$(arg init)
    init=${init:-/sbin/init}
    if [ ! -x "/newroot$init" ] && [ ! -L "/newroot$init" ]; then
        umount /newroot
        fail "$dev has no $init"
    fi
    say "switching to $dev ($init)"
    umount /tmp 2>/dev/null
    for d in dev proc sys run; do
        mkdir -p "/newroot/$d"
        mount --move "/$d" "/newroot/$d"
    done
    exec switch_root /newroot "$init"
fi

say "no kiln.mode= and no root= on the command line: $CMDLINE"
finish poweroff
