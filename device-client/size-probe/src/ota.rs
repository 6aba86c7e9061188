//! Size probe of a whole device: the monitoring side of `main.rs` plus the OTA installer.
//!
//! After each window the probe handles one received message (an offer or an MQTT block, from
//! opaque bytes), drives the installer one step (verify an offer: Ed25519 with
//! `verify_strict`'s rules, `ota::ed25519`; apply image bytes or a `TFP1` patch with LZ4, hash,
//! read back, switch, self-test with golden vectors, confirm) and seals the progress report and
//! block request it produces. The bootloader decision ([`boot::boot`]) is linked too, as a
//! device that keeps its boot flags in the same flash would. The flash driver is a stand-in the
//! optimizer cannot see through; a real HAL's NOR driver adds its own few hundred bytes.
#![no_std]
#![no_main]

mod common;

use core::hint::black_box;

use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash};
use tinyfleet_device::ota::flash::{Layout, Region};
use tinyfleet_device::ota::installer::{Config, GoldenDigest, Installer, Next};
use tinyfleet_device::ota::manifest::{MAX_OFFER, TrustedKey};
use tinyfleet_device::ota::patch::Patcher;
use tinyfleet_device::ota::{boot, decode_block};
use tinyfleet_device::wire::{self, BlockRequest, Kind};
use tinyfleet_device::{DeviceId, DeviceKey};

/// Largest patch block the device applies (its patcher holds about 3 x B bytes).
const B: usize = 1024;
/// The receive buffer: an offer, or a block message (1 KB of data and its CBOR header).
const RX_LEN: usize = if MAX_OFFER > B + 64 {
    MAX_OFFER
} else {
    B + 64
};

type DeviceInstaller<'a> = Installer<'a, ProbeFlash, B>;

/// `size_of` the installer, published like the monitor's.
#[used]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probe_info")]
static PROBE_SIZE_OF_INSTALLER: [u8; size_of::<DeviceInstaller<'static>>()] =
    [0; size_of::<DeviceInstaller<'static>>()];

/// `size_of` the patcher the installer borrows (about 3 x B).
#[used]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probe_info")]
static PROBE_SIZE_OF_PATCHER: [u8; size_of::<Patcher<B>>()] = [0; size_of::<Patcher<B>>()];

/// The receive buffer (offers, verified in place, and blocks).
#[used]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probe_info")]
static PROBE_SIZE_OF_RX_BUFFER: [u8; RX_LEN] = [0; RX_LEN];

/// Keys the device trusts (two, for rotation); in flash.
static KEYS: [TrustedKey<'static>; 2] = [
    TrustedKey {
        kid: &[1, 2, 3, 4, 5, 6, 7, 8],
        public: [0x11; 32],
    },
    TrustedKey {
        kid: &[8, 7, 6, 5, 4, 3, 2, 1],
        public: [0x22; 32],
    },
];

/// 1 MiB of NOR flash in 4 KB sectors: two 448 KB slots, then the boot and progress logs.
const LAYOUT: Layout = Layout {
    slots: [
        Region::new(0x0_0000, 0x7_0000),
        Region::new(0x7_0000, 0x7_0000),
    ],
    boot: Region::new(0xe_0000, 0x2000),
    progress: Region::new(0xe_2000, 0x2000),
};

/// A NOR flash whose contents and results the optimizer cannot predict.
#[derive(Debug)]
struct ProbeFlash;

impl ErrorType for ProbeFlash {
    type Error = NorFlashErrorKind;
}

fn outcome() -> Result<(), NorFlashErrorKind> {
    if black_box(false) {
        Err(NorFlashErrorKind::Other)
    } else {
        Ok(())
    }
}

impl ReadNorFlash for ProbeFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        black_box(offset);
        black_box(&mut *bytes);
        outcome()
    }

    fn capacity(&self) -> usize {
        black_box(1 << 20)
    }
}

impl NorFlash for ProbeFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 4096;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        black_box((from, to));
        outcome()
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        black_box((offset, bytes));
        outcome()
    }
}

/// Power-on: the bootloader's decision (in a real device, the bootloader's own image), then the
/// installer resumes from the flash. Not inlined, so its temporaries stay out of `Reset`'s frame
/// (which holds the device's long-lived state, as statics would on firmware).
#[inline(never)]
fn power_on(patcher: &mut Patcher<B>) -> DeviceInstaller<'_> {
    let mut flash = ProbeFlash;
    let layout = black_box(LAYOUT);
    let Ok(booted) = boot::boot(&mut flash, &layout) else {
        common::halt()
    };
    black_box(booted);
    let config = Config {
        hw: black_box("nrf52840"),
        fw: black_box(12),
        arena: black_box(64 * 1024),
        keys: black_box(&KEYS[..]),
    };
    let Ok(installer) = DeviceInstaller::open(flash, layout, config, patcher) else {
        common::halt()
    };
    installer
}

/// Message sequence numbers of the device's OTA messages.
#[derive(Debug, Default)]
struct Counters {
    progress: u32,
    request: u32,
}

/// One received message (an offer or a block) and one installer step, with the progress
/// reports and block request they produce sealed into `out`. Not inlined (see `power_on`).
#[inline(never)]
fn ota_step(
    installer: &mut DeviceInstaller<'_>,
    rx: &mut [u8; RX_LEN],
    id: DeviceId<'_>,
    key: &DeviceKey,
    out: &mut [u8],
    seq: &mut Counters,
) {
    let mut reports = [installer.take_report(), None, None];
    black_box(&mut *rx);
    let len = black_box(rx.len());
    let step = if black_box(true) {
        installer.offer_in_place(&mut rx[..len]).map(Some)
    } else if let Some(block) = decode_block(&rx[..len]) {
        installer.write(block.offset, block.data)
    } else {
        Ok(None)
    };
    reports[1] = step.ok().flatten();
    let next = match installer.next() {
        Next::Fetch {
            object,
            offset,
            block_size,
            ..
        } => {
            let request = BlockRequest {
                boot: 1,
                seq: seq.request,
                object: &object,
                offset,
                len: block_size,
            };
            seq.request = seq.request.wrapping_add(1);
            black_box(wire::seal(id, key, Kind::BlockRequest, &request, out)).ok();
            Ok(None)
        }
        Next::Switch => installer.switch(),
        Next::SelfTest => {
            let mut golden = |i: u16, seen: &mut GoldenDigest| {
                // Input and expected output of vector i, and the model's answer.
                seen.update(&rx[..black_box(64)]);
                black_box(i) == black_box(0)
            };
            installer.self_test(&mut golden)
        }
        Next::Reboot | Next::Idle => Ok(None),
    };
    reports[2] = next.ok().flatten();
    for report in reports.iter_mut().filter_map(Option::take) {
        let msg = report.progress(1, seq.progress);
        seq.progress = seq.progress.wrapping_add(1);
        black_box(wire::seal(id, key, Kind::Progress, &msg, out)).ok();
    }
}

#[unsafe(no_mangle)]
#[allow(non_snake_case)]
pub extern "C" fn Reset() -> ! {
    // The device's long-lived OTA state (statics on firmware): the patcher, the installer that
    // borrows it, the receive buffer.
    let mut patcher = Patcher::new();
    let mut installer = power_on(&mut patcher);
    let mut rx = [0u8; RX_LEN];
    let mut seq = Counters::default();
    monitor_probe!(|id, key, out| {
        ota_step(&mut installer, &mut rx, id, &key, &mut out, &mut seq);
    })
}
