//! The streaming delta patcher: rebuilds a new model image from the installed one and a `TFP1`
//! patch, one output block at a time, in a fixed RAM budget (about `3 * B` bytes), reading the
//! old image and writing the new one only through [`Slots`].
//!
//! Format (normative; mirrored in `docs/protocol.md`, "Delta patches"):
//!
//! ```text
//! header  = "TFP1" block_size:u16le reserved:u16le(0) target_size:u32le base_size:u32le
//! record  = op:u8 [src:u32le] [plen:u16le payload:plen bytes]     one per output block
//! op      = kind (bits 0-1) | code (bits 2-4) | lz4 (bit 5) | next (bit 6); bit 7 zero
//!   kind 0 COPY     out = base[src .. src+len]                     (src, no payload)
//!   kind 1 ADD      out[i] = base[src+i] + delta[i] (mod 256)      (src, payload)
//!   kind 2 LITERAL  out = payload                                   (payload)
//!   next (COPY, ADD) src is not stored: it is the previous record's src + its length (0 for
//!                   the first record; a LITERAL counts as if its src were the one expected)
//!   code (ADD only) how the deltas are stored, with z the zigzag code of a signed delta
//!                   (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...):
//!                   0     the delta bytes as they are
//!                   1-3   Rice, k = code - 1: z >> k one bits, a zero bit, the low k bits of z
//!                   4-7   sparse, g = 2 * (code - 4): repeated (gap, value): gap = zero deltas
//!                         before the next non-zero one, Exp-Golomb of order g; value = z - 1,
//!                         Exp-Golomb of order 0; a gap that reaches the end of the block ends it
//!                   Exp-Golomb of order g: v + 2^g has n + 1 significant bits; n - g one bits,
//!                   a zero bit, then its low n bits. All bit fields LSB first, bytes filled
//!                   from bit 0, the last byte padded with zero bits.
//!   lz4 (ADD, LITERAL) the payload is an LZ4 block (lz4_flex block format, no size prefix)
//! ```
//!
//! `len` of a record is `block_size`, except for the last, which ends at `target_size`. A patch
//! ends exactly after the record that reaches `target_size`; anything after it is an error. Why
//! this shape: retraining moves every int8 weight a little, so byte-matching diffs (bsdiff) find
//! nothing, while the arithmetic difference of aligned regions is mostly 0 and +-1, which a Rice
//! code stores in 1-2 bits per weight (and a sparse update in a few bits per changed weight);
//! moved tensors are found by `src`; unchanged regions cost one byte per block.

use lz4_flex::block::decompress_into;

/// Bytes of the patch header.
pub const HEADER_LEN: usize = 16;
/// The header's magic.
pub const MAGIC: [u8; 4] = *b"TFP1";

/// Record kinds.
pub const KIND_COPY: u8 = 0;
pub const KIND_ADD: u8 = 1;
pub const KIND_LITERAL: u8 = 2;
/// The op bit that marks an LZ4-compressed payload.
pub const OP_LZ4: u8 = 1 << 5;
/// The op bit that leaves `src` out (it is the expected one).
pub const OP_NEXT: u8 = 1 << 6;
/// Shift of the ADD code in the op byte.
pub const CODE_SHIFT: u8 = 2;

/// How an ADD record stores its deltas (bits 2-4 of the op).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaCode {
    /// The delta bytes as they are.
    Raw,
    /// Rice codes of the zigzag codes with parameter `k` (0-2).
    Rice(u32),
    /// (gap, value) pairs, gaps Exp-Golomb of order `g` (0, 2, 4, 6).
    Sparse(u32),
}

impl DeltaCode {
    /// The code of op bits 2-4.
    pub const fn from_bits(code: u8) -> Self {
        match code & 0b111 {
            0 => Self::Raw,
            c @ 1..=3 => Self::Rice(c as u32 - 1),
            c => Self::Sparse(2 * (c as u32 - 4)),
        }
    }

    /// Op bits 2-4 of this code (`None` for parameters the format has no code for).
    pub const fn bits(self) -> Option<u8> {
        match self {
            Self::Raw => Some(0),
            Self::Rice(k) if k <= 2 => Some(k as u8 + 1),
            Self::Sparse(g) if g <= 6 && g % 2 == 0 => Some(4 + g as u8 / 2),
            _ => None,
        }
    }
}

/// The patch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PatchHeader {
    /// Output bytes per record (the last record may be shorter).
    pub block_size: u16,
    /// Size of the image the patch builds.
    pub target_size: u32,
    /// Size of the image the patch reads (its digest is checked before applying).
    pub base_size: u32,
}

