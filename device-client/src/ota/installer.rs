//! The installer: from a signed offer to a confirmed image, resumable across power losses.
//!
//! ```text
//!            offer()                write() ...           switch()          (reboot: boot::boot)
//! Idle ----------------> Downloading ----------> Verified --------> Switching ------------> trial
//!   ^  rejected (8)      accepted (1)  progress (2)  verified (3)   switching (4)              |
//!   |                        | failed (6)                                                     |
//!   +------------------------+<---- self_test() passes: confirmed (5) / fails: reverted (7) --+
//!                                   (a trial never confirmed is reverted by the next boot: 7)
//! ```
//!
//! - [`Installer::offer`] verifies the offer (signature under a trusted key, hardware, sequence
//!   number above the installed one, firmware and arena requirements, size, and for a delta the
//!   SHA-256 of the active slot's base region) and starts the job.
//! - [`Installer::write`] takes object bytes `(offset, bytes)` from any transport, in any
//!   chunking; [`Installer::next`] says which offset it wants. A full image is written as it
//!   comes; a patch goes through the [`Patcher`]. Both go only to the inactive slot, each sector
//!   erased just before its first byte is written, and the object is hashed as it arrives.
//! - Every time the output reaches a sector boundary, the installer appends a checkpoint to the
//!   progress log (output offset, object offset, the patcher's record boundary, the object hash's
//!   state). After a power loss, [`Installer::open`] resumes from the last checkpoint: the caller
//!   fetches from the object offset it names, and the sector after the checkpoint is erased again
//!   before anything is written to it.
//! - At the end the object's digest is checked, the slot is read back and its SHA-256 compared
//!   to the signed image digest; only then can [`Installer::switch`] ask the bootloader for a
//!   trial boot ([`super::boot`]).
//! - In the trial, [`Installer::self_test`] runs the caller's checks and the golden vectors the
//!   manifest names; it confirms the slot or reverts.
//!
//! Every step returns a [`Report`] with the `progress` states of protocol v1
//! ([`crate::wire::ota_state`]) and an [`error`] code.

use embedded_storage::nor_flash::NorFlash;
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest as _, Sha256};

use super::boot::{self, BootState, ImageInfo, Trial};
use super::flash::{self, FlashError, Layout, LayoutError, Log, Region};
use super::manifest::{self, Digest, Golden, Manifest, OfferError, TrustedKey};
use super::patch::{HEADER_LEN, PatchError, PatchHeader, Patcher, Position, Slots};
use crate::wire::{Progress, ota_state};

/// Error codes of [`Report::error`] (`progress.error`).
pub mod error {
    /// No error.
    pub const NONE: u16 = 0;
    // Offer refused (state 8, rejected).
    /// Not an offer, or its manifest does not decode or is inconsistent.
    pub const MALFORMED: u16 = 1;
    /// Signed with a key id the device does not trust.
    pub const UNKNOWN_KEY: u16 = 2;
    /// The signature does not verify.
    pub const SIGNATURE: u16 = 3;
    /// For other hardware.
    pub const HARDWARE: u16 = 4;
    /// Sequence number not above the installed one (or the one being installed).
    pub const ROLLBACK: u16 = 5;
    /// This sequence number was tried and reverted before.
    pub const REVERTED_BEFORE: u16 = 6;
    /// The device's firmware is older than the manifest's `min_fw`.
    pub const FIRMWARE: u16 = 7;
    /// The model needs a larger tensor arena than the device has.
    pub const ARENA: u16 = 8;
    /// The image (or the base a delta names) does not fit a slot.
    pub const TOO_LARGE: u16 = 9;
    /// A delta's block size is above what the device's patcher holds, or not a multiple of
    /// the flash write size.
    pub const BLOCK_SIZE: u16 = 10;
    /// A delta's base digest differs from the active slot's.
    pub const BASE_DIGEST: u16 = 11;
    /// Another image is being switched to or tried.
    pub const BUSY: u16 = 12;
    // Install failed (state 6).
    /// The patch is malformed.
    pub const PATCH: u16 = 20;
    /// The patch header disagrees with the manifest (block size, sizes).
    pub const PATCH_HEADER: u16 = 21;
    /// The object's SHA-256 differs from the manifest's.
    pub const OBJECT_DIGEST: u16 = 22;
    /// The image read back from the slot differs from the manifest's SHA-256.
    pub const IMAGE_DIGEST: u16 = 23;
    /// The caller aborted the install.
    pub const ABORTED: u16 = 24;
    /// The saved progress contradicts the bootloader's state; the install was dropped.
    pub const STATE: u16 = 25;
    // Reverted (state 7).
    /// The self-test (checks or golden vectors) failed.
    pub const SELF_TEST: u16 = 30;
    /// The trial image was not confirmed before the next boot (crash, watchdog, power loss).
    pub const NOT_CONFIRMED: u16 = 31;
}

