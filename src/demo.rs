//! `tinyfleet demo`: the whole product on one machine, with nothing to install.
//!
//! It starts `serve` in this process (embedded broker, ingest, monitor, OTA, API) on a fresh data
//! directory, and a simulated fleet of devices running the real device client and installer
//! over real MQTT, in three hardware cohorts, each with its own model build (`kws-nrf52840`,
//! `kws-stm32l4`, `kws-esp32s3`). After a while one feature of the `stm32l4` cohort shifts (a
//! new microphone batch, say), and its accuracy drops. The monitor raises `FeatureDrift` for
//! that cohort and feature and sends a retraining trigger; the demo's stand-in for a training
//! pipeline receives it, "retrains" (a new artifact and a monitoring profile fitted to what the
//! cohort now sees), and pushes the version. A continuous-delivery policy starts a staged
//! rollout; canaries are compared with the devices still on the old version, and the stages
//! open one after another until the whole cohort runs the new model and the drift alert
//! resolves. The narrative is printed as it happens.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tinyfleet_device::DeviceKey;
use tinyfleet_device::testkit::ReferenceProfile;
use tinyfleet_drift::profile::{BuildOptions, MonitoringProfile, build_profile};
use tinyfleet_sim::{Behaviour, DeviceSpec, Factory, SimEvent, WindowData};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::serve::{self, Ready};

/// The hardware cohorts, each with its own build of the model.
const COHORTS: [&str; 3] = ["nrf52840", "stm32l4", "esp32s3"];
/// The cohort whose inputs shift.
const DRIFTING: &str = "stm32l4";
/// The feature that shifts (index into f0..f7).
const SHIFTED_FEATURE: usize = 3;
const SHIFT: f32 = 1.0;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    /// Where the API (and the dashboard) listens; another free port is taken if it is busy.
    pub api: SocketAddr,
    pub data_dir: Option<PathBuf>,
    /// Summaries sent by each device before the drift starts.
    pub drift_after: u64,
    /// Stop once the retrained model has reached the whole cohort (for scripts and tests).
    pub exit_when_done: bool,
    /// Give up after this long (with `exit_when_done`).
    pub timeout: Duration,
}

fn model_id(hw: &str) -> String {
    format!("kws-{hw}")
}

/// A model artifact: `len` bytes of "weights" from `seed`.
fn artifact(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// `base` after retraining: every weight nudged a little, one layer replaced.
fn retrained(base: &[u8]) -> Vec<u8> {
    base.iter()
        .enumerate()
        .map(|(i, &b)| {
            if (6_000..9_000).contains(&i) {
                (i as u8).wrapping_mul(13) ^ 0x5a
            } else {
                b.wrapping_add((i % 3) as u8)
            }
        })
        .collect()
}

/// A monitoring profile fitted to `data`, and the device-side edges it implies.
fn profile(
    model: &str,
    version: &str,
    data: &WindowData,
) -> Result<(MonitoringProfile, Arc<ReferenceProfile>), String> {
    let csv = tinyfleet_sim::reference_csv(data, 8_000, 42);
    let opts = BuildOptions {
        model_id: model.to_owned(),
        model_version: version.to_owned(),
        ..BuildOptions::default()
    };
    let p = build_profile(csv.as_bytes(), &opts).map_err(|e| format!("profile: {e}"))?;
    let edges = device_profile(&p)?;
    Ok((p, Arc::new(edges)))
}

/// The edges a device build (8 features of 16 bins, 8 latency bins) is flashed with for a
/// monitoring profile; the reference latency edges when the profile has none.
pub(crate) fn device_profile(p: &MonitoringProfile) -> Result<ReferenceProfile, String> {
    let features = p
        .feature_edges::<8, 16>()
        .map_err(|e| format!("profile {}@{}: {e}", p.model_id, p.model_version))?;
    let latency = match p.latency_edges::<8>() {
        Ok(l) => l,
        Err(_) => ReferenceProfile::default().latency,
    };
    Ok(ReferenceProfile { features, latency })
}

/// The data a device of `hw` sees in its `window`-th summary on `version`.
fn window_data(hw: &str, version: &str, window: u64, drift_after: u64) -> WindowData {
    let mut data = WindowData::default();
    if hw == DRIFTING && window >= drift_after {
        data.shift[SHIFTED_FEATURE] = SHIFT;
        // The old model has not seen inputs like these; the retrained one has.
        data.accuracy = if version == "1.0" { 0.78 } else { 0.9 };
    }
    data
}

/// The shifted data a retraining job would fit the new version to.
fn shifted() -> WindowData {
    let mut data = WindowData::default();
    data.shift[SHIFTED_FEATURE] = SHIFT;
    data
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, String> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("API: {e}"))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| format!("API: {e}"))?;
        if !status.is_success() {
            return Err(format!("API answered {status}: {body}"));
        }
        Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn put_json(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    async fn push(
        &self,
        model: &str,
        version: &str,
        seq: u32,
        hw: &str,
        bytes: Vec<u8>,
    ) -> Result<Value, String> {
        let url = format!(
            "{}/api/v1/models/{model}/versions/{version}?seq={seq}&hw={hw}",
            self.base
        );
        self.send(self.http.post(url).body(bytes)).await
    }

    async fn put_profile(&self, p: &MonitoringProfile) -> Result<Value, String> {
        let body = serde_json::to_value(p).map_err(|e| e.to_string())?;
        self.put_json(
            &format!("/api/v1/models/{}/{}/profile", p.model_id, p.model_version),
            &body,
        )
        .await
    }
}

