#!/usr/bin/env bash
# Installs everything weft needs on a fresh machine of this kind (Debian 12, root), idempotently.
# A second run does no downloads and takes seconds.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf 'setup: %s\n' "$*"; }

# Debian packages used by the tests, the demo and the benchmarks.
PACKAGES=(
  iproute2        # ip: the test bed's helpers and the demo (weft itself uses netlink)
  iputils-ping    # ping inside test namespaces
  util-linux      # nsenter, mount
  iperf3          # throughput benchmarks
  nftables        # kube-proxy-style nftables baseline (benchmarks)
  iptables        # kube-proxy-style iptables baseline (benchmarks)
  hyperfine       # timing whole commands in benchmarks
  jq              # reading JSON in scripts
  python3         # the demo's web servers and metrics fetch
  pkg-config      # finding C libraries at build time
  libnftnl-dev    # weft-cni's masquerade: nftables over netlink (nftnl crate)
  libmnl-dev      # netlink socket library under libnftnl
  containernetworking-plugins  # reference CNI plugins (bridge, host-local): the CNI benchmark's baseline
  e2fsprogs       # weft-csi: mkfs.ext4, resize2fs, e2fsck
  xfsprogs        # weft-csi: mkfs.xfs, xfs_growfs
  btrfs-progs     # weft-csi: mkfs.btrfs, btrfs filesystem resize
  nfs-ganesha     # a real NFS server for weft-csi's nfs backend tests (userspace, on 127.0.0.1)
  nfs-ganesha-vfs # its filesystem backend
  containerd      # the container runtime weft node drives over CRI (weft starts its own, never the service)
  runc            # containerd's OCI runtime
  protobuf-compiler # protoc, for the CRI protobufs (k8s-cri's build)
  etcd-server     # etcd 3.4: the store backend for clusters that outgrow one machine (tests start their own members)
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# kubectl talks to weft's API server in the tests and the demo. The machine image ships a recent
# one; where it is missing, Debian's (older, but speaks the same API) is used.
if ! command -v kubectl >/dev/null; then
  say "installing kubectl (Debian kubernetes-client)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi

# The eBPF crate builds on the stable toolchain with -Z build-std=core, which needs rust-src.
if ! rustup component list --toolchain stable --installed | grep -q '^rust-src'; then
  say "adding rust-src to the stable toolchain"
  rustup component add rust-src --toolchain stable
else
  say "rust-src present"
fi

# bpf-linker 0.10.x loads the compiler's own LLVM at run time (0.11+ needs a system LLVM).
BPF_LINKER_VERSION=0.10.4
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "installing bpf-linker $BPF_LINKER_VERSION (about 2 minutes)"
  cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked --quiet
else
  say "bpf-linker $BPF_LINKER_VERSION present"
fi

# bpffs, where weft pins maps and links.
if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" != "bpf_fs" ]; then
  say "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
else
  say "bpffs mounted"
fi
say "done"
