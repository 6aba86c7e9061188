//! Bad input over the wire, against a real `tinyfleet serve`.
//!
//! HTTP: malformed JSON, wrong or missing content types, missing, unknown, mistyped and
//! oversized fields, invalid UTF-8, absurd numbers, deep nesting, bodies over the limits (a model
//! upload far above `ota.max_artifact_bytes`, declared and streamed), profiles that are valid
//! JSON but not valid profiles, and junk in paths, queries and headers: every one is a 4xx with
//! a JSON `{"error": ...}` body, and the server keeps answering.
//!
//! MQTT: a summary sealed with the wrong key, a hello forged on another device's topic, garbage
//! bytes, an empty payload, a payload above the size limit, a message for an unknown device, an
//! authenticated body that is not a summary, an out-of-range summary and a replay from an older
//! boot: each is refused and counted under its reason (in `/api/v1/ingest` and `/metrics`),
//! nothing of them reaches fleet state, and every valid summary sent between them is kept.
//!
//! Already covered elsewhere, and not repeated here: a device's own summary republished on
//! another device's topic and a plain replay (`tests/serve.rs`,
//! `summaries_flow_from_devices_to_api_and_store`), replays after a restart
//! (`state_survives_a_restart_and_dedup_still_holds`), wrong MQTT passwords and revoked devices
//! (`wrong_credentials_are_refused`), read tokens refused for writes, every refusal reason at
//! the decoder (`ingest/src/decode.rs`), and an oversized MQTT packet cut by the broker
//! (`broker/tests/broker.rs`).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use support::{READ_TOKEN, Server, TOKEN, wait_for};
use tinyfleet_device::DeviceKey;
use tinyfleet_device::wire::{self, DeviceId, Health, Kind, Shape, Summary, Topic, Will};

const WAIT: Duration = Duration::from_secs(20);
/// `ota.max_artifact_bytes` of the server under test.
const MAX_ARTIFACT: usize = 64 * 1024;

/// An HTTP answer.
struct Reply {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A request body case: what it is, its headers, the body, the status it must get (any 4xx
/// when `None`).
type BodyCase<'a> = (&'a str, &'a [(&'a str, &'a [u8])], &'a [u8], Option<u16>);

fn send(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &[u8])],
    body: Vec<u8>,
) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = reqwest::blocking::Client::new()
        .request(method, format!("{}{path}", server.api))
        .timeout(WAIT)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (name, value) in headers {
        req = req.header(
            *name,
            reqwest::header::HeaderValue::from_bytes(value).expect("header value"),
        );
    }
    let resp = req.send().expect("the server answers");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.bytes().expect("body").to_vec();
    Reply {
        status,
        content_type,
        body,
    }
}

const JSON: (&str, &[u8]) = ("content-type", b"application/json");

/// A 4xx (exactly `status` when given) with a JSON error body.
fn assert_json_error(what: &str, r: &Reply, status: Option<u16>) {
    let shown = String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned();
    match status {
        Some(s) => assert_eq!(r.status, s, "{what}: {shown}"),
        None => assert!(
            (400..500).contains(&r.status),
            "{what}: {} {shown}",
            r.status
        ),
    }
    assert!(
        r.content_type.starts_with("application/json"),
        "{what}: content type {:?}, body {shown}",
        r.content_type
    );
    let error = r.json()["error"].as_str().map(str::to_owned);
    assert!(
        error.is_some_and(|e| !e.is_empty()),
        "{what}: no JSON error in {shown}"
    );
}

/// The server still answers: health, an authenticated read, and a write.
fn assert_alive(server: &Server, n: usize) {
    let health = send(server, "GET", "/healthz", None, &[], vec![]);
    assert_eq!(health.status, 200, "healthz after bad input");
    assert_eq!(server.get_as("/api/v1/devices", READ_TOKEN).0, 200);
    let (status, creds) = server.post(
        "/api/v1/devices",
        TOKEN,
        serde_json::json!({ "id": format!("alive-{n}") }),
    );
    assert_eq!(status, 201, "provisioning after bad input: {creds}");
}

