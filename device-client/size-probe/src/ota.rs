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
use tinyfleet_device::ota::installer::{Config, Error, GoldenDigest, Installer, Next, Report};
use tinyfleet_device::ota::manifest::{MAX_OFFER, TrustedKey};
use tinyfleet_device::ota::patch::Patcher;
use tinyfleet_device::ota::{boot, decode_block};
use tinyfleet_device::wire::{self, BlockRequest, Kind};
use tinyfleet_device::{DeviceId, DeviceKey};

/// Largest patch block the device applies (its patcher holds about 3 x B bytes): the service's
/// default `[ota] block_size`.
const B: usize = 512;
/// The message buffer: an offer, a block message (B bytes of data and its CBOR header), or a
/// message the device seals (a summary takes at most `OUT_LEN`).
const IO_LEN: usize = max(max(MAX_OFFER, B + 64), common::OUT_LEN);

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

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

/// The message buffer (offers, verified in place, blocks, and sealed messages).
#[used]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probe_info")]
static PROBE_SIZE_OF_IO_BUFFER: [u8; IO_LEN] = [0; IO_LEN];

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
fn power_on(patcher: &mut Patcher<B>) -> Result<DeviceInstaller<'_>, Error<NorFlashErrorKind>> {
    bootloader();
    let layout = black_box(LAYOUT);
    let config = Config {
        hw: black_box("nrf52840"),
        fw: black_box(12),
        arena: black_box(64 * 1024),
        keys: black_box(&KEYS[..]),
    };
    DeviceInstaller::open(ProbeFlash, layout, config, patcher)
}

/// The bootloader's decision (on a real device, in the bootloader's own image, which runs
/// before the application and so never shares its RAM; linked here for its flash).
#[inline(never)]
fn bootloader() {
    let mut flash = ProbeFlash;
    let Ok(booted) = boot::boot(&mut flash, &black_box(LAYOUT)) else {
        common::halt()
    };
    black_box(booted);
}

/// Message sequence numbers of the device's OTA messages.
#[derive(Debug, Default)]
struct Counters {
    progress: u32,
    request: u32,
}

/// One received message (an offer or a block) and one installer step, with the progress
/// reports and block request they produce sealed into `io` once the message is used up. Not
/// inlined (see `power_on`); each part is a function of its own, so that what one part holds
/// is not on the stack under another (the offer's signature check is the deepest).
#[inline(never)]
fn ota_step(
    installer: &mut DeviceInstaller<'_>,
    io: &mut [u8; IO_LEN],
    id: DeviceId<'_>,
    key: &DeviceKey,
    seq: &mut Counters,
) {
    let mut reports = [installer.take_report(), None, None];
    reports[1] = receive(installer, io);
    reports[2] = advance(installer, io, id, key, seq);
    for report in reports.iter_mut().filter_map(Option::take) {
        send_report(&report, io, id, key, seq);
    }
}

/// Hands the received message in `io` to the installer: an offer (verified in place) or a
/// block.
#[inline(never)]
fn receive(installer: &mut DeviceInstaller<'_>, io: &mut [u8; IO_LEN]) -> Option<Report> {
    black_box(&mut *io);
    let len = black_box(io.len());
    let step = if black_box(true) {
        installer.offer_in_place(&mut io[..len]).map(Some)
    } else if let Some(block) = decode_block(&io[..len]) {
        installer.write(block.offset, block.data)
    } else {
        Ok(None)
    };
    step.ok().flatten()
}

/// The installer's next step: a block request (sealed into `io`), the switch, or the self-test
/// with golden vectors.
#[inline(never)]
fn advance(
    installer: &mut DeviceInstaller<'_>,
    io: &mut [u8; IO_LEN],
    id: DeviceId<'_>,
    key: &DeviceKey,
    seq: &mut Counters,
) -> Option<Report> {
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
            black_box(wire::seal(id, key, Kind::BlockRequest, &request, &mut io[..])).ok();
            Ok(None)
        }
        Next::Switch => installer.switch(),
        Next::SelfTest => {
            let mut golden = |i: u16, seen: &mut GoldenDigest| {
                // Input and expected output of vector i, and the model's answer.
                seen.update(&io[..black_box(64)]);
                black_box(i) == black_box(0)
            };
            installer.self_test(&mut golden)
        }
        Next::Reboot | Next::Idle => Ok(None),
    };
    next.ok().flatten()
}

/// Seals a progress report into `io`.
#[inline(never)]
fn send_report(
    report: &Report,
    io: &mut [u8; IO_LEN],
    id: DeviceId<'_>,
    key: &DeviceKey,
    seq: &mut Counters,
) {
    let msg = report.progress(1, seq.progress);
    seq.progress = seq.progress.wrapping_add(1);
    black_box(wire::seal(id, key, Kind::Progress, &msg, &mut io[..])).ok();
}

#[unsafe(no_mangle)]
#[allow(non_snake_case)]
pub extern "C" fn Reset() -> ! {
    // The device's long-lived OTA state (statics on firmware): the patcher, the installer that
    // borrows it, and the one message buffer (received offers and blocks, and every message
    // the device seals: summaries, progress reports, block requests).
    let mut patcher = Patcher::new();
    let Ok(mut installer) = power_on(&mut patcher) else {
        common::halt()
    };
    let mut io = [0u8; IO_LEN];
    let mut seq = Counters::default();
    monitor_probe!(|id, key, io| {
        ota_step(&mut installer, &mut io, id, &key, &mut seq);
    })
}
