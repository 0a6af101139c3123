//! Generated gRPC types for `syft.ledger.v1` and `syft.router.v1`, and the codecs they decode
//! with (`codec.rs`).

pub mod codec;

pub mod ledger {
    tonic::include_proto!("syft.ledger.v1");
}

pub mod router {
    tonic::include_proto!("syft.router.v1");
}

/// The longest transaction token the ledger accepts (bytes). The router refuses a longer one (or
/// one with control characters) itself, as a token that proves nothing, before it counts the
/// request in anyone's rate-limit windows.
pub const MAX_TRANSACTION_TOKEN_BYTES: usize = 512;

/// Encoded descriptor sets of the ledger's and the router's services, for gRPC server reflection.
pub const LEDGER_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ledger_descriptor");
pub const ROUTER_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("router_descriptor");

/// gRPC server reflection, v1 and v1alpha (for older `grpcurl`s), advertising `services`, the
/// health service and reflection itself.
#[allow(clippy::type_complexity)]
pub fn reflection(
    services: &[&'static str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(LEDGER_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(ROUTER_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection");
        services
            .iter()
            .fold(builder, |b, service| b.with_service_name(*service))
    };
    Ok((
        builder().build_v1()?,
        builder()
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
            .build_v1alpha()?,
    ))
}
