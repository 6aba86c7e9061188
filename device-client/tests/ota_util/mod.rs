//! Shared by the `ota_*` tests: keys, manifests, hand-built `TFP1` patches, a provisioned
//! simulated flash, and a device loop that runs power cycles until the install settles.
#![allow(dead_code)]

use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256};
use tinyfleet_device::ota::boot::{self, ImageInfo};
use tinyfleet_device::ota::flash::{Layout, Region};
use tinyfleet_device::ota::installer::{Error, GoldenDigest, Installer, Next, Report, SelfTest};
use tinyfleet_device::ota::manifest::{self, Delta, Digest, Golden, Manifest, TrustedKey};
use tinyfleet_device::ota::patch::{HEADER_LEN, KIND_COPY, KIND_LITERAL, PatchHeader, Patcher};
use tinyfleet_device::ota::sim::{SimError, SimFlash};
use tinyfleet_device::ota::{Config, installer};
use tinyfleet_device::wire::ota_state;

pub const SECTOR: usize = 4096;
pub const SLOT: u32 = 32 * 1024;
pub const BLOCK: u16 = 1024;
/// Largest patch block the test installers take.
pub const B: usize = 1024;
pub const HW: &str = "nrf52840";

pub type Flash<const W: usize> = SimFlash<W, SECTOR>;

pub fn layout() -> Layout {
    Layout {
        slots: [Region::new(0, SLOT), Region::new(SLOT, SLOT)],
        boot: Region::new(2 * SLOT, 2 * SECTOR as u32),
        progress: Region::new(2 * SLOT + 2 * SECTOR as u32, 2 * SECTOR as u32),
    }
}

pub fn capacity() -> usize {
    2 * SLOT as usize + 4 * SECTOR
}

pub fn signing_key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub fn kid(n: u8) -> [u8; 8] {
    manifest::kid_of(signing_key(n).verifying_key().as_bytes())
}

/// The trusted keys of the test devices: keys 1 and 2 (rotation).
pub fn trusted() -> [TrustedKey<'static>; 2] {
    let k = |n: u8| TrustedKey {
        kid: Box::leak(Box::new(kid(n))),
        public: signing_key(n).verifying_key().to_bytes(),
    };
    [k(1), k(2)]
}

pub fn config(keys: &'static [TrustedKey<'static>]) -> Config<'static> {
    Config {
        hw: HW,
        fw: 10,
        arena: 64 * 1024,
        keys,
    }
}

pub fn sha(bytes: &[u8]) -> Digest {
    Digest(Sha256::digest(bytes).into())
}

/// A test image: `len` pseudo-random bytes from `seed`.
pub fn image(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// `old` with a few 1 KB blocks changed: the next model version.
pub fn retrained(old: &[u8], len: usize) -> Vec<u8> {
    let mut new = old.to_vec();
    new.resize(len, 0x5a);
    for (i, b) in new.iter_mut().enumerate() {
        if (i / 1024) % 3 == 1 {
            *b = b.wrapping_add((i % 7) as u8);
        }
    }
    new
}

pub fn full_manifest(seq: u32, img: &[u8]) -> Manifest<'static> {
    Manifest {
        model_id: "kws",
        model_version: "2026.11.2",
        seq,
        hw: HW,
        image_size: img.len() as u32,
        image_sha256: sha(img),
        delta: None,
        block_size: BLOCK,
        url: "https://ota.example/objects/x",
        object: sha(img),
        min_fw: 0,
        arena: 0,
        golden: None,
    }
}

pub fn delta_manifest(seq: u32, base: &[u8], new: &[u8], patch: &[u8]) -> Manifest<'static> {
    Manifest {
        delta: Some(Delta {
            base_sha256: sha(base),
            patch_size: patch.len() as u32,
            patch_sha256: sha(patch),
            base_size: base.len() as u32,
        }),
        object: sha(patch),
        ..full_manifest(seq, new)
    }
}

pub fn with_golden(mut m: Manifest<'static>, vectors: &[(&[u8], &[u8])]) -> Manifest<'static> {
    let mut h = Sha256::new();
    for (input, expected) in vectors {
        h.update(input);
        h.update(expected);
    }
    m.golden = Some(Golden {
        count: vectors.len() as u16,
        sha256: Digest(h.finalize().into()),
    });
    m
}

pub fn sign(m: &Manifest<'_>) -> Vec<u8> {
    manifest::sign_offer(m, &signing_key(1), &kid(1)).unwrap()
}

/// The simplest valid `TFP1` patch: per block, COPY from the same offset of `base` when that
/// block is unchanged, else an uncompressed LITERAL.
pub fn literal_patch(base: &[u8], new: &[u8], block: u16) -> Vec<u8> {
    let mut p = PatchHeader {
        block_size: block,
        target_size: new.len() as u32,
        base_size: base.len() as u32,
    }
    .to_bytes()
    .to_vec();
    assert_eq!(p.len(), HEADER_LEN);
    for (i, out) in new.chunks(usize::from(block)).enumerate() {
        let at = i * usize::from(block);
        if base.get(at..at + out.len()) == Some(out) {
            p.push(KIND_COPY);
            p.extend_from_slice(&(at as u32).to_le_bytes());
        } else {
            p.push(KIND_LITERAL);
            p.extend_from_slice(&(out.len() as u16).to_le_bytes());
            p.extend_from_slice(out);
        }
    }
    p
}

/// A flash whose slot 0 holds `old` (seq `seq`), provisioned as the confirmed image.
pub fn provisioned<const W: usize>(old: &[u8], seq: u32) -> Flash<W> {
    let mut f = Flash::<W>::new(capacity());
    f.load(0, old);
    let info = ImageInfo {
        seq,
        size: old.len() as u32,
        sha256: sha(old).0,
    };
    boot::provision(&mut f, &layout(), 0, info).unwrap();
    f
}

/// What the bootloader would start next, and the confirmed slot's image, as bytes.
pub fn bootable<const W: usize>(f: &Flash<W>, len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut g = f.clone();
    g.power_on();
    let s = boot::read(&mut g, &layout()).unwrap();
    let slot = |n: u8| {
        let r = layout().slots[usize::from(n)];
        g.bytes()[r.start as usize..r.start as usize + len].to_vec()
    };
    (slot(s.next_boot()), slot(s.active))
}

/// The image a slot holds, if it is exactly `old` or `new`: 0 for old, 1 for new.
pub fn which(bytes: &[u8], old: &[u8], new: &[u8]) -> Option<u8> {
    if bytes.starts_with(old) {
        Some(0)
    } else if bytes.starts_with(new) {
        Some(1)
    } else {
        None
    }
}

/// A self-test with golden vectors: `model` maps an input to an output.
pub struct GoldenModel<'a> {
    pub vectors: &'a [(&'a [u8], &'a [u8])],
    pub model: fn(&[u8]) -> Vec<u8>,
}

