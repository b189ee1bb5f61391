//! Build script: compiles `proto/profile.proto` (pprof's schema) into Rust types with
//! protox and prost-build, so building needs no system `protoc`.

use anyhow::Context as _;

const PROTO_DIR: &str = "proto";
const PROTO_FILE: &str = "proto/profile.proto";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed={PROTO_FILE}");
    let descriptors = protox::compile([PROTO_FILE], [PROTO_DIR])
        .with_context(|| format!("compiling {PROTO_FILE}"))?;
    prost_build::Config::new()
        .compile_fds(descriptors)
        .with_context(|| format!("generating Rust types from {PROTO_FILE}"))?;
    Ok(())
}
