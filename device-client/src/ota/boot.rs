//! The bootloader's side of an A/B update, modelled in the same flash as the slots: which slot
//! is confirmed, whether the other one is to be tried (or is being tried), and what each slot
//! holds. The state is one record of a [`Log`] in `Layout::boot`, so every change is atomic: a
//! power loss leaves either the old or the new state.
//!
//! At every boot the bootloader calls [`boot`]:
//!
//! | state before | boots | state after |
//! |---|---|---|
//! | no trial | the active slot | unchanged |
//! | trial pending | the inactive slot, in trial mode | trial running (written *before* jumping) |
//! | trial running (never confirmed) | the active slot | no trial, `reverted_seq` = the trial's seq |
//!
//! So a trial image that crashes, hangs into the watchdog, loses power or fails its self-test
//! is never booted twice; only [`confirm`] (after the self-test) makes it the active slot. A real
//! bootloader (MCUboot, a custom one) keeps the same three states in its own format; this module
//! is what the installer and the tests use to reason about them.

use embedded_storage::nor_flash::NorFlash;

use super::flash::{FlashError, Layout, Log};

/// Payload bytes of a boot-state record.
pub const PAYLOAD: usize = 96;
/// Version byte of the boot-state log's records.
const LOG_VERSION: u8 = 0xb1;

/// What a slot holds, as the installer wrote it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ImageInfo {
    /// The manifest sequence number (0: unknown, e.g. a factory image without one).
    pub seq: u32,
    pub size: u32,
    pub sha256: [u8; 32],
}

/// Whether the inactive slot is being tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Trial {
    None = 0,
    /// Boot the inactive slot once, in trial mode, at the next boot.
    Pending = 1,
    /// The inactive slot was booted in trial mode and is not confirmed (yet).
    Running = 2,
}

/// The bootloader's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BootState {
    /// The confirmed slot (0 or 1).
    pub active: u8,
    pub trial: Trial,
    /// The seq of the last image whose trial was reverted (0: none).
    pub reverted_seq: u32,
    /// What each slot holds.
    pub images: [ImageInfo; 2],
}

impl BootState {
    /// A new device: slot 0 active, nothing known about the images.
    pub const FACTORY: Self = Self {
        active: 0,
        trial: Trial::None,
        reverted_seq: 0,
        images: [
            ImageInfo {
                seq: 0,
                size: 0,
                sha256: [0; 32],
            },
            ImageInfo {
                seq: 0,
                size: 0,
                sha256: [0; 32],
            },
        ],
    };

    /// The slot that is not active: the one updates are written to.
    pub fn inactive(&self) -> u8 {
        1 - self.active
    }

    /// The slot running now, after [`boot`].
    pub fn running(&self) -> u8 {
        if self.trial == Trial::Running {
            self.inactive()
        } else {
            self.active
        }
    }

    /// The slot the next [`boot`] starts (pure: no flash access).
    pub fn next_boot(&self) -> u8 {
        if self.trial == Trial::Pending {
            self.inactive()
        } else {
            self.active
        }
    }

    fn encode(&self) -> [u8; PAYLOAD] {
        let mut p = [0u8; PAYLOAD];
        p[0] = self.active;
        p[1] = self.trial as u8;
        p[4..8].copy_from_slice(&self.reverted_seq.to_le_bytes());
        for (i, img) in self.images.iter().enumerate() {
            let at = 8 + i * 40;
            p[at..at + 4].copy_from_slice(&img.seq.to_le_bytes());
            p[at + 4..at + 8].copy_from_slice(&img.size.to_le_bytes());
            p[at + 8..at + 40].copy_from_slice(&img.sha256);
        }
        p
    }

    fn decode(p: &[u8; PAYLOAD]) -> Option<Self> {
        let u32_at = |at: usize| u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
        let trial = match p[1] {
            0 => Trial::None,
            1 => Trial::Pending,
            2 => Trial::Running,
            _ => return None,
        };
        if p[0] > 1 {
            return None;
        }
        let mut images = [ImageInfo::default(); 2];
        for (i, img) in images.iter_mut().enumerate() {
            let at = 8 + i * 40;
            img.seq = u32_at(at);
            img.size = u32_at(at + 4);
            img.sha256.copy_from_slice(&p[at + 8..at + 40]);
        }
        Some(Self {
            active: p[0],
            trial,
            reverted_seq: u32_at(4),
            images,
        })
    }
}

