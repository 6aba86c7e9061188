//! The delta builder: a `TFP1` patch (format in `tinyfleet_device::ota::patch`) that rebuilds
//! `new` from `base` one output block at a time.
//!
//! For each output block the builder tries a few source offsets in the base image (the same
//! offset, the previous block's offset + one block, for tensors that moved; and offsets where
//! sampled 16-byte windows of the block occur in the base) and, for each, every encoding:
//! COPY (identical), ADD (arithmetic difference as raw bytes, Rice-coded with k = 0, 1, 2, or
//! sparse (gap, value) pairs, each with or without LZ4), and LITERAL (the bytes, with or
//! without LZ4). It keeps the smallest record; a source that continues the previous record's is
//! not stored. Retraining moves int8 weights by small amounts, which byte-matching diffs cannot
//! use but a Rice code of the differences stores in one or two bits per weight.

use std::collections::HashMap;

use tinyfleet_device::ota::patch::{
    CODE_SHIFT, DeltaCode, KIND_ADD, KIND_COPY, KIND_LITERAL, OP_LZ4, OP_NEXT, PatchHeader, zigzag,
};

/// Output bytes per record: the device's patcher needs about three of these in RAM. 512 is what
/// fits the whole device client (monitor + installer, stack included) in 8 KB of RAM
/// (`docs/benchmarks.md`); 1 KB blocks make patches 1-17% smaller for devices with RAM to spare.
pub const DEFAULT_BLOCK_SIZE: u16 = 512;
/// Window length of the base index.
const WINDOW: usize = 16;
/// The base index samples every `STEP`-th offset.
const STEP: usize = 4;
/// Most candidate sources tried per block.
const MAX_CANDIDATES: usize = 6;

/// Why a patch cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    #[error("block size {0} must be between 16 and 4096")]
    BlockSize(u16),
    #[error("images larger than 4 GiB are not supported")]
    TooLarge,
}

/// Statistics of a built patch (for logs and benchmarks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffStats {
    pub copy: usize,
    pub add: usize,
    pub literal: usize,
    pub moved: usize,
}

