//! `tinyfleet simulate` as a process against `tinyfleet serve`: devices provisioned through the
//! API, factory images and profiles downloaded from it, summaries over real MQTT. A covariate
//! shift of one feature on one hardware cohort raises `FeatureDrift` for that cohort and that
//! feature only.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Server, TOKEN, wait_for};
use tinyfleet_drift::profile::{BuildOptions, build_profile};
use tinyfleet_sim::WindowData;

/// A server with `kws-nrf52840` and `kws-stm32l4` 1.0 registered, each with a profile fitted
/// to the simulator's reference data.
fn server_with_models(dir: &std::path::Path) -> Server {
    let server = Server::start_with(
        &dir.join("data"),
        "window_secs = 2\ncheckpoint_ms = 200",
        "[monitor]\ngrace_secs = 0\ntick_ms = 100\n[drift]\nmin_inferences = 300",
    );
    let http = reqwest::blocking::Client::new();
    for (n, hw) in ["nrf52840", "stm32l4"].iter().enumerate() {
        let model = format!("kws-{hw}");
        let image: Vec<u8> = (0..16_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> (9 + n)) as u8)
            .collect();
        let resp = http
            .post(format!(
                "{}/api/v1/models/{model}/versions/1.0?seq=1&hw={hw}",
                server.api
            ))
            .bearer_auth(TOKEN)
            .body(image)
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        let csv = tinyfleet_sim::reference_csv(&WindowData::default(), 8_000, 7);
        let opts = BuildOptions {
            model_id: model.clone(),
            model_version: "1.0".into(),
            ..BuildOptions::default()
        };
        let profile = build_profile(csv.as_bytes(), &opts).unwrap();
        let resp = http
            .put(format!("{}/api/v1/models/{model}/1.0/profile", server.api))
            .bearer_auth(TOKEN)
            .json(&profile)
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().unwrap());
    }

    server
}

/// `tinyfleet simulate` with 12 devices on both cohorts, `scenario` on stm32l4 after 3 s.
fn simulate(server: &Server, scenario: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
        .args(["simulate", "--api", &server.api, "--token", TOKEN, "--mqtt"])
        .arg(server.mqtt.to_string())
        .args([
            "--devices",
            "12",
            "--hw",
            "nrf52840,stm32l4",
            "--model",
            "kws-{hw}",
            "--cohort",
            "stm32l4",
            "--after-secs",
            "3",
            "--interval-ms",
            "400",
            "--duration-secs",
            "60",
        ])
        .args(scenario)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tinyfleet simulate")
}

/// The firing alerts named `alertname`, once there is one.
fn firing(server: &Server, alertname: &str) -> Vec<serde_json::Value> {
    wait_for(alertname, Duration::from_secs(60), || {
        let alerts = server.get("/api/v1/alerts");
        let firing: Vec<serde_json::Value> = alerts
            .as_array()?
            .iter()
            .filter(|a| a["labels"]["alertname"] == alertname && a["state"] == "firing")
            .cloned()
            .collect();
        (!firing.is_empty()).then_some(firing)
    })
}

#[test]
fn a_shift_on_one_cohort_and_feature_is_alerted_there_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_models(dir.path());
    let mut sim = simulate(
        &server,
        &[
            "--scenario",
            "covariate-shift",
            "--feature",
            "5",
            "--magnitude",
            "1.5",
        ],
    );

    let drifted = firing(&server, "FeatureDrift");
    // Wait two more windows for anything spurious to show up too.
    std::thread::sleep(Duration::from_secs(4));
    let alerts = server.get("/api/v1/alerts");
    for a in alerts.as_array().unwrap() {
        let labels = &a["labels"];
        if labels["alertname"] == "FeatureDrift" || labels["alertname"] == "DeviceDrift" {
            let scope = labels["scope"].as_str().unwrap_or("");
            assert!(scope.starts_with("kws-stm32l4@1.0"), "{a}");
            assert_eq!(labels["feature"], "f5", "{a}");
        }
    }
    assert!(!drifted.is_empty());

    // The operator's view from a terminal: the alert, a silence for it, the trusted keys.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
            .args(args)
            .env("TINYFLEET_API", &server.api)
            .env("TINYFLEET_TOKEN", TOKEN)
            .output()
            .expect("tinyfleet");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = cli(&["alerts", "list", "--state", "firing"]);
    assert!(
        listed.lines().any(|l| l.contains("FeatureDrift")
            && l.contains("kws-stm32l4@1.0")
            && l.contains("(f5)")),
        "{listed}"
    );
    let created = cli(&[
        "alerts",
        "silence",
        "--match",
        "alertname=FeatureDrift",
        "--match",
        "scope=~kws-stm32l4@.*",
        "--duration",
        "1h",
        "--comment",
        "known: new microphones",
    ]);
    assert!(created.starts_with("silence "), "{created}");
    assert!(cli(&["alerts", "silences"]).contains("known: new microphones"));
    let keys = cli(&["keys", "list"]);
    assert!(
        keys.lines().nth(1).is_some_and(|l| l.contains(" yes ")),
        "{keys}"
    );
    let key_file = dir.path().join("next.key");
    let generated = cli(&["keys", "generate", key_file.to_str().unwrap()]);
    assert!(generated.contains("public key"), "{generated}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let devices = server.get("/api/v1/devices?limit=100");
    let online = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["online"] == true)
        .count();
    assert_eq!(online, 12);
    let _ = sim.kill();
    let _ = sim.wait();
    server.stop();
}

/// A sensor stuck at one value on one cohort is a `SensorFault` of that feature, not a drift of
/// the others.
#[test]
fn a_broken_sensor_is_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_models(dir.path());
    let mut sim = simulate(&server, &["--scenario", "broken-sensor", "--feature", "2"]);
    let faults = firing(&server, "SensorFault");
    for a in &faults {
        assert_eq!(a["labels"]["feature"], "f2", "{a}");
        let at = a["labels"]["scope"].as_str().unwrap_or("");
        assert!(at.starts_with("kws-stm32l4@1.0"), "{a}");
    }
    let _ = sim.kill();
    let _ = sim.wait();
    server.stop();
}

/// Concept drift: inputs and confidences unchanged, labels disagree: only labelled accuracy
/// can see it, and it does, on the right cohort.
#[test]
fn concept_drift_shows_in_labelled_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_models(dir.path());
    let mut sim = simulate(
        &server,
        &[
            "--scenario",
            "concept-drift",
            "--magnitude",
            "0.4",
            "--labelled",
            "50",
        ],
    );
    let drops = firing(&server, "AccuracyDrop");
    assert!(
        drops.iter().all(|a| a["labels"]["scope"]
            .as_str()
            .unwrap_or("")
            .starts_with("kws-stm32l4@1.0")),
        "{drops:?}"
    );
    let alerts = server.get("/api/v1/alerts");
    assert!(
        !alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["alertname"] == "FeatureDrift"),
        "inputs did not move: {alerts}"
    );
    let _ = sim.kill();
    let _ = sim.wait();
    server.stop();
}
