//! Power loss at every flash operation of a whole install (download, verification, switch,
//! trial boot, confirmation), before the operation or halfway through it: the device must
//! always boot exactly the old or the new image, and, rebooted, settle on one of them.

mod ota_util;

use ota_util::*;
use tinyfleet_device::ota::boot::{self, Trial};
use tinyfleet_device::ota::installer::{Installer, Next};
use tinyfleet_device::ota::manifest::{MAX_OFFER, TrustedKey};
use tinyfleet_device::ota::patch::Patcher;
use tinyfleet_device::ota::sim::Cut;
use tinyfleet_device::wire::ota_state::*;

struct Scenario {
    old: Vec<u8>,
    new: Vec<u8>,
    offer: Vec<u8>,
    object: Vec<u8>,
    chunk: usize,
}

fn full() -> Scenario {
    let old = image(1, 12_000);
    let new = image(2, 16_000 - 7);
    Scenario {
        offer: sign(&full_manifest(2, &new)),
        object: new.clone(),
        old,
        new,
        chunk: 1000,
    }
}

fn delta() -> Scenario {
    let old = image(1, 14_000);
    let new = retrained(&old, 16_000 - 3);
    let patch = literal_patch(&old, &new, BLOCK);
    Scenario {
        offer: sign(&delta_manifest(2, &old, &new, &patch)),
        object: patch,
        old,
        new,
        chunk: 1024,
    }
}

/// Cuts the power at every operation of the reference install, in both ways; returns how many
/// runs ended on the new image and how many on the old.
fn power_loss_everywhere<const W: usize>(s: &Scenario) -> (usize, usize) {
    let base = provisioned::<W>(&s.old, 1);
    let mut f = base.clone();
    let start = f.ops();
    let mut reference = Trace::default();
    run_device(
        &mut f,
        &s.offer,
        &s.object,
        s.chunk,
        &mut pass(),
        &mut reference,
    )
    .unwrap();
    assert_eq!(reference.last().state, CONFIRMED, "{reference:?}");
    let end = f.ops();
    let (trial_from, trial_to) = reference.trial_ops.unwrap();
    let len = s.old.len().max(s.new.len());
    let mut outcomes = (0, 0);
    for op in start..end {
        for how in [Cut::Before, Cut::Midway] {
            let ctx = format!("cut {how:?} at op {op} (of {start}..{end})");
            let mut f = base.clone();
            f.cut_power_at(op, how);
            let mut trace = Trace::default();
            let lost = run_device(
                &mut f,
                &s.offer,
                &s.object,
                s.chunk,
                &mut pass(),
                &mut trace,
            );
            assert!(lost.is_err() && f.is_off(), "{ctx}: {lost:?}");
            // Right after the loss, what would boot is the old or the new image, and so is the
            // confirmed one (the fallback).
            let (next, active) = bootable(&f, len);
            assert!(
                which(&next, &s.old, &s.new).is_some(),
                "{ctx}: next boot broken"
            );
            assert!(
                which(&active, &s.old, &s.new).is_some(),
                "{ctx}: active broken"
            );
            // Reboot and let the device carry on until it settles.
            f.power_on();
            run_to_end(
                &mut f,
                &s.offer,
                &s.object,
                s.chunk,
                &mut pass(),
                &mut trace,
            );
            let state = boot::read(&mut f, &layout()).unwrap();
            assert_eq!(state.trial, Trial::None, "{ctx}");
            let (next, active) = bootable(&f, len);
            assert_eq!(next, active, "{ctx}");
            let settled = which(&active, &s.old, &s.new).expect("settled on a broken image");
            // Only a loss during the trial (before it was confirmed) may revert; otherwise the
            // install completes.
            let in_trial = (trial_from..trial_to).contains(&op);
            if !in_trial {
                assert_eq!(settled, 1, "{ctx}: {trace:?}");
            }
            if settled == 1 {
                outcomes.0 += 1;
                assert_eq!(state.images[usize::from(state.active)].seq, 2);
            } else {
                outcomes.1 += 1;
                assert_eq!(state.reverted_seq, 2, "{ctx}");
            }
            assert_eq!(f.violations(), 0, "{ctx}: a granule was programmed twice");
        }
    }
    println!(
        "{} cut points x 2: {} ended on the new image, {} reverted to the old",
        end - start,
        outcomes.0,
        outcomes.1
    );
    outcomes
}

