//! The streaming `TFP1` patcher (`device-client/src/ota/patch.rs`) on arbitrary patch bytes
//! against a fixed base image, the way the installer feeds it.
//!
//! Properties: never panics and never writes outside the output or reads outside the base
//! (the slots below check both); the outcome does not depend on how the patch is chunked (whole,
//! byte by byte, or in fuzzed pieces give the same output and the same error); resuming a fresh
//! patcher at any record boundary the first one reported, fed the rest of the patch, produces
//! the same output (what the installer does after a power loss).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::ota::patch::{PatchError, PatchHeader, Patcher, Position, Slots};
use tinyfleet_fuzz::Input;

/// The patcher's largest block, as on a device.
const B: usize = 1024;
const BASE_LEN: usize = 8 * 1024;

fn base() -> &'static [u8] {
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let mut x = 0x1234_5678u32;
        (0..BASE_LEN)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Runs of zeros and noise, like model weights.
                if (i / 512) % 3 == 0 {
                    0
                } else {
                    (x >> 24) as u8
                }
            })
            .collect()
    })
}

/// Slots that check the patcher's contract: reads inside the base, one write per block in
/// increasing order, never longer than a block. Output is capped so a patch naming a huge
/// target costs no memory.
struct Checked {
    out: Vec<u8>,
    written: u64,
}

const OUT_CAP: usize = 64 * 1024;

impl Slots for Checked {
    type Error = ();
    fn read_base(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), ()> {
        let o = offset as usize;
        let from = base().get(o..o + buf.len()).ok_or(())?;
        buf.copy_from_slice(from);
        Ok(())
    }
    fn write_out(&mut self, offset: u32, data: &[u8]) -> Result<(), ()> {
        assert_eq!(
            u64::from(offset),
            self.written,
            "blocks are written in order"
        );
        assert!(!data.is_empty() && data.len() <= B, "one block at a time");
        self.written += data.len() as u64;
        if self.out.len() + data.len() > OUT_CAP {
            return Err(());
        }
        self.out.extend_from_slice(data);
        Ok(())
    }
}

#[derive(Debug, PartialEq)]
struct Outcome {
    out: Vec<u8>,
    result: Result<(), PatchError<()>>,
    done: bool,
}

/// Feeds `patch` in the given chunk sizes (cycled); stops at the first error.
fn run(patch: &[u8], chunks: &[usize], boundaries: Option<&mut Vec<Position>>) -> Outcome {
    let mut p = Box::new(Patcher::<B>::new());
    let mut slots = Checked {
        out: Vec::new(),
        written: 0,
    };
    let mut at = 0;
    let mut i = 0;
    let mut seen = boundaries;
    let mut result = Ok(());
    while at < patch.len() {
        let n = chunks[i % chunks.len()].clamp(1, patch.len() - at);
        i += 1;
        result = p.feed(&patch[at..at + n], &mut slots);
        at += n;
        if let Some(b) = seen.as_deref_mut() {
            let pos = p.boundary();
            if b.last() != Some(&pos) {
                b.push(pos);
            }
        }
        if result.is_err() {
            break;
        }
    }
    Outcome {
        out: slots.out,
        result,
        done: p.is_done(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let pick = usize::from(input.byte());
    let chunks: Vec<usize> = (0..1 + input.byte() % 4)
        .map(|_| 1 + usize::from(input.u16() % 2048))
        .collect();
    let patch = input.rest();

    let mut boundaries = Vec::new();
    let bytewise = run(patch, &[1], Some(&mut boundaries));
    let whole = run(patch, &[patch.len().max(1)], None);
    let chunked = run(patch, &chunks, None);
    // An output cap hit (Io) may happen at a different point only in how much was written
    // before it; everything else must agree exactly.
    if bytewise.result != Err(PatchError::Io(())) {
        assert_eq!(whole, bytewise, "whole vs byte by byte");
        assert_eq!(chunked, bytewise, "chunked vs byte by byte");
    }

    // Resume at record boundaries seen (a checkpoint after a power loss): a fuzzed one, the
    // middle one and the last one.
    let Some(header) = header_of(patch) else {
        return;
    };
    let resumable: Vec<Position> = boundaries
        .into_iter()
        .filter(|b| b.patch_offset >= 16)
        .collect();
    if resumable.is_empty() {
        return;
    }
    let n = resumable.len();
    for at in [pick % n, n / 2, n - 1].map(|i| &resumable[i]) {
        let Ok(mut p) = Patcher::<B>::resume(header, *at) else {
            panic!("a reported boundary {at:?} does not resume");
        };
        let mut slots = Checked {
            out: bytewise.out[..(at.out_offset as usize).min(bytewise.out.len())].to_vec(),
            written: u64::from(at.out_offset),
        };
        let rest = &patch[at.patch_offset as usize..];
        let mut result = Ok(());
        for b in rest.chunks(1) {
            result = p.feed(b, &mut slots);
            if result.is_err() {
                break;
            }
        }
        if bytewise.result != Err(PatchError::Io(())) {
            assert_eq!(result, bytewise.result, "resumed at {at:?}");
            assert_eq!(slots.out, bytewise.out, "resumed at {at:?}");
            assert_eq!(p.is_done(), bytewise.done);
        }
    }
});

fn header_of(patch: &[u8]) -> Option<PatchHeader> {
    let h: &[u8; 16] = patch.get(..16)?.try_into().ok()?;
    PatchHeader::parse(h).ok()
}
