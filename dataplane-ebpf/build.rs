//! Rebuild the BPF object when bpf-linker changes (a new LLVM means new code).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
