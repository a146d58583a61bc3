#!/usr/bin/env bash
# scripts/make-test-os-image.sh [options] OUT_DIR
#
# Builds the test OS: a small ext4 filesystem image of `/`, what kiln
# writes onto a layout's root volume (docs/agent.md, "Layout planning"), so
# that the end-to-end test reimages a VM with no internet. Writes
#   OUT_DIR/kiln-test-os.ext4          the image (raw ext4, 64 MiB)
#   OUT_DIR/kiln-test-os.ext4.sha256   its SHA-256, as `sha256sum` prints it
#
# What is in it (docs/ramdisk.md, "The test OS"):
#   /boot/vmlinuz, /boot/initrd.img  the ramdisk's kernel and the ramdisk
#       itself: its /init mounts root= (md RAID and LVM assembled first)
#   busybox (the ramdisk's own, taken out of the archive) with its applets
#   /sbin/init  prints "kiln-test-os: booted hostname=… serial=… uuid=…"
#       and "kiln-test-os: firmware: uefi" (or bios), runs DHCP, then a small subset of cloud-init's NoCloud on the
#       user-data kiln's agent wrote (/var/lib/cloud/seed/nocloud/user-data):
#       each `write_files` entry with `encoding: b64` is written to its path
#       with its permissions, then each `runcmd` entry of the form
#       `- [/absolute/path]` runs (kiln's firstboot.sh, which runs the job's
#       post-install script, reports stage 5 and calls the callback: its
#       lines start "kiln-firstboot:"); any other form is printed as
#       skipped. Then it stays up.
#
# Options:
#   --artifacts DIR   where `kiln ramdisk build` wrote vmlinuz and
#                     kiln-agent.cpio.gz (default /var/lib/kiln/artifacts)
#   --kernel FILE     the kernel (default DIR/vmlinuz)
#   --initrd FILE     the ramdisk (default DIR/kiln-agent.cpio.gz)
#   --user-data FILE  bake a NoCloud user-data into the image (for tests
#                     that boot it without kiln's agent)
#   --size-mib N      filesystem size (default 64)
#
# Needs mkfs.ext4 (e2fsprogs >= 1.43 for -d), sha256sum, gzip, and cpio or
# busybox to read the ramdisk. No root, no loop mounts, no network. The
# filesystem UUID is fixed (6b696c6e-7465-7374-2d6f-732d726f6f74, so
# root=UUID=… works); the image is not byte-for-byte reproducible, since
# mke2fs 1.47.0 stamps the current time on the superblock and inodes.
set -euo pipefail

die() { echo "make-test-os-image: $*" >&2; exit 1; }

artifacts=/var/lib/kiln/artifacts
kernel= initrd= user_data= size_mib=64 out=
while [[ $# -gt 0 ]]; do
    case $1 in
    --artifacts) artifacts=$2; shift 2 ;;
    --kernel) kernel=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --user-data) user_data=$2; shift 2 ;;
    --size-mib) size_mib=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (--help)" ;;
    *) [[ -z $out ]] || die "one OUT_DIR only"; out=$1; shift ;;
    esac
done
[[ -n $out ]] || die "usage: $0 [--artifacts DIR | --kernel F --initrd F] [--user-data F] OUT_DIR"
kernel=${kernel:-$artifacts/vmlinuz}
initrd=${initrd:-$artifacts/kiln-agent.cpio.gz}
[[ -f $kernel ]] || die "no kernel at $kernel (run kiln ramdisk build, or pass --kernel)"
[[ -f $initrd ]] || die "no ramdisk at $initrd (run kiln ramdisk build, or pass --initrd)"
[[ -z $user_data || -f $user_data ]] || die "no file $user_data"
command -v mkfs.ext4 >/dev/null || die "needs mkfs.ext4 (apt-get install e2fsprogs)"
if command -v cpio >/dev/null; then
    cpio=(cpio)
elif command -v busybox >/dev/null; then
    cpio=(busybox cpio)
else
    die "needs cpio or busybox to take busybox out of the ramdisk"
fi

