//! Rebuild the BPF object when bpf-linker changes (aya-template habit): a new linker can
//! change the emitted code or BTF even when no source changed.

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found on PATH: {err}"),
    }
}
