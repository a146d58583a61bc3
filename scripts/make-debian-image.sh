#!/usr/bin/env bash
# scripts/make-debian-image.sh [--cache DIR] [--print-dir]
#
# Builds a real Debian 12 (bookworm) whole-disk image from Debian's own
# packages, the kind of image Debian, Ubuntu and Rocky publish for clouds:
# a GPT disk with its own partition table and bootloader, cloud-init inside.
# kiln's agent streams it onto a machine's system disk and hands the new OS
# its configuration on a CIDATA (NoCloud) filesystem (docs/images.md). Nothing
# kiln-specific is in it: the test's stage 5 comes from the user-data kiln
# serves, run by cloud-init itself.
#
# The disk (1 GiB, raw, GPT):
#   1  BIOS boot  1 MiB        GRUB's core.img for SeaBIOS / legacy boot
#   2  ESP        32 MiB vfat  \EFI\BOOT\BOOTX64.EFI (the removable path that
#                              UEFI firmware boots with no NVRAM entry) and
#                              \EFI\debian\grubx64.efi
#   3  root       ext4, the rest; label "debian-root", a fixed UUID
# GRUB (both) finds the root filesystem by UUID and reads /boot/grub/grub.cfg
# there; the kernel command line has console=ttyS0 so that tests read the
# boot on the serial console. cloud-init's growpart and resize_rootfs are
# on (Debian's defaults), so the root filesystem grows to its partition on
# first boot; kiln's agent grows the partition itself (docs/images.md).
#
# Documentation, manual pages and translations are left out (dpkg
# path-exclude, as Debian's own minimal images do), about 60 MiB.
#
# Packages: linux-image-cloud-amd64, systemd-sysv, cloud-init,
# cloud-guest-utils, ifupdown + isc-dhcp-client (cloud-init's network
# renderer on Debian 12), curl, grub-pc-bin, grub-efi-amd64-bin.
#
# Output, in the cache directory (default /var/cache/kiln-test/debian-12-HASH,
# HASH = the first 12 hex digits of this script's SHA-256, so a changed script
# builds afresh and an unchanged one is built once per machine):
#   debian-12.raw            the disk, raw (sparse on the host)
#   debian-12.qcow2          the same disk as qcow2 (what tests serve: the
#                            zeros are not sent)
#   debian-12.{raw,qcow2}.sha256
#   build-info               build seconds and sizes
# --print-dir prints that directory (building first if needed) and nothing
# else on stdout.
#
# Needs root (mmdebstrap in root mode, chroot), mmdebstrap, sgdisk,
# mkfs.ext4 (-d), mkfs.vfat, mtools, qemu-img, and apt access to
# deb.debian.org. No loop devices (containers often have no partition
# scanning on loops): the filesystems are made as files and placed with dd,
# and GRUB's BIOS boot sector is set up here the way grub-bios-setup would.
set -euo pipefail

die() { echo "make-debian-image: $*" >&2; exit 1; }
log() { echo "make-debian-image: $*" >&2; }

script_hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
cache=/var/cache/kiln-test
print_dir=0
while [[ $# -gt 0 ]]; do
    case $1 in
    --cache) cache=$2; shift 2 ;;
    --print-dir) print_dir=1; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (--help)" ;;
    esac
done
out=$cache/debian-12-$script_hash
if [[ -f $out/build-info ]]; then
    log "cached: $out"
    [[ $print_dir == 1 ]] && echo "$out"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "needs root (mmdebstrap's root mode and chroot)"
for tool in mmdebstrap sgdisk mkfs.ext4 mkfs.vfat mcopy mmd qemu-img; do
    command -v $tool >/dev/null || die "needs $tool (apt-get install mmdebstrap gdisk e2fsprogs dosfstools mtools qemu-utils)"
done

t0=$(date +%s)
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# Fixed identities, so GRUB's and fstab's references are known before the
# filesystems exist.
root_uuid=4b696c6e-4465-6269-616e-31322d726f6f
esp_id=4B4C4E45   # vfat volume id, written as 4B4C-4E45
esp_uuid=4B4C-4E45