t0=$(date +%s.%N)
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-test-os.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# busybox: the ramdisk's own (busybox-static, from the same Debian).
mkdir -p "$work/rd"
(cd "$work/rd" && gzip -dc "$initrd" | "${cpio[@]}" -id usr/bin/busybox 2>/dev/null) || true
[[ -x $work/rd/usr/bin/busybox ]] || die "$initrd has no usr/bin/busybox: not a kiln ramdisk?"

mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,boot,dev,proc,sys,run,tmp,root,etc,var/lib/cloud/seed/nocloud}
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
cp "$work/rd/usr/bin/busybox" "$root/usr/bin/busybox"
for applet in $("$root/usr/bin/busybox" --list-full); do
    case $applet in
    bin/* | sbin/*) applet=usr/$applet ;;
    esac
    [[ -e $root/$applet || $applet == usr/bin/busybox ]] || ln -s /usr/bin/busybox "$root/$applet"
done
cp "$kernel" "$root/boot/vmlinuz"
cp "$initrd" "$root/boot/initrd.img"
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
if [[ -n $user_data ]]; then
    cp "$user_data" "$root/var/lib/cloud/seed/nocloud/user-data"
fi
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"

cat >"$root/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc's hook: address and default route.
case "$1" in
deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
bound | renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "$interface $ip/${mask:-24}" >/run/test-os-net
    ;;
esac
exit 0
EOF
chmod 755 "$root/etc/udhcpc.script"

cat >"$root/sbin/init.sh" <<'EOF'
#!/bin/sh
# The test OS's init (busybox sh). Its console lines start "kiln-test-os:".
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# The initramfs moved /proc, /sys, /dev and /run here; busybox has no
# `mountpoint` applet in Debian's build, so /proc/mounts says what is there.
[ -e /proc/mounts ] || mount -t proc proc /proc
mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mounted /run || mount -t tmpfs -o mode=0755 tmpfs /run
mounted /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
# The bootloader mounts / read-only (`ro`), as for any OS: init makes it
# writable, as systemd does from fstab.
mount -o remount,rw /
exec </dev/console >/dev/console 2>&1
say() { echo "kiln-test-os: $*"; }

serial=$(cat /sys/class/dmi/id/product_serial 2>/dev/null)
uuid=$(cat /sys/class/dmi/id/product_uuid 2>/dev/null)
seed=/var/lib/cloud/seed/nocloud/user-data
host=$(cat /etc/hostname 2>/dev/null)
[ -n "$host" ] || host=$(sed -n 's/^hostname: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$seed" 2>/dev/null | head -n 1)
[ -n "$host" ] && hostname "$host"
say "booted hostname=${host:-(none)} serial=${serial:-(none)} uuid=${uuid:-(none)}"
# Which firmware booted it (the UEFI tests check it came up in UEFI mode).
if [ -d /sys/firmware/efi ]; then say "firmware: uefi"; else say "firmware: bios"; fi

# DHCP on every Ethernet NIC until one has a lease (up to ~20 s).
ip link set lo up
nics=
for d in /sys/class/net/*; do
    [ -e "$d/device" ] && [ "$(cat "$d/type")" = 1 ] && nics="$nics ${d##*/}"
done
lease=
if [ -z "$nics" ]; then
    say "no Ethernet NIC"
