#!/usr/bin/env bash
# Proves kiln's package set-up from a fresh machine's state, not from this machine's.
#
# A Debian 12 root is made with mmdebstrap holding what a fresh machine of kiln's kind holds
# where it matters: qemu-utils 10.0 from bookworm-backports, no qemu-system, and apt sources
# without bookworm-backports (the machine image installed qemu-utils, then dropped the
# source). install_packages (scripts/lib/packages.sh) runs in it; then every tool kiln calls
# must run, and every QEMU binary must report the same generation.
#
# Network: only the Debian mirror, as every test. Downloads are cached under
# $KILN_CACHE_DIR/fresh-install/, keyed by the package lists, so a repeat run fetches nothing
# but package indices. Everything it mounts or unpacks is removed on exit, also on failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
require_root
started=$SECONDS

cache_root=${KILN_CACHE_DIR:-/var/cache/kiln}/fresh-install
mirror=$(debian_mirror)
security_mirror=${mirror%/debian}/debian-security

# What the fresh root is made of, and the key of its cached tarball.
fresh_packages="apt,ca-certificates,curl,gcc,python3,iproute2,e2fsprogs,xz-utils,zstd,hostname,binutils"
recipe="bookworm minbase $fresh_packages qemu-utils/bookworm-backports v1"
root_key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
# The install step's downloads, keyed by kiln's package lists.
debs_key=$(printf '%s\n' "${KILN_PACKAGES[@]}" "${KILN_QEMU_PACKAGES[@]}" "$KILN_QEMU_GENERATION" |
  sha256sum | cut -c1-16)
root_tar="$cache_root/root-$root_key.tar"
debs="$cache_root/debs-$debs_key"
mkdir -p "$cache_root" "$debs"
chmod 700 "$cache_root"

work=$(mktemp -d /tmp/kiln-fresh-install.XXXXXX)
root="$work/root"
cleanup() {
  local mount
  # Deepest first.
  for mount in $(awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r); do
    umount -l "$mount" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

if [ ! -s "$root_tar" ]; then
  step "making the fresh Debian 12 root (cached as $root_tar)"
  mmdebstrap --quiet --variant=minbase --include="$fresh_packages" \
    --customize-hook='chroot "$1" apt-get install -y -qq --no-install-recommends qemu-utils/bookworm-backports' \
    --customize-hook='chroot "$1" apt-get clean' \
    bookworm "$work/root.tar" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb $security_mirror bookworm-security main" "deb $mirror bookworm-backports main"
  mv "$work/root.tar" "$root_tar"
fi

step "unpacking the fresh root"
mkdir "$root"
tar -C "$root" -xf "$root_tar"
# A fresh machine's sources: the release, its updates and security, no backports.
rm -f "$root"/etc/apt/sources.list "$root"/etc/apt/sources.list.d/*
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/kiln/scripts"
cp -r "$KILN_ROOT/scripts/lib" "$root/kiln/scripts/"
for fs in proc sys dev; do mount --rbind "/$fs" "$root/$fs"; mount --make-rslave "$root/$fs"; done
mount --bind "$debs" "$root/var/cache/apt/archives"

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }

step "the root is a fresh machine where it matters"
before=$(in_root dpkg-query -W -f='${Version}' qemu-utils)
case "$before" in
  *bpo12*) echo "qemu-utils $before (bookworm-backports)" ;;
  *) die "the fresh root's qemu-utils is $before, not bookworm-backports'" ;;
esac
if in_root sh -c 'command -v qemu-system-x86_64' >/dev/null; then
  die "the fresh root already has qemu-system-x86_64"
fi
if in_root grep -rqs bookworm-backports /etc/apt/sources.list.d; then
  die "the fresh root's sources name bookworm-backports"
fi

step "install_packages in the fresh root"
in_root bash -c 'source /kiln/scripts/lib/common.sh && install_packages'

step "every tool kiln calls runs, every QEMU binary reports QEMU $KILN_QEMU_GENERATION"
# The flag that makes each tool print its version.
version_flag() {
  case "$1" in
    ip) echo -V ;;
    nft | conntrack | dnsmasq) echo --version ;;
    openssl) echo version ;;
    mkfs.ext4 | debugfs | filefrag | mkfs.xfs) echo -V ;;
    *) echo --version ;;
  esac
}
for entry in "${KILN_TOOLS[@]}"; do
  tool=${entry%%:*}
  if [ "$tool" = newuidmap ]; then
    # It has no version flag; what matters is that it is setuid root.
    in_root sh -c 'test -u "$(command -v newuidmap)"' || die "newuidmap is not setuid in the fresh root"
    printf '  %-20s %s\n' "$tool" "setuid"
    continue
  fi
  flag=$(version_flag "$tool")
  if ! out=$(in_root "$tool" "$flag" 2>&1); then
    die "$tool $flag failed in the fresh root: $out"
  fi
  printf '  %-20s %s\n' "$tool" "$(head -n1 <<<"$out")"
done
for tool in "${KILN_QEMU_TOOLS[@]}"; do
  version=$(in_root "$tool" --version | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p')
  case "$version" in
    "$KILN_QEMU_GENERATION".*) ;;
    *) die "$tool reports QEMU ${version:-nothing}, not $KILN_QEMU_GENERATION" ;;
  esac
done
in_root dpkg-query -W -f='  ${Package} ${Version}\n' "${KILN_QEMU_PACKAGES[@]}"

step "the build user exists with its subordinate ids"
in_root id "$KILN_BUILD_USER"
for file in subuid subgid; do
  line=$(in_root grep "^$KILN_BUILD_USER:" "/etc/$file") || die "no $KILN_BUILD_USER in the fresh root's /etc/$file"
  [ "$line" = "$KILN_BUILD_USER:1900000000:65536" ] || die "/etc/$file has $line"
done

step "a second run installs nothing"
second=$(in_root bash -c 'source /kiln/scripts/lib/common.sh && install_packages' 2>&1)
if grep -q "installing kiln's packages\|adding the system user" <<<"$second"; then
  die "install_packages installed again on a machine that has everything: $second"
fi
for file in subuid subgid; do
  count=$(in_root grep -c "^$KILN_BUILD_USER:" "/etc/$file")
  [ "$count" = 1 ] || die "a second run left $count entries for $KILN_BUILD_USER in /etc/$file"
done

printf '\nfresh-machine set-up proven in %d s\n' "$((SECONDS - started))"
