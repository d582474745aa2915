//! The `sd.v1` gRPC API: messages, the `Diffusion` client and server traits generated
//! from `proto/sd/v1/diffusion.proto`, and the encoded file descriptor set for server
//! reflection.

/// The `sd.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("sd.v1");

    /// Encoded `FileDescriptorSet` of `sd.v1`, for `tonic-reflection`.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sd_v1_descriptor");
}

pub use v1::*;

#[cfg(test)]
mod tests {
    use super::v1::*;
    use prost::Message;

    #[test]
    fn round_trip() {
        let req = GenerateRequest {
            prompt: "a cat".into(),
            width: Some(64),
            output_format: OutputFormat::Webp as i32,
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        let back = GenerateRequest::decode(bytes.as_slice()).expect("decode");
        assert_eq!(back, req);
        assert!(!FILE_DESCRIPTOR_SET.is_empty());
    }
}
