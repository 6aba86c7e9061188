//! Over-the-air model updates on the device, without an allocator.
//!
//! - [`patch`]: the streaming delta patcher (format `TFP1`, `docs/protocol.md`): output block by
//!   block with a fixed RAM budget, the old image only read.
//! - [`manifest`]: the signed offer (COSE_Sign1, Ed25519) and its manifest.
//! - [`ed25519`]: Ed25519 verification with ed25519-dalek's `verify_strict` rules, in ~3.6 KB of
//!   stack instead of ~8 KB.
//! - [`flash`]: slot layout, NOR flash helpers, the CRC-protected append-only log.
//! - [`decode_block`]: OTA blocks (`tf/v1/{device}/ota/blk`) without serde_cbor's decoder.
//! - [`boot`]: the bootloader's slot state (active, trial pending/running, revert).
//! - [`installer`]: offer -> download (full image or delta) -> verify -> trial -> confirm, resumable
//!   across power losses.
//! - [`sim`] (`std`): a simulated NOR flash that enforces NOR rules and cuts power on demand.

pub mod boot;
mod cbor;
pub mod ed25519;
pub mod flash;
pub mod installer;
pub mod manifest;
pub mod patch;
#[cfg(feature = "std")]
pub mod sim;

pub use cbor::decode_block;
pub use installer::{Config, Installer, Next, Report, SelfTest};
pub use manifest::{Manifest, TrustedKey, verify_offer};
