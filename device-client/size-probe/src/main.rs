//! Size probe for the monitoring side of `tinyfleet-device` on a Cortex-M4F.
//!
//! Not firmware: there is no runtime (no .data/.bss initialisation, no interrupt vectors), the
//! image is never run. It only makes the linker keep what a device that monitors a model needs:
//! building the reference monitor, recording inferences, labels and health, and finishing
//! windows into authenticated summaries. Every input goes through `black_box` so nothing is
//! constant-folded, and every output goes through `black_box` so nothing is discarded.
//! `scripts/size-probe.sh` builds it and reads the section sizes. `ota.rs` is the same device
//! with the OTA installer.
#![no_std]
#![no_main]

mod common;

#[unsafe(no_mangle)]
#[allow(non_snake_case)]
pub extern "C" fn Reset() -> ! {
    let mut out = [0u8; common::OUT_LEN];
    monitor_probe!(|_id, _key, out| {})
}
