//! Drift and alerting through `tinyfleet serve`: a profile built from a reference CSV and
//! uploaded with the CLI, devices binning with its edges over real MQTT, a shift detected by
//! the running service, and the alert seen in the API, at a real Alertmanager-webhook
//! receiver, at a real retraining receiver and on the MQTT alert topic.

mod support;

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, Uri};
use axum::routing::post;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use support::{Server, TOKEN, Victoria, wait_for};
use tinyfleet_device::sketch::Edges;
use tinyfleet_device::testkit::{LATENCY_US, ReferenceProfile, StreamParams};

/// One request a receiver got: path, headers, JSON body.
type Received = (String, HeaderMap, Value);

/// A real HTTP server on an ephemeral port that records every POSTed JSON body.
fn receiver() -> (String, mpsc::Receiver<Received>) {
    let (tx, rx) = mpsc::channel();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().route(
                "/{*path}",
                post(
                    move |uri: Uri, headers: HeaderMap, Json(body): Json<Value>| {
                        let tx = tx.clone();
                        async move {
                            let _ = tx.send((uri.path().to_owned(), headers, body));
                            "ok"
                        }
                    },
                ),
            );
            axum::serve(listener, app).await.expect("serve receiver");
        });
    });
    (url, rx)
}

fn tinyfleet(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
        .args(args)
        .output()
        .expect("run tinyfleet");
    assert!(
        out.status.success(),
        "tinyfleet {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A reference data set of the test model: the same generator the devices run, unshifted.
fn reference_csv(path: &std::path::Path) {
    let csv = tinyfleet_sim::reference_csv(&tinyfleet_sim::WindowData::default(), 8_000, 99);
    std::fs::write(path, csv).expect("csv");
}

/// The device-side edges from a built profile (what firmware would be flashed with).
fn device_profile(profile: &Value) -> ReferenceProfile {
    let json = serde_json::to_string(profile).unwrap();
    let p: tinyfleet_drift::profile::MonitoringProfile = serde_json::from_str(&json).unwrap();
    let features: Vec<Edges<16>> = p
        .features
        .iter()
        .map(|f| tinyfleet_drift::profile::device_edges::<16>(&f.hist).expect("16 bins"))
        .collect();
    ReferenceProfile {
        features: features.try_into().expect("8 features"),
        latency: Edges::new(0.0, LATENCY_US).expect("latency edges"),
    }
}

#[test]
fn a_shift_is_detected_alerted_and_triggers_retraining() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (hook, received) = receiver();
    let vm = Victoria::start();

    // The profile: built from the reference CSV, then uploaded with the CLI.
    let csv = dir.path().join("reference.csv");
    reference_csv(&csv);
    let profile_path = dir.path().join("kws-3.json");
    tinyfleet(&[
        "profile",
        "build",
        "--csv",
        csv.to_str().unwrap(),
        "--model",
        "kws",
        "--version",
        "3",
        "--out",
        profile_path.to_str().unwrap(),
    ]);
    let profile: Value =
        serde_json::from_str(&std::fs::read_to_string(&profile_path).unwrap()).unwrap();
    let edges = device_profile(&profile);

    let server = Server::start_with(
        &data,
        "window_secs = 2\ncheckpoint_ms = 200",
        &format!(
            r#"
[influx]
url = "{vm_url}"
org = "fleet"
bucket = "tinyfleet"
token = "influx-token"
flush_interval_ms = 50
[monitor]
grace_secs = 0
tick_ms = 100
[drift]
min_inferences = 300
[alerts]
default_receivers = ["hook"]
[alerts.rules.DeviceOffline]
for_ms = 0
[[alerts.receivers]]
name = "hook"
kind = {{ type = "alertmanager_webhook", url = "{hook}/alerts" }}
[[alerts.receivers]]
name = "retrain"
kind = {{ type = "retrain_webhook", url = "{hook}/retrain" }}
"#,
            vm_url = vm.url
        ),
    );
    tinyfleet(&[
        "profile",
        "upload",
        "--api",
        &server.api,
        "--token",
        TOKEN,
        profile_path.to_str().unwrap(),
    ]);
    assert_eq!(server.get("/api/v1/models")[0]["model_id"], "kws");

    // An observer on the MQTT alert topic (any authenticated client may subscribe).
    let observer = server.provision("observer");
    let mut opts = MqttOptions::new("observer", server.mqtt.ip().to_string(), server.mqtt.port());
    opts.set_credentials("observer", &observer.password);
    let (obs_client, mut obs_conn) = Client::new(opts, 10);
    obs_client
        .subscribe("tf/ops/v1/alerts/#", QoS::AtLeastOnce)
        .unwrap();
    let (events_tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        for event in obs_conn.iter() {
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = events_tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });

    // Devices whose inputs have all moved by one standard deviation.
    let mut devices: Vec<_> = (0..8)
        .map(|i| server.provision(&format!("dev-{i}")))
        .collect();
    let mut sessions: Vec<_> = devices.iter().map(|d| d.connect(server.mqtt)).collect();
    for (d, s) in devices.iter().zip(&mut sessions) {
        s.publish_acked(&[d.hello(0)], true);
    }
    let shifted = StreamParams {
        feature_shift: 1.0,
        ..StreamParams::default()
    };
    let firing = wait_for(
        "a firing FeatureDrift alert",
        Duration::from_secs(90),
        || {
            for (d, s) in devices.iter_mut().zip(&mut sessions) {
                let summary = d.next_summary_with(&edges, &shifted, 50);
                s.publish_acked(&[summary], false);
            }
            let alerts = server.get("/api/v1/alerts?state=firing");
            alerts
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|a| a["labels"]["alertname"] == "FeatureDrift")
                        .cloned()
                })
                .or_else(|| {
                    std::thread::sleep(Duration::from_millis(200));
                    None
                })
        },
    );
    assert_eq!(firing["labels"]["model"], "kws");
    assert_eq!(firing["labels"]["model_version"], "3");
    assert_eq!(firing["labels"]["kind"], "drift");
    assert!(
        firing["labels"]["feature"]
            .as_str()
            .unwrap()
            .starts_with('f')
    );

    // The Alertmanager webhook and the retraining trigger reached the receiver.
    let mut alert_hook = None;
    let mut retrain = None;
    wait_for("webhook deliveries", Duration::from_secs(30), || {
        while let Ok((path, headers, body)) = received.try_recv() {
            match path.as_str() {
                "/alerts"
                    if body["alerts"].as_array().is_some_and(|a| {
                        a.iter().any(|a| a["labels"]["alertname"] == "FeatureDrift")
                    }) =>
                {
                    alert_hook = Some(body)
                }
                "/retrain" => retrain = Some((headers, body)),
                _ => {}
            }
        }
        (alert_hook.is_some() && retrain.is_some()).then_some(())
    });
    let alert_hook = alert_hook.unwrap();
    assert_eq!(alert_hook["version"], "4");
    assert_eq!(alert_hook["status"], "firing");
    assert_eq!(alert_hook["receiver"], "hook");
    let (headers, retrain) = retrain.unwrap();
    assert_eq!(
        headers["idempotency-key"].to_str().unwrap().len(),
        64,
        "retraining triggers carry an idempotency key"
    );
    let text = retrain.to_string();
    assert!(text.contains("importance_weights"), "{text}");
    assert!(text.contains("\"kws\""), "{text}");

    // The MQTT alert event.
    let (topic, body) = wait_for("an MQTT alert event", Duration::from_secs(20), || {
        events
            .recv_timeout(Duration::from_millis(200))
            .ok()
            .filter(|(t, _)| t == "tf/ops/v1/alerts/FeatureDrift")
    });
    assert_eq!(topic, "tf/ops/v1/alerts/FeatureDrift");
    let event: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["status"], "firing");
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let start = doc
        .find("alert-event = {")
        .expect("alert-event CDDL in protocol.md");
    let cddl = &doc[start..start + doc[start..].find("```").unwrap()];
    cddl::validate_json_from_str(cddl, std::str::from_utf8(&body).unwrap(), None)
        .unwrap_or_else(|e| panic!("alert event does not match protocol.md: {e:?}"));
    let mut wrong = event.clone();
    wrong["status"] = "odd".into();
    assert!(cddl::validate_json_from_str(cddl, &wrong.to_string(), None).is_err());

    // Drift scores and findings in the API, counters in /metrics.
    let drift = server.get("/api/v1/drift");
    assert!(!drift["active_findings"].as_array().unwrap().is_empty());
    let newest = &drift["evaluations"][0];
    assert!(newest["stats"]["devices"].as_u64().unwrap() >= 1);
    assert!(!newest["scores"].as_array().unwrap().is_empty());
    let metrics = reqwest::blocking::get(format!("{}/metrics", server.api))
        .unwrap()
        .text()
        .unwrap();
    assert!(metrics.contains("tinyfleet_drift_evaluations_total"));
    assert!(metrics.contains("tinyfleet_alerts_delivery_sent_total{receiver=\"hook\"}"));

    // Drift scores in the time-series store (VictoriaMetrics names fields `measurement_field`).
    let psi = wait_for("tf_drift points", Duration::from_secs(20), || {
        let out = vm.export("tf_drift_psi");
        out.contains("\"scope\":\"kws@3\"").then_some(out)
    });
    assert!(psi.contains("\"subject\":\"f0\""), "{psi}");
    assert!(psi.contains("\"scope_kind\":\"model\""), "{psi}");

    // A device whose connection is taken over uncleanly goes offline by its will, and
    // DeviceOffline fires (its rule has for_ms = 0 here).
    let gone = &devices[0];
    let _second = gone.connect(server.mqtt);
    let offline = wait_for("DeviceOffline", Duration::from_secs(30), || {
        let alerts = server.get("/api/v1/alerts");
        alerts.as_array().and_then(|a| {
            a.iter()
                .find(|a| a["labels"]["alertname"] == "DeviceOffline")
                .cloned()
        })
    });
    assert_eq!(offline["labels"]["device"], "dev-0");
    server.stop();
}