impl SelfTest for GoldenModel<'_> {
    fn run(&mut self, index: u16, seen: &mut GoldenDigest) -> bool {
        let Some((input, expected)) = self.vectors.get(usize::from(index)) else {
            return false;
        };
        seen.update(input);
        seen.update(expected);
        (self.model)(input) == *expected
    }
}

/// A trace of a device's life across power cycles.
#[derive(Debug, Default)]
pub struct Trace {
    pub reports: Vec<Report>,
    pub boots: usize,
    /// Flash op counts before the boot that started the trial and after the self-test.
    pub trial_ops: Option<(usize, usize)>,
}

impl Trace {
    pub fn states(&self) -> Vec<u8> {
        self.reports.iter().map(|r| r.state).collect()
    }
    pub fn last(&self) -> Report {
        *self.reports.last().unwrap()
    }
}

type DevError = Error<SimError>;

fn power_lost(e: &DevError) -> bool {
    matches!(
        e,
        Error::Flash(installer_flash_err) if *installer_flash_err
            == tinyfleet_device::ota::flash::FlashError::Flash(SimError::PowerLost)
    )
}

/// One power cycle: the bootloader, then the installer, the (retained) offer, and the steps the
/// installer asks for, fetching `chunk` bytes at a time, until it is idle or asks for a reboot.
/// `Ok(true)`: idle; `Ok(false)`: reboot asked; `Err`: flash error (power lost).
pub fn power_cycle<const W: usize>(
    f: &mut Flash<W>,
    offer: &[u8],
    object: &[u8],
    chunk: usize,
    test: &mut impl SelfTest,
    trace: &mut Trace,
) -> Result<bool, DevError> {
    static KEYS: std::sync::OnceLock<[TrustedKey<'static>; 2]> = std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(trusted);
    trace.boots += 1;
    let before_boot = f.ops();
    let booted = boot::boot(f, &layout())?;
    let mut patcher = Patcher::new();
    let mut inst = Installer::<_, B>::open(&mut *f, layout(), config(keys), &mut patcher)?;
    trace.reports.extend(inst.take_report());
    // The offer arrives in the receive buffer, verified in place.
    let mut rx = offer.to_vec();
    let r = inst.offer_in_place(&mut rx)?;
    trace.reports.push(r);
    loop {
        match inst.next() {
            Next::Idle => return Ok(true),
            Next::Reboot => return Ok(false),
            Next::Fetch { offset, total, .. } => {
                assert_eq!(total as usize, object.len());
                let end = (offset as usize + chunk).min(object.len());
                let r = inst.write(offset, &object[offset as usize..end])?;
                trace.reports.extend(r);
            }
            Next::Switch => trace.reports.extend(inst.switch()?),
            Next::SelfTest => {
                assert!(booted.trial);
                let r = inst.self_test(test)?;
                trace.reports.extend(r);
                drop(inst);
                trace.trial_ops = Some((before_boot, f.ops()));
                return Ok(r.is_some_and(|r| r.state == ota_state::CONFIRMED));
            }
        }
    }
}

/// Power cycles until the device is idle (at most `max` boots). Stops at the first power loss
/// (returns the error).
pub fn run_device<const W: usize>(
    f: &mut Flash<W>,
    offer: &[u8],
    object: &[u8],
    chunk: usize,
    test: &mut impl SelfTest,
    trace: &mut Trace,
) -> Result<(), DevError> {
    for _ in 0..8 {
        if power_cycle(f, offer, object, chunk, test, trace)? {
            return Ok(());
        }
    }
    panic!("no idle after 8 boots: {trace:?}");
}

/// Like [`run_device`], but a power loss is a reboot: runs until idle.
pub fn run_to_end<const W: usize>(
    f: &mut Flash<W>,
    offer: &[u8],
    object: &[u8],
    chunk: usize,
    test: &mut impl SelfTest,
    trace: &mut Trace,
) {
    for _ in 0..8 {
        match run_device(f, offer, object, chunk, test, trace) {
            Ok(()) => return,
            Err(e) if power_lost(&e) => f.power_on(),
            Err(e) => panic!("{e:?}"),
        }
    }
    panic!("did not settle");
}

/// Passes without golden vectors.
pub fn pass() -> impl SelfTest {
    |_: u16, _: &mut GoldenDigest| true
}

#[allow(unused_imports)]
pub use installer::error;
