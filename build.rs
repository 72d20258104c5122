//! Generates Rust types for the Istio wire protocols in `proto/`.
//!
//! The .proto files are parsed by `protox` (pure Rust, so no `protoc` is
//! needed on the build machine; it also supplies the google.protobuf
//! well-known types) and turned into message code by `prost-build`, with gRPC
//! clients and servers for the two services (xDS's AggregatedDiscoveryService
//! and the Istio CA's IstioCertificateService) by `tonic-prost-build`.
//! Well-known types map to `prost_types`.
//!
//! It also records the git revision being built (`MESHNODE_GIT_REVISION`, read from `.git` without running
//! git; `unknown` outside a checkout) for `meshnode version`.

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
    let revision = git_revision(Path::new(&manifest_dir)).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESHNODE_GIT_REVISION={revision}");
    Ok(())
}

/// The commit `HEAD` names in the checkout at `root` (a plain `.git` directory; a worktree's `.git` file
/// is followed), watching the files it was read from.
fn git_revision(root: &Path) -> Option<String> {
    let mut git = root.join(".git");
    if git.is_file() {
        let text = fs::read_to_string(&git).ok()?;
        git = PathBuf::from(text.strip_prefix("gitdir:")?.trim());
    }
    let head_path = git.join("HEAD");
    let head = fs::read_to_string(&head_path).ok()?;
    println!("cargo:rerun-if-changed={}", head_path.display());
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:") else {
        return Some(head.chars().take(12).collect());
    };
    let reference = reference.trim();
    // A worktree keeps its refs in the main repository (`commondir`).
    let common = fs::read_to_string(git.join("commondir"))
        .map(|c| git.join(c.trim()))
        .unwrap_or_else(|_| git.clone());
    for dir in [&git, &common] {
        let path = dir.join(reference);
        if let Ok(id) = fs::read_to_string(&path) {
            println!("cargo:rerun-if-changed={}", path.display());
            return Some(id.trim().chars().take(12).collect());
        }
    }
    let packed = common.join("packed-refs");
    let text = fs::read_to_string(&packed).ok()?;
    println!("cargo:rerun-if-changed={}", packed.display());
    text.lines().find_map(|l| {
        let (id, name) = l.split_once(' ')?;
        (name == reference).then(|| id.chars().take(12).collect())
    })
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
