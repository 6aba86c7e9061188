//! The flash helpers: layout checks, unaligned reads, and the CRC-protected log under power
//! loss at every operation.

use embedded_storage::nor_flash::{ErrorType, NorFlash, ReadNorFlash};
use proptest::prelude::*;
use tinyfleet_device::ota::flash::{self, Layout, LayoutError, Log, Region};
use tinyfleet_device::ota::sim::{Cut, SimError, SimFlash};

type Flash = SimFlash<8, 1024>;

const PAYLOAD: usize = 100;

fn log() -> Log {
    Log::new(Region::new(1024, 2048), PAYLOAD, 7)
}

fn record(n: u32) -> [u8; PAYLOAD] {
    let mut p = [0u8; PAYLOAD];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (n as usize * 31 + i) as u8;
    }
    p[..4].copy_from_slice(&n.to_le_bytes());
    p
}

fn latest(f: &mut Flash) -> Option<u32> {
    let mut p = [0u8; PAYLOAD];
    log().read_latest(f, &mut p).unwrap()?;
    let n = u32::from_le_bytes(p[..4].try_into().unwrap());
    assert_eq!(p, record(n), "payload intact");
    Some(n)
}

#[test]
fn last_record_wins_across_compactions() {
    let mut f = Flash::new(4096);
    assert_eq!(latest(&mut f), None);
    // 9 records of 112 bytes fit a 1 KB sector: 40 appends compact several times.
    for n in 1..=40 {
        log().append(&mut f, &record(n)).unwrap();
        assert_eq!(latest(&mut f), Some(n));
    }
    assert_eq!(f.violations(), 0);
    // Other logs' records (another version byte) are not this log's.
    let other = Log::new(Region::new(1024, 2048), PAYLOAD, 8);
    let mut p = [0u8; PAYLOAD];
    assert_eq!(other.read_latest(&mut f, &mut p).unwrap(), None);
}

#[test]
fn a_power_cut_anywhere_keeps_the_previous_or_the_new_record() {
    let mut reference = Flash::new(4096);
    let start = reference.ops();
    for n in 1..=30 {
        log().append(&mut reference, &record(n)).unwrap();
    }
    for op in start..reference.ops() {
        for how in [Cut::Before, Cut::Midway] {
            let mut f = Flash::new(4096);
            f.cut_power_at(op, how);
            let mut done = 0;
            for n in 1..=30 {
                if log().append(&mut f, &record(n)).is_err() {
                    break;
                }
                done = n;
            }
            f.power_on();
            let got = latest(&mut f);
            // The record being appended when the power went is there or not; nothing older
            // than the one before it, nothing broken.
            let ok = got == Some(done + 1) || got == Some(done) || (done == 0 && got.is_none());
            assert!(ok, "cut {how:?} at {op}: done {done}, latest {got:?}");
            // And the log goes on.
            let next = got.unwrap_or(0) + 1;
            for n in next..next + 12 {
                log().append(&mut f, &record(n)).unwrap();
                assert_eq!(latest(&mut f), Some(n));
            }
            assert_eq!(f.violations(), 0);
        }
    }
}

#[test]
fn layouts_are_checked() {
    let f = SimFlash::<4, 4096>::new(64 * 1024);
    let good = Layout {
        slots: [Region::new(0, 24 * 1024), Region::new(24 * 1024, 24 * 1024)],
        boot: Region::new(48 * 1024, 8192),
        progress: Region::new(56 * 1024, 8192),
    };
    assert_eq!(good.check(&f), Ok(()));
    let bad = |l: Layout, e| assert_eq!(l.check(&f), Err(e), "{l:?}");
    bad(
        Layout {
            boot: Region::new(48 * 1024 + 1, 8192),
            ..good
        },
        LayoutError::Region,
    );
    bad(
        Layout {
            progress: Region::new(56 * 1024, 16384),
            ..good
        },
        LayoutError::Region,
    );
    bad(
        Layout {
            boot: Region::new(20 * 1024, 8192),
            ..good
        },
        LayoutError::Overlap,
    );
    bad(
        Layout {
            slots: [Region::new(0, 20 * 1024), Region::new(24 * 1024, 24 * 1024)],
            ..good
        },
        LayoutError::SlotLength,
    );
    bad(
        Layout {
            boot: Region::new(48 * 1024, 4096),
            ..good
        },
        LayoutError::LogTooSmall,
    );
}

/// A flash that reads only 4-byte aligned words.
#[derive(Debug)]
struct Words(SimFlash<4, 1024>);

impl ErrorType for Words {
    type Error = SimError;
}

impl ReadNorFlash for Words {
    const READ_SIZE: usize = 4;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        assert!(
            offset.is_multiple_of(4) && bytes.len().is_multiple_of(4),
            "unaligned read"
        );
        self.0.read(offset, bytes)
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

impl NorFlash for Words {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 1024;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        self.0.erase(from, to)
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        self.0.write(offset, bytes)
    }
}

proptest! {
    #[test]
    fn reads_at_any_alignment(offset in 0u32..2000, len in 0usize..100) {
        let mut w = Words(SimFlash::new(4096));
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        w.0.load(0, &data);
        let mut buf = vec![0u8; len];
        flash::read(&mut w, offset, &mut buf).unwrap();
        prop_assert_eq!(&buf[..], &data[offset as usize..offset as usize + len]);
    }

    #[test]
    fn program_pads_the_last_granule(offset in 0u32..100, data in prop::collection::vec(any::<u8>(), 1..40)) {
        let mut f = Flash::new(4096);
        let at = offset * 8;
        flash::program(&mut f, at, &data).unwrap();
        let end = at as usize + data.len();
        prop_assert_eq!(&f.bytes()[at as usize..end], &data[..]);
        prop_assert!(f.bytes()[end..end.next_multiple_of(8)].iter().all(|&b| b == 0xff));
        prop_assert_eq!(flash::program(&mut f, at + 3, &data), Err(flash::FlashError::Range));
    }
}