impl PatchHeader {
    /// The 16 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&self.block_size.to_le_bytes());
        h[8..12].copy_from_slice(&self.target_size.to_le_bytes());
        h[12..16].copy_from_slice(&self.base_size.to_le_bytes());
        h
    }

    /// Parses and checks the 16 header bytes.
    pub fn parse(h: &[u8; HEADER_LEN]) -> Result<Self, Malformed> {
        if h[..4] != MAGIC {
            return Err(Malformed::Magic);
        }
        let block_size = u16::from_le_bytes([h[4], h[5]]);
        if block_size == 0 || h[6] != 0 || h[7] != 0 {
            return Err(Malformed::Header);
        }
        Ok(Self {
            block_size,
            target_size: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            base_size: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
        })
    }
}

/// Reads the base image (the active slot, only read) and writes the output (the inactive slot).
pub trait Slots {
    type Error;
    /// Reads `buf.len()` bytes of the base image at `offset`.
    fn read_base(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes one output block at `offset`; called once per block, in increasing order.
    fn write_out(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error>;
}

/// A record boundary: patch bytes consumed and output bytes written there, and the base offset
/// a `next` record would read. Feeding the patch from `patch_offset` to a patcher
/// [resumed](Patcher::resume) here continues the install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Position {
    pub patch_offset: u32,
    pub out_offset: u32,
    pub next_src: u32,
}

/// What is wrong with a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Malformed {
    /// Not a `TFP1` patch.
    Magic,
    /// Reserved header bits set, or a zero block size.
    Header,
    /// The patch's blocks are larger than this patcher's buffers.
    BlockTooLarge,
    /// An op byte with reserved bits or an unknown kind.
    Op,
    /// A record reads outside the base image.
    BaseRange,
    /// A payload length that cannot be right for its record.
    PayloadLength,
    /// The LZ4 payload does not decompress to the expected length.
    Decompress,
    /// An ADD record's coded deltas are malformed, or do not end with its payload.
    Delta,
    /// Bytes after the last record.
    TrailingData,
    /// Resuming at a position that is not a record boundary of this patch.
    Resume,
    /// The patch ended before its last record.
    Truncated,
}

/// Why patching failed: a malformed patch, or the slots' error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PatchError<E> {
    Malformed(Malformed),
    Io(E),
}

impl<E> From<Malformed> for PatchError<E> {
    fn from(m: Malformed) -> Self {
        Self::Malformed(m)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Collecting the header.
    Header,
    /// Collecting a record's op byte and fields (`need` bytes in `fields`).
    Fields { need: usize },
    /// Collecting `need` payload bytes.
    Payload { need: usize },
    /// The last record was applied.
    Done,
}

/// The streaming patcher; `B` is the largest block size it accepts (RAM is about `3 * B`).
#[derive(Debug)]
pub struct Patcher<const B: usize> {
    stage: Stage,
    header: Option<PatchHeader>,
    /// Header or record fields collected so far.
    fields: [u8; HEADER_LEN],
    filled: usize,
    payload: [u8; B],
    scratch: [u8; B],
    out: [u8; B],
    op: u8,
    src: u32,
    /// Patch bytes consumed, and output written, so far.
    consumed: u32,
    written: u32,
    boundary: Position,
}

impl<const B: usize> Default for Patcher<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const B: usize> Patcher<B> {
    /// A patcher at the start of a patch.
    pub const fn new() -> Self {
        Self {
            stage: Stage::Header,
            header: None,
            fields: [0; HEADER_LEN],
            filled: 0,
            payload: [0; B],
            scratch: [0; B],
            out: [0; B],
            op: 0,
            src: 0,
            consumed: 0,
            written: 0,
            boundary: Position {
                patch_offset: 0,
                out_offset: 0,
                next_src: 0,
            },
        }
    }

    /// A patcher continuing at `at`, a [`boundary`](Self::boundary) saved before a power loss;
    /// feed the patch from `at.patch_offset` on.
    pub fn resume(header: PatchHeader, at: Position) -> Result<Self, Malformed> {
        if usize::from(header.block_size) > B {
            return Err(Malformed::BlockTooLarge);
        }
        let aligned = at.out_offset.is_multiple_of(u32::from(header.block_size))
            || at.out_offset == header.target_size;
        if !aligned || at.out_offset > header.target_size || at.patch_offset < HEADER_LEN as u32 {
            return Err(Malformed::Resume);
        }
        let mut p = Self::new();
        p.header = Some(header);
        p.src = at.next_src;
        p.consumed = at.patch_offset;
        p.written = at.out_offset;
        p.boundary = at;
        p.stage = if at.out_offset == header.target_size {
            Stage::Done
        } else {
            Stage::Fields { need: 1 }
        };
        Ok(p)
    }