/// One OTA progress report; [`Report::progress`] makes the wire message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Report {
    pub manifest_seq: u32,
    /// A [`crate::wire::ota_state`] code.
    pub state: u8,
    /// Bytes of the object received so far.
    pub bytes: u32,
    /// An [`error`] code.
    pub error: u16,
}

impl Report {
    const fn new(manifest_seq: u32, state: u8, bytes: u32, error: u16) -> Self {
        Self {
            manifest_seq,
            state,
            bytes,
            error,
        }
    }

    /// The `progress` message, with the device's boot counter and progress sequence number.
    pub fn progress(&self, boot: u32, seq: u32) -> Progress {
        Progress {
            boot,
            seq,
            manifest_seq: self.manifest_seq,
            state: self.state,
            bytes: self.bytes,
            error: self.error,
        }
    }
}

/// What the device is and trusts.
#[derive(Debug, Clone, Copy)]
pub struct Config<'a> {
    /// Hardware id; offers must name exactly this.
    pub hw: &'a str,
    /// Firmware build number, compared with the manifest's `min_fw`.
    pub fw: u32,
    /// Tensor arena bytes available to a model.
    pub arena: u32,
    /// Keys that may sign offers.
    pub keys: &'a [TrustedKey<'a>],
}

/// What the installer needs from the caller now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Next {
    /// Nothing: wait for an offer.
    Idle,
    /// Object bytes from `offset` on (of `total`); `block_size` is the manifest's, a good
    /// request size. `object` names it for MQTT block requests.
    Fetch {
        object: [u8; 32],
        offset: u32,
        total: u32,
        block_size: u16,
    },
    /// The new image is verified: call [`Installer::switch`] when ready to reboot into it.
    Switch,
    /// Reboot (into the trial image, or back to the active one after a failed self-test).
    Reboot,
    /// Running a trial image: call [`Installer::self_test`].
    SelfTest,
}

/// Why the installer could not proceed (not a refused offer or a failed install: those are
/// [`Report`]s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Error<E> {
    Flash(FlashError<E>),
    Layout(LayoutError),
    /// An earlier call failed on the flash, so the state in RAM may be ahead of the flash:
    /// [`Installer::open`] it again (as after a reboot).
    Stale,
}

impl<E> From<FlashError<E>> for Error<E> {
    fn from(e: FlashError<E>) -> Self {
        Error::Flash(e)
    }
}

/// The model check after a trial boot. The installer calls [`SelfTest::check`], then
/// [`SelfTest::run`] for each golden vector of the manifest.
pub trait SelfTest {
    /// Any check of the running image (the model loads, its arena fits, ...).
    fn check(&mut self) -> bool {
        true
    }
    /// Runs golden vector `index` through the model and returns whether its output matched the
    /// expected one. Feeds the vector's input, then its expected output, to `seen`: their
    /// digest over all vectors must equal the manifest's, so the signed vectors ran.
    fn run(&mut self, index: u16, seen: &mut GoldenDigest) -> bool;
}

impl<T: FnMut(u16, &mut GoldenDigest) -> bool> SelfTest for T {
    fn run(&mut self, index: u16, seen: &mut GoldenDigest) -> bool {
        self(index, seen)
    }
}

/// The running digest of the golden vectors a self-test used.
#[derive(Debug, Clone, Default)]
pub struct GoldenDigest(Sha256);

impl GoldenDigest {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The job: what the installer keeps of an accepted manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    seq: u32,
    target: u8,
    image_size: u32,
    image_sha256: Digest,
    object: Digest,
    object_size: u32,
    /// The base size if this is a delta.
    delta: Option<u32>,
    block_size: u16,
    golden: Option<Golden>,
}

impl Job {
    fn of(m: &Manifest<'_>, target: u8) -> Self {
        Self {
            seq: m.seq,
            target,
            image_size: m.image_size,
            image_sha256: m.image_sha256,
            object: m.object,
            object_size: m.object_size(),
            delta: m.delta.map(|d| d.base_size),
            block_size: m.block_size,
            golden: m.golden,
        }
    }

