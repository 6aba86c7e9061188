//! The streaming delta patcher: rebuilds a new model image from the installed one and a `TFP1`
//! patch, one output block at a time, in a fixed RAM budget (about `3 * B` bytes), reading the
//! old image and writing the new one only through [`Slots`].
//!
//! Format (normative; mirrored in `docs/protocol.md`, "Delta patches"):
//!
//! ```text
//! header  = "TFP1" block_size:u16le reserved:u16le(0) target_size:u32le base_size:u32le
//! record  = op:u8 [src:u32le] [plen:u16le payload:plen bytes]     one per output block
//! op      = kind (bits 0-1) | width (bits 2-3) << 2 | lz4 (bit 4) << 4; bits 5-7 zero
//!   kind 0 COPY     out = base[src .. src+len]                     (src, no payload)
//!   kind 1 ADD      out[i] = base[src+i] + delta[i] (mod 256)      (src, payload)
//!   kind 2 LITERAL  out = payload                                   (payload)
//!   width (ADD)     0: delta bytes as they are; 1, 2, 3: 4, 2, 1-bit zigzag codes of the
//!                   signed delta, packed LSB first
//!   lz4             the payload is an LZ4 block (lz4_flex block format, no size prefix)
//! ```
//!
//! `len` of a record is `block_size`, except for the last, which ends at `target_size`. A patch
//! ends exactly after the record that reaches `target_size`; anything after it is an error. Why
//! this shape: retraining moves every int8 weight a little, so byte-matching diffs (bsdiff) find
//! nothing, while the arithmetic difference of aligned regions is small and packs into 1-4 bits
//! per weight; moved tensors are found by `src`; unchanged regions cost 5 bytes per block.

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
pub const OP_LZ4: u8 = 1 << 4;

/// Bits per delta for an ADD record's width code.
pub const fn width_bits(code: u8) -> u32 {
    match code {
        1 => 4,
        2 => 2,
        3 => 1,
        _ => 8,
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

/// A record boundary: patch bytes consumed and output bytes written there. Feeding the patch
/// from `patch_offset` to a patcher [resumed](Patcher::resume) here continues the install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Position {
    pub patch_offset: u32,
    pub out_offset: u32,
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
    /// An ADD delta code does not fit its width.
    Delta,
    /// Bytes after the last record.
    TrailingData,
    /// Resuming at a position that is not a record boundary of this patch.
    Resume,
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
        let width = (op >> 2) & 0b11;
        if op & 0b1110_0000 != 0 || kind > KIND_LITERAL {
            return Err(Malformed::Op.into());
        }
        if kind != KIND_ADD && width != 0 || kind == KIND_COPY && op & OP_LZ4 != 0 {
            return Err(Malformed::Op.into());
        }
        let need =
            1 + if kind == KIND_LITERAL { 0 } else { 4 } + if kind == KIND_COPY { 0 } else { 2 };
        if self.filled < need {
            // Only the op byte so far: now the rest of the fields.
            self.stage = Stage::Fields { need };
            return Ok(());
        }
        self.op = op;
        let f = &self.fields;
        let mut at = 1;
        if kind != KIND_LITERAL {
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
                let bits = width_bits((self.op >> 2) & 0b11);
                let packed = (len * bits as usize).div_ceil(8);
                let deltas: &[u8] = if lz4 {
                    let n = decompress_into(&self.payload[..plen], &mut self.scratch[..packed])
                        .map_err(|_| Malformed::Decompress)?;
                    if n != packed {
                        return Err(Malformed::Decompress.into());
                    }
                    &self.scratch[..packed]
                } else if plen == packed {
                    &self.payload[..packed]
                } else {
                    return Err(Malformed::PayloadLength.into());
                };
                slots.read_base(self.src, out).map_err(PatchError::Io)?;
                add_deltas(out, deltas, bits)?;
            }
        }
        slots
            .write_out(self.written, &self.out[..len])
            .map_err(PatchError::Io)?;
        self.written += len as u32;
        self.boundary = Position {
            patch_offset: self.consumed,
            out_offset: self.written,
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

/// `out[i] += delta[i]` with deltas packed `bits` wide (8: raw wrapping bytes).
fn add_deltas(out: &mut [u8], packed: &[u8], bits: u32) -> Result<(), Malformed> {
    if bits == 8 {
        for (o, d) in out.iter_mut().zip(packed) {
            *o = o.wrapping_add(*d);
        }
        return Ok(());
    }
    let per_byte = (8 / bits) as usize;
    let mask = (1u8 << bits) - 1;
    for (i, o) in out.iter_mut().enumerate() {
        let byte = packed.get(i / per_byte).copied().ok_or(Malformed::Delta)?;
        let code = (byte >> ((i % per_byte) as u32 * bits)) & mask;
        *o = o.wrapping_add(unzigzag(code) as u8);
    }
    // Unused high bits of the last byte must be zero (one encoding per patch).
    let used = out.len() % per_byte;
    if used != 0 {
        let last = packed.last().copied().unwrap_or(0);
        if last >> (used as u32 * bits) != 0 {
            return Err(Malformed::Delta);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    struct Mem<'a> {
        base: &'a [u8],
        out: Vec<u8>,
    }

    impl Slots for Mem<'_> {
        type Error = ();
        fn read_base(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), ()> {
            let o = offset as usize;
            buf.copy_from_slice(self.base.get(o..o + buf.len()).ok_or(())?);
            Ok(())
        }
        fn write_out(&mut self, offset: u32, data: &[u8]) -> Result<(), ()> {
            assert_eq!(offset as usize, self.out.len(), "blocks arrive in order");
            self.out.extend_from_slice(data);
            Ok(())
        }
    }

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
        // COPY block 0 from base 8; ADD 2-bit deltas (+1 each) over base 0; LITERAL lz4; raw.
        let mut add = Vec::from([KIND_ADD | 2 << 2]);
        add.extend_from_slice(&0u32.to_le_bytes());
        add.extend_from_slice(&2u16.to_le_bytes());
        add.extend_from_slice(&[0b1010_1010, 0b1010_1010]); // zigzag(+1) = 2, four per byte
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
        first.feed(&p[..HEADER_LEN + 5 + 9], &mut probe).unwrap();
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
            Patcher::<8>::new().feed(p, &mut mem)
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
        assert_eq!(run(&patch(8, 8, 16, &[&[0x20]])), Err(bad(Malformed::Op)));
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
        // 1-bit deltas over 3 bytes: the 5 unused bits of the packed byte must be zero.
        let mut add = Vec::from([KIND_ADD | 3 << 2]);
        add.extend_from_slice(&0u32.to_le_bytes());
        add.extend_from_slice(&[1, 0, 0b1111_0000]);
        assert_eq!(run(&patch(8, 3, 16, &[&add])), Err(bad(Malformed::Delta)));
    }
}