log "mmdebstrap bookworm into $root"
mmdebstrap --mode=root --variant=minbase \
    --components=main \
    --include=linux-image-cloud-amd64,systemd-sysv,udev,dbus,cloud-init,cloud-guest-utils,ifupdown,isc-dhcp-client,iproute2,curl,ca-certificates,grub-pc-bin,grub-efi-amd64-bin,grub-common,e2fsprogs,procps \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='echo debian > "$1/etc/hostname"' \
    bookworm "$root" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >&2

kver=$(ls "$root/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -n1)
[[ -n $kver ]] || die "no kernel in $root/boot"

cat >"$root/etc/fstab" <<EOF
UUID=$root_uuid / ext4 errors=remount-ro 0 1
UUID=$esp_uuid /boot/efi vfat umask=0077 0 2
EOF
mkdir -p "$root/boot/efi"
# Debian's cloud images: the NoCloud, ConfigDrive and None datasources are
# what matters here; listing NoCloud first saves cloud-init probing clouds.
cat >"$root/etc/cloud/cloud.cfg.d/01_datasources.cfg" <<'EOF'
datasource_list: [ NoCloud, ConfigDrive, None ]
EOF
# ifupdown's interfaces file: cloud-init writes its own in interfaces.d.
cat >"$root/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
EOF

# GRUB's menu, by hand: grub-mkconfig probes the devices of a mounted root,
# which a directory has none of. /vmlinuz and /initrd.img are the symlinks
# Debian's kernel package keeps to the newest kernel.
mkdir -p "$root/boot/grub"
kernel=/boot/vmlinuz-$kver initrd=/boot/initrd.img-$kver
[[ -e $root/vmlinuz ]] && kernel=/vmlinuz
[[ -e $root/initrd.img ]] && initrd=/initrd.img
cat >"$root/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=1
search --no-floppy --fs-uuid --set=root $root_uuid
menuentry 'Debian GNU/Linux 12' {
    linux $kernel root=UUID=$root_uuid ro console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200
    initrd $initrd
}
EOF
early=$work/early.cfg
cat >"$early" <<EOF
search --no-floppy --fs-uuid --set=root $root_uuid
set prefix=(\$root)/boot/grub
configfile \$prefix/grub.cfg
EOF
# Every module GRUB needs is built into its image, so no module directory
# has to be found at boot.
mods="part_gpt part_msdos ext2 fat search search_fs_uuid normal linux configfile echo gzio serial terminal terminfo test"
chroot "$root" true
cp "$early" "$root/tmp/early.cfg"
chroot "$root" grub-mkimage -O x86_64-efi -o /tmp/grubx64.efi -p /boot/grub -c /tmp/early.cfg \
    $mods efi_gop efi_uga all_video
chroot "$root" grub-mkimage -O i386-pc -o /tmp/core.img -p /boot/grub -c /tmp/early.cfg \
    $mods biosdisk
cp "$root/tmp/grubx64.efi" "$root/tmp/core.img" "$root/usr/lib/grub/i386-pc/boot.img" "$work/"
rm -f "$root/tmp/grubx64.efi" "$root/tmp/core.img" "$root/tmp/early.cfg"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*_Packages

# Sizes (MiB): the root filesystem gets its content plus 25% and 128 MiB.
used=$(du -sm --apparent-size "$root" | cut -f1)
root_mib=$((used + used / 4 + 128))
esp_mib=32
disk_mib=$((1 + 1 + esp_mib + root_mib + 1))   # 1 MiB alignment + backup GPT
log "root content ${used} MiB, root filesystem ${root_mib} MiB, disk ${disk_mib} MiB"

mkfs.ext4 -q -L debian-root -U "$root_uuid" -d "$root" "$work/root.ext4" "${root_mib}M"
truncate -s "${esp_mib}M" "$work/esp.vfat"
mkfs.vfat -n ESP -i "$esp_id" "$work/esp.vfat" >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$work/esp.vfat" ::/EFI ::/EFI/BOOT ::/EFI/debian
mcopy -i "$work/esp.vfat" "$work/grubx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$work/esp.vfat" "$work/grubx64.efi" ::/EFI/debian/grubx64.efi

disk=$work/debian-12.raw
truncate -s "${disk_mib}M" "$disk"
# Sectors of 512 bytes; 2048 per MiB.
bios_start=2048
esp_start=$((2 * 2048))
root_start=$(((2 + esp_mib) * 2048))
sgdisk -Z "$disk" >/dev/null
sgdisk -n "1:$bios_start:+1M" -t 1:EF02 -c 1:bios \
    -n "2:$esp_start:+${esp_mib}M" -t 2:EF00 -c 2:esp \
    -n "3:$root_start:+${root_mib}M" -t 3:8304 -c 3:root "$disk" >/dev/null
dd if="$work/esp.vfat" of="$disk" bs=1M seek=2 conv=notrunc,sparse status=none
dd if="$work/root.ext4" of="$disk" bs=1M seek=$((2 + esp_mib)) conv=notrunc,sparse status=none

# GRUB for BIOS, as grub-bios-setup does it for a core.img embedded in a
# BIOS boot partition (grub-core/util/setup.c):
#  - boot.img's first 440 bytes into the MBR (the protective MBR's disk
#    signature and partition table stay), with the LBA of core.img's first
#    sector at 0x5c and the floppy drive check (0x66) replaced by two NOPs;
#  - core.img at the partition's start, its first sector (diskboot.img)
#    holding a one-entry block list at 0x1f4: the LBA of the rest, its
#    sector count, and the load segment 0x820 (left as built).
core_bytes=$(stat -c %s "$work/core.img")
core_sectors=$(((core_bytes + 511) / 512))
((core_sectors <= 2048)) || die "core.img is $core_bytes bytes, more than the 1 MiB BIOS boot partition"
le() { # le VALUE BYTES: VALUE as BYTES little-endian bytes
    local v=$1 n=$2 i out=
    for ((i = 0; i < n; i++)); do out+=$(printf '\\x%02x' $(((v >> (8 * i)) & 255))); done
    printf "$out"
}
dd if="$work/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
le "$bios_start" 8 | dd of="$disk" bs=1 seek=$((0x5c)) conv=notrunc status=none
printf '\x90\x90' | dd of="$disk" bs=1 seek=$((0x66)) conv=notrunc status=none
dd if="$work/core.img" of="$disk" bs=512 seek="$bios_start" conv=notrunc status=none
le $((bios_start + 1)) 8 | dd of="$disk" bs=1 seek=$((bios_start * 512 + 0x1f4)) conv=notrunc status=none
le $((core_sectors - 1)) 2 | dd of="$disk" bs=1 seek=$((bios_start * 512 + 0x1fc)) conv=notrunc status=none
sgdisk -v "$disk" >/dev/null || die "sgdisk -v finds the built disk's GPT broken"

qemu-img convert -f raw -O qcow2 "$disk" "$work/debian-12.qcow2"
rm -f "$work/root.ext4" "$work/esp.vfat" "$work/core.img" "$work/boot.img" "$work/grubx64.efi" "$work/early.cfg"
(cd "$work" && sha256sum debian-12.raw >debian-12.raw.sha256 && sha256sum debian-12.qcow2 >debian-12.qcow2.sha256)
t1=$(date +%s)
{
    echo "built=$(date -u +%FT%TZ)"
    echo "seconds=$((t1 - t0))"
    echo "kernel=$kver"
    echo "raw_bytes=$(stat -c %s "$disk")"
    echo "raw_allocated_bytes=$(($(stat -c %b "$disk") * $(stat -c %B "$disk")))"
    echo "qcow2_bytes=$(stat -c %s "$work/debian-12.qcow2")"
    echo "root_uuid=$root_uuid"
} >"$work/build-info"
rm -rf "$root"
mv "$work" "$out"
trap - EXIT
chmod 755 "$out"
log "built $out in $((t1 - t0)) s:"
sed 's/^/  /' "$out/build-info" >&2
[[ $print_dir == 1 ]] && echo "$out"
exit 0
