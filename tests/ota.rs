//! OTA through `tinyfleet serve`: model versions pushed with the CLI, a signed delta offer
//! verified with the device's own code and trusted key, and the patch downloaded over real
//! HTTP in two ranged requests (a resumed download), then applied by the device's patcher.

mod support;

use std::process::Command;

use support::{Server, TOKEN};
use tinyfleet_device::ota::manifest::{MAX_OFFER, TrustedKey, verify_offer};
use tinyfleet_device::ota::patch::apply_in_memory;

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
    let (f1, f2) = (dir.path().join("v1.bin"), dir.path().join("v2.bin"));
    std::fs::write(&f1, &v1).unwrap();
    std::fs::write(&f2, &v2).unwrap();
    let push = |file: &std::path::Path, version: &str, seq: &str| {
        cli(
            &server,
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
    };
    let r1: serde_json::Value = serde_json::from_str(&push(&f1, "1.0", "1")).unwrap();
    push(&f2, "1.1", "2");
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