/// A stopwatch for the narrative.
struct Narrator {
    started: Instant,
}

impl Narrator {
    fn say(&self, text: impl AsRef<str>) {
        let s = self.started.elapsed().as_secs();
        println!("[{:02}:{:02}] {}", s / 60, s % 60, text.as_ref());
    }
}

pub fn run(opts: DemoOptions) -> Result<(), String> {
    if opts.devices < 3 {
        return Err("--devices must be at least 3 (one per hardware cohort)".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(demo(opts))
}

async fn demo(opts: DemoOptions) -> Result<(), String> {
    let say = Narrator {
        started: Instant::now(),
    };
    let data_dir = match &opts.data_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tinyfleet-demo-{}", std::process::id())),
    };
    if data_dir.exists() {
        return Err(format!(
            "{} exists; the demo starts from an empty data directory",
            data_dir.display()
        ));
    }
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let token = {
        let mut b = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
        hex::encode(b)
    };

    // The retraining pipeline's stand-in: a webhook receiver.
    let (retrain_tx, mut retrain_rx) = mpsc::unbounded_channel::<Value>();
    let retrain_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen for retraining triggers: {e}"))?;
    let retrain_addr = retrain_listener.local_addr().map_err(|e| e.to_string())?;
    let app = axum::Router::new().route(
        "/retrain",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = retrain_tx.clone();
            async move {
                let _ = tx.send(body);
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(retrain_listener, app).await;
    });

    let api_listen = match std::net::TcpListener::bind(opts.api) {
        Ok(l) => {
            drop(l);
            opts.api
        }
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let config_text = format!(
        r#"data_dir = {data_dir:?}
[broker]
listen = "127.0.0.1:0"
[ingest]
window_secs = 10
checkpoint_ms = 200
offline_after_secs = 60
[api]
listen = "{api_listen}"
[[api.tokens]]
name = "demo"
token = "{token}"
role = "operator"
[monitor]
grace_secs = 0
tick_ms = 500
[ota]
rollout_tick_ms = 1000
[alerts]
[[alerts.receivers]]
name = "training-pipeline"
kind = {{ type = "retrain_webhook", url = "http://{retrain_addr}/retrain" }}
"#
    );
    let mut config: Config =
        toml::from_str(&config_text).map_err(|e| format!("demo config: {e}"))?;
    config.resolve();
    config.validate()?;

    // The fleet's identities, provisioned before the server starts.
    let mut devices = Vec::with_capacity(opts.devices);
    {
        let store = tinyfleet_store::Store::open(&data_dir).map_err(|e| e.to_string())?;
        for i in 0..opts.devices {
            let hw = COHORTS[i % COHORTS.len()];
            let id = format!("dev-{i:05}");
            let tags = BTreeMap::from([("site".to_owned(), format!("site-{}", i % 4))]);
            let creds = store
                .registry()
                .provision(&id, tags)
                .map_err(|e| e.to_string())?;
            let key: [u8; 32] = hex::decode(&creds.mac_key)
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or("provisioning returned a bad key")?;
            devices.push((id, hw, creds.mqtt_password.clone(), DeviceKey(key)));
        }
    }

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel::<Ready>();
    let server = tokio::spawn(serve::serve_with(
        config,
        async move {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    let ready = match ready_rx.await {
        Ok(r) => r,
        Err(_) => {
            return match server.await {
                Ok(Err(e)) => Err(e),
                _ => Err("the server stopped before it was ready".into()),
            };
        }
    };
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{}", ready.api),
        token: token.clone(),
    };
    println!();
    say.say(format!(
        "tinyfleet is serving: MQTT on {}, API on {} (token: {token})",
        ready.mqtt, api.base
    ));
    say.say(format!(
        "  dashboard: open {}/ in a browser and sign in with the token above",
        api.base
    ));
    say.say(format!(
        "  API: curl -H 'Authorization: Bearer {token}' {}/api/v1/rollouts",
        api.base
    ));
    say.say(format!("  data: {}", data_dir.display()));

    // Version 1.0 of each build, its monitoring profile, and a continuous-delivery policy.
    let mut images: HashMap<String, Vec<u8>> = HashMap::new();
    let edges: Arc<Mutex<HashMap<String, Arc<ReferenceProfile>>>> = Arc::default();
    for (n, hw) in COHORTS.iter().enumerate() {
        let model = model_id(hw);
        let image = artifact(n as u32 + 1, 24_000);
        api.push(&model, "1.0", 1, hw, image.clone()).await?;
        let (p, e) = profile(&model, "1.0", &WindowData::default())?;
        api.put_profile(&p).await?;
        edges.lock().map_err(|_| "lock")?.insert(model.clone(), e);
        api.put_json(
            &format!("/api/v1/models/{model}/policy"),
            &json!({
                "stages": [
                    { "share": 0.01, "min_devices": 10, "soak_ms": 20_000, "deadline_ms": 600_000 },
                    { "share": 0.10, "min_devices": 0, "soak_ms": 10_000, "deadline_ms": 600_000 },
                    { "share": 0.50, "min_devices": 0, "soak_ms": 10_000, "deadline_ms": 600_000 },
                    { "share": 1.00, "min_devices": 0, "soak_ms": 5_000, "deadline_ms": 600_000 }
                ],
                "install": { "min_done": 5 },
                "quality": {
                    "min_canary_devices": 5, "min_control_devices": 5,
                    "min_windows": 2, "min_labelled": 300
                },
                "offers_per_minute": 6000
            }),
        )
        .await?;
        images.insert((*hw).to_owned(), image);
    }
    say.say(format!(
        "Registered kws 1.0 for {} (signed, content-addressed), with monitoring profiles and \
         a continuous-delivery policy: 1% (at least 10 devices) -> 10% -> 50% -> 100%.",
        COHORTS.join(", ")
    ));

    // The fleet.
    let (trusted_kid, trusted_public) = {
        let keys = api.get("/api/v1/ota/keys").await?;
        let kid = keys[0]["kid"].as_str().and_then(|k| hex::decode(k).ok());
        let public = keys[0]["public_key"]
            .as_str()
            .and_then(|k| hex::decode(k).ok())
            .and_then(|k| <[u8; 32]>::try_from(k).ok());
        match (kid, public) {
            (Some(k), Some(p)) => (k, p),
            _ => return Err("the API did not return the signing key".into()),
        }
    };
    let (sim_stop_tx, sim_stop) = watch::channel(false);
    let (events_tx, mut events) = mpsc::unbounded_channel::<SimEvent>();
    let drift_after = opts.drift_after;
    for (n, (id, hw, password, key)) in devices.into_iter().enumerate() {
        let model = model_id(hw);
        let profiles = edges.clone();
        let behaviour = Behaviour {
            summary_interval: Duration::from_secs(5),
            inferences: 100,
            labelled: 20,
            stream: Arc::new(move |ctx| {
                window_data(ctx.hw, ctx.model_version, ctx.window, drift_after)
            }),
            profile: Arc::new(move |version| {
                let key = if version == "1.0" {
                    model.clone()
                } else {
                    format!("{model}@{version}")
                };
                let map = profiles.lock().unwrap_or_else(|e| e.into_inner());
                map.get(&key)
                    .or_else(|| map.get(&model))
                    .cloned()
                    .unwrap_or_default()
            }),
            ..Behaviour::default()
        };
        let spec = DeviceSpec {
            id,
            password,
            mac_key: key,
            hw: hw.to_owned(),
            fw: 10,
            arena: 64 * 1024,
            model_id: model_id(hw),
            factory: Factory {
                model_version: "1.0".into(),
                model_seq: 1,
                image: Arc::new(images.get(hw).cloned().unwrap_or_default()),
            },
            slot_size: 32 * 1024,
            trusted: vec![(trusted_kid.clone(), trusted_public)],
            broker_host: ready.mqtt.ip().to_string(),
            broker_port: ready.mqtt.port(),
            seed: n as u64 + 1,
            behaviour,
        };
        tokio::spawn(tinyfleet_sim::run(
            spec,
            Some(events_tx.clone()),
            sim_stop.clone(),
        ));
        // Stagger connections a little, as a real fleet's would be.
        if n % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(events_tx);
    say.say(format!(
        "Started {} simulated devices (the real device client and installer on a simulated \
         flash, each on its own MQTT connection); each sends a summary every 5 s. The {DRIFTING} \
         cohort's f{SHIFTED_FEATURE} shifts by +{SHIFT} sd after {drift_after} summaries.",
        opts.devices
    ));

    let outcome = narrate(
        &say,
        &api,
        &mut retrain_rx,
        &mut events,
        &edges,
        &images,
        &opts,
    )
    .await;
    let _ = sim_stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(());
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(format!("server task: {e}")),
    }
    outcome
}

/// Follows the story through the API until the retrained model reached its whole cohort (or
/// Ctrl-C, or the timeout with `exit_when_done`).
async fn narrate(
    say: &Narrator,
    api: &Api,
    retrain_rx: &mut mpsc::UnboundedReceiver<Value>,
    events: &mut mpsc::UnboundedReceiver<SimEvent>,
    edges: &Arc<Mutex<HashMap<String, Arc<ReferenceProfile>>>>,
    images: &HashMap<String, Vec<u8>>,
    opts: &DemoOptions,
) -> Result<(), String> {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut seen_alerts = BTreeSet::new();
    let mut resolved_alerts = BTreeSet::new();
    let mut retrained_models = BTreeSet::new();
    let mut rollout_seen: HashMap<String, (String, u64, u64)> = HashMap::new();
    let mut online_reported = false;
    let mut errors = 0u64;
    let mut done = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                say.say("Interrupted; stopping the fleet and the server.");
                return Ok(());
            }
            Some(trigger) = retrain_rx.recv() => {
                let model = trigger["model"]["id"].as_str().unwrap_or("").to_owned();
                let cohort = trigger["cohort"].as_str().unwrap_or("");
                let reason = trigger["reason"].as_str().unwrap_or("");
                if retrained_models.insert(model.clone()) {
                    say.say(format!(
                        "Retraining trigger received for {model} (cohort {cohort}: {reason}); \
                         its payload carries the drifted histograms and importance weights, no \
                         raw data. (One trigger per drifting cohort: tag cohorts send theirs \
                         too.)"
                    ));
                    let hw = model.trim_start_matches("kws-");
                    let base = images.get(hw).ok_or("unknown model in the trigger")?;
                    let (p, e) = profile(&model, "1.1", &shifted())?;
                    edges
                        .lock()
                        .map_err(|_| "lock")?
                        .insert(format!("{model}@1.1"), e);
                    api.put_profile(&p).await?;
                    let pushed = api.push(&model, "1.1", 2, hw, retrained(base)).await?;
                    say.say(format!(
                        "Retrained {model} 1.1 pushed (seq 2) with a profile fitted to the new \
                         inputs; the policy started rollout {}.",
                        pushed["rollout"].as_str().unwrap_or("(none)")
                    ));
                }
            }
            Some(e) = events.recv() => {
                if let tinyfleet_sim::SimEventKind::Error(err) = &e.kind {
                    errors += 1;
                    if errors <= 3 {
                        say.say(format!("device {} stopped: {err}", e.device));
                    }
                }
            }
            _ = tick.tick() => {
                if !online_reported {
                    let ingest = api.get("/api/v1/ingest").await?;
                    let hellos = ingest["accepted.hello"].as_u64().unwrap_or(0);
                    if hellos >= opts.devices as u64 {
                        say.say(format!(
                            "All {hellos} devices said hello (authenticated, verified by ingest); \
                             summaries are arriving."
                        ));
                        online_reported = true;
                    }
                }
                let alerts = api.get("/api/v1/alerts").await?;
                let alerts = alerts.as_array().cloned().unwrap_or_default();
                let label = |a: &Value, k: &str| a["labels"][k].as_str().unwrap_or("").to_owned();
                // The story follows model-level findings; the same finding on the model's
                // hardware and tag cohorts is mentioned, not repeated.
                for a in &alerts {
                    let scope = label(a, "scope");
                    if scope.is_empty() || scope.contains('/') {
                        continue;
                    }
                    let (name, feature) = (label(a, "alertname"), label(a, "feature"));
                    let key = format!(
                        "{name} on {scope}{}",
                        if feature.is_empty() { String::new() } else { format!(", feature {feature}") }
                    );
                    let also = alerts
                        .iter()
                        .filter(|b| {
                            label(b, "alertname") == name
                                && label(b, "feature") == feature
                                && label(b, "scope").starts_with(&format!("{scope}/"))
                                && b["state"] == a["state"]
                        })
                        .count();
                    match a["state"].as_str() {
                        Some("firing") if seen_alerts.insert(key.clone()) => {
                            let extra = if also > 0 {
                                format!(" (and on {also} of its hardware and tag cohorts)")
                            } else {
                                String::new()
                            };
                            say.say(format!("ALERT firing: {key}{extra}"));
                        }
                        Some("resolved") if seen_alerts.contains(&key) && resolved_alerts.insert(key.clone()) => {
                            say.say(format!("Alert resolved: {key}"));
                        }
                        _ => {}
                    }
                }
                let rollouts = api.get("/api/v1/rollouts").await?;
                for r in rollouts.as_array().into_iter().flatten() {
                    let id = r["id"].as_str().unwrap_or("").to_owned();
                    let state = r["state"].as_str().unwrap_or("").to_owned();
                    let stage = r["stage"].as_u64().unwrap_or(0);
                    let confirmed = r["totals"]["confirmed"].as_u64().unwrap_or(0);
                    let now = (state.clone(), stage, confirmed);
                    if rollout_seen.get(&id) != Some(&now) {
                        let targeted = r["totals"]["targeted"].as_u64().unwrap_or(0);
                        let stages = r["stages"].as_array().map_or(0, |s| s.len());
                        say.say(format!(
                            "Rollout {id}: {state}, stage {}/{stages}, {confirmed} of {targeted} devices confirmed{}",
                            stage + 1,
                            r["holding"].as_str().map(|h| format!(" (holding: {h})")).unwrap_or_default()
                        ));
                        rollout_seen.insert(id.clone(), now);
                    }
                    if state == "completed" && !done {
                        done = true;
                        say.say(format!(
                            "The retrained model reached the whole cohort. Browse {}/api/v1/rollouts/{id}/audit for every transition and its gate values.",
                            api.base
                        ));
                    }
                    if matches!(state.as_str(), "aborted" | "rolling_back") && opts.exit_when_done {
                        return Err(format!("rollout {id} was aborted: {r}"));
                    }
                }
                if done && opts.exit_when_done {
                    return Ok(());
                }
                if opts.exit_when_done && started.elapsed() > opts.timeout {
                    return Err(format!(
                        "the demo did not finish within {:?} (alerts seen: {seen_alerts:?})",
                        opts.timeout
                    ));
                }
            }
        }
    }
}