/// Two losses: one at op `first`, the next `gap` operations after the reboot (so during the
/// recovery: re-erasing, the re-sent offer, the bootloader's writes).
fn double_loss<const W: usize>(s: &Scenario) {
    let base = provisioned::<W>(&s.old, 1);
    let mut f = base.clone();
    let start = f.ops();
    run_device(
        &mut f,
        &s.offer,
        &s.object,
        s.chunk,
        &mut pass(),
        &mut Trace::default(),
    )
    .unwrap();
    let end = f.ops();
    let len = s.old.len().max(s.new.len());
    for first in (start..end).step_by(2) {
        for gap in [0, 1, 2, 3, 5, 8] {
            let ctx = format!("cuts at op {first} and {gap} ops after the reboot");
            let mut f = base.clone();
            let mut trace = Trace::default();
            f.cut_power_at(first, Cut::Midway);
            assert!(
                run_device(
                    &mut f,
                    &s.offer,
                    &s.object,
                    s.chunk,
                    &mut pass(),
                    &mut trace
                )
                .is_err()
            );
            f.power_on();
            f.cut_power_at(f.ops() + gap, Cut::Midway);
            let second = run_device(
                &mut f,
                &s.offer,
                &s.object,
                s.chunk,
                &mut pass(),
                &mut trace,
            );
            let (next, active) = bootable(&f, len);
            assert!(which(&next, &s.old, &s.new).is_some(), "{ctx}: {second:?}");
            assert!(which(&active, &s.old, &s.new).is_some(), "{ctx}");
            f.power_on();
            run_to_end(
                &mut f,
                &s.offer,
                &s.object,
                s.chunk,
                &mut pass(),
                &mut trace,
            );
            let (next, active) = bootable(&f, len);
            assert_eq!(next, active, "{ctx}");
            assert!(which(&active, &s.old, &s.new).is_some(), "{ctx}: {trace:?}");
            assert_eq!(f.violations(), 0, "{ctx}");
        }
    }
}

#[test]
fn a_second_power_loss_during_recovery() {
    double_loss::<4>(&full());
    double_loss::<4>(&delta());
}

#[test]
fn power_loss_during_a_full_image_install() {
    let (new, old) = power_loss_everywhere::<4>(&full());
    assert!(new > 0 && old > 0);
}

#[test]
fn power_loss_during_a_delta_install() {
    let (new, old) = power_loss_everywhere::<4>(&delta());
    assert!(new > 0 && old > 0);
}

#[test]
fn power_loss_with_a_16_byte_write_granule() {
    power_loss_everywhere::<16>(&full());
}

static KEYS: std::sync::LazyLock<[TrustedKey<'static>; 2]> = std::sync::LazyLock::new(trusted);

/// After a loss, the download resumes from the last sector boundary, not from 0.
#[test]
fn downloads_resume_from_the_last_checkpoint() {
    for s in [full(), delta()] {
        let mut f = provisioned::<4>(&s.old, 1);
        {
            let mut patcher = Patcher::new();
            let mut inst =
                Installer::<_, B>::open(&mut f, layout(), config(&KEYS[..]), &mut patcher).unwrap();
            let mut scratch = [0u8; MAX_OFFER];
            assert_eq!(inst.offer(&s.offer, &mut scratch).unwrap().state, ACCEPTED);
            let mut checkpoints = vec![];
            while let Next::Fetch { offset, .. } = inst.next() {
                if offset as usize > s.object.len() * 2 / 3 {
                    break;
                }
                let end = (offset as usize + 300).min(s.object.len());
                if let Some(r) = inst.write(offset, &s.object[offset as usize..end]).unwrap() {
                    checkpoints.push(r.bytes);
                }
            }
            assert!(checkpoints.len() >= 2, "{checkpoints:?}");
            let last = *checkpoints.last().unwrap();
            // Power lost here (the installer is simply dropped).
            drop(inst);
            let mut inst =
                Installer::<_, B>::open(&mut f, layout(), config(&KEYS[..]), &mut patcher).unwrap();
            assert_eq!(inst.take_report(), None);
            let Next::Fetch { offset, .. } = inst.next() else {
                panic!("{:?}", inst.next())
            };
            assert_eq!(offset, last);
        }
        let mut trace = Trace::default();
        run_device(
            &mut f,
            &s.offer,
            &s.object,
            s.chunk,
            &mut pass(),
            &mut trace,
        )
        .unwrap();
        assert_eq!(trace.last().state, CONFIRMED);
        assert_eq!(f.violations(), 0);
    }
}