    fn header(&self) -> Option<PatchHeader> {
        self.delta.map(|base_size| PatchHeader {
            block_size: self.block_size,
            target_size: self.image_size,
            base_size,
        })
    }

    fn image(&self) -> ImageInfo {
        ImageInfo {
            seq: self.seq,
            size: self.image_size,
            sha256: self.image_sha256.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum Phase {
    Idle = 0,
    Downloading = 1,
    Verified = 2,
    Switching = 3,
}

/// Bytes of a serialized SHA-256 state.
const HASH_STATE: usize = core::mem::size_of::<SerializedState<Sha256>>();
/// Payload bytes of a progress record.
pub const PROGRESS_PAYLOAD: usize = 132 + HASH_STATE;
/// Version byte of the progress log's records.
const LOG_VERSION: u8 = 0xa1;

/// Why a write step stopped.
enum Stop<E> {
    Flash(FlashError<E>),
    /// The install failed with this [`error`] code.
    Fail(u16),
}

impl<E> From<FlashError<E>> for Stop<E> {
    fn from(e: FlashError<E>) -> Self {
        Stop::Flash(e)
    }
}

/// The patcher's view of the slots: the active one read, the inactive one written.
struct SlotIo<'a, F> {
    flash: &'a mut F,
    base: Region,
    out: Region,
}

impl<F: NorFlash> Slots for SlotIo<'_, F> {
    type Error = FlashError<F::Error>;

    fn read_base(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error> {
        let addr = self.base.at(offset, buf.len()).ok_or(FlashError::Range)?;
        flash::read(self.flash, addr, buf)
    }

    fn write_out(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error> {
        flash::write_slot(self.flash, self.out, offset, data)
    }
}

/// The installer over a flash `F`; `B` is the largest patch block size it applies.
///
/// The patcher (about `3 * B` bytes) is the caller's: it can live in a static, and the installer
/// itself (about 450 bytes) stays cheap to move. It is reset and resumed in place.
#[derive(Debug)]
pub struct Installer<'a, F, const B: usize> {
    flash: F,
    layout: Layout,
    config: Config<'a>,
    boot: BootState,
    phase: Phase,
    job: Job,
    /// Next object byte wanted.
    obj_offset: u32,
    /// Output bytes durably written (at the last checkpoint).
    out_offset: u32,
    /// The patcher's `next_src` at the last checkpoint.
    next_src: u32,
    hasher: Sha256,
    patcher: &'a mut Patcher<B>,
    /// Image bytes not yet programmed (less than a write granule).
    carry: [u8; flash::MAX_GRANULE],
    carry_len: usize,
    reboot: bool,
    /// A flash error interrupted a step (see [`Error::Stale`]).
    stale: bool,
    /// What `open` found settled, for `take_report`.
    settled: Option<Report>,
}

const NO_JOB: Job = Job {
    seq: 0,
    target: 0,
    image_size: 0,
    image_sha256: Digest([0; 32]),
    object: Digest([0; 32]),
    object_size: 0,
    delta: None,
    block_size: 0,
    golden: None,
};

impl<'a, F: NorFlash, const B: usize> Installer<'a, F, B> {
    /// Opens the installer after boot (after the bootloader's [`boot::boot`]): reads the boot
    /// state and the progress log and resumes where a power loss stopped. When the boot settled
    /// an install (confirmed before the power went, reverted by the bootloader), the report is
    /// waiting in [`Installer::take_report`].
    ///
    /// Not inlined, so that its temporaries stay out of the caller's frame.
    #[inline(never)]
    pub fn open(
        mut flash: F,
        layout: Layout,
        config: Config<'a>,
        patcher: &'a mut Patcher<B>,
    ) -> Result<Self, Error<F::Error>> {
        layout.check(&flash).map_err(Error::Layout)?;
        let boot = boot::read(&mut flash, &layout)?;
        reset_patcher(patcher);
        let mut me = Self {
            flash,
            layout,
            config,
            boot,
            phase: Phase::Idle,
            job: NO_JOB,
            obj_offset: 0,
            out_offset: 0,
            next_src: 0,
            hasher: Sha256::new(),
            patcher,
            carry: [0; flash::MAX_GRANULE],
            carry_len: 0,
            reboot: false,
            stale: false,
            settled: None,
        };
        me.resume()?;
        Ok(me)
    }

    /// Resumes from the latest progress record, if any. Not inlined: the record and the
    /// restored state stay out of [`Installer::open`]'s frame, which holds the installer.
    #[inline(never)]
    fn resume(&mut self) -> Result<(), Error<F::Error>> {
        let mut record = [0u8; PROGRESS_PAYLOAD];
        if self
            .log()
            .read_latest(&mut self.flash, &mut record)?
            .is_some()
        {
            self.settled = self.restore(&record)?;
        }
        Ok(())
    }

    /// The report of an install that [`Installer::open`] found settled (once).
    pub fn take_report(&mut self) -> Option<Report> {
        self.settled.take()
    }

    /// Gives the flash back (e.g. to simulate a reboot in tests).
    pub fn into_flash(self) -> F {
        self.flash
    }

    /// The bootloader state as the installer last read or wrote it.
    pub fn boot_state(&self) -> &BootState {
        &self.boot
    }

    /// What the installer needs now.
    pub fn next(&self) -> Next {
        if self.reboot {
            return Next::Reboot;
        }
        match self.phase {
            Phase::Idle => Next::Idle,
            Phase::Downloading => Next::Fetch {
                object: self.job.object.0,
                offset: self.obj_offset,
                total: self.job.object_size,
                block_size: self.job.block_size,
            },
            Phase::Verified => Next::Switch,
            Phase::Switching if self.boot.trial == Trial::Running => Next::SelfTest,
            Phase::Switching => Next::Reboot,
        }
    }

    /// Runs a step; a flash error makes the installer stale.
    fn guard<T>(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<T, Error<F::Error>>,
    ) -> Result<T, Error<F::Error>> {
        if self.stale {
            return Err(Error::Stale);
        }
        let r = step(self);
        if r.is_err() {
            self.stale = true;
        }
        r
    }

    /// Handles an offer (the body of `tf/v1/{device}/ota/offer`). `scratch` holds the signed
    /// bytes while verifying ([`manifest::MAX_OFFER`] bytes always suffice).
    ///
    /// The offer of the install under way (a retained offer delivered again, or after a
    /// reboot) continues it; one with a higher sequence number replaces a download under way;
    /// the offer of the installed image reports it confirmed.
    pub fn offer(&mut self, bytes: &[u8], scratch: &mut [u8]) -> Result<Report, Error<F::Error>> {
        self.guard(|me| {
            let verified = manifest::verify_offer(bytes, me.config.keys, scratch);
            me.offer_inner(verified)
        })
    }

    /// [`Installer::offer`] without a scratch buffer: the signed bytes are built over the offer
    /// itself ([`manifest::verify_offer_in_place`]), so `buf` (the received message, exactly)
    /// is overwritten.
    ///
    /// The signature check, the device's deepest stack, is called from this small frame; the
    /// manifest's decoding and the offer's handling (`offer_signed`) come after it, in frames of
    /// their own.
    pub fn offer_in_place(&mut self, buf: &mut [u8]) -> Result<Report, Error<F::Error>> {
        if self.stale {
            return Err(Error::Stale);
        }
        let signed = manifest::signed_payload_in_place(buf, self.config.keys);
        self.offer_signed(buf, signed)
    }

    /// The rest of [`Installer::offer_in_place`] once the signature was checked: `signed` is
    /// where the payload now is in `buf`.
    #[inline(never)]
    fn offer_signed(
        &mut self,
        buf: &[u8],
        signed: Result<core::ops::Range<usize>, OfferError>,
    ) -> Result<Report, Error<F::Error>> {
        self.guard(|me| {
            let verified = signed.and_then(|payload| manifest::decode_signed(buf, payload));
            me.offer_inner(verified)
        })
    }

    /// Takes object bytes at `offset` (from any transport, any chunking). Bytes before the
    /// wanted offset are skipped, a chunk after it is ignored ([`Installer::next`] says what to
    /// fetch). Returns a report at each checkpoint (downloading), at the end (verified), or
    /// when the install failed.
    pub fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<Option<Report>, Error<F::Error>> {
        self.guard(|me| me.write_inner(offset, bytes))
    }

    /// Gives up the download (or a verified image not yet switched to).
    pub fn abort(&mut self) -> Result<Option<Report>, Error<F::Error>> {
        self.guard(|me| me.abort_inner())
    }

    /// Asks the bootloader for a trial boot of the verified image; reboot afterwards
    /// ([`Next::Reboot`]).
    pub fn switch(&mut self) -> Result<Option<Report>, Error<F::Error>> {
        self.guard(|me| me.switch_inner())
    }

    /// In a trial boot: runs the self-test, then confirms the image or reverts (and asks for a
    /// reboot, [`Next::Reboot`]).
    pub fn self_test(
        &mut self,
        test: &mut impl SelfTest,
    ) -> Result<Option<Report>, Error<F::Error>> {
        self.guard(|me| me.self_test_inner(test))
    }

    fn log(&self) -> Log {
        Log::new(self.layout.progress, PROGRESS_PAYLOAD, LOG_VERSION)
    }

    fn report(&self, state: u8, error: u16) -> Report {
        Report::new(self.job.seq, state, self.obj_offset, error)
    }

    /// The report of the current phase (for a repeated offer of the same install).
    fn status(&self) -> Report {
        let state = match self.phase {
            Phase::Idle => ota_state::ACCEPTED,
            Phase::Downloading => ota_state::DOWNLOADING,
            Phase::Verified => ota_state::VERIFIED,
            Phase::Switching => ota_state::SWITCHING,
        };
        self.report(state, error::NONE)
    }

    fn offer_inner(
        &mut self,
        verified: Result<Manifest<'_>, OfferError>,
    ) -> Result<Report, Error<F::Error>> {
        let m = match verified {
            Ok(m) => m,
            Err(e) => {
                let code = match e {
                    OfferError::UnknownKey => error::UNKNOWN_KEY,
                    OfferError::BadSignature => error::SIGNATURE,
                    _ => error::MALFORMED,
                };
                return Ok(Report::new(0, ota_state::REJECTED, 0, code));
            }
        };
        let reject = |code| Ok(Report::new(m.seq, ota_state::REJECTED, 0, code));
        if self.phase != Phase::Idle && Job::of(&m, self.job.target) == self.job {
            return Ok(self.status());
        }
        let installed = self.boot.images[usize::from(self.boot.active)];
        if m.seq == installed.seq && m.image_sha256.0 == installed.sha256 {
            return Ok(Report::new(m.seq, ota_state::CONFIRMED, 0, error::NONE));
        }
        // Busy: switching, trying, or running a reverted trial image (whose slot is the
        // inactive one until the reboot).
        if matches!(self.phase, Phase::Verified | Phase::Switching)
            || self.boot.trial != Trial::None
            || self.reboot
        {
            return reject(error::BUSY);
        }
        if m.hw != self.config.hw {
            return reject(error::HARDWARE);
        }
        let busy_seq = if self.phase == Phase::Idle {
            0
        } else {
            self.job.seq
        };
        if m.seq <= installed.seq || m.seq <= busy_seq {
            return reject(error::ROLLBACK);
        }
        if m.seq == self.boot.reverted_seq {
            return reject(error::REVERTED_BEFORE);
        }
        if m.min_fw > self.config.fw {
            return reject(error::FIRMWARE);
        }
        if m.arena > self.config.arena {
            return reject(error::ARENA);
        }
        let target = self.boot.inactive();
        let slot_len = self.layout.slots[usize::from(target)].len;
        if m.image_size > slot_len {
            return reject(error::TOO_LARGE);
        }
        if let Some(d) = &m.delta {
            let bs = usize::from(m.block_size);
            if bs > B || !bs.is_multiple_of(F::WRITE_SIZE) {
                return reject(error::BLOCK_SIZE);
            }
            if d.base_size > slot_len {
                return reject(error::TOO_LARGE);
            }
            let active = self.layout.slots[usize::from(self.boot.active)];
            if flash::sha256(&mut self.flash, active, 0, d.base_size)? != d.base_sha256.0 {
                return reject(error::BASE_DIGEST);
            }
        }
        self.job = Job::of(&m, target);
        self.restart();
        self.phase = Phase::Downloading;
        self.persist()?;
        Ok(self.report(ota_state::ACCEPTED, error::NONE))
    }

    /// Resets the download state to the start of the object.
    fn restart(&mut self) {
        self.obj_offset = 0;
        self.out_offset = 0;
        self.next_src = 0;
        self.hasher = Sha256::new();
        reset_patcher(self.patcher);
        self.carry_len = 0;
    }

    /// Not inlined into [`Installer::write`], so that its temporaries stay out of the caller's
    /// frame (which, in a device's message handler, often also leads to the signature check).
    #[inline(never)]
    fn write_inner(
        &mut self,
        offset: u32,
        bytes: &[u8],
    ) -> Result<Option<Report>, Error<F::Error>> {
        if self.phase != Phase::Downloading || self.reboot {
            return Ok(None);
        }
        let want = self.obj_offset;
        let end = u64::from(offset) + bytes.len() as u64;
        if offset > want || end <= u64::from(want) {
            return Ok(None);
        }
        let skip = (want - offset) as usize;
        let room = (self.job.object_size - want) as usize;
        let data = &bytes[skip..];
        let data = &data[..data.len().min(room)];
        let step = if self.job.delta.is_some() {
            self.feed_patch(data)
        } else {
            self.feed_image(data)
        };
        let step = step.and_then(|report| {
            if self.obj_offset == self.job.object_size {
                self.finish().map(Some)
            } else {
                Ok(report)
            }
        });
        match step {
            Ok(report) => Ok(report),
            Err(Stop::Flash(e)) => Err(Error::Flash(e)),
            Err(Stop::Fail(code)) => self.end(ota_state::FAILED, code).map(Some),
        }
    }

    /// Ends the job in `state` with `code`; the progress log goes back to idle.
    fn end(&mut self, state: u8, code: u16) -> Result<Report, Error<F::Error>> {
        let report = self.report(state, code);
        self.phase = Phase::Idle;
        self.persist()?;
        Ok(report)
    }

    fn abort_inner(&mut self) -> Result<Option<Report>, Error<F::Error>> {
        match self.phase {
            Phase::Downloading | Phase::Verified => {
                self.end(ota_state::FAILED, error::ABORTED).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn checkpoint(&mut self) -> Result<Report, FlashError<F::Error>> {
        self.persist()?;
        Ok(self.report(ota_state::DOWNLOADING, error::NONE))
    }

    /// Feeds patch bytes one at a time, so that the patcher's record boundary is seen at every
    /// record and a checkpoint is taken exactly where an output sector ends.
    fn feed_patch(&mut self, data: &[u8]) -> Result<Option<Report>, Stop<F::Error>> {
        let sector = F::ERASE_SIZE as u32;
        let (base, out) = (
            self.layout.slots[usize::from(1 - self.job.target)],
            self.layout.slots[usize::from(self.job.target)],
        );
        let mut report = None;
        for &b in data {
            self.hasher.update([b]);
            let mut io = SlotIo {
                flash: &mut self.flash,
                base,
                out,
            };
            self.patcher.feed(&[b], &mut io).map_err(|e| match e {
                PatchError::Io(e) => Stop::Flash(e),
                PatchError::Malformed(_) => Stop::Fail(error::PATCH),
            })?;
            self.obj_offset += 1;
            if self.obj_offset == HEADER_LEN as u32 && self.patcher.header() != self.job.header() {
                return Err(Stop::Fail(error::PATCH_HEADER));
            }
            let at = self.patcher.boundary();
            if at.patch_offset == self.obj_offset
                && at.out_offset > self.out_offset
                && at.out_offset.is_multiple_of(sector)
                && !self.patcher.is_done()
            {
                self.out_offset = at.out_offset;
                self.next_src = at.next_src;
                report = Some(self.checkpoint()?);
            }
        }
        Ok(report)
    }

    /// Writes full-image bytes, with a checkpoint at every sector boundary.
    fn feed_image(&mut self, mut data: &[u8]) -> Result<Option<Report>, Stop<F::Error>> {
        let sector = F::ERASE_SIZE as u32;
        let mut report = None;
        while !data.is_empty() {
            let to_boundary = (sector - self.obj_offset % sector) as usize;
            let (chunk, rest) = data.split_at(data.len().min(to_boundary));
            self.hasher.update(chunk);
            self.put_image(chunk)?;
            self.obj_offset += chunk.len() as u32;
            data = rest;
            if self.obj_offset.is_multiple_of(sector) && self.obj_offset < self.job.image_size {
                self.out_offset = self.obj_offset;
                report = Some(self.checkpoint()?);
            }
        }
        if self.obj_offset == self.job.image_size && self.carry_len > 0 {
            let at = self.obj_offset - self.carry_len as u32;
            let out = self.layout.slots[usize::from(self.job.target)];
            flash::write_slot(&mut self.flash, out, at, &self.carry[..self.carry_len])?;
            self.carry_len = 0;
        }
        Ok(report)
    }

    /// Programs image bytes that continue at `obj_offset`, whole write granules at a time.
    fn put_image(&mut self, mut bytes: &[u8]) -> Result<(), FlashError<F::Error>> {
        let w = F::WRITE_SIZE;
        let out = self.layout.slots[usize::from(self.job.target)];
        let mut at = self.obj_offset - self.carry_len as u32;
        if self.carry_len > 0 {
            let n = (w - self.carry_len).min(bytes.len());
            self.carry[self.carry_len..self.carry_len + n].copy_from_slice(&bytes[..n]);
            self.carry_len += n;
            bytes = &bytes[n..];
            if self.carry_len < w {
                return Ok(());
            }
            flash::write_slot(&mut self.flash, out, at, &self.carry[..w])?;
            at += w as u32;
            self.carry_len = 0;
        }
        let direct = bytes.len() - bytes.len() % w;
        if direct > 0 {
            flash::write_slot(&mut self.flash, out, at, &bytes[..direct])?;
        }
        let rest = &bytes[direct..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
        Ok(())
    }

    /// The whole object arrived: check it, read the slot back, and mark the job verified.
    fn finish(&mut self) -> Result<Report, Stop<F::Error>> {
        if self.job.delta.is_some() && !self.patcher.is_done() {
            return Err(Stop::Fail(error::PATCH));
        }
        let object: [u8; 32] = core::mem::take(&mut self.hasher).finalize().into();
        if object != self.job.object.0 {
            return Err(Stop::Fail(error::OBJECT_DIGEST));
        }
        let out = self.layout.slots[usize::from(self.job.target)];
        if flash::sha256(&mut self.flash, out, 0, self.job.image_size)? != self.job.image_sha256.0 {
            return Err(Stop::Fail(error::IMAGE_DIGEST));
        }
        self.phase = Phase::Verified;
        self.out_offset = self.job.image_size;
        self.persist()?;
        Ok(self.report(ota_state::VERIFIED, error::NONE))
    }

    fn switch_inner(&mut self) -> Result<Option<Report>, Error<F::Error>> {
        if self.phase != Phase::Verified || self.boot.trial != Trial::None {
            return Ok(None);
        }
        boot::request_trial(
            &mut self.flash,
            &self.layout,
            &mut self.boot,
            self.job.image(),
        )?;
        self.phase = Phase::Switching;
        self.persist()?;
        Ok(Some(self.report(ota_state::SWITCHING, error::NONE)))
    }

    fn self_test_inner(
        &mut self,
        test: &mut impl SelfTest,
    ) -> Result<Option<Report>, Error<F::Error>> {
        if self.phase != Phase::Switching || self.boot.trial != Trial::Running {
            return Ok(None);
        }
        let mut passed = test.check();
        if let (true, Some(golden)) = (passed, self.job.golden) {
            let mut seen = GoldenDigest::default();
            for i in 0..golden.count {
                if !test.run(i, &mut seen) {
                    passed = false;
                    break;
                }
            }
            passed = passed && <[u8; 32]>::from(seen.0.finalize()) == golden.sha256.0;
        }
        if passed {
            boot::confirm(&mut self.flash, &self.layout, &mut self.boot)?;
            self.end(ota_state::CONFIRMED, error::NONE).map(Some)
        } else {
            boot::revert(&mut self.flash, &self.layout, &mut self.boot)?;
            self.reboot = true;
            self.end(ota_state::REVERTED, error::SELF_TEST).map(Some)
        }
    }

    /// Appends the current state to the progress log.
    fn persist(&mut self) -> Result<(), FlashError<F::Error>> {
        let mut p = [0u8; PROGRESS_PAYLOAD];
        self.progress_record(&mut p);
        let log = self.log();
        log.append(&mut self.flash, &p)
    }

    /// The progress record of the current state. Not inlined: its temporaries (the hash
    /// state serialised) stay out of [`Installer::persist`]'s frame, above the flash write.
    #[inline(never)]
    fn progress_record(&self, p: &mut [u8; PROGRESS_PAYLOAD]) {
        let j = &self.job;
        p[0] = self.phase as u8;
        p[1] = j.target;
        p[2] = u8::from(j.delta.is_some()) | u8::from(j.golden.is_some()) << 1;
        p[4..8].copy_from_slice(&j.seq.to_le_bytes());
        p[8..12].copy_from_slice(&j.image_size.to_le_bytes());
        p[12..44].copy_from_slice(&j.image_sha256.0);
        p[44..76].copy_from_slice(&j.object.0);
        p[76..80].copy_from_slice(&j.object_size.to_le_bytes());
        p[80..84].copy_from_slice(&j.delta.unwrap_or(0).to_le_bytes());
        p[84..86].copy_from_slice(&j.block_size.to_le_bytes());
        if let Some(g) = &j.golden {
            p[86..88].copy_from_slice(&g.count.to_le_bytes());
            p[88..120].copy_from_slice(&g.sha256.0);
        }
        p[120..124].copy_from_slice(&self.obj_offset.to_le_bytes());
        p[124..128].copy_from_slice(&self.out_offset.to_le_bytes());
        p[128..132].copy_from_slice(&self.next_src.to_le_bytes());
        p[132..].copy_from_slice(&self.hasher.serialize());
    }

    /// Restores the state of a progress record, reconciled with the boot state.
    fn restore(&mut self, p: &[u8; PROGRESS_PAYLOAD]) -> Result<Option<Report>, Error<F::Error>> {
        let u32_at = |at: usize| u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
        let digest_at = |at: usize| {
            let mut d = [0u8; 32];
            d.copy_from_slice(&p[at..at + 32]);
            Digest(d)
        };
        let phase = match p[0] {
            1 => Phase::Downloading,
            2 => Phase::Verified,
            3 => Phase::Switching,
            _ => return Ok(None),
        };
        self.job = Job {
            seq: u32_at(4),
            target: p[1] & 1,
            image_size: u32_at(8),
            image_sha256: digest_at(12),
            object: digest_at(44),
            object_size: u32_at(76),
            delta: (p[2] & 1 != 0).then(|| u32_at(80)),
            block_size: u16::from_le_bytes([p[84], p[85]]),
            golden: (p[2] & 2 != 0).then(|| Golden {
                count: u16::from_le_bytes([p[86], p[87]]),
                sha256: digest_at(88),
            }),
        };
        self.phase = phase;
        self.obj_offset = u32_at(120);
        self.out_offset = u32_at(124);
        self.next_src = u32_at(128);
        let b = self.boot;
        let target = self.job.target;
        match phase {
            Phase::Downloading => {
                let resumed = self.resume_download(&p[132..]);
                if b.trial != Trial::None || b.inactive() != target || resumed.is_none() {
                    return self.end(ota_state::FAILED, error::STATE).map(Some);
                }
                Ok(None)
            }
            // Trial requested or running: wait for the reboot, or run the self-test.
            _ if b.trial != Trial::None && b.inactive() == target => {
                self.phase = Phase::Switching;
                Ok(None)
            }
            // Confirmed, but the power went before the progress log said so.
            _ if b.active == target && b.images[usize::from(target)].seq == self.job.seq => {
                self.end(ota_state::CONFIRMED, error::NONE).map(Some)
            }
            Phase::Verified if b.inactive() == target => Ok(None),
            // Switched, and the trial was reverted (by the bootloader or a failed self-test).
            Phase::Switching if b.inactive() == target => {
                let code = if b.reverted_seq == self.job.seq {
                    error::NOT_CONFIRMED
                } else {
                    error::STATE
                };
                self.end(ota_state::REVERTED, code).map(Some)
            }
            _ => self.end(ota_state::FAILED, error::STATE).map(Some),
        }
    }

    /// Restores the hash and the patcher at the checkpoint; `None` if the record is unusable.
    fn resume_download(&mut self, hash_state: &[u8]) -> Option<()> {
        let state = SerializedState::<Sha256>::try_from(hash_state).ok()?;
        self.hasher = Sha256::deserialize(&state).ok()?;
        self.carry_len = 0;
        if self.obj_offset > self.job.object_size || self.out_offset > self.job.image_size {
            return None;
        }
        match self.job.header() {
            Some(h) if self.obj_offset >= HEADER_LEN as u32 => {
                let at = Position {
                    patch_offset: self.obj_offset,
                    out_offset: self.out_offset,
                    next_src: self.next_src,
                };
                resume_patcher(self.patcher, h, at)?;
            }
            Some(_) => (self.obj_offset == 0).then_some(())?,
            None => (self.obj_offset == self.out_offset).then_some(())?,
        }
        Some(())
    }
}

/// Resets a patcher in place (`Patcher::new()` is all zeros, so this is a memset: no `3 * B`-byte
/// temporary on the stack).
#[inline(never)]
fn reset_patcher<const B: usize>(p: &mut Patcher<B>) {
    *p = const { Patcher::new() };
}

/// Resumes a patcher in place. Not inlined: the compiler then builds the result directly in `p`
/// instead of in a `3 * B`-byte temporary in the caller's frame.
#[inline(never)]
fn resume_patcher<const B: usize>(p: &mut Patcher<B>, h: PatchHeader, at: Position) -> Option<()> {
    *p = Patcher::resume(h, at).ok()?;
    Some(())
}