/// One raw HTTP/1.1 request over TCP: `head` (request line and headers, without the blank
/// line), then `body_len` bytes streamed from another thread while the answer is read, so a
/// server that answers before reading everything (as it should over a limit) is seen doing
/// so. Returns the status and the parsed JSON body.
fn raw_request(server: &Server, head: &str, body_len: usize, chunked: bool) -> Reply {
    let addr = server.api.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&addr).expect("connect to the API");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.set_write_timeout(Some(WAIT)).expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let head = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let block = vec![b'x'; 64 * 1024];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(block.len());
            // The server may answer and close before the end: stop at the first error.
            let sent = if chunked {
                writer
                    .write_all(format!("{n:x}\r\n").as_bytes())
                    .and_then(|()| writer.write_all(&block[..n]))
                    .and_then(|()| writer.write_all(b"\r\n"))
            } else {
                writer.write_all(&block[..n])
            };
            if sent.is_err() {
                return;
            }
            left -= n;
        }
        if chunked {
            let _ = writer.write_all(b"0\r\n\r\n");
        }
    });
    // Read the answer's head, then its Content-Length of body.
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "the answer ended early ({other:?}): {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("the answer's body");
    drop(stream);
    let _ = sender.join();
    Reply {
        status,
        content_type: header("content-type").unwrap_or_default(),
        body,
    }
}

