//! Over-the-air model updates on the device, without an allocator.
//!
//! - [`patch`]: the streaming delta patcher (format `TFP1`, `docs/protocol.md`): output block by
//!   block with a fixed RAM budget, the old image only read.

pub mod patch;
