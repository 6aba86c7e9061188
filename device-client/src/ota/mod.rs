//! Over-the-air model updates on the device, without an allocator.
//!
//! - [`patch`]: the streaming delta patcher (format `TFP1`, `docs/protocol.md`): output block by
//!   block with a fixed RAM budget, the old image only read.
//! - [`manifest`]: the signed offer (COSE_Sign1, Ed25519) and its manifest.
//! - [`ed25519`]: Ed25519 verification with ed25519-dalek's `verify_strict` rules, in ~2.3 KB of
//!   stack instead of ~8 KB.
//! - [`flash`]: slot layout, NOR flash helpers, the CRC-protected append-only log.
//! - [`decode_block`]: OTA blocks (`tf/v1/{device}/ota/blk`) without serde_cbor's decoder.
//! - [`boot`]: the bootloader's slot state (active, trial pending/running, revert).
//! - [`installer`]: offer -> download (full image or delta) -> verify -> trial -> confirm, resumable
//!   across power losses.
//! - [`sim`] (`std`): a simulated NOR flash that enforces NOR rules and cuts power on demand.
//!
//! RAM, for firmware authors (measured on a Cortex-M4F by `scripts/size-probe.sh`, whose
//! `size-probe-ota` is a complete example): monitor + installer peak at about 8 KB with
//!
//! - a `Patcher<512>` (1.6 KB; the service's default `[ota] block_size` is 512, and a device
//!   refuses blocks larger than its patcher's),
//! - one message buffer of [`manifest::MAX_OFFER`] bytes for received offers (verified in place
//!   with [`Installer::offer_in_place`]) and blocks and for the messages the device seals,
//! - the `Installer` (448 B), the monitor (1.6 KB) and its profile's edges,
//! - about 2.7 KB of stack for the deepest call (the offer's signature check) on top of the
//!   firmware's own frames and interrupts.
//!
//! The library keeps its big temporaries out of its callers' frames (the functions that hold
//! them are not inlined), so a message handler that calls [`Installer::offer_in_place`] or
//! [`Installer::write`] pays only for what it holds itself.

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
