//! The installer on a simulated flash: full images and deltas end to end, every refusal, bad
//! bytes caught by the digests, self-tests that confirm or revert.

mod ota_util;

use ota_util::*;
use proptest::prelude::*;
use tinyfleet_device::ota::boot::{self, Trial};
use tinyfleet_device::ota::installer::{GoldenDigest, Installer, Next, Report};
use tinyfleet_device::ota::manifest::{MAX_OFFER, Manifest, TrustedKey};
use tinyfleet_device::ota::patch::Patcher;
use tinyfleet_device::wire::ota_state::*;

static KEYS: std::sync::LazyLock<[TrustedKey<'static>; 2]> = std::sync::LazyLock::new(trusted);

type Inst<'f, const W: usize> = Installer<'f, &'f mut Flash<W>, B>;

fn open<const W: usize>(f: &mut Flash<W>) -> (Inst<'_, W>, Option<Report>) {
    // Tests leak a patcher per installer (3 KB); firmware keeps one in a static.
    let patcher = Box::leak(Box::new(Patcher::new()));
    let mut inst = Installer::open(f, layout(), config(&KEYS[..]), patcher).unwrap();
    let report = inst.take_report();
    (inst, report)
}

fn offer<const W: usize>(inst: &mut Inst<'_, W>, m: &Manifest<'_>) -> Report {
    let mut scratch = [0u8; MAX_OFFER];
    inst.offer(&sign(m), &mut scratch).unwrap()
}

fn rejected(seq: u32, code: u16) -> Report {
    Report {
        manifest_seq: seq,
        state: REJECTED,
        bytes: 0,
        error: code,
    }
}

/// Feeds the whole object in `chunk`-byte pieces; returns the last report.
fn download<const W: usize>(inst: &mut Inst<'_, W>, object: &[u8], chunk: usize) -> Report {
    let mut last = None;
    while let Next::Fetch { offset, .. } = inst.next() {
        let end = (offset as usize + chunk).min(object.len());
        if let Some(r) = inst.write(offset, &object[offset as usize..end]).unwrap() {
            last = Some(r);
        }
    }
    last.unwrap()
}

fn slot_bytes<const W: usize>(f: &Flash<W>, slot: usize, len: usize) -> Vec<u8> {
    let r = layout().slots[slot];
    f.bytes()[r.start as usize..r.start as usize + len].to_vec()
}

#[test]
fn full_image_end_to_end() {
    let old = image(1, 10_000);
    let new = image(2, 12_345);
    let mut f = provisioned::<4>(&old, 4);
    let offer = sign(&full_manifest(5, &new));
    let mut trace = Trace::default();
    run_device(&mut f, &offer, &new, 1000, &mut pass(), &mut trace).unwrap();
    let states = trace.states();
    assert_eq!(states[0], ACCEPTED);
    assert!(states.contains(&DOWNLOADING));
    let tail = &states[states.len() - 4..];
    assert_eq!(
        tail,
        [VERIFIED, SWITCHING, SWITCHING, CONFIRMED],
        "{trace:?}"
    );
    assert!(
        trace
            .reports
            .iter()
            .all(|r| r.manifest_seq == 5 && r.error == 0)
    );
    let s = boot::read(&mut f, &layout()).unwrap();
    assert_eq!((s.active, s.trial), (1, Trial::None));
    assert_eq!(s.images[1].seq, 5);
    assert_eq!(slot_bytes(&f, 1, new.len()), new);
    assert_eq!(
        slot_bytes(&f, 0, old.len()),
        old,
        "the old image was only read"
    );
    assert_eq!(f.violations(), 0);
    // The retained offer, delivered again: already installed.
    let mut t2 = Trace::default();
    run_device(&mut f, &offer, &new, 1000, &mut pass(), &mut t2).unwrap();
    assert_eq!(t2.states(), [CONFIRMED]);
}

#[test]
fn deltas_end_to_end_and_back_to_slot_0() {
    let v1 = image(1, 12_000);
    let v2 = retrained(&v1, 13_000);
    let v3 = retrained(&v2, 11_111);
    let mut f = provisioned::<4>(&v1, 1);
    for (seq, base, new, slot) in [(2, &v1, &v2, 1), (3, &v2, &v3, 0)] {
        let patch = literal_patch(base, new, BLOCK);
        let offer = sign(&delta_manifest(seq, base, new, &patch));
        let mut trace = Trace::default();
        run_device(&mut f, &offer, &patch, 700, &mut pass(), &mut trace).unwrap();
        assert_eq!(trace.last().state, CONFIRMED, "{trace:?}");
        let s = boot::read(&mut f, &layout()).unwrap();
        assert_eq!(s.active, slot);
        assert_eq!(slot_bytes(&f, usize::from(slot), new.len()), *new);
    }
    assert_eq!(f.violations(), 0);
}

#[test]
fn chunks_in_any_size_and_order_and_a_16_byte_write_granule() {
    let old = image(1, 8_000);
    let new = image(3, 9_001);
    for chunk in [1, 15, 16, 17, 333, 4096, 5000, 20_000] {
        let mut f = provisioned::<16>(&old, 1);
        let (mut inst, _) = open(&mut f);
        assert_eq!(offer(&mut inst, &full_manifest(2, &new)).state, ACCEPTED);
        // A chunk ahead of the wanted offset is ignored; overlapping ones are trimmed.
        assert_eq!(inst.write(100, &new[100..200]).unwrap(), None);
        inst.write(0, &new[..50]).unwrap();
        inst.write(10, &new[10..60]).unwrap();
        let Next::Fetch { offset: 60, .. } = inst.next() else {
            panic!("{:?}", inst.next())
        };
        let r = download(&mut inst, &new, chunk);
        assert_eq!((r.state, r.error), (VERIFIED, 0), "chunk {chunk}");
        assert_eq!(inst.next(), Next::Switch);
        drop(inst);
        assert_eq!(slot_bytes(&f, 1, new.len()), new);
        assert_eq!(f.violations(), 0);
    }
}

#[test]
fn refusals() {
    let old = image(1, 8_000);
    let new = retrained(&old, 9_000);
    let patch = literal_patch(&old, &new, BLOCK);
    let mut f = provisioned::<4>(&old, 10);
    let (mut inst, _) = open(&mut f);
    let full = full_manifest(11, &new);
    let delta = delta_manifest(11, &old, &new, &patch);
    let cases: Vec<(Manifest<'static>, u16)> = vec![
        (
            Manifest {
                hw: "stm32f4",
                ..full
            },
            error::HARDWARE,
        ),
        (Manifest { seq: 9, ..full }, error::ROLLBACK),
        (Manifest { seq: 10, ..full }, error::ROLLBACK),
        (Manifest { min_fw: 11, ..full }, error::FIRMWARE),
        (
            Manifest {
                arena: 70_000,
                ..full
            },
            error::ARENA,
        ),
        (
            full_manifest(11, &image(4, SLOT as usize + 1)),
            error::TOO_LARGE,
        ),
        (delta_manifest(11, &new, &new, &patch), error::BASE_DIGEST),
        (
            Manifest {
                block_size: 2048,
                ..delta
            },
            error::BLOCK_SIZE,
        ),
    ];
    for (m, code) in cases {
        assert_eq!(offer(&mut inst, &m), rejected(m.seq, code), "{m:?}");
    }
    // Signature problems (unknown key, bad signature, garbage) are refused with seq 0.
    let mut scratch = [0u8; MAX_OFFER];
    let other =
        tinyfleet_device::ota::manifest::sign_offer(&full, &signing_key(9), &kid(9)).unwrap();
    assert_eq!(
        inst.offer(&other, &mut scratch).unwrap(),
        rejected(0, error::UNKNOWN_KEY)
    );
    let mut bad = sign(&full);
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert_eq!(
        inst.offer(&bad, &mut scratch).unwrap(),
        rejected(0, error::SIGNATURE)
    );
    assert_eq!(
        inst.offer(b"hello", &mut scratch).unwrap(),
        rejected(0, error::MALFORMED)
    );
    // Nothing was written: no progress record, the inactive slot untouched.
    assert_eq!(inst.next(), Next::Idle);
    drop(inst);
    assert!(slot_bytes(&f, 1, 100).iter().all(|&b| b == 0xff));
    // The good one is accepted.
    let (mut inst, _) = open(&mut f);
    assert_eq!(offer(&mut inst, &delta).state, ACCEPTED);
}

#[test]
fn a_newer_offer_replaces_a_download_and_an_older_one_is_refused() {
    let old = image(1, 8_000);
    let (v2, v3) = (image(2, 9_000), image(3, 9_500));
    let mut f = provisioned::<4>(&old, 1);
    let (mut inst, _) = open(&mut f);
    offer(&mut inst, &full_manifest(2, &v2));
    inst.write(0, &v2[..5000]).unwrap();
    // The same offer again: carries on.
    assert_eq!(offer(&mut inst, &full_manifest(2, &v2)).state, DOWNLOADING);
    assert!(matches!(inst.next(), Next::Fetch { offset: 5000, .. }));
    assert_eq!(offer(&mut inst, &full_manifest(3, &v3)).state, ACCEPTED);
    assert!(matches!(inst.next(), Next::Fetch { offset: 0, .. }));
    assert_eq!(
        offer(&mut inst, &full_manifest(2, &v2)),
        rejected(2, error::ROLLBACK)
    );
    assert_eq!(download(&mut inst, &v3, 4096).state, VERIFIED);
    // Verified, not yet switched: busy for a newer one, until aborted.
    assert_eq!(
        offer(&mut inst, &full_manifest(4, &v2)),
        rejected(4, error::BUSY)
    );
    assert_eq!(inst.abort().unwrap().unwrap().error, error::ABORTED);
    assert_eq!(offer(&mut inst, &full_manifest(4, &v2)).state, ACCEPTED);
}

#[test]
fn a_corrupted_slot_fails_the_read_back() {
    let old = image(1, 8_000);
    let new = image(2, 9_000);
    let mut f = provisioned::<4>(&old, 1);
    let (mut inst, _) = open(&mut f);
    offer(&mut inst, &full_manifest(2, &new));
    inst.write(0, &new[..6000]).unwrap();
    drop(inst);
    // A bit flips in the flash behind the installer's back (after the object hash saw it).
    f.corrupt(SLOT as usize + 1234, 0x10);
    let (mut inst, _) = open(&mut f);
    let r = download(&mut inst, &new, 4096);
    assert_eq!((r.state, r.error), (FAILED, error::IMAGE_DIGEST));
    assert_eq!(inst.next(), Next::Idle);
}

#[test]
fn golden_vectors_confirm_or_revert() {
    let vectors: &[(&[u8], &[u8])] = &[(b"yes", b"YES"), (b"no", b"NO"), (b"up", b"UP")];
    let upper = |x: &[u8]| x.to_ascii_uppercase();
    let lower = |x: &[u8]| x.to_ascii_lowercase();
    let old = image(1, 8_000);
    let new = image(2, 9_000);
    let m = with_golden(full_manifest(2, &new), vectors);
    let offer = sign(&m);

    // The right model passes.
    let mut f = provisioned::<4>(&old, 1);
    let mut good = GoldenModel {
        vectors,
        model: upper,
    };
    let mut trace = Trace::default();
    run_device(&mut f, &offer, &new, 4096, &mut good, &mut trace).unwrap();
    assert_eq!(trace.last().state, CONFIRMED);

    // A wrong model fails: reverted, the old image boots, the same seq is refused from then on.
    let mut f = provisioned::<4>(&old, 1);
    let mut bad = GoldenModel {
        vectors,
        model: lower,
    };
    let mut trace = Trace::default();
    run_device(&mut f, &offer, &new, 4096, &mut bad, &mut trace).unwrap();
    let reverted = trace.reports.iter().find(|r| r.state == REVERTED).unwrap();
    assert_eq!(reverted.error, error::SELF_TEST);
    assert_eq!(trace.last(), rejected(2, error::REVERTED_BEFORE));
    let (next, active) = bootable(&f, old.len());
    assert_eq!((next, active), (old.clone(), old.clone()));

    // Vectors that are not the signed ones (the digest differs) fail too.
    let other: &[(&[u8], &[u8])] = &[(b"yes", b"YES"), (b"no", b"NO"), (b"go", b"GO")];
    let mut f = provisioned::<4>(&old, 1);
    let mut unsigned = GoldenModel {
        vectors: other,
        model: upper,
    };
    let mut trace = Trace::default();
    run_device(&mut f, &offer, &new, 4096, &mut unsigned, &mut trace).unwrap();
    assert!(trace.states().contains(&REVERTED));
    assert_eq!(boot::read(&mut f, &layout()).unwrap().active, 0);
}

#[test]
fn a_trial_that_never_confirms_is_reverted_by_the_next_boot() {
    let old = image(1, 8_000);
    let new = image(2, 9_000);
    let mut f = provisioned::<4>(&old, 1);
    let (mut inst, _) = open(&mut f);
    offer(&mut inst, &full_manifest(2, &new));
    download(&mut inst, &new, 4096);
    assert_eq!(inst.switch().unwrap().unwrap().state, SWITCHING);
    assert_eq!(inst.next(), Next::Reboot);
    drop(inst);
    // Trial boot: the new image runs, then crashes before its self-test.
    let b = boot::boot(&mut f, &layout()).unwrap();
    assert_eq!((b.slot, b.trial), (1, true));
    let (inst, _) = open(&mut f);
    assert_eq!(inst.next(), Next::SelfTest);
    drop(inst);
    // Next boot: reverted.
    let b = boot::boot(&mut f, &layout()).unwrap();
    assert_eq!((b.slot, b.trial, b.reverted), (0, false, Some(2)));
    let (inst, report) = open(&mut f);
    let r = report.unwrap();
    assert_eq!(
        (r.state, r.error, r.manifest_seq),
        (REVERTED, error::NOT_CONFIRMED, 2)
    );
    assert_eq!(inst.next(), Next::Idle);
}

#[test]
fn offers_during_a_trial_are_refused() {
    let old = image(1, 8_000);
    let new = image(2, 9_000);
    let mut f = provisioned::<4>(&old, 1);
    let (mut inst, _) = open(&mut f);
    offer(&mut inst, &full_manifest(2, &new));
    download(&mut inst, &new, 4096);
    inst.switch().unwrap();
    assert_eq!(
        offer(&mut inst, &full_manifest(3, &old)),
        rejected(3, error::BUSY)
    );
    drop(inst);
    boot::boot(&mut f, &layout()).unwrap();
    let (mut inst, _) = open(&mut f);
    assert_eq!(
        offer(&mut inst, &full_manifest(3, &old)),
        rejected(3, error::BUSY)
    );
    // A failing self-test reverts; until the reboot, offers stay refused (the inactive slot
    // is the one running).
    let mut fail = |_: u16, _: &mut GoldenDigest| false;
    let m = with_golden(full_manifest(3, &old), &[(b"a", b"b")]);
    assert_eq!(offer(&mut inst, &m), rejected(3, error::BUSY));
    assert_eq!(inst.next(), Next::SelfTest);
    // No golden vectors in the job: only `check` runs, and the closure's default passes.
    assert_eq!(inst.self_test(&mut fail).unwrap().unwrap().state, CONFIRMED);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn lower_or_equal_sequence_numbers_are_refused(installed in 1u32..1000, back in 0u32..1000) {
        let old = image(1, 4_000);
        let new = image(2, 4_500);
        let mut f = provisioned::<4>(&old, installed);
        let (mut inst, _) = open(&mut f);
        let seq = installed.saturating_sub(back);
        prop_assert_eq!(offer(&mut inst, &full_manifest(seq, &new)), rejected(seq, error::ROLLBACK));
        prop_assert_eq!(offer(&mut inst, &full_manifest(installed + 1, &new)).state, ACCEPTED);
    }

    #[test]
    fn wrong_hardware_or_base_is_refused(hw in "[a-z0-9]{1,12}", flip in 0usize..6_000, bit in 0u8..8) {
        let old = image(1, 6_000);
        let new = retrained(&old, 6_500);
        let patch = literal_patch(&old, &new, BLOCK);
        let mut f = provisioned::<4>(&old, 1);
        let (mut inst, _) = open(&mut f);
        if hw != HW {
            let m = Manifest { hw: Box::leak(hw.into_boxed_str()), ..full_manifest(2, &new) };
            prop_assert_eq!(offer(&mut inst, &m), rejected(2, error::HARDWARE));
        }
        let mut other_base = old.clone();
        other_base[flip] ^= 1 << bit;
        let m = delta_manifest(2, &other_base, &new, &patch);
        prop_assert_eq!(offer(&mut inst, &m), rejected(2, error::BASE_DIGEST));
    }

    #[test]
    fn a_flipped_bit_in_the_image_fails_the_digest(pos in 0usize..9_000, bit in 0u8..8,
                                                   chunk in 100usize..5000) {
        let old = image(1, 8_000);
        let new = image(2, 9_000);
        let mut f = provisioned::<4>(&old, 1);
        let (mut inst, _) = open(&mut f);
        offer(&mut inst, &full_manifest(2, &new));
        let mut bad = new.clone();
        bad[pos] ^= 1 << bit;
        let r = download(&mut inst, &bad, chunk);
        prop_assert_eq!((r.state, r.error), (FAILED, error::OBJECT_DIGEST));
        prop_assert_eq!(inst.next(), Next::Idle);
        prop_assert_eq!(inst.switch().unwrap(), None);
        drop(inst);
        let (next, active) = bootable(&f, old.len());
        prop_assert!(next == old && active == old);
    }

    #[test]
    fn a_flipped_bit_in_the_patch_fails(pos in 0usize..7_000, bit in 0u8..8) {
        let old = image(1, 6_000);
        let new = retrained(&old, 6_500);
        let patch = literal_patch(&old, &new, BLOCK);
        let mut f = provisioned::<4>(&old, 1);
        let (mut inst, _) = open(&mut f);
        offer(&mut inst, &delta_manifest(2, &old, &new, &patch));
        let mut bad = patch.clone();
        let pos = pos % bad.len();
        bad[pos] ^= 1 << bit;
        let r = download(&mut inst, &bad, 512);
        prop_assert_eq!(r.state, FAILED);
        prop_assert!([error::PATCH, error::PATCH_HEADER, error::OBJECT_DIGEST].contains(&r.error),
                     "{:?}", r);
        prop_assert_eq!(inst.next(), Next::Idle);
    }
}
