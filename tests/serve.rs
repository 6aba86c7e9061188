//! End to end: `tinyfleet serve` as a process on ephemeral ports, devices speaking real MQTT
//! with the device client's encoder, assertions through the HTTP API and the SQLite file.

mod support;

use std::time::Duration;

use support::{READ_TOKEN, Server, TOKEN, Victoria, wait_for};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn summaries_flow_from_devices_to_api_and_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, "");
    let mut a = server.provision("dev-a");
    let b = server.provision("dev-b");

    let mut session = a.connect(server.mqtt);
    session.publish_acked(&[a.hello(0)], true);
    let summaries: Vec<_> = (0..5).map(|_| a.next_summary()).collect();
    session.publish_acked(&summaries, false);
    wait_for("5 summaries of dev-a in the API", WAIT, || {
        (server.device_summaries("dev-a") == 5).then_some(())
    });

    // Device A publishes a valid summary of its own on device B's topic: rejected as forged.
    let (_, own) = a.next_summary();
    session.publish_acked(&[(format!("tf/v1/{}/sum", b.id), own)], false);
    wait_for("the forged summary counted", WAIT, || {
        (server.counter("rejected.forged") == 1).then_some(())
    });
    // A replayed summary (same boot and seq) is counted once.
    session.publish_acked(&[summaries[2].clone()], false);
    wait_for("the replay counted as duplicate", WAIT, || {
        (server.counter("rejected.duplicate") >= 1).then_some(())
    });
    assert_eq!(server.device_summaries("dev-a"), 5);
    assert_eq!(server.counter("accepted.summary"), 5);

    // The device's state: online, its model, cohort aggregates.
    let device = server.get("/api/v1/devices/dev-a");
    assert_eq!(device["state"]["presence"]["online"], true, "{device}");
    assert_eq!(device["state"]["model_id"], "kws");
    assert_eq!(device["state"]["health"]["battery_mv"], 3600);
    let cohorts = server.get("/api/v1/cohorts");
    let kws = cohorts
        .as_array()
        .expect("cohort list")
        .iter()
        .find(|c| c["cohort"] == "kws@3/nrf52840")
        .unwrap_or_else(|| panic!("no kws cohort in {cohorts}"));
    assert_eq!(kws["latest"]["agg"]["inferences"], 200, "{kws}");
    assert_eq!(kws["latest_devices"], 1);
    let page = server.get("/api/v1/devices?cohort=kws@3/nrf52840&state=online");
    assert_eq!(page["devices"].as_array().map(Vec::len), Some(1), "{page}");
    let page = server.get("/api/v1/devices?state=unseen");
    assert_eq!(page["devices"][0]["id"], "dev-b", "{page}");
    let windows = server.get("/api/v1/devices/dev-a/windows");
    assert_eq!(windows[0]["window"]["agg"]["summaries"], 5, "{windows}");

    // A read-only token reads but cannot provision.
    assert_eq!(server.get_as("/api/v1/devices", READ_TOKEN).0, 200);
    let (status, _) = server.post(
        "/api/v1/devices",
        READ_TOKEN,
        serde_json::json!({ "id": "dev-c" }),
    );
    assert_eq!(status, 403);
    assert_eq!(
        server.get_as("/api/v1/devices", "wrong-token-000000").0,
        401
    );

    // Prometheus metrics of the service itself.
    let metrics = reqwest::blocking::get(format!("{}/metrics", server.api))
        .and_then(|r| r.text())
        .expect("metrics");
    assert!(metrics.contains("tinyfleet_ingest_accepted_total{kind=\"summary\"} 5"));
    assert!(metrics.contains("tinyfleet_ingest_rejected_total{reason=\"forged\"} 1"));

    // A clean disconnect publishes nothing; the broker publishes the will when the connection
    // dies, which the next test covers. Stop the server: the store keeps everything.
    session.disconnect();
    server.stop();

    // The embedded store, read directly.
    let db = rusqlite::Connection::open_with_flags(
        data.join("tinyfleet.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the store");
    let summaries_in_db: i64 = db
        .query_row(
            "SELECT summaries FROM device_state WHERE id = 'dev-a'",
            [],
            |r| r.get(0),
        )
        .expect("dev-a row");
    assert_eq!(summaries_in_db, 5);
    let hash_len: i64 = db
        .query_row(
            "SELECT length(password_hash) FROM devices WHERE id = 'dev-a'",
            [],
            |r| r.get(0),
        )
        .expect("hash");
    assert_eq!(hash_len, 32, "passwords are stored as SHA-256 digests");
}

/// `serve` runs with two malloc arenas (glibc), so its memory levels off over windows
/// (`limit_malloc_arenas` in `src/main.rs`); an operator's own setting is kept.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn serve_runs_with_few_malloc_arenas() {
    let environ = |pid: u32| std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let has = |env: &[u8], var: &str| env.split(|b| *b == 0).any(|v| v == var.as_bytes());
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), "");
    assert!(has(&environ(server.pid()), "MALLOC_ARENA_MAX=2"));
    // Provisioning works: the process that answers is the one re-executed, same pid.
    server.provision("dev-a");
}

