//! NOR flash helpers for the installer, over `embedded_storage::nor_flash`.
//!
//! - [`Layout`]: the two image slots and the two log regions, checked against the flash's
//!   geometry.
//! - [`read`], [`program`], [`write_slot`], [`sha256`]: reads at any alignment, programs padded
//!   to the write granule, sequential slot writes that erase each sector before its first byte.
//! - [`Log`]: an append-only log of fixed-size, CRC-protected records in a region of at least
//!   two sectors. The record with the highest counter wins; a torn record fails its CRC and is
//!   ignored (and never written over: appends go to the next fully erased slot); when the
//!   current sector is full, the next sector is erased and the record written there, so the
//!   previous record survives until the new one is complete.
//!
//! Erased flash reads `0xff`; programming only clears bits. No byte is programmed twice between
//! erases, so the helpers also suit flash with ECC that forbids overwrites.

use embedded_storage::nor_flash::{NorFlash, ReadNorFlash};
use sha2::Digest as _;

/// Value of an erased byte.
pub const ERASED: u8 = 0xff;
/// Largest `WRITE_SIZE` and `READ_SIZE` supported.
pub const MAX_GRANULE: usize = 32;
/// Largest log record (header, payload, CRC, padding).
pub const MAX_RECORD: usize = 320;

/// A byte range of the flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Region {
    pub start: u32,
    pub len: u32,
}

impl Region {
    pub const fn new(start: u32, len: u32) -> Self {
        Self { start, len }
    }

    /// One past the last byte (saturating: a region past 4 GiB fails `Layout::check`).
    pub const fn end(&self) -> u32 {
        self.start.saturating_add(self.len)
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.start < other.end() && other.start < self.end()
    }

    /// The absolute address of `offset..offset + len` inside the region, if it fits.
    pub fn at(&self, offset: u32, len: usize) -> Option<u32> {
        let end = u64::from(offset) + len as u64;
        if end > u64::from(self.len) {
            return None;
        }
        self.start.checked_add(offset)
    }
}

/// Where things live in the flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Layout {
    /// The two image slots (same length). The bootloader boots one of them.
    pub slots: [Region; 2],
    /// The bootloader's state log ([`super::boot`]).
    pub boot: Region,
    /// The installer's progress log.
    pub progress: Region,
}

/// Why a layout does not fit a flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LayoutError {
    /// A region is not sector-aligned, is empty, or lies beyond the flash.
    Region,
    /// Two regions overlap.
    Overlap,
    /// The slots differ in length.
    SlotLength,
    /// A log region has fewer than two sectors, or a sector holds no record.
    LogTooSmall,
    /// The flash's granules are unsupported (`READ_SIZE`/`WRITE_SIZE` above [`MAX_GRANULE`],
    /// not powers of two, or not dividing the sector).
    Granule,
}

impl Layout {
    /// Checks the layout against the flash's geometry.
    pub fn check<F: NorFlash>(&self, flash: &F) -> Result<(), LayoutError> {
        let (r, w, e) = (F::READ_SIZE, F::WRITE_SIZE, F::ERASE_SIZE);
        let pow2 = |n: usize| n.is_power_of_two();
        if !(pow2(r) && pow2(w) && pow2(e))
            || r > MAX_GRANULE
            || w > MAX_GRANULE
            || !e.is_multiple_of(w)
        {
            return Err(LayoutError::Granule);
        }
        let regions = [self.slots[0], self.slots[1], self.boot, self.progress];
        for (i, a) in regions.iter().enumerate() {
            let aligned =
                (a.start as usize).is_multiple_of(e) && (a.len as usize).is_multiple_of(e);
            if !aligned || a.len == 0 || a.end() as usize > flash.capacity() {
                return Err(LayoutError::Region);
            }
            if regions[i + 1..].iter().any(|b| a.overlaps(b)) {
                return Err(LayoutError::Overlap);
            }
        }
        if self.slots[0].len != self.slots[1].len {
            return Err(LayoutError::SlotLength);
        }
        for log in [self.boot, self.progress] {
            if (log.len as usize) < 2 * e || e < MAX_RECORD {
                return Err(LayoutError::LogTooSmall);
            }
        }
        Ok(())
    }
}

/// A flash error, or an access the helpers refuse (out of a region, misaligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FlashError<E> {
    Flash(E),
    /// Outside its region or misaligned for the flash: a bug or a bad layout.
    Range,
}

fn io<E>(e: E) -> FlashError<E> {
    FlashError::Flash(e)
}

