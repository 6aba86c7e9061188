//! Staged rollouts through `tinyfleet serve`, with simulated devices that run the real
//! installer over real MQTT: offers go out as retained messages stage by stage, the devices
//! fetch patches by MQTT block requests, install, reboot and confirm, and their progress
//! reports and windows drive the gates.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Server, SimFleet, TOKEN, wait_for};
use tinyfleet_sim::{Behaviour, Factory, SimEventKind, WindowData};

const DEVICES: usize = 12;

fn image(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// `base` retrained: every weight nudged, one region replaced.
fn retrained(base: &[u8], salt: u8) -> Vec<u8> {
    base.iter()
        .enumerate()
        .map(|(i, b)| match i {
            2_000..5_000 => (i as u8).wrapping_mul(31) ^ salt,
            _ => b.wrapping_add((i % 3) as u8),
        })
        .collect()
}

fn push(server: &Server, dir: &std::path::Path, bytes: &[u8], version: &str, seq: u32) {
    let file = dir.join(format!("{version}.bin"));
    std::fs::write(&file, bytes).unwrap();
    let resp = reqwest::blocking::Client::new()
        .post(format!(
            "{}/api/v1/models/kws/versions/{version}?seq={seq}&hw=nrf52840",
            server.api
        ))
        .bearer_auth(TOKEN)
        .body(bytes.to_vec())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{}", resp.text().unwrap());
}

/// A canary of 5 of the 12 devices soaking `canary_soak_ms`, then everyone.
fn stages(canary_soak_ms: u64) -> Value {
    json!([
        { "share": 0.25, "min_devices": 5, "soak_ms": canary_soak_ms, "deadline_ms": 600_000 },
        { "share": 1.0, "min_devices": 0, "soak_ms": 500, "deadline_ms": 600_000 }
    ])
}

/// 1.0 and a healthy 2.0 registered; the fleet on 1.0, sending no summaries (install health
/// alone decides).
fn healthy_fleet(server: &Server, dir: &std::path::Path) -> SimFleet {
    let v1 = image(1, 20_000);
    push(server, dir, &v1, "1.0", 1);
    push(server, dir, &retrained(&v1, 7), "2.0", 2);
    let quiet = Behaviour {
        summary_interval: Duration::from_secs(3600),
        ..Behaviour::default()
    };
    fleet_on_v1(server, &v1, &quiet)
}

/// Starts rollout `kws-2` of 2.0 on install health alone.
fn start_healthy_rollout(server: &Server, canary_soak_ms: u64) {
    let (status, created) = server.post(
        "/api/v1/rollouts",
        TOKEN,
        json!({
            "model_id": "kws", "version": "2.0", "id": "kws-2",
            "stages": stages(canary_soak_ms),
            "install": { "min_done": 5 },
            "quality": { "required": false },
        }),
    );
    assert_eq!(status, 201, "{created}");
}

/// Waits for `kws-2` to complete with every device confirmed and running 2.0.
fn assert_completed_on_v2(server: &Server) {
    let done = wait_for("the rollout completed", Duration::from_secs(90), || {
        let r = rollout(server, "kws-2");
        (r["state"] == "completed").then_some(r)
    });
    assert_eq!(done["totals"]["confirmed"], DEVICES as u64, "{done}");
    let running = wait_for("every device on 2.0", Duration::from_secs(30), || {
        let v = versions_running(server);
        v.iter().all(|c| c == "kws@2.0/nrf52840").then_some(v)
    });
    assert_eq!(running.len(), DEVICES);
}

fn fleet_on_v1(server: &Server, v1: &[u8], behaviour: &Behaviour) -> SimFleet {
    let mut fleet = SimFleet::new();
    let factory = Factory {
        model_version: "1.0".into(),
        model_seq: 1,
        image: Arc::new(v1.to_vec()),
    };
    for i in 0..DEVICES {
        let id = format!("node-{i:02}");
        fleet.add(server, &id, "nrf52840", factory.clone(), behaviour.clone());
    }
    // Every device has said hello, so the rollout's target is the whole fleet.
    wait_for("the fleet online", Duration::from_secs(30), || {
        let page = server.get("/api/v1/devices?limit=100");
        let online = page["devices"]
            .as_array()?
            .iter()
            .filter(|d| d["online"] == true && d["cohort"] == "kws@1.0/nrf52840")
            .count();
        (online == DEVICES).then_some(())
    });
    fleet
}

/// `tinyfleet rollout ARGS [--plan FILE]` against `server`; its standard output.
fn rollout_cli(server: &Server, args: &[&str], plan: Option<&std::path::Path>) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tinyfleet"));
    cmd.args(["rollout", "--api", &server.api, "--token", TOKEN])
        .args(args);
    if let Some(plan) = plan {
        cmd.arg("--plan").arg(plan);
    }
    let out = cmd.output().expect("tinyfleet rollout");
    assert!(
        out.status.success(),
        "rollout {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rollout(server: &Server, id: &str) -> Value {
    server.get(&format!("/api/v1/rollouts/{id}"))
}

fn versions_running(server: &Server) -> Vec<String> {
    let page = server.get("/api/v1/devices?limit=100");
    page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["cohort"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// A healthy model goes to the whole fleet on its own: the canary stage (5 of 12 devices)
/// installs, soaks and passes the install gate, then the rest follow.
#[test]
fn a_healthy_model_reaches_the_whole_fleet_in_stages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "[ota]\nrollout_tick_ms = 200");
    let mut fleet = healthy_fleet(&server, dir.path());

    // Started from the CLI, as an operator would.
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{ "install": { "min_done": 5 }, "quality": { "required": false } }"#,
    )
    .unwrap();
    let started = rollout_cli(
        &server,
        &[
            "start",
            "kws",
            "2.0",
            "--id",
            "kws-2",
            "--stages",
            "25:5:500ms,100:0:500ms",
        ],
        Some(&plan),
    );
    assert!(started.contains("kws-2"), "{started}");
    let (status, again) = server.post(
        "/api/v1/rollouts",
        TOKEN,
        json!({ "model_id": "kws", "version": "2.0" }),
    );
    assert_eq!(status, 409, "a second live rollout of the model: {again}");

    // The canaries confirm before anyone else is offered the update.
    let mut confirmed = std::collections::BTreeSet::new();
    while confirmed.len() < 5 {
        let e = fleet.wait_event(
            "a canary confirming",
            Duration::from_secs(60),
            |e| matches!(&e.kind, SimEventKind::Progress(r) if r.state == 5),
        );
        confirmed.insert(e.device);
    }
    assert_completed_on_v2(&server);
    let shown = rollout_cli(&server, &["status", "kws-2"], None);
    assert!(shown.contains("completed"), "{shown}");

    // The audit log names what moved the rollout.
    let audit = server.get("/api/v1/rollouts/kws-2/audit");
    let text = audit.to_string();
    assert!(
        text.contains("soak") && text.contains("completed"),
        "{text}"
    );
    fleet.stop();
    server.stop();
}