fn log(layout: &Layout) -> Log {
    Log::new(layout.boot, PAYLOAD, LOG_VERSION)
}

/// Reads the boot state ([`BootState::FACTORY`] if none was ever written).
pub fn read<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
) -> Result<BootState, FlashError<F::Error>> {
    let mut p = [0u8; PAYLOAD];
    Ok(match log(layout).read_latest(flash, &mut p)? {
        Some(_) => BootState::decode(&p).ok_or(FlashError::Range)?,
        None => BootState::FACTORY,
    })
}

/// Writes the boot state (one atomic log append).
pub fn write<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    state: &BootState,
) -> Result<(), FlashError<F::Error>> {
    log(layout).append(flash, &state.encode())
}

/// Factory provisioning: `slot` holds `image` and is the active, confirmed slot.
pub fn provision<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    slot: u8,
    image: ImageInfo,
) -> Result<(), FlashError<F::Error>> {
    let mut state = BootState::FACTORY;
    state.active = slot.min(1);
    state.images[usize::from(state.active)] = image;
    write(flash, layout, &state)
}

/// What [`boot`] started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Booted {
    pub slot: u8,
    /// The slot runs in trial mode: confirm it, or the next boot reverts.
    pub trial: bool,
    /// This boot reverted an unconfirmed trial of the image with this seq.
    pub reverted: Option<u32>,
}

/// The bootloader's decision at power-on (see the module docs); writes the new state before
/// returning the slot to start.
pub fn boot<F: NorFlash>(flash: &mut F, layout: &Layout) -> Result<Booted, FlashError<F::Error>> {
    let mut state = read(flash, layout)?;
    match state.trial {
        Trial::None => Ok(Booted {
            slot: state.active,
            trial: false,
            reverted: None,
        }),
        Trial::Pending => {
            state.trial = Trial::Running;
            write(flash, layout, &state)?;
            Ok(Booted {
                slot: state.inactive(),
                trial: true,
                reverted: None,
            })
        }
        Trial::Running => {
            let seq = state.images[usize::from(state.inactive())].seq;
            state.trial = Trial::None;
            state.reverted_seq = seq;
            write(flash, layout, &state)?;
            Ok(Booted {
                slot: state.active,
                trial: false,
                reverted: Some(seq),
            })
        }
    }
}

/// Asks for a trial of the inactive slot, which now holds `image`, at the next boot.
pub fn request_trial<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    state: &mut BootState,
    image: ImageInfo,
) -> Result<(), FlashError<F::Error>> {
    let mut next = *state;
    next.images[usize::from(next.inactive())] = image;
    next.trial = Trial::Pending;
    write(flash, layout, &next)?;
    *state = next;
    Ok(())
}

/// Makes the running trial image the active one.
pub fn confirm<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    state: &mut BootState,
) -> Result<(), FlashError<F::Error>> {
    let mut next = *state;
    next.active = next.inactive();
    next.trial = Trial::None;
    write(flash, layout, &next)?;
    *state = next;
    Ok(())
}

/// Gives up a trial (pending or running): the active slot stays, and the next boot starts it.
pub fn revert<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    state: &mut BootState,
) -> Result<(), FlashError<F::Error>> {
    let mut next = *state;
    next.reverted_seq = next.images[usize::from(next.inactive())].seq;
    next.trial = Trial::None;
    write(flash, layout, &next)?;
    *state = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let mut s = BootState::FACTORY;
        s.active = 1;
        s.trial = Trial::Running;
        s.reverted_seq = 9;
        s.images[0].seq = 3;
        s.images[1].sha256 = [7; 32];
        assert_eq!(BootState::decode(&s.encode()), Some(s));
        let mut bad = s.encode();
        bad[1] = 3;
        assert_eq!(BootState::decode(&bad), None);
    }
}
