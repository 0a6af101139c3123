use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    // Read at run time: a build script binary can be reused by another checkout of the crate.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        root.join("syft/ledger/v1/ledger.proto"),
        root.join("syft/ledger/v1/alerts.proto"),
        root.join("syft/router/v1/router.proto"),
    ];
    tonic_prost_build::configure()
        // Every service and client decodes through `codec.rs`: prost's codec behind a bound on
        // a message's fields, checked before decoding.
        .codec_path("crate::codec::BoundedCodec")
        .file_descriptor_set_path(out.join("syft_descriptor.bin"))
        .compile_protos(&protos, &[root])?;
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Ok(())
}
