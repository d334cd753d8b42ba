//! Builds the eBPF object (`npm-ebpf`, target bpfel-unknown-none, nightly + bpf-linker) with
//! aya-build and leaves it in `OUT_DIR/npm`, where `datapath::loader` embeds it.
//!
//! Needs `rustup` with a `nightly` toolchain (rust-src) and `bpf-linker` on PATH
//! (`~/.cargo/bin`). `AYA_BUILD_SKIP=1` skips the build (the agent then embeds an empty
//! object and `Datapath::load` fails with a clear error).
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const EBPF_PACKAGE: &str = "npm-ebpf";
const COMMON_PACKAGE: &str = "npm-common";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let dir_of = |wanted: &str| {
        packages
            .iter()
            .find(|p| p.name.as_str() == wanted)
            .and_then(|p| p.manifest_path.parent())
            .map(|d| d.to_string())
            .ok_or_else(|| anyhow!("package {wanted} not found in the workspace"))
    };
    let ebpf_dir = dir_of(EBPF_PACKAGE)?;
    // aya-build reruns on changes under the eBPF crate; the ABI crate is compiled into the
    // object too, so watch it as well.
    println!("cargo:rerun-if-changed={}", dir_of(COMMON_PACKAGE)?);

    let skip = env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true");
    if skip {
        // Keep `include_bytes!` compiling; the loader rejects an empty object.
        let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
        fs::write(out.join("npm"), []).context("writing placeholder object")?;
    }
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
