#!/usr/bin/env bash
# Installs what building and testing npm needs on a fresh Debian 12 machine (root).
# Idempotent: every step checks first and does nothing when its part is present.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
# prometheus: a real Prometheus server for npm-agent/tests/http_endpoints.rs and
# grafana_dashboards.rs (scrapes the agent; the latter runs every dashboard query).
# iperf3 and sockperf: the lab traffic figures of `cargo xtask bench`.
# nftables: kube-proxy-like Service DNAT rules in npm-agent/tests/service_dnat.rs.
# build-essential, pkg-config: the C compiler and linker cargo's builds use, and library
# lookups from build scripts. openssl: the CA and certificates of npm-agent/tests/daemonset_run.rs.
for pkg in llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev bpftool iproute2 iputils-ping \
           netcat-openbsd util-linux prometheus iperf3 sockperf \
           nftables build-essential pkg-config openssl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  log "rustup toolchain install nightly"
  rustup toolchain install nightly --profile minimal
fi
for comp in rust-src clippy; do
  if ! rustup component list --toolchain nightly --installed | grep -q "^$comp"; then
    log "rustup component add $comp --toolchain nightly"
    rustup component add "$comp" --toolchain nightly
  fi
done

# `cargo xtask test` runs `cargo fmt` and `cargo clippy` on the default toolchain.
for comp in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$comp"; then
    log "rustup component add $comp (default toolchain)"
    rustup component add "$comp"
  fi
done

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q '0.13.0'; then
  log "cargo install bpf-linker 0.13.0 (LLVM 22)"
  PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --version 0.13.0 --locked \
    --no-default-features --features llvm-22
fi

# cargo-fuzz for `cargo xtask fuzz` (and the fuzz smoke of `cargo xtask test`); 0.13.2 builds
# with the stable toolchain here (about a minute) and drives the nightly one.
if ! command -v cargo-fuzz >/dev/null 2>&1 || ! cargo fuzz --version 2>/dev/null | grep -q '0.13.2'; then
  log "cargo install cargo-fuzz 0.13.2"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mount bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
