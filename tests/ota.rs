//! OTA through `tinyfleet serve`: model versions pushed with the CLI, a signed delta offer
//! verified with the device's own code and trusted key, and the patch downloaded over real
//! HTTP in two ranged requests (a resumed download), then applied by the device's patcher.

mod support;

use std::process::Command;

use std::sync::Arc;
use std::time::Duration;

use support::{Server, SimFleet, TOKEN, trusted_key, wait_for};
use tinyfleet_device::ota::manifest::{MAX_OFFER, TrustedKey, verify_offer};
use tinyfleet_device::ota::patch::apply_in_memory;
use tinyfleet_device::wire::ota_state;
use tinyfleet_sim::{Behaviour, Factory, SimEventKind};

fn cli(server: &Server, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
        .args(["model", "--api", &server.api, "--token", TOKEN])
        .args(args)
        .output()
        .expect("run tinyfleet");
    assert!(
        out.status.success(),
        "tinyfleet model {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tinyfleet model --json push` of `bytes` as model `kws` for nrf52840; the JSON answer.
fn push(server: &Server, dir: &std::path::Path, bytes: &[u8], version: &str, seq: &str) -> String {
    let file = dir.join(format!("{version}.bin"));
    std::fs::write(&file, bytes).unwrap();
    cli(
        server,
        &[
            "--json",
            "push",
            file.to_str().unwrap(),
            "--model",
            "kws",
            "--version",
            version,
            "--seq",
            seq,
            "--hw",
            "nrf52840",
        ],
    )
}

#[test]
fn a_pushed_version_is_offered_signed_and_downloaded_by_range() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "");
    let v1: Vec<u8> = (0..40_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let v2: Vec<u8> = v1
        .iter()
        .enumerate()
        .map(|(i, b)| b.wrapping_add((i % 3) as u8))
        .collect();
    let r1: serde_json::Value =
        serde_json::from_str(&push(&server, dir.path(), &v1, "1.0", "1")).unwrap();
    push(&server, dir.path(), &v2, "1.1", "2");
    let listed = cli(&server, &["list", "kws"]);
    assert!(listed.contains("1.1") && listed.contains("1.0"), "{listed}");

    // The key to trust, then the offer for a device running v1.
    let http = reqwest::blocking::Client::new();
    let keys: serde_json::Value = http
        .get(format!("{}/api/v1/ota/keys", server.api))
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let public: [u8; 32] = hex::decode(keys[0]["public_key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let kid = hex::decode(keys[0]["kid"].as_str().unwrap()).unwrap();
    let offer = http
        .get(format!(
            "{}/api/v1/models/kws/versions/1.1/offer",
            server.api
        ))
        .query(&[("base", r1["sha256"].as_str().unwrap())])
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let trusted = [TrustedKey { kid: &kid, public }];
    let mut scratch = [0u8; MAX_OFFER + 64];
    let m = verify_offer(&offer, &trusted, &mut scratch).unwrap();
    let delta = m.delta.expect("a delta offer");
    assert!(m.url.starts_with(&server.api), "{}", m.url);

    // Download in two ranged requests, as a device resuming after a lost connection would.
    let half = delta.patch_size / 2;
    let mut patch = Vec::new();
    for range in [format!("bytes=0-{}", half - 1), format!("bytes={half}-")] {
        let resp = http.get(m.url).header("range", range).send().unwrap();
        assert_eq!(resp.status().as_u16(), 206);
        patch.extend_from_slice(&resp.bytes().unwrap());
    }
    assert_eq!(patch.len() as u32, delta.patch_size);
    assert_eq!(apply_in_memory(&v1, &patch, 1000).unwrap(), v2);
    server.stop();
}

/// An MQTT-only device: a simulated device running the real installer on a simulated flash
/// gets a signed delta offer, fetches the patch by block requests over MQTT (ingest verifies
/// each request, the OTA service answers), installs, reboots into the trial, confirms, and
/// says hello with the new version. Its progress reports reach the device API.
#[test]
fn a_device_installs_a_delta_by_mqtt_block_transfer() {
    install_over_mqtt(false);
}

/// The same, with the power cut part-way through the download: the device reboots, resumes
/// from its last flash checkpoint (the retained offer arrives again) and confirms.
#[test]
fn an_install_resumes_after_a_power_cut() {
    install_over_mqtt(true);
}

fn install_over_mqtt(power_cut: bool) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "");
    let v1: Vec<u8> = (0..24_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let v2: Vec<u8> = v1
        .iter()
        .enumerate()
        .map(|(i, b)| match i {
            // A retrained layer (small changes everywhere) and a new one (new bytes).
            0..8_000 => b.wrapping_add((i % 3) as u8),
            8_000..14_000 => (i.wrapping_mul(40_503) >> 5) as u8,
            _ => *b,
        })
        .collect();
    push(&server, dir.path(), &v1, "1.0", "1");
    push(&server, dir.path(), &v2, "2.0", "2");
    let operator = server.provision("mcu-2");
    let mut fleet = SimFleet::new();
    let factory = Factory {
        model_version: "1.0".into(),
        model_seq: 1,
        image: Arc::new(v1.clone()),
    };
    let quiet = Behaviour {
        summary_interval: Duration::from_secs(3600),
        power_loss_in_install: power_cut,
        ..Behaviour::default()
    };
    fleet.add(&server, "mcu-1", "nrf52840", factory, quiet);
    let minute = Duration::from_secs(60);
    fleet.wait_event(
        "hello on 1.0",
        minute,
        |e| matches!(&e.kind, SimEventKind::Online { model_version, .. } if model_version == "1.0"),
    );

    // The offer for a device on 1.0, published retained on the device's offer topic (here by
    // another device: the broker cannot restrict topics, which is why offers are signed).
    let base = server
        .get("/api/v1/models/kws/versions")
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["model_version"] == "1.0")
        .map(|v| v["sha256"].as_str().unwrap().to_owned())
        .unwrap();
    let offer = reqwest::blocking::Client::new()
        .get(format!(
            "{}/api/v1/models/kws/versions/2.0/offer",
            server.api
        ))
        .query(&[("base", base.as_str())])
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec();
    let mut scratch = [0u8; MAX_OFFER + 64];
    let (kid, public) = trusted_key(&server);
    let patch_size = verify_offer(&offer, &[TrustedKey { kid: &kid, public }], &mut scratch)
        .unwrap()
        .delta
        .expect("a delta")
        .patch_size;
    let mut session = operator.connect(server.mqtt);
    session.publish_acked(&[("tf/v1/mcu-1/ota/offer".to_owned(), offer)], true);

    if power_cut {
        fleet.wait_event("a power cut", minute, |e| {
            matches!(&e.kind, SimEventKind::PowerLost)
        });
        fleet.wait_event("hello after the power cut, still on 1.0", minute, |e| {
            matches!(&e.kind, SimEventKind::Online { boot: 2, model_version } if model_version == "1.0")
        });
    }
    // It reboots into the trial (and says hello with 2.0), then its self-test confirms.
    fleet.wait_event(
        "hello on 2.0",
        minute,
        |e| matches!(&e.kind, SimEventKind::Online { model_version, .. } if model_version == "2.0"),
    );
    let confirmed = fleet.wait_event(
        "confirmed",
        minute,
        |e| matches!(&e.kind, SimEventKind::Progress(r) if r.state == ota_state::CONFIRMED),
    );
    let SimEventKind::Progress(r) = confirmed.kind else {
        unreachable!()
    };
    assert_eq!((r.manifest_seq, r.error), (2, 0));

    // The patch travelled as blocks over MQTT, and the service knows where the device stands.
    let sent = wait_for("blocks counted", Duration::from_secs(10), || {
        let metrics = reqwest::blocking::Client::new()
            .get(format!("{}/metrics", server.api))
            .bearer_auth(TOKEN)
            .send()
            .ok()?
            .text()
            .ok()?;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("tinyfleet_ota_blocks_total{result=\"sent\"}"))?;
        let n: u64 = line.rsplit(' ').next()?.parse().ok()?;
        (n > 0).then_some(n)
    });
    assert!(
        sent >= u64::from(patch_size.div_ceil(1024)) && patch_size > 4096,
        "{sent} blocks for a {patch_size}-byte patch"
    );
    let state = wait_for(
        "OTA state in the device API",
        Duration::from_secs(20),
        || {
            let d = server.get("/api/v1/devices/mcu-1");
            (d["ota"]["state_name"] == "confirmed" && d["state"]["model_version"] == "2.0")
                .then_some(d)
        },
    );
    assert_eq!(state["ota"]["manifest_seq"], 2);

    fleet.stop();
    session.disconnect();
    server.stop();
}
