//! `tinyfleet backup` of a running server's data directory and `tinyfleet restore` of it: a new
//! server on the restored copy has the same devices, state, windows, keys and artifacts; the
//! devices' credentials still verify (the master key came back), their replay windows still
//! refuse old messages, and messages that were only in the ingest journal are not lost.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::{Server, TOKEN, wait_for};

const WAIT: Duration = Duration::from_secs(30);

fn tinyfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
        .args(args)
        .env("TINYFLEET_LOG", "warn")
        .output()
        .expect("run tinyfleet")
}

/// Runs `tinyfleet args...`, expecting success; its standard output.
fn ok(args: &[&str]) -> String {
    let out = tinyfleet(args);
    assert!(
        out.status.success(),
        "tinyfleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `tinyfleet args...`, expecting failure; its standard error.
fn fails(args: &[&str]) -> String {
    let out = tinyfleet(args);
    assert!(!out.status.success(), "tinyfleet {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// `tinyfleet model push` of `bytes` as `kws` `version` (sequence `seq`); the answer's digest.
fn push(server: &Server, dir: &Path, bytes: &[u8], version: &str, seq: &str) -> String {
    let file = dir.join(format!("{version}.bin"));
    std::fs::write(&file, bytes).expect("write model");
    let out = ok(&[
        "model",
        "--api",
        &server.api,
        "--token",
        TOKEN,
        "--json",
        "push",
        s(&file),
        "--model",
        "kws",
        "--version",
        version,
        "--seq",
        seq,
        "--hw",
        "nrf52840",
    ]);
    let answer: serde_json::Value = serde_json::from_str(&out).expect("JSON answer");
    answer["sha256"].as_str().expect("sha256").to_owned()
}

fn get_bytes(server: &Server, path: &str) -> Vec<u8> {
    reqwest::blocking::Client::new()
        .get(format!("{}{path}", server.api))
        .bearer_auth(TOKEN)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.bytes())
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .to_vec()
}

/// Everything about the fleet the API shows that a restore must bring back (what moves on
/// its own, like presence and timestamps of the last message, left out).
fn fleet_view(server: &Server) -> serde_json::Value {
    let mut devices = server.get("/api/v1/devices")["devices"].clone();
    for d in devices.as_array_mut().expect("device list") {
        d.as_object_mut().expect("device").remove("online");
    }
    serde_json::json!({
        "devices": devices,
        "dev-a": server.get("/api/v1/devices/dev-a/windows"),
        "keys": server.get("/api/v1/ota/keys"),
        "versions": server.get("/api/v1/models/kws/versions"),
    })
}

#[test]
fn a_backup_taken_while_serving_restores_devices_keys_and_artifacts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    // The operator token `serve` generates when no tokens are configured (this server has
    // tokens in its configuration, so the file is only carried along).
    std::fs::write(
        data.join("api-token"),
        "generated-operator-token-0123456789",
    )
    .unwrap();
    let server = Server::start(&data, "");

    let mut a = server.provision("dev-a");
    let mut b = server.provision("dev-b");
    let mut a_session = a.connect(server.mqtt);
    let first = a.next_summary();
    let mut messages = vec![a.hello(0), first.clone()];
    messages.extend((0..2).map(|_| a.next_summary()));
    a_session.publish_acked(&messages, false);
    let mut b_session = b.connect(server.mqtt);
    let mut messages = vec![b.hello(0)];
    messages.extend((0..2).map(|_| b.next_summary()));
    b_session.publish_acked(&messages, false);
    wait_for("3 + 2 summaries in the store", WAIT, || {
        (server.device_summaries("dev-a") == 3 && server.device_summaries("dev-b") == 2)
            .then_some(())
    });

    // Two model versions and the patch between them: three artifacts, the signing key.
    let v1: Vec<u8> = (0..30_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let v2: Vec<u8> = v1
        .iter()
        .enumerate()
        .map(|(i, b)| b.wrapping_add((i % 5 == 0) as u8))
        .collect();
    let sha1 = push(&server, dir.path(), &v1, "1.0", "1");
    let sha2 = push(&server, dir.path(), &v2, "2.0", "2");
    get_bytes(
        &server,
        &format!("/api/v1/models/kws/versions/2.0/offer?base={sha1}"),
    );
    let before = fleet_view(&server);

    // The backup, while dev-b keeps publishing.
    let backup = dir.path().join("backup");
    let publishing = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut sent = 0;
            while publishing.load(Ordering::SeqCst) && sent < 200 {
                b_session.publish_acked(&[b.next_summary()], false);
                sent += 1;
            }
        });
        let out = ok(&["backup", "--data-dir", s(&data), "--out", s(&backup)]);
        publishing.store(false, Ordering::SeqCst);
        assert!(out.contains("2 devices"), "{out}");
        assert!(out.contains("3 artifacts"), "{out}");
    });
    let b_sent = b.summaries_sent;
    #[cfg(unix)]
    {
        assert_eq!(mode(&backup), 0o700);
        for f in [
            "master.key",
            "ota-signing.key",
            "api-token",
            "tinyfleet.db",
            "backup.json",
        ] {
            assert_eq!(mode(&backup.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&backup.join("artifacts").join(&sha2)), 0o600);
    }
    let checked = ok(&["restore", "--from", s(&backup), "--check"]);
    assert!(checked.contains("is intact"), "{checked}");
    a_session.disconnect();
    b_session.disconnect();
    server.stop();

    // Restore into a new directory and serve from it.
    let restored = dir.path().join("restored");
    let out = ok(&["restore", "--from", s(&backup), "--data-dir", s(&restored)]);
    assert!(out.contains("2 devices"), "{out}");
    for f in ["master.key", "ota-signing.key", "api-token"] {
        assert_eq!(
            std::fs::read(restored.join(f)).unwrap(),
            std::fs::read(data.join(f)).unwrap(),
            "{f}"
        );
        #[cfg(unix)]
        assert_eq!(mode(&restored.join(f)), 0o600, "{f}");
    }
    let server = Server::start(&restored, "");
    // dev-b's count is whatever the backup caught of its publishing, at least what was
    // stored before.
    let b_restored = wait_for("dev-b's summaries", WAIT, || {
        let n = server.device_summaries("dev-b");
        (n >= 2).then_some(n)
    });
    assert!(b_restored <= i64::from(b_sent), "{b_restored} > {b_sent}");
    let mut after = fleet_view(&server);
    let mut expected = before.clone();
    // dev-b moved on while the backup ran; the rest must match.
    for v in [&mut after, &mut expected] {
        for d in v["devices"].as_array_mut().unwrap() {
            if d["id"] == "dev-b" {
                d.as_object_mut().unwrap().remove("last_seen_ms");
                d.as_object_mut().unwrap().remove("lost_summaries");
            }
        }
    }
    assert_eq!(after, expected);
    assert_eq!(server.device_summaries("dev-a"), 3);
    assert_eq!(get_bytes(&server, &format!("/ota/v1/objects/{sha1}")), v1);
    assert_eq!(get_bytes(&server, &format!("/ota/v1/objects/{sha2}")), v2);

    // dev-a's credentials still verify: its password lets it in, its next summary's tag
    // verifies under the restored master key, and its replay window refuses an old one.
    let mut a_session = a.connect(server.mqtt);
    a_session.publish_acked(&[a.next_summary(), first], false);
    wait_for(
        "dev-a's fourth summary and the replay refused",
        WAIT,
        || {
            (server.device_summaries("dev-a") == 4 && server.counter("rejected.duplicate") == 1)
                .then_some(())
        },
    );
    assert_eq!(server.counter("rejected.forged"), 0);
    a_session.disconnect();
    server.stop();

    // A damaged or incomplete backup is refused, and so is a directory in use.
    let damaged = dir.path().join("damaged");
    copy_dir(&backup, &damaged);
    let artifact = damaged.join("artifacts").join(&sha1);
    let mut bytes = std::fs::read(&artifact).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&artifact, bytes).unwrap();
    let err = fails(&["restore", "--from", s(&damaged), "--check"]);
    assert!(err.contains("damaged") && err.contains(&sha1), "{err}");
    std::fs::remove_file(&artifact).unwrap();
    let err = fails(&["restore", "--from", s(&damaged), "--check"]);
    assert!(err.contains("cannot read"), "{err}");
    std::fs::remove_file(damaged.join("backup.json")).unwrap();
    let err = fails(&["restore", "--from", s(&damaged), "--check"]);
    assert!(err.contains("not a complete tinyfleet backup"), "{err}");
    let err = fails(&["restore", "--from", s(&backup), "--data-dir", s(&data)]);
    assert!(err.contains("not empty"), "{err}");
    let err = fails(&["backup", "--data-dir", s(&data), "--out", s(&backup)]);
    assert!(err.contains("not empty"), "{err}");
    let err = fails(&[
        "backup",
        "--data-dir",
        s(&dir.path().join("nothing")),
        "--out",
        s(&dir.path().join("out")),
    ]);
    assert!(err.contains("not a tinyfleet data directory"), "{err}");
}

