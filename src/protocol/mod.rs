//! The wire: job entry fields, job records, Open Inference Protocol v2 bodies and
//! the binary tensor codec. Nothing here touches Redis, I/O or model signatures.

pub mod binary;
pub mod job;
pub mod oip;
pub mod tensor;

pub use oip::{DecodeError, InferRequest, InferResponse, OutputTensor};
pub use tensor::{DataType, Tensor, TensorData};
