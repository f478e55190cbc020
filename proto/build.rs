//! Generates the control API's gRPC code (feature `grpc`) from `proto/` with protox, a
//! protobuf compiler in Rust: no system `protoc` is needed to build.

fn main() {
    #[cfg(feature = "grpc")]
    grpc();
}

#[cfg(feature = "grpc")]
fn grpc() {
    const PROTO: &str = "proto/clickgate/control/v1/control.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = match protox::compile([PROTO], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("compiling {PROTO}: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
    {
        panic!("generating the control API code: {e}");
    }
}
