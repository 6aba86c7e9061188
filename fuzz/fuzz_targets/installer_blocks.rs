//! The device's OTA installer (`device-client/src/ota/installer.rs`) driven by a fuzzed
//! sequence of events on a simulated NOR flash: MQTT block answers (decoded with the device's
//! `decode_block`: genuine, corrupted, misplaced or arbitrary bytes), the retained offer again,
//! offers the fuzzer wrote (unsigned, or signed with the trusted key so that any manifest gets
//! past the signature), aborts, switches, self-tests that pass or fail, and power cycles (the
//! bootloader, then the installer reopened from its progress log).
//!
//! Properties: never panics; the installer never fails on a healthy flash (no error of any
//! kind: it never programs a granule twice without an erase, never leaves its regions); a
//! reported `verified` state means the inactive slot holds exactly the image the manifest
//! names; a `confirmed` image is the active one after the next boot.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};
use tinyfleet_device::ota::boot::{self, ImageInfo};
use tinyfleet_device::ota::decode_block;
use tinyfleet_device::ota::flash::{Layout, Region};
use tinyfleet_device::ota::installer::{Config, GoldenDigest, Installer, Next, Report};
use tinyfleet_device::ota::manifest::{self, Delta, Digest, Manifest};
use tinyfleet_device::ota::patch::{KIND_COPY, KIND_LITERAL, PatchHeader, Patcher};
use tinyfleet_device::ota::sim::SimFlash;
use tinyfleet_device::wire::{self, Block, ota_state};
use tinyfleet_fuzz::{Input, sign_payload, signing_key, trusted};

const SECTOR: usize = 4096;
const SLOT: u32 = 32 * 1024;
/// The patcher's largest block (the manifests below use 1024).
const B: usize = 1024;
const BLOCK: u16 = 1024;
const HW: &str = "nrf52840";

type Flash = SimFlash<4, SECTOR>;

fn layout() -> Layout {
    Layout {
        slots: [Region::new(0, SLOT), Region::new(SLOT, SLOT)],
        boot: Region::new(2 * SLOT, 2 * SECTOR as u32),
        progress: Region::new(2 * SLOT + 2 * SECTOR as u32, 2 * SECTOR as u32),
    }
}

fn config() -> Config<'static> {
    Config {
        hw: HW,
        fw: 10,
        arena: 64 * 1024,
        keys: trusted(),
    }
}

fn pseudo_random(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn sha(bytes: &[u8]) -> Digest {
    Digest(Sha256::digest(bytes).into())
}

/// Everything fixed: the installed image, the next one, a patch between them, two offers.
struct World {
    new: Vec<u8>,
    patch: Vec<u8>,
    full_offer: Vec<u8>,
    delta_offer: Vec<u8>,
    flash: Flash,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let old = pseudo_random(1, 12 * 1024 + 100);
        let mut new = old.clone();
        new.resize(14 * 1024 + 7, 0x5a);
        for (i, b) in new.iter_mut().enumerate() {
            if (i / 1024) % 3 == 1 {
                *b = b.wrapping_add((i % 7) as u8);
            }
        }
        // COPY unchanged blocks, LITERAL the others.
        let mut patch = PatchHeader {
            block_size: BLOCK,
            target_size: new.len() as u32,
            base_size: old.len() as u32,
        }
        .to_bytes()
        .to_vec();
        for (i, out) in new.chunks(usize::from(BLOCK)).enumerate() {
            let at = i * usize::from(BLOCK);
            if old.get(at..at + out.len()) == Some(out) {
                patch.push(KIND_COPY);
                patch.extend_from_slice(&(at as u32).to_le_bytes());
            } else {
                patch.push(KIND_LITERAL);
                patch.extend_from_slice(&(out.len() as u16).to_le_bytes());
                patch.extend_from_slice(out);
            }
        }
        let full = Manifest {
            model_id: "kws",
            model_version: "2",
            seq: 2,
            hw: HW,
            image_size: new.len() as u32,
            image_sha256: sha(&new),
            delta: None,
            block_size: BLOCK,
            url: "",
            object: sha(&new),
            min_fw: 0,
            arena: 0,
            golden: None,
        };
        let delta = Manifest {
            seq: 3,
            delta: Some(Delta {
                base_sha256: sha(&old),
                patch_size: patch.len() as u32,
                patch_sha256: sha(&patch),
                base_size: old.len() as u32,
            }),
            object: sha(&patch),
            ..full
        };
        let kid = manifest::kid_of(signing_key().verifying_key().as_bytes());
        let sign = |m: &Manifest<'_>| manifest::sign_offer(m, &signing_key(), &kid).expect("sign");
        let mut flash = Flash::new(2 * SLOT as usize + 4 * SECTOR);
        flash.load(0, &old);
        let info = ImageInfo {
            seq: 1,
            size: old.len() as u32,
            sha256: sha(&old).0,
        };
        boot::provision(&mut flash, &layout(), 0, info).expect("provision");
        World {
            full_offer: sign(&full),
            delta_offer: sign(&delta),
            new,
            patch,
            flash,
        }
    })
}

