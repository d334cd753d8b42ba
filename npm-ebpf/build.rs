//! Rebuild the BPF object when bpf-linker changes (aya-template habit): a new linker can
//! change the emitted code or BTF even when no source changed.
//!
//! It also passes `--disable-expand-memcpy-in-order` to bpf-linker. By default bpf-linker asks
//! LLVM to expand only memcpy itself (in order, for JITs that pattern-match copies), which
//! leaves every memset and memmove (zeroing a key, copying a 16-byte address) as a call to a
//! byte-at-a-time subprogram: profiled at ~10% of an established packet (`cargo xtask bench`,
//! perf: `bpf_prog_*_memset`). Without the flag LLVM expands all three inline.

fn main() {
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found on PATH: {err}"),
    }
}
