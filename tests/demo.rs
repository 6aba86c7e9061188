//! End to end: the `tinyfleet` binary as a process. `demo` drives the device client and ingest's
//! decoder; its report must show every summary accepted, the shifted cohort, and each injected
//! attack refused with its reason.

use std::process::Command;

fn tinyfleet(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
        .args(args)
        .output()
        .expect("tinyfleet runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_reports_every_summary_and_every_attack() {
    let (ok, stdout, stderr) = tinyfleet(&["demo", "--devices", "30", "--windows", "2"]);
    assert!(ok, "demo failed: {stderr}");
    assert!(
        stdout.contains("60 of 60 summaries verified and decoded"),
        "{stdout}"
    );
    // The replayed-on-another-topic and the bit-flipped summaries are forged; the truncated one
    // is malformed.
    let line = |label: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
    };
    assert_eq!(line("forged").as_deref(), Some("2"), "{stdout}");
    assert_eq!(line("malformed").as_deref(), Some("1"), "{stdout}");
    // The shifted cohort's feature mean moves away from the reference (0.5); the others stay.
    let cohort = |name: &str| -> Vec<f64> {
        let l = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}: {stdout}"));
        l.split_whitespace()
            .skip(1)
            .take(2)
            .map(|v| v.parse().expect("a number"))
            .collect()
    };
    let shifted = cohort("stm32l4");
    assert!(
        (shifted[0] - 0.5).abs() < 0.05 && shifted[1] > 0.58,
        "{shifted:?}"
    );
    let steady = cohort("nrf52840");
    assert!((steady[1] - 0.5).abs() < 0.05, "{steady:?}");
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let (ok, _, stderr) = tinyfleet(&["demo", "--devices", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains("--devices and --windows must be at least 1"),
        "{stderr}"
    );
    let (ok, _, stderr) = tinyfleet(&["demo", "--devices", "many"]);
    assert!(!ok);
    assert!(stderr.contains("invalid value"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}
