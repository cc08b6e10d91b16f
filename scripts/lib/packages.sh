# The Debian packages kiln needs, installed as one consistent set, and the check that every
# tool the project calls is then present. Sourced by common.sh; the fresh-machine test
# (scripts/tests/fresh-install.sh) runs install_packages inside a Debian root of its own.
#
# QEMU: kiln uses QEMU 10 for every QEMU package (qemu-system-x86, qemu-utils and what they
# pin), from bookworm-backports on Debian 12 and from the main archive on Debian 13. Why 10
# and not Debian 12's 7.2: docs/qemu.md. Mixing generations is what broke a fresh machine
# once: Debian 12's qemu-system-x86 7.2 removes the image's qemu-utils 10.0 (they share
# qemu-system-common's version), so the QEMU family is always named together, in one
# transaction, from one suite.

# The QEMU generation kiln runs (the major.minor every QEMU binary must report).
KILN_QEMU_GENERATION=10.0

# Packages that are not QEMU's.
KILN_PACKAGES=(
  util-linux mount iproute2 coreutils hostname gcc binutils kmod
  e2fsprogs xfsprogs mmdebstrap xz-utils zstd cpio curl ca-certificates python3
  nftables conntrack dnsmasq-base openssl iperf3 uidmap
)

# The QEMU family: every package whose version must be the same generation.
KILN_QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios)

# Commands the build and tests call, and the package that provides each.
KILN_TOOLS=(
  "unshare:util-linux"
  "losetup:mount"
  "ip:iproute2"
  "stty:coreutils"
  "hostname:hostname"
  "cc:gcc"
  "readelf:binutils"
  "depmod:kmod"
  "mkfs.ext4:e2fsprogs"
  "debugfs:e2fsprogs"
  "filefrag:e2fsprogs"
  "mkfs.xfs:xfsprogs"
  "mmdebstrap:mmdebstrap"
  "xz:xz-utils"
  "zstd:zstd"
  "cpio:cpio"
  "curl:curl"
  "python3:python3"
  "nft:nftables"
  "conntrack:conntrack"
  "dnsmasq:dnsmasq-base"
  "openssl:openssl"
  "iperf3:iperf3"
  "newuidmap:uidmap"
  "qemu-system-x86_64:qemu-system-x86"
  "qemu-img:qemu-utils"
)

# The QEMU binaries kiln calls; each must report $KILN_QEMU_GENERATION.
KILN_QEMU_TOOLS=(qemu-system-x86_64 qemu-img)

# The Debian release this machine runs (its codename), or nothing.
debian_codename() {
  local codename=""
  if [ -r /etc/os-release ]; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  fi
  echo "$codename"
}

# The suite QEMU comes from on this release ("" for the release's own archive).
qemu_suite() {
  case "$(debian_codename)" in
    bookworm) echo bookworm-backports ;;
    *) echo "" ;;
  esac
}

# The mirror the machine's bookworm sources use (deb822 or one-line format), else Debian's.
debian_mirror() {
  local mirror
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ { uri = $2 } /^Suites:/ && / bookworm( |$)/ { print uri; exit }')
  if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }')
  fi
  echo "${mirror:-http://deb.debian.org/debian}"
}

# Adds suite $1 (bookworm-backports) to apt's sources unless a source already names it.
ensure_backports_source() {
  local suite=$1
  if grep -rqsw -- "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  cat >/etc/apt/sources.list.d/kiln-backports.sources <<EOF
# Added by kiln's set-up (scripts/lib/packages.sh): QEMU 10 comes from here on Debian 12.
Types: deb
URIs: $(debian_mirror)
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

# Whether package $1 is installed (at version prefix $2 after the epoch, if given).
package_installed() {
  local status version
  status=$(dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null) || return 1
  version=${status#* }
  [ "${status%% *}" = installed ] || return 1
  [ -z "${2:-}" ] && return 0
  version=${version#*:}
  case "$version" in "$2".*) return 0 ;; *) return 1 ;; esac
}

# Every package of the set missing, or of the QEMU family at another generation.
packages_to_install() {
  local pkg
  for pkg in "${KILN_PACKAGES[@]}"; do
    package_installed "$pkg" || echo "$pkg"
  done
  for pkg in "${KILN_QEMU_PACKAGES[@]}"; do
    case "$pkg" in
      qemu-*) package_installed "$pkg" "$KILN_QEMU_GENERATION" || echo "$pkg" ;;
      *) package_installed "$pkg" || echo "$pkg" ;;
    esac
  done
}

