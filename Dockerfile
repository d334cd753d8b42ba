# The npm-agent image the DaemonSet (deploy/daemonset.yaml) runs.
#
#   docker build -t <registry>/npm-agent:<tag> .      # from the repository root
#   docker push <registry>/npm-agent:<tag>
#   cd deploy && kustomize edit set image npm-agent=<registry>/npm-agent:<tag>
#
# NOT VERIFIED: no container engine runs on the machines this project is developed on, so
# nothing has built this file yet. Each step repeats what scripts/setup.sh and `cargo build`
# do on the development machines (Debian 12, where they are verified); deploy/README.md says
# what is and is not checked.

# --- build: the same toolchain as the development machines (TOOLCHAIN.md) ---
FROM debian:12 AS build
ARG RUST_STABLE=1.95.0
# The nightly that builds the BPF object (-Z build-std=core); aya-build asks for "nightly".
ARG RUST_NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER=0.13.0
ENV DEBIAN_FRONTEND=noninteractive
# LLVM 22 comes from bookworm-security, as on the development machines.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain "$RUST_STABLE" \
 && rustup toolchain install "$RUST_NIGHTLY" --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustc +"$RUST_NIGHTLY" --print sysroot)"
RUN PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --version "$BPF_LINKER" --locked \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p npm-agent --bin npm-agent \
 && install -D -m 0755 target/release/npm-agent /out/npm-agent

# --- run: the binary (links only glibc, libm, libgcc_s) and iproute2 ---
FROM debian:12-slim
# iproute2: node discovery runs `ip -j` (links, routes, neighbours, addresses) and `bridge -j`
# (forwarding tables of bridged CNIs).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/npm-agent /usr/local/bin/npm-agent
ENTRYPOINT ["/usr/local/bin/npm-agent"]
CMD ["run", "--config", "/etc/npm/azure-npm.json"]
