//! Builds the BPF programs (crate `dataplane-ebpf`) for the BPF target with
//! BTF, so `cargo build` produces the agent and the object it embeds.
//!
//! The pinned toolchain (rust-toolchain.toml) is stable; `-Z build-std=core`
//! for the BPF target needs RUSTC_BOOTSTRAP, which we scope to this one
//! child build (aya-build reads it and passes `-Z build-std=core`).

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "dataplane-ebpf")
        .ok_or_else(|| anyhow!("dataplane-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.95.0".into());
    let toolchain = toolchain.split('-').next().unwrap_or("1.95.0").to_owned();
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
