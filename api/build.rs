fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in [
        "proto/federation.proto",
        "proto/identity.proto",
        "proto/dataplane.proto",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/federation.proto",
            "proto/identity.proto",
            "proto/dataplane.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
