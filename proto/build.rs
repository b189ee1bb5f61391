//! Build script: compiles `proto/stallscope.proto` with protox (pure Rust, no system
//! `protoc`) and generates message types and gRPC stubs with tonic-prost-build; also
//! writes the descriptor set that server reflection serves.

use anyhow::Context as _;
use prost::Message as _;

const PROTO_DIR: &str = "proto";
const PROTO_FILE: &str = "proto/stallscope.proto";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed={PROTO_FILE}");
    let descriptors = protox::compile([PROTO_FILE], [PROTO_DIR])
        .with_context(|| format!("compiling {PROTO_FILE}"))?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    std::fs::write(
        out_dir.join("stallscope_descriptor.bin"),
        descriptors.encode_to_vec(),
    )
    .context("writing the descriptor set")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .with_context(|| format!("generating Rust code from {PROTO_FILE}"))?;
    Ok(())
}