#[test]
fn malformed_http_is_a_4xx_with_a_json_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &format!("[ota]\nmax_artifact_bytes = {MAX_ARTIFACT}\nrollout_tick_ms = 100\n"),
    );
    let op = Some(TOKEN);
    let expect = |what: &str,
                  method: &str,
                  path: &str,
                  headers: &[(&str, &[u8])],
                  body: &[u8],
                  status: Option<u16>| {
        let r = send(&server, method, path, op, headers, body.to_vec());
        assert_json_error(what, &r, status);
    };

    // Bodies of `POST /api/v1/devices` (a JSON extractor).
    let devices = "/api/v1/devices";
    let long_id = format!(r#"{{"id":"{}"}}"#, "x".repeat(100_000));
    let deep = format!(r#"{{"id":"dev-x","tags":{}"#, "[".repeat(100_000));
    let text: (&str, &[u8]) = ("content-type", b"text/plain");
    let bodies: &[BodyCase] = &[
        ("malformed JSON", &[JSON], b"{not json", Some(400)),
        ("truncated JSON", &[JSON], b"{\"id\": \"dev-x\"", Some(400)),
        ("wrong content type", &[text], br#"{"id":"dev-x"}"#, None),
        ("no content type", &[], br#"{"id":"dev-x"}"#, None),
        ("empty body", &[JSON], b"", Some(400)),
        ("null", &[JSON], b"null", Some(400)),
        ("missing field", &[JSON], b"{}", Some(400)),
        (
            "unknown field",
            &[JSON],
            br#"{"id":"dev-x","admin":true}"#,
            Some(400),
        ),
        ("wrong type", &[JSON], br#"{"id":17}"#, Some(400)),
        (
            "tags not a map",
            &[JSON],
            br#"{"id":"dev-x","tags":[1,2]}"#,
            Some(400),
        ),
        (
            "invalid UTF-8",
            &[JSON],
            b"{\"id\":\"dev-\xff\xfe\"}",
            Some(400),
        ),
        (
            "NUL in the id",
            &[JSON],
            br#"{"id":"dev\u0000x"}"#,
            Some(400),
        ),
        (
            "a wildcard in the id",
            &[JSON],
            br##"{"id":"dev/#"}"##,
            Some(400),
        ),
        ("a 100 KB id", &[JSON], long_id.as_bytes(), Some(400)),
        (
            "100,000 levels of nesting",
            &[JSON],
            deep.as_bytes(),
            Some(400),
        ),
        (
            "a number beyond f64",
            &[JSON],
            br#"{"id":"dev-x","tags":{"k":1e999}}"#,
            Some(400),
        ),
    ];
    for (what, headers, body, status) in bodies {
        expect(what, "POST", devices, headers, body, *status);
    }
    assert_eq!(
        server.get("/api/v1/devices?state=unseen")["devices"],
        serde_json::json!([])
    );

    // A JSON body above the default 2 MB limit, streamed: refused before it is all read.
    let huge_json = raw_request(
        &server,
        &format!(
            "POST {devices} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}",
            8 * 1024 * 1024
        ),
        8 * 1024 * 1024,
        false,
    );
    assert_json_error("an 8 MB JSON body", &huge_json, None);
    assert_alive(&server, 1);

    // Absurd numbers in a silence: refused, or stored and served back.
    let silences = "/api/v1/silences";
    let silence = |extra: &str| {
        format!(
            r#"{{"matchers":[{{"name":"device","value":"d1","op":"="}}],"comment":"x",{extra}}}"#
        )
    };
    for (what, extra) in [
        (
            "duration u64::MAX",
            r#""duration_secs":18446744073709551615"#,
        ),
        (
            "duration beyond u64",
            r#""duration_secs":18446744073709551616"#,
        ),
        ("negative duration", r#""duration_secs":-5"#),
        ("fractional duration", r#""duration_secs":1.5"#),
        (
            "end before start",
            r#""starts_at_ms":9223372036854775807,"ends_at_ms":5"#,
        ),
        (
            "both end and duration",
            r#""ends_at_ms":5,"duration_secs":5"#,
        ),
    ] {
        expect(
            what,
            "POST",
            silences,
            &[JSON],
            silence(extra).as_bytes(),
            Some(400),
        );
    }
    let far = silence(r#""ends_at_ms":9223372036854775807"#);
    let r = send(&server, "POST", silences, op, &[JSON], far.into_bytes());
    assert_eq!(
        r.status,
        201,
        "a silence until i64::MAX is valid: {:?}",
        r.json()
    );
    let (status, list) = server.get_as(silences, READ_TOKEN);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list[0]["ends_at_ms"], i64::MAX);
    let bad_regex = |value: &str| {
        format!(
            r#"{{"matchers":[{{"name":"device","value":{value:?},"op":"=~"}}],"comment":"x","duration_secs":60}}"#
        )
    };
    expect(
        "a regex over the size limit",
        "POST",
        silences,
        &[JSON],
        bad_regex("(x{1000}){1000}").as_bytes(),
        Some(400),
    );
    expect(
        "an invalid regex",
        "POST",
        silences,
        &[JSON],
        bad_regex("(").as_bytes(),
        Some(400),
    );

    // Monitoring profiles: valid JSON, invalid content.
    let profile = tinyfleet_drift::sim::profile(2_000, 7);
    let path = format!(
        "/api/v1/models/{}/{}/profile",
        profile.model_id, profile.model_version
    );
    let put = |what: &str, p: &serde_json::Value, path: &str| {
        expect(
            what,
            "PUT",
            path,
            &[JSON],
            p.to_string().as_bytes(),
            Some(400),
        );
    };
    let good = serde_json::to_value(&profile).expect("profile JSON");
    let mut p = good.clone();
    p["features"][0]["hist"]["upper"][3] = serde_json::json!(-100.0);
    put("edges not increasing", &p, &path);
    let mut p = good.clone();
    p["features"][0]["hist"]["counts"][0] = serde_json::json!(1);
    put("counts not summing to n", &p, &path);
    let mut p = good.clone();
    p["calibration"][0] = serde_json::json!(1.5);
    put("a calibration above 1", &p, &path);
    let mut p = good.clone();
    p["features"] = serde_json::Value::Array(vec![good["features"][0].clone(); 65]);
    put("65 features", &p, &path);
    let mut p = good.clone();
    p["n"] = serde_json::json!(-1);
    put("a negative n", &p, &path);
    put(
        "the profile of another model version",
        &good,
        "/api/v1/models/sim/2/profile",
    );
    put(
        "not a profile",
        &serde_json::json!({"model_id": "sim"}),
        &path,
    );
    // Counts whose sum overflows u64 but saturates to n (was accepted, then overflowed the
    // drift engine's sums; found by the `profile_upload` fuzz target).
    let m = u64::MAX;
    let mut p = good.clone();
    p["n"] = serde_json::json!(m);
    for f in p["features"].as_array_mut().expect("features") {
        f["hist"] = serde_json::json!({"lo": 0.0, "upper": [1.0, 2.0], "counts": [m, 5],
                                       "underflow": 0, "overflow": 0, "nan": 0});
    }
    p["classes"] = serde_json::json!([m, 0, 0, 0]);
    let zeros = vec![0u64; 8];
    let mut first = zeros.clone();
    first[0] = m;
    p["confidence"] = serde_json::json!([first, zeros, zeros, zeros]);
    p["calibration_n"] = serde_json::json!(zeros);
    p["labelled"] = serde_json::json!(0);
    p["accuracy"] = serde_json::Value::Null;
    p["latency"] = serde_json::Value::Null;
    put("counts that overflow u64", &p, &path);
    let r = send(
        &server,
        "PUT",
        &path,
        op,
        &[JSON],
        good.to_string().into_bytes(),
    );
    assert_eq!(r.status, 204, "the valid profile is stored: {:?}", r.json());

    // Junk in paths, queries and headers.
    for (what, method, path, status) in [
        (
            "invalid UTF-8 in a path",
            "GET",
            "/api/v1/devices/%FF%FE",
            Some(400),
        ),
        (
            "a traversal in a path",
            "GET",
            "/api/v1/devices/..%2F..%2Fetc%2Fpasswd",
            Some(404),
        ),
        (
            "a NUL in a path",
            "GET",
            "/api/v1/devices/a%00b/windows",
            Some(404),
        ),
        (
            "the master key by traversal",
            "GET",
            "/ota/v1/objects/..%2Fmaster.key",
            Some(404),
        ),
        (
            "a short object digest",
            "GET",
            "/ota/v1/objects/abc",
            Some(404),
        ),
        (
            "a UI asset by traversal",
            "GET",
            "/ui/..%2F..%2FCargo.toml",
            Some(404),
        ),
        (
            "invalid UTF-8 in a model",
            "GET",
            "/api/v1/models/%FF/1/profile",
            Some(400),
        ),
        (
            "an unknown rollout",
            "POST",
            "/api/v1/rollouts/%00%01/pause",
            None,
        ),
        (
            "an unknown silence",
            "DELETE",
            "/api/v1/silences/%FF",
            Some(400),
        ),
        (
            "a limit that is not a number",
            "GET",
            "/api/v1/devices?limit=abc",
            Some(400),
        ),
        (
            "a limit beyond u64",
            "GET",
            "/api/v1/devices?limit=99999999999999999999999",
            Some(400),
        ),
        (
            "a since that is not an integer",
            "GET",
            "/api/v1/drift?since=1e99",
            Some(400),
        ),
        (
            "invalid UTF-8 in a query",
            "GET",
            "/api/v1/devices?state=%FF",
            Some(400),
        ),
        (
            "an unknown state",
            "GET",
            "/api/v1/alerts?state=%00",
            Some(400),
        ),
        (
            "a base that is not a digest",
            "GET",
            "/api/v1/models/kws/versions/1/offer?base=..%2F",
            Some(400),
        ),
        ("an unknown route", "GET", "/api/v1/nope", Some(404)),
        (
            "a method the route lacks",
            "DELETE",
            "/api/v1/devices",
            Some(405),
        ),
    ] {
        let r = send(&server, method, path, op, &[], vec![]);
        assert_json_error(what, &r, status);
    }
    let long_path = format!("/api/v1/devices/{}", "x".repeat(10_000));
    assert_json_error(
        "a 10 KB device id",
        &send(&server, "GET", &long_path, op, &[], vec![]),
        Some(404),
    );
    for (what, value) in [
        (
            "a 64 KB token",
            format!("Bearer {}", "x".repeat(64 * 1024)).into_bytes(),
        ),
        (
            "a token with non-ASCII bytes",
            b"Bearer \xff\xfe\xfd".to_vec(),
        ),
        ("another scheme", format!("Basic {TOKEN}").into_bytes()),
        ("no token", b"Bearer ".to_vec()),
    ] {
        let r = send(
            &server,
            "GET",
            "/api/v1/devices",
            None,
            &[("authorization", &value)],
            vec![],
        );
        assert_json_error(what, &r, Some(401));
    }

    // Model uploads: query junk, then bodies far above `ota.max_artifact_bytes`.
    let upload = "/api/v1/models/kws/versions/1";
    let small = vec![7u8; 1024];
    for (what, query) in [
        ("no seq", "?hw=nrf52840"),
        ("a negative seq", "?seq=-1&hw=nrf52840"),
        ("a seq beyond u32", "?seq=4294967296&hw=nrf52840"),
        ("an unknown parameter", "?seq=1&hw=nrf52840&sudo=1"),
    ] {
        let r = send(
            &server,
            "POST",
            &format!("{upload}{query}"),
            op,
            &[],
            small.clone(),
        );
        assert_json_error(what, &r, Some(400));
    }
    let declared = raw_request(
        &server,
        &format!(
            "POST {upload}?seq=1&hw=nrf52840 HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}",
            1u64 << 30
        ),
        16 * MAX_ARTIFACT,
        false,
    );
    assert_json_error("a 1 GiB upload (declared)", &declared, Some(413));
    let streamed = raw_request(
        &server,
        &format!(
            "POST {upload}?seq=1&hw=nrf52840 HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked"
        ),
        16 * MAX_ARTIFACT,
        true,
    );
    assert_json_error("a 1 MiB upload (chunked)", &streamed, Some(413));
    let versions = server.get("/api/v1/models/kws/versions");
    assert!(
        !versions.to_string().contains("model_version"),
        "nothing was registered: {versions}"
    );
    // An upload within the limit still works.
    let r = send(
        &server,
        "POST",
        &format!("{upload}?seq=1&hw=nrf52840"),
        op,
        &[],
        small,
    );
    assert_eq!(r.status, 201, "{:?}", r.json());
    let next = "/api/v1/models/kws/versions/2?seq=2&hw=nrf52840";
    let r = send(&server, "POST", next, op, &[], vec![8u8; 2048]);
    assert_eq!(r.status, 201, "{:?}", r.json());

    // Rollouts: junk bodies, and absurd but valid numbers (saturating arithmetic).
    let rollouts = "/api/v1/rollouts";
    expect(
        "a rollout that is not JSON",
        "POST",
        rollouts,
        &[JSON],
        b"\x00\x01",
        Some(400),
    );
    expect(
        "a rollout of nothing",
        "POST",
        rollouts,
        &[JSON],
        b"{}",
        Some(400),
    );
    let stages = |stages: &str| format!(r#"{{"model_id":"kws","version":"2","stages":{stages}}}"#);
    for (what, s) in [
        (
            "a share above 1",
            r#"[{"share":1e300,"soak_ms":0,"deadline_ms":1}]"#,
        ),
        (
            "a negative soak",
            r#"[{"share":1,"soak_ms":-1,"deadline_ms":1}]"#,
        ),
        ("no stages", "[]"),
        (
            "a soak beyond i64",
            r#"[{"share":1,"soak_ms":9223372036854775808,"deadline_ms":1}]"#,
        ),
    ] {
        expect(
            what,
            "POST",
            rollouts,
            &[JSON],
            stages(s).as_bytes(),
            Some(400),
        );
    }
    let r = send(
        &server,
        "POST",
        rollouts,
        op,
        &[JSON],
        stages(
            r#"[{"share":1,"min_devices":4294967295,"soak_ms":9223372036854775806,
                "deadline_ms":9223372036854775807}]"#,
        )
        .into_bytes(),
    );
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id = r.json()["id"].as_str().expect("rollout id").to_owned();
    // The rollout engine evaluates it at each tick (every 100 ms): wait for two more
    // evaluations, then it still reads.
    let status = |server: &Server| server.get(&format!("{rollouts}/{id}"));
    let first = status(&server)["gates"]["at_ms"].as_i64().unwrap_or(0);
    let mut seen = first;
    let mut ticks = 0;
    wait_for("two rollout ticks", WAIT, || {
        let at = status(&server)["gates"]["at_ms"].as_i64().unwrap_or(0);
        if at > seen {
            (seen, ticks) = (at, ticks + 1);
        }
        (ticks >= 2).then_some(())
    });
    let (code, rollout) = server.get_as(&format!("{rollouts}/{id}"), READ_TOKEN);
    assert_eq!(code, 200, "{rollout}");
    assert_eq!(rollout["state"], "running", "{rollout}");
    expect(
        "pause with a junk reason",
        "POST",
        &format!("{rollouts}/{id}/pause"),
        &[JSON],
        br#"{"reason":17}"#,
        Some(400),
    );

    assert_alive(&server, 2);
    server.stop();
}

/// `body` sealed by `device` with `key` for `kind` (any key: the right one or a forger's).
fn sealed_raw(device: &str, key: &DeviceKey, kind: Kind, body: &[u8]) -> (String, Vec<u8>) {
    let id = DeviceId::new(device).expect("device id");
    let topic = Topic::new(id, kind);
    let mut out = vec![0u8; body.len() + 64];
    let n = tinyfleet_device::cose::seal::<tinyfleet_device::cose::CoseError>(
        key,
        &[topic.as_bytes()],
        &mut out,
        |buf| {
            buf[..body.len()].copy_from_slice(body);
            Ok(body.len())
        },
    )
    .expect("seal");
    out.truncate(n);
    (topic.as_str().to_owned(), out)
}

fn cbor<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let n = wire::to_cbor(msg, &mut buf).expect("encode");
    buf.truncate(n);
    buf
}

/// Publishes QoS 1 messages over a connection of our own (with a packet limit above the
/// broker's, which the test harness's sessions do not have) and waits for the broker's
/// acknowledgements.
fn publish_raw(server: &Server, id: &str, password: &str, messages: &[(String, Vec<u8>)]) {
    let mut opts = MqttOptions::new(id, server.mqtt.ip().to_string(), server.mqtt.port());
    opts.set_credentials(id, password);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut connection) = Client::new(opts, 16);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            let failed = event.is_err();
            if tx.send(event.map_err(|e| e.to_string())).is_err() || failed {
                break;
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .expect("publish request");
    }
    let mut acked = 0;
    while acked < messages.len() {
        match rx.recv_timeout(WAIT) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{id}'s connection failed while publishing: {e}"),
            Err(_) => panic!("only {acked} of {} publishes acknowledged", messages.len()),
        }
    }
    let _ = client.disconnect();
}

#[test]
fn forged_garbage_and_stale_messages_are_refused_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), "");
    let mut a = server.provision("dev-a");
    let mut b = server.provision("dev-b");
    // Devices whose keys forge messages for dev-a and dev-b (their own keys, other topics).
    let mut forger_a = server.provision("dev-forger-a");
    forger_a.id = "dev-a".into();
    let mut forger_b = server.provision("dev-forger-b");
    forger_b.id = "dev-b".into();

    let mut valid = Vec::new();
    let mut session = a.connect(server.mqtt);
    session.publish_acked(&[a.hello(0)], true);
    let mut send_valid = |a: &mut support::SimDevice, session: &mut support::Session| {
        let s = a.next_summary();
        session.publish_acked(std::slice::from_ref(&s), false);
        valid.push(s);
    };

    send_valid(&mut a, &mut session);
    // A summary on dev-a's own topic under another key, and a hello forged for dev-b (which
    // never connected): both `forged`, and dev-b's presence does not change.
    session.publish_acked(&[forger_a.next_summary()], false);
    session.publish_acked(&[forger_b.hello(0)], true);
    send_valid(&mut a, &mut session);
    // Garbage bytes and an empty payload on a summary topic: `malformed`.
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 73 % 256) as u8).collect();
    session.publish_acked(
        &[
            ("tf/v1/dev-a/sum".into(), garbage),
            ("tf/v1/dev-a/sum".into(), Vec::new()),
        ],
        false,
    );
    // A message for a device nobody provisioned: `unknown_device`.
    let (_, own) = a.next_summary();
    session.publish_acked(&[("tf/v1/ghost-1/sum".into(), own)], false);
    send_valid(&mut a, &mut session);
    // dev-a's key over bodies that are not valid summaries: `bad_body` (a will's body on the
    // summary topic) and `out_of_range` (65 features).
    let will = cbor(&Will { boot: 1, seq: 77 });
    let too_wide = cbor(&Summary {
        boot: 1,
        seq: 78,
        profile: 3,
        t_end_ms: 1,
        span_ms: 1,
        unix_s: None,
        shape: Shape(65, 16, 10, 8, 8, false),
        counts: &[],
        moments: Vec::<f32>::new(),
        health: Health::default(),
    });
    session.publish_acked(
        &[
            sealed_raw("dev-a", &a.key, Kind::Summary, &will),
            sealed_raw("dev-a", &a.key, Kind::Summary, &too_wide),
        ],
        false,
    );
    send_valid(&mut a, &mut session);
    // A reboot (boot 2), then a summary replayed from boot 1: `stale_boot`.
    a.boot = 2;
    send_valid(&mut a, &mut session);
    a.boot = 1;
    let (topic, stale) = a.next_summary();
    session.publish_acked(&[(topic, stale)], false);
    a.boot = 2;
    send_valid(&mut a, &mut session);
    session.disconnect();

    // A payload just above the size limit (16 KiB, which the broker lets through with the
    // room it leaves for the topic), from dev-b over its own connection: `oversized`. Then a
    // valid summary of dev-b on the same connection.
    let oversized = vec![0xa5u8; 16 * 1024 + 64];
    let b_summary = b.next_summary();
    publish_raw(
        &server,
        &b.id,
        &b.password,
        &[("tf/v1/dev-b/sum".into(), oversized), b_summary],
    );

    let expected = [
        ("rejected.forged", 2),
        ("rejected.malformed", 2),
        ("rejected.unknown_device", 1),
        ("rejected.bad_body", 1),
        ("rejected.out_of_range", 1),
        ("rejected.stale_boot", 1),
        ("rejected.oversized", 1),
        ("accepted.summary", valid.len() as i64 + 1),
        ("accepted.hello", 1),
    ];
    wait_for("every refusal counted under its reason", WAIT, || {
        let counters = server.get("/api/v1/ingest");
        expected
            .iter()
            .all(|(name, n)| counters[*name] == *n)
            .then_some(())
    });
    let counters = server.get("/api/v1/ingest");
    for reason in ["bad_topic", "wrong_direction", "duplicate", "too_old"] {
        assert_eq!(
            counters[format!("rejected.{reason}")],
            0,
            "{reason}: {counters}"
        );
    }
    // Every valid summary is kept; none of the refused ones is.
    wait_for("dev-a's summaries stored", WAIT, || {
        (server.device_summaries("dev-a") == valid.len() as i64).then_some(())
    });
    wait_for("dev-b's summary stored", WAIT, || {
        (server.device_summaries("dev-b") == 1).then_some(())
    });
    assert_eq!(server.device_summaries("ghost-1"), 0);
    // The forged hello did not give dev-b a model or firmware.
    let b_state = server.get("/api/v1/devices/dev-b");
    assert!(b_state["state"]["model_id"].is_null(), "{b_state}");
    // The same counts in the Prometheus text.
    let metrics = send(&server, "GET", "/metrics", None, &[], vec![]);
    let text = String::from_utf8_lossy(&metrics.body);
    for (name, n) in expected.iter().filter(|(n, _)| n.starts_with("rejected.")) {
        let line = format!(
            "tinyfleet_ingest_rejected_total{{reason=\"{}\"}} {n}",
            name.trim_start_matches("rejected.")
        );
        assert!(text.contains(&line), "{line} not in /metrics");
    }
    assert!(text.contains(&format!(
        "tinyfleet_ingest_accepted_total{{kind=\"summary\"}} {}",
        valid.len() + 1
    )));
    server.stop();
}