/// A model that installs fine but is worse on its canaries (labelled accuracy 0.65 against
/// 0.9 on the control devices over the same windows) is stopped at the canary stage by the
/// quality gate, and every canary is rolled back to a signed copy of 1.0 with a higher seq.
#[test]
fn a_worse_model_is_stopped_at_the_canary_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        "window_secs = 2\ncheckpoint_ms = 200",
        "[ota]\nrollout_tick_ms = 200\n[monitor]\ngrace_secs = 0\ntick_ms = 100",
    );
    let v1 = image(1, 20_000);
    push(&server, dir.path(), &v1, "1.0", 1);
    push(&server, dir.path(), &retrained(&v1, 9), "2.0", 2);
    let labelled = Behaviour {
        summary_interval: Duration::from_millis(400),
        inferences: 100,
        labelled: 100,
        stream: Arc::new(|ctx| WindowData {
            accuracy: if ctx.model_version == "2.0" {
                0.65
            } else {
                0.9
            },
            ..WindowData::default()
        }),
        ..Behaviour::default()
    };
    let fleet = fleet_on_v1(&server, &v1, &labelled);

    let (status, created) = server.post(
        "/api/v1/rollouts",
        TOKEN,
        json!({
            "model_id": "kws", "version": "2.0", "id": "kws-2-bad",
            "stages": stages(500),
            "install": { "min_done": 5 },
            "quality": {
                "min_canary_devices": 3, "min_control_devices": 3,
                "min_windows": 2, "min_labelled": 300
            },
        }),
    );
    assert_eq!(status, 201, "{created}");
    let aborted = wait_for("the rollout aborted", Duration::from_secs(120), || {
        let r = rollout(&server, "kws-2-bad");
        (r["state"] == "aborted").then_some(r)
    });
    assert_eq!(
        aborted["stage"], 0,
        "stopped at the canary stage: {aborted}"
    );
    let text = server.get("/api/v1/rollouts/kws-2-bad/audit").to_string();
    assert!(text.contains("quality_gate"), "{text}");

    // The rollback version: the 1.0 artifact under a new name and a seq above 2.0's.
    let versions = server.get("/api/v1/models/kws/versions");
    let rollback = versions
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["seq"].as_u64() > Some(2))
        .unwrap_or_else(|| panic!("no rollback version in {versions}"));
    let v1_sha = versions
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["model_version"] == "1.0")
        .unwrap()["sha256"]
        .clone();
    assert_eq!(rollback["sha256"], v1_sha);
    let rollback_cohort = format!(
        "kws@{}/nrf52840",
        rollback["model_version"].as_str().unwrap()
    );
    // Nobody is left on 2.0; only canaries went to the rollback version, the rest stayed.
    let running = wait_for("no device on 2.0", Duration::from_secs(60), || {
        let v = versions_running(&server);
        v.iter().all(|c| c != "kws@2.0/nrf52840").then_some(v)
    });
    let rolled_back = running.iter().filter(|c| **c == rollback_cohort).count();
    assert!((3..=5).contains(&rolled_back), "{running:?}");
    assert_eq!(
        running.iter().filter(|c| *c == "kws@1.0/nrf52840").count(),
        DEVICES - rolled_back
    );
    // Two reboots (into 2.0, back to 1.0) are not going offline: devices that keep sending
    // summaries are online, even when rumqttd fires a will for their live connection.
    wait_for(
        "every device online after its reboots",
        Duration::from_secs(10),
        || {
            let page = server.get("/api/v1/devices?limit=100");
            let all_online = page["devices"]
                .as_array()?
                .iter()
                .all(|d| d["online"] == true);
            all_online.then_some(())
        },
    );
    fleet.stop();
    server.stop();
}

