//! End to end: `tinyfleet demo` as a process, the README's first command at a small scale.
//! The drifting cohort's feature is alerted, the retraining trigger arrives, the retrained
//! version is pushed and its rollout completes stage by stage; the demo exits 0.

use std::process::Command;

#[test]
fn the_demo_tells_the_whole_story_and_exits_when_done() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
        .args([
            "demo",
            "--devices",
            "45",
            "--drift-after",
            "3",
            "--api",
            "127.0.0.1:0",
            "--exit-when-done",
            "--timeout-secs",
            "300",
            "--data-dir",
        ])
        .arg(dir.path().join("demo"))
        .env("TINYFLEET_LOG", "warn,rumqttd=off")
        .output()
        .expect("tinyfleet runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
    };
    // The right cohort and the right feature.
    let alert = line("ALERT firing: FeatureDrift");
    assert!(
        alert.contains("kws-stm32l4@1.0") && alert.contains("feature f3"),
        "{alert}"
    );
    assert!(
        !stdout
            .lines()
            .any(|l| l.contains("ALERT") && (l.contains("nrf52840") || l.contains("esp32s3"))),
        "an alert on a cohort that did not drift:\n{stdout}"
    );
    assert!(line("Retraining trigger received for kws-stm32l4").contains("FeatureDrift"));
    line("Retrained kws-stm32l4 1.1 pushed");
    let done = line("completed, stage 4/4");
    assert!(done.contains("15 of 15 devices confirmed"), "{done}");
}
