//! `tinyfleet profile build` over the reference fixture, as an operator runs it.

use std::process::Command;

fn tinyfleet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
}

#[test]
fn builds_a_valid_profile_from_the_reference_csv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("profile.json");
    let status = tinyfleet()
        .args(["profile", "build", "--csv"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/drift/tests/data/reference.csv"
        ))
        .args(["--model", "kws", "--version", "1.2.0", "--out"])
        .arg(&out)
        .status()
        .expect("run tinyfleet");
    assert!(status.success());
    let json = std::fs::read_to_string(&out).expect("profile written");
    let profile: tinyfleet_drift::profile::MonitoringProfile =
        serde_json::from_str(&json).expect("profile JSON");
    assert_eq!(profile.validate(), Ok(()));
    assert_eq!(
        (profile.model_id.as_str(), profile.model_version.as_str()),
        ("kws", "1.2.0")
    );
    assert_eq!(profile.features.len(), 8);
    assert!(profile.features.iter().all(|f| f.hist.counts.len() == 16));
}

#[test]
fn a_bad_csv_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("bad.csv");
    std::fs::write(&csv, "x,prediction,confidence\n1.0,0,0.9\nabc,0,0.8\n").expect("write");
    let out = tinyfleet()
        .args(["profile", "build", "--csv"])
        .arg(&csv)
        .args(["--model", "m", "--version", "1"])
        .output()
        .expect("run tinyfleet");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("`x`"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