/// The service stops in the middle of a rollout (canaries installing) and starts again on the
/// same data: the rollout resumes where it was, offers are published again from the database
/// (the broker kept nothing), the devices reconnect, and the outcome is the same as without
/// the restart: every device on 2.0, each stage opened once.
#[test]
fn a_restart_mid_rollout_changes_nothing_in_the_outcome() {
    restart_mid_rollout(false);
}

/// As above, with `kill -9` instead of a clean stop: nothing is flushed or handed over, the
/// embedded broker dies with the process, and the outcome is still the same.
#[test]
fn a_kill_9_mid_rollout_changes_nothing_in_the_outcome() {
    restart_mid_rollout(true);
}

fn restart_mid_rollout(kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, "[ota]\nrollout_tick_ms = 200");
    let mut fleet = healthy_fleet(&server, dir.path());
    start_healthy_rollout(&server, 3000);
    fleet.wait_event(
        "a canary confirming",
        Duration::from_secs(60),
        |e| matches!(&e.kind, SimEventKind::Progress(r) if r.state == 5),
    );
    let before = rollout(&server, "kws-2");
    assert_eq!(before["state"], "running", "{before}");
    assert_eq!(before["stage"], 0, "still soaking the canaries: {before}");

    let (mqtt, api) = (server.mqtt, server.api.clone());
    if kill {
        server.kill9();
    } else {
        server.stop();
    }
    let server = Server::restart_on_same_ports(&data, mqtt, &api);
    let after = rollout(&server, "kws-2");
    assert_eq!(after["stage"], 0, "{after}");

    assert_completed_on_v2(&server);
    let audit = server.get("/api/v1/rollouts/kws-2/audit");
    let opened: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "stage_opened" || e["record"]["event"] == "stage_opened")
        .collect();
    assert_eq!(opened.len(), 2, "each stage opened once: {audit}");
    fleet.stop();
    server.stop();
}

