//! Generated gRPC types for `syft.ledger.v1` and `syft.router.v1`.

pub mod ledger {
    tonic::include_proto!("syft.ledger.v1");
}

pub mod router {
    tonic::include_proto!("syft.router.v1");
}

/// Encoded descriptor set of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("syft_descriptor");