#[test]
fn wrong_credentials_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), "");
    let a = server.provision("dev-a");
    assert!(a.connect_with(server.mqtt, "not-the-password").is_err());
    let mut stranger = server.provision("dev-x");
    stranger.id = "dev-unknown".into();
    assert!(
        stranger
            .connect_with(server.mqtt, &stranger.password)
            .is_err()
    );
    // Revoked devices cannot connect any more.
    assert!(a.connect_with(server.mqtt, &a.password).is_ok());
    let (status, _) = server.post("/api/v1/devices/dev-a/revoke", TOKEN, serde_json::json!({}));
    assert_eq!(status, 204);
    assert!(a.connect_with(server.mqtt, &a.password).is_err());
}

#[test]
fn state_survives_a_restart_and_dedup_still_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, "");
    let mut a = server.provision("dev-a");
    let mut session = a.connect(server.mqtt);
    let first: Vec<_> = (0..3).map(|_| a.next_summary()).collect();
    session.publish_acked(&first, false);
    wait_for("3 summaries", WAIT, || {
        (server.device_summaries("dev-a") == 3).then_some(())
    });
    session.disconnect();
    server.stop();

    let server = Server::restart_after_stop(&data);
    assert_eq!(server.device_summaries("dev-a"), 3);
    assert_eq!(server.counter("accepted.summary"), 3);
    let mut session = a.connect(server.mqtt);
    // Replays of what was counted before the restart are still duplicates.
    session.publish_acked(&first, false);
    let more: Vec<_> = (0..2).map(|_| a.next_summary()).collect();
    session.publish_acked(&more, false);
    wait_for("5 summaries after the restart", WAIT, || {
        (server.device_summaries("dev-a") == 5).then_some(())
    });
    wait_for("3 duplicates", WAIT, || {
        (server.counter("rejected.duplicate") == 3).then_some(())
    });
    assert_eq!(server.counter("accepted.summary"), 5);
}

#[test]
fn will_marks_a_device_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), "");
    let a = server.provision("dev-a");
    // A second connection with the same client id makes the broker drop the first one without
    // a DISCONNECT, so the will of the first is published.
    let mut first = a.connect(server.mqtt);
    first.publish_acked(&[a.hello(0)], true);
    wait_for("online", WAIT, || {
        (server.get("/api/v1/devices/dev-a")["state"]["presence"]["online"] == true).then_some(())
    });
    drop(first);
    let second = a.connect(server.mqtt);
    wait_for("offline by will", WAIT, || {
        let state = server.get("/api/v1/devices/dev-a")["state"].clone();
        (state["presence"]["online"] == false && state["presence"]["offline_reason"] == "will")
            .then_some(())
    });
    second.disconnect();
}

#[test]
fn summaries_reach_the_time_series_store() {
    let vm = Victoria::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let influx = format!(
        "[influx]\nurl = \"{}\"\norg = \"fleet\"\nbucket = \"tinyfleet\"\ntoken = \"influx-token\"\n\
         flush_interval_ms = 50\n",
        vm.url
    );
    let server = Server::start(&dir.path().join("data"), &influx);
    let mut a = server.provision("dev-a");
    let mut session = a.connect(server.mqtt);
    session.publish_acked(&[a.hello(0)], true);
    let summaries: Vec<_> = (0..3).map(|_| a.next_summary()).collect();
    session.publish_acked(&summaries, false);
    // VictoriaMetrics names a field `measurement_field`.
    let lines = wait_for("tf_summary points in VictoriaMetrics", WAIT, || {
        let out = vm.export("tf_summary_inferences");
        (out.lines().count() >= 1 && out.contains("\"device\":\"dev-a\"")).then_some(out)
    });
    assert!(lines.contains("\"cohort\":\"kws@3/nrf52840\""), "{lines}");
    let values: u64 = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|v| v["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .map(|v| v as u64)
        .sum();
    assert_eq!(values, 120, "3 summaries x 40 inferences: {lines}");
    let battery = vm.export("tf_summary_battery_mv");
    assert!(battery.contains("3600"), "{battery}");
    let presence = vm.export("tf_presence_online");
    assert!(presence.contains("\"reason\":\"hello\""), "{presence}");
}

#[test]
fn devices_are_managed_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), "");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
            .arg("device")
            .args(["--api", &server.api, "--token", TOKEN])
            .args(args)
            .output()
            .expect("tinyfleet device");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = cli(&["--json", "add", "cli-1", "--tag", "site=roof"]);
    assert!(ok, "{stderr}");
    let creds: serde_json::Value = serde_json::from_str(&stdout).expect("json credentials");
    assert_eq!(creds["mqtt_password"].as_str().map(str::len), Some(64));
    let (ok, stdout, _) = cli(&["list", "--tag", "site=roof"]);
    assert!(
        ok && stdout.contains("cli-1") && stdout.contains("unseen"),
        "{stdout}"
    );
    let (ok, _, stderr) = cli(&["add", "cli-1"]);
    assert!(!ok && stderr.contains("409"), "{stderr}");
    let (ok, stdout, _) = cli(&["revoke", "cli-1"]);
    assert!(ok && stdout.contains("revoked cli-1"));
    let (ok, stdout, _) = cli(&["list", "--state", "revoked"]);
    assert!(ok && stdout.contains("cli-1"), "{stdout}");
    let (ok, _, stderr) = cli(&["show", "nope"]);
    assert!(!ok && stderr.contains("404"), "{stderr}");
}