# Installs kiln's package set in one apt-get transaction when anything in it is missing (or
# QEMU is of another generation), then checks every tool. Set KILN_SKIP_INSTALL=1 to manage
# the packages yourself: the check still runs.
install_packages() {
  local missing suite pkg args=()
  missing=$(packages_to_install | tr '\n' ' ')
  if [ -n "${missing// /}" ] && [ "${KILN_SKIP_INSTALL:-0}" != 1 ]; then
    command -v apt-get >/dev/null 2>&1 ||
      die "missing packages: $missing; kiln's set-up installs them with apt-get (Debian 12 or 13), which this machine lacks"
    suite=$(qemu_suite)
    [ -z "$suite" ] || ensure_backports_source "$suite"
    step "installing kiln's packages (missing or not QEMU $KILN_QEMU_GENERATION: $missing)"
    apt-get update -qq || die "apt-get update failed: check the machine's apt sources and its network"
    args=("${KILN_PACKAGES[@]}")
    for pkg in "${KILN_QEMU_PACKAGES[@]}"; do
      args+=("$pkg${suite:+/$suite}")
    done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -o Dpkg::Options::=--force-confold "${args[@]}" ||
      die "installing kiln's packages failed (apt-get's output above says why)"
  fi
  check_tools
  ensure_build_user
  # The guest kernel is fetched with apt-get download, which needs package lists.
  if ! apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
    step "apt-get update (package lists for the guest kernel)"
    apt-get update -qq || die "apt-get update failed: check the machine's apt sources and its network"
  fi
}

# The unprivileged user template packages are installed as (mmdebstrap's unshare mode, see
# crates/kiln-image/src/mmdebstrap.rs), and the 65536 subordinate ids of its own that the
# package scripts run as, root of a user namespace owning nothing on the host. The range lies
# below the sandboxes' VMM uids (from 2000000000) and far above what adduser hands out.
KILN_BUILD_USER=kiln-build
KILN_BUILD_SUBIDS=1900000000-1900065535

ensure_build_user() {
  if ! id -u "$KILN_BUILD_USER" >/dev/null 2>&1; then
    step "adding the system user $KILN_BUILD_USER (template packages are installed as it)"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
      "$KILN_BUILD_USER" || die "adding the user $KILN_BUILD_USER failed"
  fi
  if ! grep -qs "^$KILN_BUILD_USER:" /etc/subuid; then
    usermod --add-subuids "$KILN_BUILD_SUBIDS" "$KILN_BUILD_USER" ||
      die "giving $KILN_BUILD_USER subordinate uids failed"
  fi
  if ! grep -qs "^$KILN_BUILD_USER:" /etc/subgid; then
    usermod --add-subgids "$KILN_BUILD_SUBIDS" "$KILN_BUILD_USER" ||
      die "giving $KILN_BUILD_USER subordinate gids failed"
  fi
}

# Fails, naming them, unless every tool kiln calls is on PATH and every QEMU binary reports
# the generation kiln runs.
check_tools() {
  local entry tool pkg absent=() version wrong=()
  for entry in "${KILN_TOOLS[@]}"; do
    tool=${entry%%:*}
    pkg=${entry#*:}
    command -v "$tool" >/dev/null 2>&1 || absent+=("$tool (package $pkg)")
  done
  [ "${#absent[@]}" -eq 0 ] || die "missing after set-up: ${absent[*]}; install them (apt-get install <package>) and re-run"
  for tool in "${KILN_QEMU_TOOLS[@]}"; do
    version=$(qemu_version "$tool")
    case "$version" in
      "$KILN_QEMU_GENERATION".*) ;;
      *) wrong+=("$tool reports ${version:-no version}") ;;
    esac
  done
  [ "${#wrong[@]}" -eq 0 ] ||
    die "kiln runs QEMU $KILN_QEMU_GENERATION for every QEMU tool, but ${wrong[*]}; see docs/qemu.md"
}

# The version QEMU tool $1 reports ("10.0.2"), or nothing.
qemu_version() {
  "$1" --version 2>/dev/null | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p'
}
