//! The `counts` bitstream: every histogram of a summary, packed with adaptive Exp-Golomb codes.
//!
//! A summary carries a few hundred small counters (8 features x 19 cells, 10 x 8 confidence cells,
//! ...). One CBOR integer per counter costs 1-3 bytes; most counters are small and many are zero,
//! so they are packed here instead, which is what keeps a reference summary under 256 bytes.
//!
//! Layout (normative, mirrored in `docs/protocol.md`): the stream is a sequence of *vectors*. A
//! vector is a 4-bit order `k` (0..=15), then each value `v` as an Exp-Golomb code of order `k`:
//! with `w = v + 2^k` and `n = bit_length(w)`, write `n - k - 1` zero bits, then `w` in `n` bits.
//! Bits are written most-significant first; the last byte is padded with zero bits. The encoder
//! picks, per vector, the `k` that gives the fewest bits. Decoders reject codes whose value does
//! not fit in 32 bits, non-zero padding, and trailing bytes.
//!
//! Nothing here allocates or panics on any input.

/// Largest Exp-Golomb order an encoder may choose (fits the 4-bit field).
const MAX_ORDER: u32 = 15;

/// Why a bitstream could not be written or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CountsError {
    /// The output buffer is full.
    BufferFull,
    /// The stream ended inside a vector.
    Truncated,
    /// A code describes a value that does not fit in 32 bits.
    Overlong,
    /// Bits after the last vector are not zero padding, or whole bytes are left over.
    TrailingData,
}

/// Writes bits most-significant first into a caller buffer.
#[derive(Debug)]
pub struct BitWriter<'a> {
    buf: &'a mut [u8],
    /// Number of bits written so far.
    bit_len: usize,
    /// Only count bits (used to size a stream before writing it).
    dry: bool,
}

impl<'a> BitWriter<'a> {
    /// A writer that fills `buf` from its start. Bytes are cleared as they are first touched.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            buf,
            bit_len: 0,
            dry: false,
        }
    }

    /// A writer that stores nothing and only counts the bits it is given.
    pub fn counting() -> BitWriter<'static> {
        BitWriter {
            buf: &mut [],
            bit_len: 0,
            dry: true,
        }
    }

    /// Bytes used so far (the last one possibly partial, zero-padded).
    pub fn byte_len(&self) -> usize {
        self.bit_len.div_ceil(8)
    }

    /// Appends the low `n` bits of `value` (n <= 64), most significant first, a byte at a time.
    fn put(&mut self, value: u64, n: u32) -> Result<(), CountsError> {
        if self.dry {
            self.bit_len += n as usize;
            return Ok(());
        }
        if self.bit_len + n as usize > self.buf.len() * 8 {
            return Err(CountsError::BufferFull);
        }
        let mut remaining = n;
        while remaining > 0 {
            let byte = self.bit_len / 8;
            let used = (self.bit_len % 8) as u32;
            let free = 8 - used;
            let take = free.min(remaining);
            let bits = (value >> (remaining - take)) & ((1u64 << take) - 1);
            if used == 0 {
                self.buf[byte] = 0;
            }
            self.buf[byte] |= (bits << (free - take)) as u8;
            self.bit_len += take as usize;
            remaining -= take;
        }
        Ok(())
    }

    /// Writes one vector: its best order, then every value.
    pub fn vector<I>(&mut self, values: I) -> Result<(), CountsError>
    where
        I: Iterator<Item = u32> + Clone,
    {
        let k = best_order(values.clone());
        self.put(u64::from(k), 4)?;
        for v in values {
            let w = u64::from(v) + (1u64 << k);
            let n = 64 - w.leading_zeros();
            self.put(0, n - k - 1)?;
            self.put(w, n)?;
        }
        Ok(())
    }
}

/// Bits an Exp-Golomb code of order `k` takes for `v`.
fn code_len(v: u32, k: u32) -> u32 {
    let w = u64::from(v) + (1u64 << k);
    let n = 64 - w.leading_zeros();
    2 * n - k - 1
}

/// The order in 0..=15 that packs `values` into the fewest bits (ties go to the smaller order).
fn best_order<I: Iterator<Item = u32> + Clone>(values: I) -> u32 {
    let mut best = (u64::MAX, 0);
    for k in 0..=MAX_ORDER {
        let bits: u64 = values.clone().map(|v| u64::from(code_len(v, k))).sum();
        if bits < best.0 {
            best = (bits, k);
        }
    }
    best.1
}

