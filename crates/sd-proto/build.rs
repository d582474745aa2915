//! Generates the sd.v1 messages and the tonic client/server with protoc from
//! `protoc-bin-vendored` (no system protoc), plus the file descriptor set for reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("sd/v1/diffusion.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("sd_v1_descriptor.bin"))
        .compile_protos(&[proto], &[root])?;
    Ok(())
}