/// The confirmed image of the active slot is intact (the installer only ever writes the other
/// slot), and a `verified` image is exactly what its manifest names.
fn check_flash(flash: &mut Flash, verified: Option<(u8, usize, [u8; 32])>) {
    let state = boot::read(flash, &layout()).expect("boot state");
    let active = state.images[usize::from(state.active)];
    let start = layout().slots[usize::from(state.active)].start as usize;
    let bytes = &flash.bytes()[start..start + active.size as usize];
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(bytes)),
        active.sha256,
        "the active slot lost its image"
    );
    if let Some((slot, size, digest)) = verified {
        let start = layout().slots[usize::from(slot)].start as usize;
        let bytes = &flash.bytes()[start..start + size];
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(bytes)),
            digest,
            "verified, but the slot does not hold the image"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let mut flash = w.flash.clone();
    let mut input = Input::new(data);
    let mut patcher = Box::new(Patcher::<B>::new());
    // The image of the offer accepted last: (seq, size, sha256).
    let mut accepted: Option<(u32, usize, [u8; 32])> = None;
    let mut steps = 0;
    // Power cycles until the input is used up.
    while !input.is_empty() && steps < 400 {
        boot::boot(&mut flash, &layout()).expect("the bootloader on a healthy flash");
        let mut inst = Installer::<_, B>::open(flash, layout(), config(), &mut patcher)
            .expect("open on a healthy flash");
        let _ = inst.take_report();
        let mut verified = None;
        while !input.is_empty() && steps < 400 {
            steps += 1;
            let op = input.byte();
            let next = inst.next();
            let report: Option<Report> = match op % 10 {
                // A genuine answer for (about) the wanted offset, sometimes corrupted.
                // (Every op reads its arguments whatever the state, so a program keeps its
                // meaning when a step does not apply.)
                0..=2 => {
                    let back = i64::from(input.byte() % 8) * 64 - 128;
                    let len = 1 + usize::from(input.u16() % 2048);
                    let (flip_at, flip_bit) = (usize::from(input.u16()), input.byte() % 8);
                    let Next::Fetch { object, offset, .. } = next else {
                        continue;
                    };
                    let obj: &[u8] = if object == sha(&w.patch).0 {
                        &w.patch
                    } else {
                        &w.new
                    };
                    let at = (i64::from(offset) + back).clamp(0, obj.len() as i64) as usize;
                    let mut data = obj[at..(at + len).min(obj.len())].to_vec();
                    if op % 10 == 2 && !data.is_empty() {
                        let i = flip_at % data.len();
                        data[i] ^= 1 << flip_bit;
                    }
                    let block = Block {
                        object: &object,
                        offset: at as u32,
                        total: obj.len() as u32,
                        data: &data,
                    };
                    answer(&mut inst, &encode(&block))
                }
                // Arbitrary bytes as a block answer.
                3 => answer(&mut inst, input.frame()),
                // Arbitrary data at the wanted offset, for the wanted object.
                4 => {
                    let data = input.frame();
                    let Next::Fetch {
                        object,
                        offset,
                        total,
                        ..
                    } = next
                    else {
                        continue;
                    };
                    answer(
                        &mut inst,
                        &encode(&Block {
                            object: &object,
                            offset,
                            total,
                            data,
                        }),
                    )
                }
                // An offer: ours (retained, delivered again), or one the fuzzer wrote,
                // unsigned or signed with the trusted key.
                5 => {
                    let offer: Vec<u8> = match input.byte() % 4 {
                        0 => w.full_offer.clone(),
                        1 => w.delta_offer.clone(),
                        2 => input.frame().to_vec(),
                        _ => sign_payload(input.frame()).unwrap_or_default(),
                    };
                    let mut scratch = [0u8; manifest::MAX_OFFER];
                    let r = if input.byte().is_multiple_of(2) {
                        inst.offer(&offer, &mut scratch)
                    } else {
                        let mut rx = offer.clone();
                        inst.offer_in_place(&mut rx)
                    }
                    .expect("offer on a healthy flash");
                    if r.state == ota_state::ACCEPTED {
                        let m = manifest::verify_offer(&offer, trusted(), &mut scratch)
                            .expect("an accepted offer verifies");
                        accepted = Some((m.seq, m.image_size as usize, m.image_sha256.0));
                    }
                    Some(r)
                }
                6 => inst.abort().expect("abort on a healthy flash"),
                7 => inst.switch().expect("switch on a healthy flash"),
                8 => {
                    let pass = input.byte().is_multiple_of(2);
                    let mut test = move |_: u16, _: &mut GoldenDigest| pass;
                    inst.self_test(&mut test)
                        .expect("self-test on a healthy flash")
                }
                // Power cycle.
                _ => break,
            };
            if let Some(r) = report {
                if trace() {
                    eprintln!("step {steps}: {r:?}");
                }
                assert!((1..=8).contains(&r.state), "{r:?}");
                if r.state == ota_state::VERIFIED {
                    let (seq, size, digest) = accepted.expect("verified without an offer");
                    assert_eq!(seq, r.manifest_seq);
                    verified = Some((inst.boot_state().inactive(), size, digest));
                    // Check the slot now: a power cycle, then on.
                    break;
                }
            }
            if inst.next() == Next::Reboot {
                break;
            }
        }
        flash = inst.into_flash();
        check_flash(&mut flash, verified);
    }
    assert_eq!(flash.violations(), 0, "a granule was programmed twice");
});

/// `TF_FUZZ_TRACE=1`: print every report (to check what a seed reaches).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("TF_FUZZ_TRACE").is_some())
}

fn encode(block: &Block<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; block.data.len() + 64];
    let n = wire::to_cbor(block, &mut buf).expect("encode a block");
    buf.truncate(n);
    buf
}

/// Decodes a block answer as the device does and writes it if it is for the wanted object.
fn answer(inst: &mut Installer<'_, Flash, B>, bytes: &[u8]) -> Option<Report> {
    let block = decode_block(bytes)?;
    let Next::Fetch { object, .. } = inst.next() else {
        return None;
    };
    if block.object != object {
        return None;
    }
    inst.write(block.offset, block.data)
        .expect("write on a healthy flash")
}