#[test]
fn messages_only_in_the_ingest_journal_survive_backup_and_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // No checkpoint for an hour: what devices send stays in the journal, not the database.
    let server = Server::start_with(&data, "checkpoint_ms = 3600000", "");
    let mut device = server.provision("dev-j");
    let mut session = device.connect(server.mqtt);
    let mut messages = vec![device.hello(0)];
    messages.extend((0..4).map(|_| device.next_summary()));
    session.publish_acked(&messages, false);
    let journal = data.join("ingest.journal");
    wait_for("5 messages in the journal", WAIT, || {
        let bytes = std::fs::read(&journal).ok()?;
        (tinyfleet_ingest::journal::decode(&bytes).len() == 5).then_some(())
    });
    assert_eq!(server.device_summaries("dev-j"), 0, "checkpointed already");

    let backup = dir.path().join("backup");
    ok(&["backup", "--data-dir", s(&data), "--out", s(&backup)]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["journal_records"], 5, "{manifest}");
    session.disconnect();
    server.stop();

    let restored = dir.path().join("restored");
    ok(&["restore", "--from", s(&backup), "--data-dir", s(&restored)]);
    let server = Server::start(&restored, "");
    wait_for("the journaled summaries replayed", WAIT, || {
        (server.device_summaries("dev-j") == 4).then_some(())
    });
    server.stop();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for item in std::fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).unwrap();
        }
    }
}