else
    for n in $nics; do ip link set "$n" up; done
    end=$(($(cut -d. -f1 /proc/uptime) + 20))
    while [ -z "$lease" ] && [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        for n in $nics; do
            if udhcpc -i "$n" -n -q -t 3 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1; then
                lease=$(cat /run/test-os-net)
                break
            fi
        done
    done
    if [ -n "$lease" ]; then say "network: $lease"; else say "no DHCP lease on$nics"; fi
fi

# A small, honest subset of cloud-init's NoCloud: the forms kiln-boot's
# user-data.yaml.j2 writes, and no others (anything else is named on the
# console as skipped, never half-done). Once per instance, as cloud-init:
# the marker is on the new disk, so each reimage runs it again.
#   write_files: each entry with `encoding: b64` (or base64) is decoded to
#       its absolute `path` (directories made), mode `permissions` (0644);
#   runcmd: each entry `- [/absolute/path]` (argv of one element, no
#       shell) runs in order, its output on the console.
# Values are plain or JSON-quoted scalars without escapes.
cloud_plan() {
    awk '
    function val(v) {
        sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
        if (v ~ /^".*"$/) v = substr(v, 2, length(v) - 2)
        return v
    }
    function flush() {
        if (!open) return
        if (path !~ /^\/[A-Za-z0-9\/._-]+$/) print "S|write_files entry with path `" path "`: not an absolute plain path"
        else if (enc != "b64" && enc != "base64") print "S|write_files " path ": encoding `" enc "` (only b64)"
        else if (perm !~ /^0?[0-7][0-7][0-7]$/) print "S|write_files " path ": permissions `" perm "`"
        else if (content !~ /^[A-Za-z0-9+\/=]*$/) print "S|write_files " path ": content is not base64 on one line"
        else print "F|" path "|" perm "|" content
        open = 0
    }
    /^[^ \t#-]/ { flush(); sec = $0; sub(/:.*/, "", sec); next }
    sec == "write_files" && /^  - / { flush(); open = 1; path = ""; perm = "0644"; enc = "(none)"; content = ""; sub(/^  - /, "    ") }
    sec == "write_files" && open && /^    [a-z_]+:/ {
        key = $0; sub(/^ +/, "", key); sub(/:.*/, "", key)
        v = $0; sub(/^ +[a-z_]+:/, "", v); v = val(v)
        if (key == "path") path = v
        else if (key == "permissions") perm = v
        else if (key == "encoding") enc = v
        else if (key == "content") content = v
        else print "S|write_files key `" key "` ignored"
        next
    }
    sec == "runcmd" && /^  - / {
        v = $0; sub(/^  - /, "", v); v = val(v)
        if (v ~ /^\[\/[A-Za-z0-9\/._-]+\]$/) print "R|" substr(v, 2, length(v) - 2)
        else print "S|runcmd entry `" v "`: only [/absolute/path]"
        next
    }
    END { flush() }
    ' "$1"
}
cloud_init() {
    if [ ! -f "$seed" ]; then
        say "no user-data at $seed: nothing to run"
        return
    fi
    marker=/var/lib/cloud/kiln-test-os.done
    [ -f $marker ] && { say "cloud-init: already ran on an earlier boot"; return; }
    cloud_plan "$seed" >/run/cloud-plan
    while IFS='|' read -r kind a b c; do
        case $kind in
        F)
            mkdir -p "${a%/*}"
            if printf '%s' "$c" | base64 -d >"$a" && chmod "$b" "$a"; then
                say "write_files: $a ($b)"
            else
                say "write_files: $a: could not write it"
            fi
            ;;
        S) say "cloud-init: skipped $a" ;;
        esac
    done </run/cloud-plan
    while IFS='|' read -r kind a; do
        [ "$kind" = R ] || continue
        say "runcmd: $a"
        "$a" </dev/null
        say "runcmd: $a exit $?"
    done </run/cloud-plan
    mkdir -p /var/lib/cloud
    : >$marker
    sync
}
cloud_init
say "up (sleeping; power off through the BMC)"
while :; do sleep 3600; done
EOF
chmod 755 "$root/sbin/init.sh"
mv "$root/sbin/init.sh" "$root/usr/sbin/init"

find "$root" -exec touch -h -d @0 {} +
img=$out/kiln-test-os.ext4
rm -f "$img.tmp"
mkfs.ext4 -q -F -t ext4 -L kiln-test-os \
    -U 6b696c6e-7465-7374-2d6f-732d726f6f74 \
    -E root_owner=0:0,hash_seed=6b696c6e-0000-4000-8000-000000000001 \
    -d "$root" "$img.tmp" "${size_mib}M" >/dev/null ||
    die "mkfs.ext4 -d failed (e2fsprogs 1.43 or newer is needed)"
mv "$img.tmp" "$img"
(cd "$out" && sha256sum kiln-test-os.ext4 >kiln-test-os.ext4.sha256)
echo "$img  $(stat -c %s "$img") bytes  sha256 $(cut -d' ' -f1 "$img.sha256")"
echo "built in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
