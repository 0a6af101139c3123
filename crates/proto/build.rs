use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    // Read at run time: a build script binary can be reused by another checkout of the crate.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Each service decodes through its own bound on a message's fields (`src/codec.rs`), so
    // the two packages are generated apart, each with its codec and descriptor set. (Neither
    // imports the other: were the router's to import the ledger's, its run would generate the
    // ledger's package again, with the router's codec.)
    let ledger = [
        root.join("syft/ledger/v1/ledger.proto"),
        root.join("syft/ledger/v1/alerts.proto"),
    ];
    let router = [root.join("syft/router/v1/router.proto")];
    for (protos, codec, descriptors) in [
        (
            &ledger[..],
            "crate::codec::LedgerCodec",
            "ledger_descriptor.bin",
        ),
        (
            &router[..],
            "crate::codec::RouterCodec",
            "router_descriptor.bin",
        ),
    ] {
        tonic_prost_build::configure()
            .codec_path(codec)
            .file_descriptor_set_path(out.join(descriptors))
            .compile_protos(protos, std::slice::from_ref(&root))?;
        for p in protos {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    Ok(())
}
