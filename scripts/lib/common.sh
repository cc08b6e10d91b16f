# Shared helpers of kiln's scripts. Source it; do not run it.

KILN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export KILN_ROOT

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Commands the build and tests use, and the Debian package that provides each.
KILN_TOOLS=(
  "unshare:util-linux"
  "ip:iproute2"
  "stty:coreutils"
  "hostname:hostname"
  "cc:gcc"
  "readelf:binutils"
  "qemu-system-x86_64:qemu-system-x86"
  "qemu-img:qemu-utils"
  "mmdebstrap:mmdebstrap"
  "mkfs.ext4:e2fsprogs"
  "debugfs:e2fsprogs"
  "filefrag:e2fsprogs"
  "mkfs.xfs:xfsprogs"
  "losetup:mount"
  "depmod:kmod"
  "xz:xz-utils"
  "zstd:zstd"
  "cpio:cpio"
  "python3:python3"
)

require_root() {
  [ "$(id -u)" -eq 0 ] || die "run as root: the agent's tests create mount, PID, UTS and network namespaces"
}

require_cargo() {
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (stable, via rustup) and re-run"
}

# Installs the Debian packages of any missing tool (apt-get; Debian 12 or later).
install_missing_tools() {
  local missing=() entry tool pkg
  for entry in "${KILN_TOOLS[@]}"; do
    tool=${entry%%:*}
    pkg=${entry#*:}
    command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing packages ${missing[*]} and no apt-get to install them"
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  # The kernel is fetched with apt-get download, which needs package lists.
  if ! apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
    step "apt-get update (package lists for the guest kernel)"
    apt-get update -qq
  fi
}

# Builds the static guest agent; prints its path.
build_static_agent() {
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p kiln-agent >&2
  echo "$KILN_ROOT/target/x86_64-unknown-linux-gnu/release/kiln-agent"
}