/// Reads `buf.len()` bytes at `addr`, at any alignment (a small bounce buffer covers the
/// unaligned head and tail when `READ_SIZE > 1`).
pub fn read<F: ReadNorFlash>(
    flash: &mut F,
    mut addr: u32,
    mut buf: &mut [u8],
) -> Result<(), FlashError<F::Error>> {
    let r = F::READ_SIZE;
    if r <= 1 {
        return flash.read(addr, buf).map_err(io);
    }
    if r > MAX_GRANULE {
        return Err(FlashError::Range);
    }
    let mut bounce = [0u8; MAX_GRANULE];
    while !buf.is_empty() {
        let skew = addr as usize % r;
        let direct = if skew == 0 {
            buf.len() - buf.len() % r
        } else {
            0
        };
        if direct > 0 {
            let (head, tail) = buf.split_at_mut(direct);
            flash.read(addr, head).map_err(io)?;
            buf = tail;
            addr += direct as u32;
        } else {
            flash
                .read(addr - skew as u32, &mut bounce[..r])
                .map_err(io)?;
            let n = (r - skew).min(buf.len());
            let (head, tail) = buf.split_at_mut(n);
            head.copy_from_slice(&bounce[skew..skew + n]);
            buf = tail;
            addr += n as u32;
        }
    }
    Ok(())
}

/// Programs `data` at `addr` (aligned to `WRITE_SIZE`), padding the last granule with
/// [`ERASED`]. The range must be erased.
pub fn program<F: NorFlash>(
    flash: &mut F,
    addr: u32,
    data: &[u8],
) -> Result<(), FlashError<F::Error>> {
    let w = F::WRITE_SIZE;
    if !(addr as usize).is_multiple_of(w) || w > MAX_GRANULE {
        return Err(FlashError::Range);
    }
    let direct = data.len() - data.len() % w;
    if direct > 0 {
        flash.write(addr, &data[..direct]).map_err(io)?;
    }
    let rest = &data[direct..];
    if !rest.is_empty() {
        let mut pad = [ERASED; MAX_GRANULE];
        pad[..rest.len()].copy_from_slice(rest);
        flash.write(addr + direct as u32, &pad[..w]).map_err(io)?;
    }
    Ok(())
}

/// Writes `data` at `offset` of a slot that is being written sequentially: every sector whose
/// first byte lies in the range is erased first. `offset` must be aligned to `WRITE_SIZE`; a
/// short tail is padded, so only the last write of an image may have one.
pub fn write_slot<F: NorFlash>(
    flash: &mut F,
    slot: Region,
    offset: u32,
    data: &[u8],
) -> Result<(), FlashError<F::Error>> {
    let padded = data.len().next_multiple_of(F::WRITE_SIZE);
    let addr = slot.at(offset, padded).ok_or(FlashError::Range)?;
    let e = F::ERASE_SIZE as u32;
    let mut sector = offset.next_multiple_of(e);
    while sector < offset + padded as u32 {
        let at = slot.start + sector;
        flash.erase(at, at + e).map_err(io)?;
        sector += e;
    }
    program(flash, addr, data)
}