/// Reads a bitstream written by [`BitWriter`].
#[derive(Debug)]
pub struct BitReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    /// A reader over a whole `counts` field.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Reads `n` bits (n <= 64), a byte at a time.
    fn take(&mut self, n: u32) -> Result<u64, CountsError> {
        if self.pos + n as usize > self.buf.len() * 8 {
            return Err(CountsError::Truncated);
        }
        let mut v = 0u64;
        let mut remaining = n;
        while remaining > 0 {
            let used = (self.pos % 8) as u32;
            let avail = 8 - used;
            let take = avail.min(remaining);
            let byte = u64::from(self.buf[self.pos / 8]);
            let bits = (byte >> (avail - take)) & ((1u64 << take) - 1);
            v = (v << take) | bits;
            self.pos += take as usize;
            remaining -= take;
        }
        Ok(v)
    }

    /// Counts zero bits up to and including the next one bit; more than `limit` zeros is an
    /// overlong code.
    fn zeros_then_one(&mut self, limit: u32) -> Result<u32, CountsError> {
        let mut zeros = 0u32;
        loop {
            let byte = *self.buf.get(self.pos / 8).ok_or(CountsError::Truncated)?;
            let used = (self.pos % 8) as u32;
            let rest = byte << used;
            if rest == 0 {
                zeros += 8 - used;
                self.pos += (8 - used) as usize;
            } else {
                let lz = rest.leading_zeros();
                zeros += lz;
                self.pos += lz as usize + 1;
                if zeros > limit {
                    return Err(CountsError::Overlong);
                }
                return Ok(zeros);
            }
            if zeros > limit {
                return Err(CountsError::Overlong);
            }
        }
    }

    /// Reads one vector of `len` values, handing each to `sink` in order.
    pub fn vector(&mut self, len: usize, mut sink: impl FnMut(u32)) -> Result<(), CountsError> {
        let k = self.take(4)? as u32;
        for _ in 0..len {
            // w has zeros + k + 1 bits and v = w - 2^k must fit in 32 bits.
            let zeros = self.zeros_then_one(32 - k)?;
            let rest = self.take(zeros + k)?;
            let w = (1u64 << (zeros + k)) | rest;
            let v = u32::try_from(w - (1u64 << k)).map_err(|_| CountsError::Overlong)?;
            sink(v);
        }
        Ok(())
    }

    /// Checks that only zero padding (fewer than 8 bits) is left.
    pub fn finish(mut self) -> Result<(), CountsError> {
        if self.buf.len() != self.pos.div_ceil(8) {
            return Err(CountsError::TrailingData);
        }
        let pad = (8 - self.pos % 8) % 8;
        if self.take(pad as u32)? != 0 {
            return Err(CountsError::TrailingData);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(vectors: &[&[u32]]) -> usize {
        let mut buf = [0u8; 4096];
        let mut w = BitWriter::new(&mut buf);
        for v in vectors {
            w.vector(v.iter().copied()).unwrap();
        }
        let len = w.byte_len();
        let mut r = BitReader::new(&buf[..len]);
        for v in vectors {
            let mut got = [0u32; 64];
            let mut i = 0;
            r.vector(v.len(), |x| {
                got[i] = x;
                i += 1;
            })
            .unwrap();
            assert_eq!(&got[..v.len()], *v);
        }
        r.finish().unwrap();
        len
    }

    #[test]
    fn known_codes() {
        // Order 0: 0 -> "1", 1 -> "010", 2 -> "011", 3 -> "00100".
        let mut buf = [0u8; 4];
        let mut w = BitWriter::new(&mut buf);
        w.put(0, 4).unwrap(); // pretend k = 0 header for a hand-made stream
        for (v, _) in [(0u32, 1), (1, 3), (2, 3), (3, 5)] {
            let wv = u64::from(v) + 1;
            let n = 64 - wv.leading_zeros();
            w.put(0, n - 1).unwrap();
            w.put(wv, n).unwrap();
        }
        // 0000 1 010 011 00100 -> 0000_1010 0110_0100
        assert_eq!(&buf[..2], &[0b0000_1010, 0b0110_0100]);
        let mut r = BitReader::new(&buf[..2]);
        let mut got = [0u32; 4];
        let mut i = 0;
        r.vector(4, |x| {
            got[i] = x;
            i += 1;
        })
        .unwrap();
        assert_eq!(got, [0, 1, 2, 3]);
        r.finish().unwrap();
    }

    #[test]
    fn extremes_roundtrip() {
        roundtrip(&[&[u32::MAX, 0, u32::MAX], &[], &[0; 40], &[7; 19]]);
    }

    #[test]
    fn zeros_cost_one_bit_each() {
        // 4-bit order + 64 one-bit zeros = 68 bits = 9 bytes.
        assert_eq!(roundtrip(&[&[0; 64]]), 9);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            BitReader::new(&[0x00; 8]).vector(1, |_| {}),
            Err(CountsError::Overlong)
        );
        assert_eq!(
            BitReader::new(&[0x0F]).vector(5, |_| {}),
            Err(CountsError::Truncated)
        );
        // k=0, one value "1" = 0, then padding must be zero: 0000 1 1 00 has a stray bit.
        let mut r = BitReader::new(&[0b0000_1100]);
        r.vector(1, |_| {}).unwrap();
        assert_eq!(r.finish(), Err(CountsError::TrailingData));
        let mut r = BitReader::new(&[0b0000_1000, 0]);
        r.vector(1, |_| {}).unwrap();
        assert_eq!(r.finish(), Err(CountsError::TrailingData));
    }

    #[test]
    fn full_buffer_is_an_error() {
        let mut buf = [0u8; 1];
        let mut w = BitWriter::new(&mut buf);
        assert_eq!(
            w.vector([9u32; 4].into_iter()),
            Err(CountsError::BufferFull)
        );
    }

    proptest! {
        #[test]
        fn any_vectors_roundtrip(vs in proptest::collection::vec(
            proptest::collection::vec(any::<u32>().prop_map(|v| v >> (v % 32)), 0..64), 0..8)) {
            let refs: std::vec::Vec<&[u32]> = vs.iter().map(|v| v.as_slice()).collect();
            roundtrip(&refs);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), lens in proptest::collection::vec(0usize..40, 0..6)) {
            let mut r = BitReader::new(&bytes);
            for len in lens {
                if r.vector(len, |_| {}).is_err() { break; }
            }
        }

        /// The reader decodes exactly what a bit-at-a-time reading of the format does, errors
        /// and trailing checks included, on arbitrary bytes (mostly garbage) and on valid
        /// streams with a flipped bit.
        #[test]
        fn reader_agrees_with_a_bit_at_a_time_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
            vs in proptest::collection::vec(any::<u32>().prop_map(|v| v >> (v % 32)), 0..40),
            flip in any::<u16>(),
            lens in proptest::collection::vec(0usize..40, 1..6),
        ) {
            let mut buf = [0u8; 512];
            let mut w = BitWriter::new(&mut buf);
            w.vector(vs.iter().copied()).unwrap();
            let n = w.byte_len();
            let mut valid = buf[..n].to_vec();
            if !valid.is_empty() && flip % 2 == 0 {
                let bit = usize::from(flip / 2) % (valid.len() * 8);
                valid[bit / 8] ^= 0x80 >> (bit % 8);
            }
            for (input, lens) in [(&bytes, lens.clone()), (&valid, std::vec![vs.len()])] {
                prop_assert_eq!(decode_all(input, &lens), reference_decode(input, &lens));
            }
        }
    }

    type Decoded = (std::vec::Vec<std::vec::Vec<u32>>, Result<(), CountsError>);

    /// `lens` vectors through [`BitReader`], then its trailing check.
    fn decode_all(bytes: &[u8], lens: &[usize]) -> Decoded {
        let mut r = BitReader::new(bytes);
        let mut out = std::vec::Vec::new();
        for &len in lens {
            let mut v = std::vec::Vec::new();
            if let Err(e) = r.vector(len, |x| v.push(x)) {
                out.push(v);
                return (out, Err(e));
            }
            out.push(v);
        }
        (out, r.finish())
    }

    /// The same, one bit at a time, straight from the format: per vector a 4-bit order k, then
    /// per value z zeros, a one, z + k more bits; the value is that (z + k + 1)-bit number
    /// minus 2^k, more than 32 - k zeros or a value beyond u32 being overlong; then only
    /// zero padding to the byte.
    fn reference_decode(bytes: &[u8], lens: &[usize]) -> Decoded {
        let total = bytes.len() * 8;
        let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) & 1;
        let mut pos = 0usize;
        let take = |n: u32, pos: &mut usize| -> Result<u64, CountsError> {
            if *pos + n as usize > total {
                return Err(CountsError::Truncated);
            }
            let mut v = 0u64;
            for _ in 0..n {
                v = (v << 1) | u64::from(bit(*pos));
                *pos += 1;
            }
            Ok(v)
        };
        let mut out = std::vec::Vec::new();
        for &len in lens {
            let mut v = std::vec::Vec::new();
            let step = (|| -> Result<(), CountsError> {
                let k = take(4, &mut pos)? as u32;
                for _ in 0..len {
                    let mut zeros = 0u32;
                    loop {
                        if pos >= total {
                            // Ran out: overlong if the zeros seen already exceed the limit
                            // at a byte boundary (where the reader checks), else truncated.
                            return Err(if zeros > 32 - k {
                                CountsError::Overlong
                            } else {
                                CountsError::Truncated
                            });
                        }
                        let b = bit(pos);
                        pos += 1;
                        if b == 1 {
                            break;
                        }
                        zeros += 1;
                    }
                    if zeros > 32 - k {
                        return Err(CountsError::Overlong);
                    }
                    let rest = take(zeros + k, &mut pos)?;
                    let w = (1u64 << (zeros + k)) | rest;
                    v.push(u32::try_from(w - (1u64 << k)).map_err(|_| CountsError::Overlong)?);
                }
                Ok(())
            })();
            out.push(v);
            if let Err(e) = step {
                return (out, Err(e));
            }
        }
        let trailing = if total != pos.div_ceil(8) * 8 || (pos..total).any(|i| bit(i) == 1) {
            Err(CountsError::TrailingData)
        } else {
            Ok(())
        };
        (out, trailing)
    }
}