    /// The header, once read.
    pub fn header(&self) -> Option<PatchHeader> {
        self.header
    }

    /// The last record boundary: where an interrupted install can resume.
    pub fn boundary(&self) -> Position {
        self.boundary
    }

    /// Whether the whole output was written.
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Output length of the record at the current output offset.
    fn record_len(&self, h: &PatchHeader) -> usize {
        (h.target_size - self.written).min(u32::from(h.block_size)) as usize
    }

    /// Feeds the next bytes of the patch, in any chunking; applies every record completed.
    pub fn feed<S: Slots>(
        &mut self,
        mut data: &[u8],
        slots: &mut S,
    ) -> Result<(), PatchError<S::Error>> {
        while !data.is_empty() {
            match self.stage {
                Stage::Done => return Err(Malformed::TrailingData.into()),
                Stage::Header => {
                    let take = (HEADER_LEN - self.filled).min(data.len());
                    self.fields[self.filled..self.filled + take].copy_from_slice(&data[..take]);
                    self.filled += take;
                    data = &data[take..];
                    self.consumed += take as u32;
                    if self.filled == HEADER_LEN {
                        let h = PatchHeader::parse(&self.fields)?;
                        if usize::from(h.block_size) > B {
                            return Err(Malformed::BlockTooLarge.into());
                        }
                        self.header = Some(h);
                        self.filled = 0;
                        self.boundary = Position {
                            patch_offset: self.consumed,
                            out_offset: 0,
                            next_src: 0,
                        };
                        self.stage = if h.target_size == 0 {
                            Stage::Done
                        } else {
                            Stage::Fields { need: 1 }
                        };
                    }
                }
                Stage::Fields { need } => {
                    let take = (need - self.filled).min(data.len());
                    self.fields[self.filled..self.filled + take].copy_from_slice(&data[..take]);
                    self.filled += take;
                    data = &data[take..];
                    self.consumed += take as u32;
                    if self.filled == need {
                        self.fields_complete(slots)?;
                    }
                }
                Stage::Payload { need } => {
                    let take = (need - self.filled).min(data.len());
                    self.payload[self.filled..self.filled + take].copy_from_slice(&data[..take]);
                    self.filled += take;
                    data = &data[take..];
                    self.consumed += take as u32;
                    if self.filled == need {
                        self.filled = 0;
                        self.apply(need, slots)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The op byte, or all of a record's fields, have arrived.
    fn fields_complete<S: Slots>(&mut self, slots: &mut S) -> Result<(), PatchError<S::Error>> {
        let op = self.fields[0];
        let kind = op & 0b11;
        let code = (op >> CODE_SHIFT) & 0b111;
        let (lz4, next) = (op & OP_LZ4 != 0, op & OP_NEXT != 0);
        let invalid = op & 0x80 != 0
            || kind > KIND_LITERAL
            || (kind != KIND_ADD && code != 0)
            || (kind == KIND_COPY && lz4)
            || (kind == KIND_LITERAL && next);
        if invalid {
            return Err(Malformed::Op.into());
        }
        let has_src = kind != KIND_LITERAL && !next;
        let need = 1 + if has_src { 4 } else { 0 } + if kind == KIND_COPY { 0 } else { 2 };
        if self.filled < need {
            // Only the op byte so far: now the rest of the fields.
            self.stage = Stage::Fields { need };
            return Ok(());
        }
        self.op = op;
        let f = &self.fields;
        let mut at = 1;
        if has_src {
            self.src = u32::from_le_bytes([f[1], f[2], f[3], f[4]]);
            at = 5;
        }
        self.filled = 0;
        if kind == KIND_COPY {
            return self.apply(0, slots);
        }
        let plen = usize::from(u16::from_le_bytes([f[at], f[at + 1]]));
        if plen == 0 || plen > B {
            return Err(Malformed::PayloadLength.into());
        }
        self.stage = Stage::Payload { need: plen };
        Ok(())
    }

    /// Applies the record whose fields and `plen` payload bytes have arrived.
    fn apply<S: Slots>(&mut self, plen: usize, slots: &mut S) -> Result<(), PatchError<S::Error>> {
        let h = self.header.ok_or(Malformed::Header)?;
        let len = self.record_len(&h);
        let kind = self.op & 0b11;
        let lz4 = self.op & OP_LZ4 != 0;
        if kind != KIND_LITERAL {
            let end = u64::from(self.src) + len as u64;
            if end > u64::from(h.base_size) {
                return Err(Malformed::BaseRange.into());
            }
        }
        let out = &mut self.out[..len];
        match kind {
            KIND_COPY => slots.read_base(self.src, out).map_err(PatchError::Io)?,
            KIND_LITERAL => {
                if lz4 {
                    let n = decompress_into(&self.payload[..plen], out)
                        .map_err(|_| Malformed::Decompress)?;
                    if n != len {
                        return Err(Malformed::Decompress.into());
                    }
                } else if plen == len {
                    out.copy_from_slice(&self.payload[..len]);
                } else {
                    return Err(Malformed::PayloadLength.into());
                }
            }
            _ => {
                let code = DeltaCode::from_bits(self.op >> CODE_SHIFT);
                let deltas: &[u8] = if lz4 {
                    let n = decompress_into(&self.payload[..plen], &mut self.scratch)
                        .map_err(|_| Malformed::Decompress)?;
                    &self.scratch[..n]
                } else {
                    &self.payload[..plen]
                };
                slots.read_base(self.src, out).map_err(PatchError::Io)?;
                match code {
                    DeltaCode::Raw if deltas.len() == len => {
                        for (o, d) in out.iter_mut().zip(deltas) {
                            *o = o.wrapping_add(*d);
                        }
                    }
                    DeltaCode::Raw => return Err(Malformed::PayloadLength.into()),
                    DeltaCode::Rice(k) => add_rice(out, deltas, k)?,
                    DeltaCode::Sparse(g) => add_sparse(out, deltas, g)?,
                }
            }
        }
        slots
            .write_out(self.written, &self.out[..len])
            .map_err(PatchError::Io)?;
        self.written += len as u32;
        // The next implicit source follows this record's (a LITERAL keeps the expected one).
        self.src = self.src.wrapping_add(len as u32);
        self.boundary = Position {
            patch_offset: self.consumed,
            out_offset: self.written,
            next_src: self.src,
        };
        self.stage = if self.written == h.target_size {
            Stage::Done
        } else {
            Stage::Fields { need: 1 }
        };
        Ok(())
    }
}

/// Zigzag code of a signed delta: 0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4, ...
pub const fn zigzag(d: i8) -> u8 {
    ((d as i16) << 1 ^ (d as i16) >> 7) as u8
}

/// The signed delta of a zigzag code.
pub const fn unzigzag(z: u8) -> i8 {
    ((z >> 1) as i8) ^ -((z & 1) as i8)
}

/// Reads bits LSB first.
struct Bits<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Result<u8, Malformed> {
        let byte = self.bytes.get(self.at / 8).ok_or(Malformed::Delta)?;
        let b = (byte >> (self.at % 8)) & 1;
        self.at += 1;
        Ok(b)
    }

    /// `n` bits as a number, the first read the lowest.
    fn bits(&mut self, n: u32) -> Result<u32, Malformed> {
        let mut v = 0;
        for i in 0..n {
            v |= u32::from(self.bit()?) << i;
        }
        Ok(v)
    }

    /// One bits up to a zero bit, at most `max`.
    fn unary(&mut self, max: u32) -> Result<u32, Malformed> {
        let mut q = 0;
        while self.bit()? == 1 {
            q += 1;
            if q > max {
                return Err(Malformed::Delta);
            }
        }
        Ok(q)
    }

    /// Exp-Golomb of order `g` (see the module docs); values stay below 2^24.
    fn exp_golomb(&mut self, g: u32) -> Result<u32, Malformed> {
        let n = g + self.unary(24)?;
        if n > 24 {
            return Err(Malformed::Delta);
        }
        Ok(((1 << n) | self.bits(n)?) - (1 << g))
    }

    /// Checks that the codes ended in the last byte and its padding bits are zero.
    fn finish(mut self) -> Result<(), Malformed> {
        if self.at.div_ceil(8) != self.bytes.len() {
            return Err(Malformed::Delta);
        }
        while !self.at.is_multiple_of(8) {
            if self.bit()? != 0 {
                return Err(Malformed::Delta);
            }
        }
        Ok(())
    }
}

/// `out[i] += delta[i]`, the deltas Rice-coded with parameter `k` (see the module docs).
fn add_rice(out: &mut [u8], coded: &[u8], k: u32) -> Result<(), Malformed> {
    let mut bits = Bits {
        bytes: coded,
        at: 0,
    };
    for o in out.iter_mut() {
        let q = bits.unary(255 >> k)?;
        let z = u8::try_from((q << k) | bits.bits(k)?).map_err(|_| Malformed::Delta)?;
        *o = o.wrapping_add(unzigzag(z) as u8);
    }
    bits.finish()
}

/// `out[i] += delta[i]`, the non-zero deltas coded as (gap, value) pairs with gaps of
/// Exp-Golomb order `g` (see the module docs).
fn add_sparse(out: &mut [u8], coded: &[u8], g: u32) -> Result<(), Malformed> {
    let mut bits = Bits {
        bytes: coded,
        at: 0,
    };
    let mut pos = 0usize;
    while pos < out.len() {
        pos += bits.exp_golomb(g)? as usize;
        if pos >= out.len() {
            if pos > out.len() {
                return Err(Malformed::Delta);
            }
            break;
        }
        let z = u8::try_from(bits.exp_golomb(0)? + 1).map_err(|_| Malformed::Delta)?;
        out[pos] = out[pos].wrapping_add(unzigzag(z) as u8);
        pos += 1;
    }
    bits.finish()
}

/// Slots in memory: the base image as a slice, the output as a growing vector (`std`).
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct MemSlots<'a> {
    pub base: &'a [u8],
    pub out: std::vec::Vec<u8>,
}

/// A read outside the in-memory base, or a block out of order.
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemError;

#[cfg(feature = "std")]
impl Slots for MemSlots<'_> {
    type Error = MemError;
    fn read_base(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), MemError> {
        let o = offset as usize;
        let from = self.base.get(o..o + buf.len()).ok_or(MemError)?;
        buf.copy_from_slice(from);
        Ok(())
    }
    fn write_out(&mut self, offset: u32, data: &[u8]) -> Result<(), MemError> {
        if offset as usize != self.out.len() {
            return Err(MemError);
        }
        self.out.extend_from_slice(data);
        Ok(())
    }
}

/// Applies a whole patch in memory, in `chunk`-byte pieces (`std`; the service checks every
/// patch it builds this way, and tests use it).
#[cfg(feature = "std")]
pub fn apply_in_memory(
    base: &[u8],
    patch: &[u8],
    chunk: usize,
) -> Result<std::vec::Vec<u8>, PatchError<MemError>> {
    let mut slots = MemSlots {
        base,
        out: std::vec::Vec::new(),
    };
    let mut patcher = std::boxed::Box::new(Patcher::<4096>::new());
    for c in patch.chunks(chunk.max(1)) {
        patcher.feed(c, &mut slots)?;
    }
    if !patcher.is_done() {
        return Err(PatchError::Malformed(Malformed::Truncated));
    }
    Ok(slots.out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    type Mem<'a> = MemSlots<'a>;

    fn patch(block: u16, target: u32, base: u32, records: &[&[u8]]) -> Vec<u8> {
        let mut p = PatchHeader {
            block_size: block,
            target_size: target,
            base_size: base,
        }
        .to_bytes()
        .to_vec();
        for r in records {
            p.extend_from_slice(r);
        }
        p
    }

    #[test]
    fn zigzag_round_trips() {
        for d in i8::MIN..=i8::MAX {
            assert_eq!(unzigzag(zigzag(d)), d);
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
    }

    #[test]
    fn every_kind_applies_in_any_chunking() {
        let base: Vec<u8> = (0..32u8).collect();
        // COPY block 0 from base 8; ADD +1 each (Rice k=1: z=2 -> "10" + "0", LSB first
        // 0b001 per delta) over base 0; LITERAL lz4; raw.
        let mut add = Vec::from([KIND_ADD | 2 << CODE_SHIFT]);
        add.extend_from_slice(&0u32.to_le_bytes());
        add.extend_from_slice(&3u16.to_le_bytes());
        // 8 codes of 3 bits "1,0,0" (LSB first): bit pattern 001 repeated -> 24 bits.
        add.extend_from_slice(&[0b0100_1001, 0b1001_0010, 0b0010_0100]);
        let literal = lz4_flex::block::compress(&[7u8; 8]);
        let mut lit = Vec::from([KIND_LITERAL | OP_LZ4]);
        lit.extend_from_slice(&(literal.len() as u16).to_le_bytes());
        lit.extend_from_slice(&literal);
        let mut copy = Vec::from([KIND_COPY]);
        copy.extend_from_slice(&8u32.to_le_bytes());
        let raw = [KIND_LITERAL, 3, 0, 9, 9, 9];
        let p = patch(8, 27, 32, &[&copy, &add, &lit, &raw]);
        let mut want: Vec<u8> = (8..16).collect();
        want.extend((0..8).map(|b| b + 1));
        want.extend([7; 8]);
        want.extend([9; 3]);
        for chunk in 1..p.len() {
            let mut mem = Mem {
                base: &base,
                out: Vec::new(),
            };
            let mut patcher = Patcher::<16>::new();
            for c in p.chunks(chunk) {
                patcher.feed(c, &mut mem).unwrap();
            }
            assert!(patcher.is_done());
            assert_eq!(mem.out, want, "chunk {chunk}");
        }
        // Resume at the boundary after the second record.
        let mut mem = Mem {
            base: &base,
            out: want[..16].to_vec(),
        };
        let mut first = Patcher::<16>::new();
        let mut probe = Mem {
            base: &base,
            out: Vec::new(),
        };
        first.feed(&p[..HEADER_LEN + 5 + 10], &mut probe).unwrap();
        assert_eq!(probe.out.len(), 16);
        let at = first.boundary();
        assert_eq!(at.out_offset, 16);
        let mut resumed = Patcher::<16>::resume(first.header().unwrap(), at).unwrap();
        resumed
            .feed(&p[at.patch_offset as usize..], &mut mem)
            .unwrap();
        assert!(resumed.is_done());
        assert_eq!(mem.out, want);
    }

    #[test]
    fn malformed_patches_are_refused() {
        let base = [0u8; 16];
        let run = |p: &[u8]| {
            let mut mem = Mem {
                base: &base,
                out: Vec::new(),
            };
            Patcher::<8>::new().feed(p, &mut mem).map_err(|e| match e {
                PatchError::Malformed(m) => PatchError::Malformed(m),
                PatchError::Io(_) => PatchError::Io(()),
            })
        };
        let copy_at = |src: u32| {
            let mut r = Vec::from([KIND_COPY]);
            r.extend_from_slice(&src.to_le_bytes());
            r
        };
        let bad = PatchError::Malformed;
        assert_eq!(run(b"TFP0xxxxxxxxxxxx"), Err(bad(Malformed::Magic)));
        assert_eq!(
            run(&patch(16, 8, 16, &[])),
            Err(bad(Malformed::BlockTooLarge))
        );
        assert_eq!(
            run(&patch(8, 8, 16, &[&copy_at(9)])),
            Err(bad(Malformed::BaseRange))
        );
        assert_eq!(run(&patch(8, 8, 16, &[&[0x80]])), Err(bad(Malformed::Op)));
        assert_eq!(
            run(&patch(8, 8, 16, &[&[KIND_LITERAL | OP_NEXT]])),
            Err(bad(Malformed::Op))
        );
        assert_eq!(
            run(&patch(8, 8, 16, &[&[KIND_COPY | OP_LZ4]])),
            Err(bad(Malformed::Op))
        );
        assert_eq!(
            run(&patch(8, 8, 16, &[&copy_at(0), &[0]])),
            Err(bad(Malformed::TrailingData))
        );
        assert_eq!(
            run(&patch(8, 8, 16, &[&[KIND_LITERAL, 2, 0, 1, 1]])),
            Err(bad(Malformed::PayloadLength))
        );
        assert_eq!(
            run(&patch(
                8,
                8,
                16,
                &[&[KIND_LITERAL | OP_LZ4, 2, 0, 0xff, 0xff]]
            )),
            Err(bad(Malformed::Decompress))
        );
        // Rice k=0 zero deltas over 3 bytes ("0" each): the 5 padding bits must be zero, and
        // the codes must not end early or run past the payload.
        let rice = |bytes: &[u8]| {
            let mut add = Vec::from([KIND_ADD | 1 << CODE_SHIFT]);
            add.extend_from_slice(&0u32.to_le_bytes());
            add.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            add.extend_from_slice(bytes);
            run(&patch(8, 3, 16, &[&add]))
        };
        assert_eq!(rice(&[0b0000_0000]), Ok(()));
        assert_eq!(rice(&[0b1111_0000]), Err(bad(Malformed::Delta)));
        assert_eq!(rice(&[0, 0]), Err(bad(Malformed::Delta)));
        assert_eq!(rice(&[0xff]), Err(bad(Malformed::Delta)));
    }
}