fn fnv(w: &[u8]) -> u64 {
    w.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Positions of sampled windows of the base image.
struct Index {
    map: HashMap<u64, u32>,
}

impl Index {
    fn new(base: &[u8]) -> Self {
        let mut map = HashMap::with_capacity(base.len() / STEP + 1);
        let mut pos = 0;
        while pos + WINDOW <= base.len() {
            // Keep the first occurrence: runs of equal windows (padding) stay cheap.
            map.entry(fnv(&base[pos..pos + WINDOW]))
                .or_insert(pos as u32);
            pos += STEP;
        }
        Self { map }
    }

    /// Base offsets where a window of `block` occurs, as block start offsets.
    fn candidates(&self, base: &[u8], block: &[u8], out: &mut Vec<u32>) {
        if block.len() < WINDOW {
            return;
        }
        // Probe a few windows spread over the block; STEP consecutive probes per spot, so one
        // hits the sampled grid whatever the shift.
        let spots = [0, block.len() / 2, block.len() - WINDOW];
        for spot in spots {
            for k in 0..STEP {
                let at = (spot + k).min(block.len() - WINDOW);
                let w = &block[at..at + WINDOW];
                if let Some(&p) = self.map.get(&fnv(w)) {
                    let p = p as usize;
                    if base.get(p..p + WINDOW) == Some(w) && p >= at {
                        let src = (p - at) as u32;
                        if !out.contains(&src) {
                            out.push(src);
                        }
                    }
                }
            }
        }
    }
}

/// Writes bit fields LSB first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, bits: u64, count: u32) {
        debug_assert!(count <= 32);
        self.acc |= bits << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn unary(&mut self, mut q: u32) {
        while q >= 32 {
            self.put(u64::from(u32::MAX), 32);
            q -= 32;
        }
        self.put((1u64 << q) - 1, q + 1);
    }

    /// Exp-Golomb of order `g` (see the patcher).
    fn exp_golomb(&mut self, v: u32, g: u32) {
        let m = u64::from(v) + (1 << g);
        let n = 63 - m.leading_zeros();
        self.unary(n - g);
        self.put(m & ((1 << n) - 1), n);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// The delta bytes of one ADD record in `code`'s encoding.
fn code_deltas(deltas: &[u8], code: DeltaCode) -> Vec<u8> {
    match code {
        DeltaCode::Raw => deltas.to_vec(),
        DeltaCode::Rice(k) => {
            let mut w = BitWriter::default();
            for d in deltas {
                let z = u32::from(zigzag(*d as i8));
                w.unary(z >> k);
                w.put(u64::from(z & ((1 << k) - 1)), k);
            }
            w.finish()
        }
        DeltaCode::Sparse(g) => {
            let mut w = BitWriter::default();
            let mut pos = 0;
            for (i, d) in deltas.iter().enumerate().filter(|(_, d)| **d != 0) {
                w.exp_golomb((i - pos) as u32, g);
                w.exp_golomb(u32::from(zigzag(*d as i8)) - 1, 0);
                pos = i + 1;
            }
            if pos < deltas.len() {
                w.exp_golomb((deltas.len() - pos) as u32, g);
            }
            w.finish()
        }
    }
}

/// Every ADD encoding worth trying.
const CODES: [DeltaCode; 8] = [
    DeltaCode::Raw,
    DeltaCode::Rice(0),
    DeltaCode::Rice(1),
    DeltaCode::Rice(2),
    DeltaCode::Sparse(0),
    DeltaCode::Sparse(2),
    DeltaCode::Sparse(4),
    DeltaCode::Sparse(6),
];

/// The smallest record for one block from one source, appended to `out`; `next` is the source
/// the patcher expects without one being stored.
fn encode_from(src: u32, next: u32, base: &[u8], block: &[u8], out: &mut Vec<u8>) {
    let s = src as usize;
    let from = &base[s..s + block.len()];
    let (next_bit, stored) = if src == next {
        (OP_NEXT, None)
    } else {
        (0, Some(src))
    };
    if from == block {
        out.push(KIND_COPY | next_bit);
        if let Some(src) = stored {
            out.extend_from_slice(&src.to_le_bytes());
        }
        return;
    }
    let deltas: Vec<u8> = block
        .iter()
        .zip(from)
        .map(|(n, b)| n.wrapping_sub(*b))
        .collect();
    let mut best: Option<Vec<u8>> = None;
    for code in CODES {
        let Some(bits) = code.bits() else { continue };
        let coded = code_deltas(&deltas, code);
        if coded.len() > block.len() {
            continue;
        }
        let mut trial = Vec::new();
        push_payload(
            &mut trial,
            KIND_ADD | bits << CODE_SHIFT | next_bit,
            stored,
            &coded,
        );
        if best.as_ref().is_none_or(|b| trial.len() < b.len()) {
            best = Some(trial);
        }
    }
    if let Some(best) = best {
        out.extend_from_slice(&best);
    }
}

/// Appends `op [src] plen payload`, LZ4-compressing the payload when that is smaller.
fn push_payload(out: &mut Vec<u8>, op: u8, src: Option<u32>, payload: &[u8]) {
    let compressed = lz4_flex::block::compress(payload);
    let (op, body) = if compressed.len() < payload.len() {
        (op | OP_LZ4, compressed.as_slice())
    } else {
        (op, payload)
    };
    out.push(op);
    if let Some(src) = src {
        out.extend_from_slice(&src.to_le_bytes());
    }
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(body);
}

/// Builds the patch from `base` to `new` with `block_size` output bytes per record.
pub fn diff(base: &[u8], new: &[u8], block_size: u16) -> Result<(Vec<u8>, DiffStats), DiffError> {
    if !(16..=4096).contains(&block_size) {
        return Err(DiffError::BlockSize(block_size));
    }
    let (Ok(target_size), Ok(base_size)) = (u32::try_from(new.len()), u32::try_from(base.len()))
    else {
        return Err(DiffError::TooLarge);
    };
    let header = PatchHeader {
        block_size,
        target_size,
        base_size,
    };
    let mut patch = header.to_bytes().to_vec();
    let mut stats = DiffStats::default();
    let index = Index::new(base);
    let bs = usize::from(block_size);
    let (mut best, mut trial) = (Vec::new(), Vec::new());
    let mut candidates = Vec::new();
    // The source the patcher expects next (see `OP_NEXT`).
    let mut next: u32 = 0;
    for (i, block) in new.chunks(bs).enumerate() {
        let at = i * bs;
        candidates.clear();
        let fits = |src: usize| src + block.len() <= base.len();
        if fits(at) {
            candidates.push(at as u32);
        }
        if fits(next as usize) && !candidates.contains(&next) {
            candidates.push(next);
        }
        index.candidates(base, block, &mut candidates);
        candidates.retain(|&src| fits(src as usize));
        candidates.truncate(MAX_CANDIDATES);

        best.clear();
        push_payload(&mut best, KIND_LITERAL, None, block);
        let mut chosen = None;
        for &src in &candidates {
            trial.clear();
            encode_from(src, next, base, block, &mut trial);
            if trial.len() < best.len() {
                std::mem::swap(&mut best, &mut trial);
                chosen = Some(src);
            }
        }
        match (best[0] & 0b11, chosen) {
            (KIND_COPY, Some(src)) | (KIND_ADD, Some(src)) => {
                if best[0] & 0b11 == KIND_COPY {
                    stats.copy += 1;
                } else {
                    stats.add += 1;
                }
                if src as usize != at {
                    stats.moved += 1;
                }
            }
            _ => stats.literal += 1,
        }
        next = chosen.unwrap_or(next).wrapping_add(block.len() as u32);
        patch.extend_from_slice(&best);
    }
    Ok((patch, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tinyfleet_device::ota::patch::apply_in_memory;

    /// Applies with the device's patcher, in `chunk`-byte pieces.
    pub(crate) fn apply(base: &[u8], patch: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
        apply_in_memory(base, patch, chunk).map_err(|e| format!("{e:?}"))
    }

    fn weights(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn retrained_weights_pack_into_few_bits_and_moves_are_found() {
        let base = weights(64 * 1024, 3);
        // Every weight moves by -1..=1: 2-bit deltas, about a quarter of the image.
        let retrained: Vec<u8> = base
            .iter()
            .enumerate()
            .map(|(i, b)| b.wrapping_add([0, 1, 255][i % 3]))
            .collect();
        let (patch, stats) = diff(&base, &retrained, 1024).unwrap();
        assert_eq!(apply(&base, &patch, 777).unwrap(), retrained);
        assert!(patch.len() < retrained.len() * 3 / 10, "{}", patch.len());
        assert_eq!(stats.add, 64);
        // A tensor inserted in front shifts everything after it.
        let mut shifted = weights(3000, 9);
        shifted.extend_from_slice(&base);
        let (patch, stats) = diff(&base, &shifted, 1024).unwrap();
        assert_eq!(apply(&base, &patch, 4096).unwrap(), shifted);
        assert!(stats.moved > 50, "{stats:?}");
        assert!(patch.len() < 3000 + 64 * 80, "{}", patch.len());
        // Identical images: one-byte COPY records only.
        let (patch, stats) = diff(&base, &base, 1024).unwrap();
        assert_eq!(stats.copy, 64);
        assert_eq!(patch.len(), 16 + 64);
        // A sparse update: a few bits per changed weight.
        let mut sparse = base.clone();
        for i in (0..sparse.len()).step_by(97) {
            sparse[i] = sparse[i].wrapping_add(40);
        }
        let (patch, _) = diff(&base, &sparse, 1024).unwrap();
        assert_eq!(apply(&base, &patch, 333).unwrap(), sparse);
        assert!(patch.len() < (sparse.len() / 97) * 3, "{}", patch.len());
    }

    #[test]
    fn bad_block_sizes_are_refused() {
        assert_eq!(diff(&[], &[], 8), Err(DiffError::BlockSize(8)));
        assert_eq!(diff(&[], &[], 8192), Err(DiffError::BlockSize(8192)));
        let (patch, _) = diff(&[], &[], 1024).unwrap();
        assert_eq!(apply(&[], &patch, 1).unwrap(), Vec::<u8>::new());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn apply_of_diff_is_the_new_image(
            base in proptest::collection::vec(any::<u8>(), 0..6000),
            edits in proptest::collection::vec((any::<u16>(), any::<i8>(), 0u8..4), 0..40),
            block in prop_oneof![Just(16u16), Just(64), Just(1024), Just(4096)],
            chunk in 1usize..700,
        ) {
            // New images related to the base (edited, shifted, cut, grown) and unrelated ones.
            let mut new = base.clone();
            for (pos, delta, how) in edits {
                let at = if new.is_empty() { 0 } else { pos as usize % new.len() };
                match how {
                    0 if !new.is_empty() => new[at] = new[at].wrapping_add(delta as u8),
                    1 => new.insert(at, delta as u8),
                    2 if !new.is_empty() => { new.remove(at); }
                    _ => new.extend_from_slice(&[delta as u8; 7]),
                }
            }
            let (patch, _) = diff(&base, &new, block).unwrap();
            prop_assert_eq!(apply(&base, &patch, chunk).unwrap(), new);
        }

        #[test]
        fn unrelated_pairs_round_trip(
            base in proptest::collection::vec(any::<u8>(), 0..3000),
            new in proptest::collection::vec(any::<u8>(), 0..3000),
        ) {
            let (patch, _) = diff(&base, &new, 256).unwrap();
            prop_assert_eq!(apply(&base, &patch, 100).unwrap(), new);
        }
    }
}
