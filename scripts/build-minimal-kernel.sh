#!/usr/bin/env bash
# Builds the minimal guest kernel that docs/images.md compares with Debian's: Debian's
# linux-source-6.1 with images/kernel/minimal-6.1.config (virtio only, no modules). Not part
# of set-up or CI (kiln boots Debian's kernel); this reproduces the comparison.
#
#   bash scripts/build-minimal-kernel.sh [OUT_DIR]     # default /var/tmp/kiln-minimal-kernel
#
# Prints the compile time and the vmlinux size. The kernel boots without an initramfs:
# `-kernel OUT_DIR/vmlinux -append "root=/dev/vda init=/sbin/kiln-agent"` on kiln's QEMU
# command line, with a template's rootfs.ext4 as the disk.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
require_root
out=${1:-/var/tmp/kiln-minimal-kernel}
config="$KILN_ROOT/images/kernel/minimal-6.1.config"

if [ -e "$out" ] && [ ! -e "$out/.kiln-minimal-kernel" ] && [ -n "$(ls -A "$out")" ]; then
  die "$out exists and is not an earlier output of this script; name an empty or new directory"
fi

step "installing linux-source-6.1 and the kernel's build dependencies"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils >/dev/null

step "unpacking into $out"
rm -rf "$out" && mkdir -p "$out" && touch "$out/.kiln-minimal-kernel"
tar -xaf /usr/src/linux-source-6.1.tar.xz -C "$out"
src=$out/linux-source-6.1
cp "$config" "$src/.config"
make -C "$src" olddefconfig >/dev/null

step "compiling vmlinux with $(nproc) jobs (about 20 min of CPU)"
started=$SECONDS
nice make -C "$src" -j"$(nproc)" vmlinux >"$out/build.log" 2>&1 || die "compile failed; see $out/build.log"
cp "$src/vmlinux" "$out/vmlinux"
printf '\nbuilt %s (%s) in %d s\n' "$out/vmlinux" "$(du -h "$out/vmlinux" | cut -f1)" "$((SECONDS - started))"
