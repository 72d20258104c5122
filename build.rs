//! Generates Rust types for the Istio wire protocols in `proto/`.
//!
//! The .proto files are parsed by `protox` (pure Rust, so no `protoc` is
//! needed on the build machine; it also supplies the google.protobuf
//! well-known types) and turned into message code by `prost-build`, with gRPC
//! clients and servers for the two services (xDS's AggregatedDiscoveryService
//! and the Istio CA's IstioCertificateService) by `tonic-prost-build`.
//! Well-known types map to `prost_types`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::{env, fs};

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?;
    let proto_dir = Path::new(&manifest_dir).join("proto");

    // A directory here makes cargo rerun the script when anything in it
    // changes, including added or removed files.
    println!("cargo:rerun-if-changed={}", proto_dir.display());

    let files = proto_files(&proto_dir)?;
    let descriptors = protox::compile(&files, [&proto_dir])?;

    let mut config = prost_build::Config::new();
    // Implement `prost::Name`, so that `type_url()` gives the xDS type
    // URL, e.g. type.googleapis.com/istio.workload.Address.
    config
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}

/// The `.proto` files directly in `dir`, sorted.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(format!("no .proto files in {}", dir.display()).into());
    }
    files.sort();
    Ok(files)
}