/// A model that fails its self-test on a third of the devices (they revert by themselves) is
/// aborted by the install gate once the minimum sample is done, not at the first revert.
#[test]
fn a_model_that_fails_to_install_on_a_third_of_the_canaries_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "[ota]\nrollout_tick_ms = 200");
    let v1 = image(1, 20_000);
    push(&server, dir.path(), &v1, "1.0", 1);
    push(&server, dir.path(), &retrained(&v1, 5), "2.0", 2);
    let mut fleet = SimFleet::new();
    let factory = Factory {
        model_version: "1.0".into(),
        model_seq: 1,
        image: Arc::new(v1.to_vec()),
    };
    for i in 0..DEVICES {
        let fails = i % 3 == 0;
        let behaviour = Behaviour {
            summary_interval: Duration::from_secs(3600),
            self_test: Arc::new(move |_, version| !(fails && version == "2.0")),
            ..Behaviour::default()
        };
        fleet.add(
            &server,
            &format!("node-{i:02}"),
            "nrf52840",
            factory.clone(),
            behaviour,
        );
    }
    wait_for("the fleet online", Duration::from_secs(30), || {
        (versions_running(&server).len() == DEVICES).then_some(())
    });
    let (status, created) = server.post(
        "/api/v1/rollouts",
        TOKEN,
        json!({
            "model_id": "kws", "version": "2.0", "id": "kws-2-flaky",
            "stages": [
                { "share": 0.5, "min_devices": 6, "soak_ms": 60_000, "deadline_ms": 600_000 },
                { "share": 1.0, "min_devices": 0, "soak_ms": 500, "deadline_ms": 600_000 }
            ],
            "install": { "min_done": 5 },
            "quality": { "required": false },
        }),
    );
    assert_eq!(status, 201, "{created}");
    let reverted = fleet.wait_event(
        "a revert",
        Duration::from_secs(60),
        |e| matches!(&e.kind, SimEventKind::Progress(r) if r.state == 7),
    );
    assert!(
        reverted.device.ends_with(['0', '3', '6', '9']),
        "{reverted:?}"
    );
    let aborted = wait_for("the rollout aborted", Duration::from_secs(60), || {
        let r = rollout(&server, "kws-2-flaky");
        matches!(r["state"].as_str(), Some("aborted" | "rolling_back")).then_some(r)
    });
    assert_eq!(
        aborted["stage"], 0,
        "stopped at the canary stage: {aborted}"
    );
    let audit = server.get("/api/v1/rollouts/kws-2-flaky/audit");
    let abort = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "aborted")
        .unwrap_or_else(|| panic!("no abort in {audit}"));
    assert_eq!(abort["cause"], "install_gate", "{abort}");
    let done = abort["gates"]["install"]["cumulative"]["revert"]["done"]
        .as_u64()
        .unwrap();
    assert!(done >= 5, "decided on {done} devices done: {abort}");
    // No device stays on the new version: the healthy canaries get the signed rollback.
    wait_for("no device on 2.0", Duration::from_secs(60), || {
        versions_running(&server)
            .iter()
            .all(|c| c != "kws@2.0/nrf52840")
            .then_some(())
    });
    fleet.stop();
    server.stop();
}
