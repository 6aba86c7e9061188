//! A simulated NOR flash for tests (`std`): enforces NOR semantics and cuts power on demand.
//!
//! - Reads, writes and erases must respect the granules: `W`-byte aligned writes, `E`-byte
//!   aligned erases; an erase sets bytes to `0xff`.
//! - A write granule may be programmed once between erases, and only from erased: writing to a
//!   programmed granule is refused ([`SimError::NotErased`]) and counted as a violation, so a
//!   test can assert that an installer never relies on overwriting.
//! - Power cut: [`SimFlash::cut_power_at`] names the index of a write or erase operation
//!   (counted from creation, see [`SimFlash::ops`]). That operation does nothing
//!   ([`Cut::Before`]) or half of its work ([`Cut::Midway`]: the first half of a write's bytes,
//!   the first half of an erase's range) and fails with [`SimError::PowerLost`], and so does
//!   every access after it until [`SimFlash::power_on`] (the reboot).

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash, check_erase, check_read,
    check_write,
};
use std::vec::Vec;

/// Errors of the simulated flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    NotAligned,
    OutOfBounds,
    /// Programming a granule that was programmed since its last erase.
    NotErased,
    /// The power is off.
    PowerLost,
}

impl NorFlashError for SimError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            SimError::NotAligned => NorFlashErrorKind::NotAligned,
            SimError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            _ => NorFlashErrorKind::Other,
        }
    }
}

impl From<NorFlashErrorKind> for SimError {
    fn from(k: NorFlashErrorKind) -> Self {
        match k {
            NorFlashErrorKind::NotAligned => SimError::NotAligned,
            _ => SimError::OutOfBounds,
        }
    }
}

/// How a power cut hits the operation it interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Before the operation changes anything.
    Before,
    /// After half of it: some bytes written (or erased), the rest not.
    Midway,
}

/// A NOR flash in memory with `W`-byte write granules and `E`-byte sectors.
#[derive(Debug, Clone)]
pub struct SimFlash<const W: usize, const E: usize> {
    data: Vec<u8>,
    /// Per write granule: programmed since the last erase.
    programmed: Vec<bool>,
    ops: usize,
    cut: Option<(usize, Cut)>,
    dead: bool,
    violations: usize,
    erases: usize,
}

impl<const W: usize, const E: usize> SimFlash<W, E> {
    /// An erased flash of `capacity` bytes (a multiple of `E`).
    pub fn new(capacity: usize) -> Self {
        Self {
            data: std::vec![0xff; capacity],
            programmed: std::vec![false; capacity / W],
            ops: 0,
            cut: None,
            dead: false,
            violations: 0,
            erases: 0,
        }
    }

    /// Write and erase operations so far (reads are not counted).
    pub fn ops(&self) -> usize {
        self.ops
    }

    /// Erase operations so far.
    pub fn erases(&self) -> usize {
        self.erases
    }

    /// Cuts the power at operation `op` (an absolute index, compare [`Self::ops`]).
    pub fn cut_power_at(&mut self, op: usize, how: Cut) {
        self.cut = Some((op, how));
    }

    /// Whether the power was cut (and not restored).
    pub fn is_off(&self) -> bool {
        self.dead
    }

    /// Restores the power (a reboot); any planned cut is cancelled.
    pub fn power_on(&mut self) {
        self.dead = false;
        self.cut = None;
    }

    /// Writes to programmed granules attempted so far.
    pub fn violations(&self) -> usize {
        self.violations
    }

    /// The flash's contents.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Sets bytes directly (factory programming), bypassing the NOR rules.
    pub fn load(&mut self, offset: usize, bytes: &[u8]) {
        self.data[offset..offset + bytes.len()].copy_from_slice(bytes);
        for g in offset / W..(offset + bytes.len()).div_ceil(W) {
            self.programmed[g] = true;
        }
    }

    /// Flips the bits of `mask` in the byte at `offset`, behind the installer's back (a flash
    /// defect, or a test of the read-back check).
    pub fn corrupt(&mut self, offset: usize, mask: u8) {
        self.data[offset] ^= mask;
    }

    /// Counts an operation; `Some(cut)` if the power goes at this one.
    fn tick(&mut self) -> Result<Option<Cut>, SimError> {
        if self.dead {
            return Err(SimError::PowerLost);
        }
        let op = self.ops;
        self.ops += 1;
        match self.cut {
            Some((at, how)) if at == op => {
                self.dead = true;
                Ok(Some(how))
            }
            _ => Ok(None),
        }
    }
}

impl<const W: usize, const E: usize> ErrorType for SimFlash<W, E> {
    type Error = SimError;
}

impl<const W: usize, const E: usize> ReadNorFlash for SimFlash<W, E> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        if self.dead {
            return Err(SimError::PowerLost);
        }
        check_read(self, offset, bytes.len())?;
        let o = offset as usize;
        bytes.copy_from_slice(&self.data[o..o + bytes.len()]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.data.len()
    }
}

impl<const W: usize, const E: usize> NorFlash for SimFlash<W, E> {
    const WRITE_SIZE: usize = W;
    const ERASE_SIZE: usize = E;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        if self.dead {
            return Err(SimError::PowerLost);
        }
        check_erase(self, from, to)?;
        let (from, to) = (from as usize, to as usize);
        let cut = self.tick()?;
        let end = match cut {
            None => to,
            Some(Cut::Before) => from,
            Some(Cut::Midway) => from + (to - from) / 2,
        };
        self.data[from..end].fill(0xff);
        for g in from / W..end / W {
            self.programmed[g] = false;
        }
        self.erases += 1;
        if cut.is_some() {
            return Err(SimError::PowerLost);
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        if self.dead {
            return Err(SimError::PowerLost);
        }
        check_write(self, offset, bytes.len())?;
        let o = offset as usize;
        let granules = o / W..(o + bytes.len()) / W;
        if granules.clone().any(|g| self.programmed[g]) {
            self.violations += 1;
            return Err(SimError::NotErased);
        }
        let cut = self.tick()?;
        let n = match cut {
            None => bytes.len(),
            Some(Cut::Before) => 0,
            Some(Cut::Midway) => bytes.len() / 2,
        };
        for (d, b) in self.data[o..o + n].iter_mut().zip(bytes) {
            *d &= *b;
        }
        for g in o / W..(o + n).div_ceil(W) {
            self.programmed[g] = true;
        }
        if cut.is_some() {
            return Err(SimError::PowerLost);
        }
        Ok(())
    }
}