/// SHA-256 of `len` bytes at `offset` of `region`.
pub fn sha256<F: ReadNorFlash>(
    flash: &mut F,
    region: Region,
    offset: u32,
    len: u32,
) -> Result<[u8; 32], FlashError<F::Error>> {
    let mut addr = region.at(offset, len as usize).ok_or(FlashError::Range)?;
    let end = addr + len;
    let mut hasher = sha2::Sha256::new();
    let mut buf = [0u8; 128];
    while addr < end {
        let n = ((end - addr) as usize).min(buf.len());
        read(flash, addr, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        addr += n as u32;
    }
    Ok(hasher.finalize().into())
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`), bitwise: tiny and fast enough for a few
/// hundred bytes per record.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// First byte of every record: never [`ERASED`], so a record torn after its first granule is
/// never mistaken for free space.
const RECORD_MAGIC: u8 = 0x7e;
/// Record header: magic, version, payload length (u16 LE), counter (u32 LE).
const RECORD_HEADER: usize = 8;

/// Bytes a record with `payload` bytes takes in a log on this flash.
pub const fn record_len<F: NorFlash>(payload: usize) -> usize {
    (RECORD_HEADER + payload + 4).next_multiple_of(F::WRITE_SIZE)
}

/// An append-only log of fixed-size records in a region (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Log {
    region: Region,
    /// Payload bytes of every record.
    payload: usize,
    /// Distinguishes logs (and layouts of the payload).
    version: u8,
}

/// The newest valid record and where the next one goes.
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// Counter of the newest valid record.
    counter: Option<u32>,
    /// Sector and slot of the next free record slot (`None`: the sector after the newest
    /// record's must be erased first).
    free: Option<(u32, u32)>,
    /// Sector of the newest valid record.
    sector: u32,
}

impl Log {
    /// A log of `payload`-byte records in `region` (sector-aligned, at least two sectors).
    pub const fn new(region: Region, payload: usize, version: u8) -> Self {
        Self {
            region,
            payload,
            version,
        }
    }

    fn geometry<F: NorFlash>(&self) -> Result<(usize, u32, u32), FlashError<F::Error>> {
        let rec = record_len::<F>(self.payload);
        let e = F::ERASE_SIZE;
        let per_sector = (e / rec) as u32;
        let sectors = self.region.len / e as u32;
        if rec > MAX_RECORD || per_sector == 0 || sectors < 2 {
            return Err(FlashError::Range);
        }
        Ok((rec, per_sector, sectors))
    }

    fn slot_addr<F: NorFlash>(&self, sector: u32, slot: u32) -> u32 {
        self.region.start
            + sector * F::ERASE_SIZE as u32
            + slot * record_len::<F>(self.payload) as u32
    }

    /// Reads record slot `(sector, slot)` into `buf`: `Some(counter)` if it holds a valid
    /// record of this log.
    fn read_slot<F: NorFlash>(
        &self,
        flash: &mut F,
        sector: u32,
        slot: u32,
        buf: &mut [u8],
    ) -> Result<Option<u32>, FlashError<F::Error>> {
        read(flash, self.slot_addr::<F>(sector, slot), buf)?;
        let body = RECORD_HEADER + self.payload;
        let valid = buf[0] == RECORD_MAGIC
            && buf[1] == self.version
            && usize::from(u16::from_le_bytes([buf[2], buf[3]])) == self.payload
            && buf[body..body + 4] == crc32(&buf[..body]).to_le_bytes();
        Ok(valid.then(|| u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]])))
    }

    /// Scans the whole region; the newest valid record's payload goes to `out`.
    fn scan<F: NorFlash>(
        &self,
        flash: &mut F,
        mut out: Option<&mut [u8]>,
    ) -> Result<Scan, FlashError<F::Error>> {
        let (rec, per_sector, sectors) = self.geometry::<F>()?;
        let mut buf = [0u8; MAX_RECORD];
        let buf = &mut buf[..rec];
        let mut best: Option<(u32, u32, u32)> = None;
        for sector in 0..sectors {
            for slot in 0..per_sector {
                if let Some(c) = self.read_slot(flash, sector, slot, buf)? {
                    // Counters increase by one per append; wrapping comparison keeps the order
                    // right across 2^32 (records never span more than a few sectors).
                    let newer = best.is_none_or(|(b, _, _)| c.wrapping_sub(b) as i32 > 0);
                    if newer {
                        best = Some((c, sector, slot));
                        if let Some(out) = out.as_deref_mut() {
                            out.copy_from_slice(&buf[RECORD_HEADER..RECORD_HEADER + self.payload]);
                        }
                    }
                }
            }
        }
        let Some((counter, sector, slot)) = best else {
            return Ok(Scan {
                counter: None,
                free: None,
                sector: sectors - 1,
            });
        };
        let mut free = None;
        for s in slot + 1..per_sector {
            read(flash, self.slot_addr::<F>(sector, s), buf)?;
            if buf.iter().all(|&b| b == ERASED) {
                free = Some((sector, s));
                break;
            }
        }
        Ok(Scan {
            counter: Some(counter),
            free,
            sector,
        })
    }

    /// Reads the newest valid record into `payload` (its length must be the log's); returns its
    /// counter, or `None` if the log holds no valid record.
    pub fn read_latest<F: NorFlash>(
        &self,
        flash: &mut F,
        payload: &mut [u8],
    ) -> Result<Option<u32>, FlashError<F::Error>> {
        if payload.len() != self.payload {
            return Err(FlashError::Range);
        }
        Ok(self.scan(flash, Some(payload))?.counter)
    }

    /// Appends a record; once this returns, [`Log::read_latest`] returns it. A power loss
    /// during the append leaves the previous record the newest.
    pub fn append<F: NorFlash>(
        &self,
        flash: &mut F,
        payload: &[u8],
    ) -> Result<(), FlashError<F::Error>> {
        let (rec, _, sectors) = self.geometry::<F>()?;
        if payload.len() != self.payload {
            return Err(FlashError::Range);
        }
        let scan = self.scan(flash, None)?;
        let (sector, slot) = match scan.free {
            Some(at) => at,
            None => {
                // Compaction: the next sector holds only older records (or none).
                let sector = (scan.sector + 1) % sectors;
                let at = self.slot_addr::<F>(sector, 0);
                flash.erase(at, at + F::ERASE_SIZE as u32).map_err(io)?;
                (sector, 0)
            }
        };
        let counter = scan.counter.map_or(1, |c| c.wrapping_add(1));
        let mut buf = [ERASED; MAX_RECORD];
        let body = RECORD_HEADER + self.payload;
        buf[0] = RECORD_MAGIC;
        buf[1] = self.version;
        buf[2..4].copy_from_slice(&(self.payload as u16).to_le_bytes());
        buf[4..8].copy_from_slice(&counter.to_le_bytes());
        buf[RECORD_HEADER..body].copy_from_slice(payload);
        let crc = crc32(&buf[..body]);
        buf[body..body + 4].copy_from_slice(&crc.to_le_bytes());
        program(flash, self.slot_addr::<F>(sector, slot), &buf[..rec])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
