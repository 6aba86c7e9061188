//! A strict reader of the few CBOR shapes the device decodes (the manifest, OTA blocks):
//! definite lengths only, every length checked, nesting bounded. It replaces serde_cbor's generic
//! decoder on the device, which costs more flash than the whole installer.

use crate::wire::Block;

/// Deepest nesting skipped in an unknown (future) field.
const MAX_DEPTH: u8 = 8;

/// A strict reader of definite-length CBOR items.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    /// True once every byte was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.b.is_empty()
    }

    pub(crate) fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.b.split_first()?;
        self.b = rest;
        Some(first)
    }

    pub(crate) fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        if n > self.b.len() {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }

    /// Major type and argument of the next item. Indefinite lengths and reserved values fail.
    pub(crate) fn head(&mut self) -> Option<(u8, u64)> {
        let ib = self.byte()?;
        let arg = match ib & 0x1f {
            n @ 0..=23 => u64::from(n),
            24 => u64::from(self.byte()?),
            25 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
            26 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
            27 => u64::from_be_bytes(self.take(8)?.try_into().ok()?),
            _ => return None,
        };
        Some((ib >> 5, arg))
    }

    pub(crate) fn uint(&mut self) -> Option<u64> {
        match self.head()? {
            (0, v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.uint()?).ok()
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        u16::try_from(self.uint()?).ok()
    }

    pub(crate) fn text(&mut self) -> Option<&'a str> {
        match self.head()? {
            (3, n) => core::str::from_utf8(self.take(n)?).ok(),
            _ => None,
        }
    }

    pub(crate) fn bytes(&mut self) -> Option<&'a [u8]> {
        match self.head()? {
            (2, n) => self.take(n),
            _ => None,
        }
    }

    pub(crate) fn digest(&mut self) -> Option<[u8; 32]> {
        match self.head()? {
            (2, 32) => self.take(32)?.try_into().ok(),
            _ => None,
        }
    }

    /// True (and consumed) if the next item is `null`.
    pub(crate) fn null(&mut self) -> bool {
        if self.b.first() == Some(&0xf6) {
            self.b = &self.b[1..];
            true
        } else {
            false
        }
    }

    /// A map header; returns its number of pairs.
    /// An array header of exactly `n` items.
    pub(crate) fn array(&mut self, n: u64) -> Option<()> {
        (self.head()? == (4, n)).then_some(())
    }

    pub(crate) fn map(&mut self) -> Option<u64> {
        match self.head()? {
            (5, n) => Some(n),
            _ => None,
        }
    }

    /// Skips one item of any type.
    pub(crate) fn skip(&mut self, depth: u8) -> Option<()> {
        if depth == 0 {
            return None;
        }
        match self.head()? {
            (0 | 1 | 7, _) => {}
            (2 | 3, n) => {
                self.take(n)?;
            }
            (4, n) => {
                for _ in 0..n {
                    self.skip(depth - 1)?;
                }
            }
            (5, n) => {
                for _ in 0..n.checked_mul(2)? {
                    self.skip(depth - 1)?;
                }
            }
            (6, _) => self.skip(depth - 1)?,
            _ => return None,
        }
        Some(())
    }

    /// Walks a map with unsigned keys: `field(key, reader)` reads the values of keys below
    /// `known` (each at most once, any order); other values are skipped. Returns the keys seen.
    pub(crate) fn fields(
        &mut self,
        known: u32,
        mut field: impl FnMut(u32, &mut Self) -> Option<()>,
    ) -> Option<u32> {
        let mut seen = 0u32;
        for _ in 0..self.map()? {
            let key = self.uint()?;
            match u32::try_from(key) {
                Ok(k) if k < known => {
                    if seen & (1 << k) != 0 {
                        return None;
                    }
                    seen |= 1 << k;
                    field(k, self)?;
                }
                _ => self.skip(MAX_DEPTH)?,
            }
        }
        Some(seen)
    }
}

/// Decodes an OTA `block` (`tf/v1/{device}/ota/blk`): `{0: object, 1: offset, 2: total,
/// 3: data}`, as [`crate::wire::from_cbor`] would, without serde_cbor's decoder.
pub fn decode_block(bytes: &[u8]) -> Option<Block<'_>> {
    let mut b = Block {
        object: &[],
        offset: 0,
        total: 0,
        data: &[],
    };
    let mut r = Reader::new(bytes);
    let seen = r.fields(4, |k, r| {
        match k {
            0 => b.object = r.bytes()?,
            1 => b.offset = r.u32()?,
            2 => b.total = r.u32()?,
            _ => b.data = r.bytes()?,
        }
        Some(())
    })?;
    (seen == 0b1111 && r.is_empty()).then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_depth_is_bounded() {
        // 100 nested arrays under an unknown key.
        let mut b = std::vec![0xa1, 0x18, 0x63];
        b.extend(std::iter::repeat_n(0x81, 100));
        b.push(0x00);
        let mut r = Reader::new(&b);
        assert_eq!(r.fields(1, |_, _| Some(())), None);
    }

    #[test]
    fn blocks_decode_like_serde_cbor() {
        let block = Block {
            object: &[0xab; 32],
            offset: 8192,
            total: 20000,
            data: &[1, 2, 3, 4],
        };
        let mut buf = [0u8; 128];
        let n = crate::wire::to_cbor(&block, &mut buf).unwrap();
        assert_eq!(decode_block(&buf[..n]), Some(block));
        assert_eq!(crate::wire::from_cbor::<Block<'_>>(&buf[..n]), Ok(block));
        assert_eq!(decode_block(&buf[..n - 1]), None);
        for i in 0..n {
            let _ = decode_block(&buf[..i]);
        }
    }
}
