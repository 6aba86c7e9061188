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

#[test]
fn a_shift_on_one_cohort_and_feature_is_alerted_there_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
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

    let mut sim = Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
        .args(["simulate", "--api", &server.api, "--token", TOKEN, "--mqtt"])
        .arg(server.mqtt.to_string())
        .args([
            "--devices",
            "12",
            "--hw",
            "nrf52840,stm32l4",
            "--model",
            "kws-{hw}",
            "--scenario",
            "covariate-shift",
            "--cohort",
            "stm32l4",
            "--feature",
            "5",
            "--magnitude",
            "1.5",
            "--after-secs",
            "3",
            "--interval-ms",
            "400",
            "--duration-secs",
            "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tinyfleet simulate");

    let drifted = wait_for(
        "FeatureDrift on the shifted cohort",
        Duration::from_secs(60),
        || {
            let alerts = server.get("/api/v1/alerts");
            let firing: Vec<serde_json::Value> = alerts
                .as_array()?
                .iter()
                .filter(|a| a["labels"]["alertname"] == "FeatureDrift" && a["state"] == "firing")
                .cloned()
                .collect();
            (!firing.is_empty()).then_some(firing)
        },
    );
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
