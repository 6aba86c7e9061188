//! `tinyfleet simulate`: simulated devices against any deployment, through its API (to
//! provision devices and fetch the factory model and its profile) and its MQTT broker.
//!
//! Each device runs the real device client (monitor, encoder, authenticator) and the real OTA
//! installer on a simulated flash (`tinyfleet-sim`). A scenario applies to one hardware cohort
//! from a given time on, with a known ground truth, so a deployment's detectors and rollout
//! gates can be checked against it; with `--scenario none` it is a load generator.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;
use tinyfleet_device::DeviceKey;
use tinyfleet_device::testkit::ReferenceProfile;
use tinyfleet_drift::profile::MonitoringProfile;
use tinyfleet_sim::{Behaviour, DeviceSpec, Factory, SimEvent, SimEventKind, WindowData};
use tokio::sync::{mpsc, watch};

use crate::demo::device_profile;
use crate::devices::{ApiArgs, call, url_segment};

/// What goes wrong in the scenario's cohort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Nothing: a healthy fleet (a load generator).
    None,
    /// Covariate shift: `--feature` moves by `--magnitude` standard deviations.
    CovariateShift,
    /// Prior shift: class 0 becomes `--magnitude` (0-1) of the inferences.
    PriorShift,
    /// Concept drift: labels disagree with confident predictions (probability `--magnitude`);
    /// inputs and confidences do not change.
    ConceptDrift,
    /// A broken sensor: `--feature` reads a constant.
    BrokenSensor,
    /// A bad model version (`--bad-version`): installs fine, accuracy 0.9 -> 0.65.
    BadModel,
    /// The cohort's self-test fails on `--bad-version` (it reverts).
    InstallFail,
    /// A third of the cohort drops off the network for two minutes.
    Offline,
    /// The cohort loses power once during its first install.
    PowerLoss,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The MQTT broker devices connect to.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt: String,
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Device ids are `{prefix}-{n}`.
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Hardware cohorts, assigned round robin.
    #[arg(long, value_delimiter = ',', default_value = "nrf52840")]
    pub hw: Vec<String>,
    /// The factory model; `{hw}` is replaced by the device's hardware (one build per MCU).
    #[arg(long, default_value = "kws")]
    pub model: String,
    /// The factory model version (registered: its artifact is the devices' factory image).
    #[arg(long, default_value = "1.0")]
    pub version: String,
    #[arg(long, value_enum, default_value_t = Scenario::None)]
    pub scenario: Scenario,
    /// The hardware cohort the scenario hits (default: the first of --hw).
    #[arg(long)]
    pub cohort: Option<String>,
    /// Feature index (0-7) for covariate-shift and broken-sensor.
    #[arg(long, default_value_t = 3)]
    pub feature: usize,
    /// Size of the change (see each scenario).
    #[arg(long, default_value_t = 1.0)]
    pub magnitude: f64,
    /// The scenario starts this long after the devices do.
    #[arg(long, default_value_t = 60)]
    pub after_secs: u64,
    /// The version bad-model and install-fail apply to.
    #[arg(long, default_value = "2.0")]
    pub bad_version: String,
    /// One summary per device per interval.
    #[arg(long, default_value_t = 10_000)]
    pub interval_ms: u64,
    #[arg(long, default_value_t = 100)]
    pub inferences: usize,
    /// Labelled inferences per summary.
    #[arg(long, default_value_t = 0)]
    pub labelled: usize,
    /// Stop after this long (0: at Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub duration_secs: u64,
    /// Credentials of earlier runs (created when missing): devices are provisioned once and
    /// reused.
    #[arg(long)]
    pub credentials: Option<PathBuf>,
}

fn model_of(template: &str, hw: &str) -> String {
    template.replace("{hw}", hw)
}

/// What the scenario does to a window of one device.
fn window_data(
    scenario: Scenario,
    affected: bool,
    started: bool,
    feature: usize,
    magnitude: f64,
    version: &str,
    bad_version: &str,
) -> WindowData {
    let mut data = WindowData::default();
    if scenario == Scenario::BadModel && version == bad_version && affected {
        data.accuracy = 0.65;
    }
    if !(affected && started) {
        return data;
    }
    match scenario {
        Scenario::CovariateShift => {
            if let Some(s) = data.shift.get_mut(feature) {
                *s = magnitude as f32;
            }
        }
        Scenario::PriorShift => data.prior = Some((0, magnitude.clamp(0.0, 1.0))),
        Scenario::ConceptDrift => data.concept_flip = magnitude.clamp(0.0, 1.0),
        Scenario::BrokenSensor => data.stuck = Some((feature, 0.0)),
        _ => {}
    }
    data
}

/// A device's credentials.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Creds {
    password: String,
    mac_key: String,
    hw: String,
}

fn provision(
    args: &SimulateArgs,
    http: &reqwest::blocking::Client,
) -> Result<BTreeMap<String, Creds>, String> {
    let base = args.api.api.trim_end_matches('/');
    let mut creds: BTreeMap<String, Creds> = match &args.credentials {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        _ => BTreeMap::new(),
    };
    let mut added = 0;
    for n in 0..args.devices {
        let id = format!("{}-{n:05}", args.prefix);
        let hw = &args.hw[n % args.hw.len()];
        if creds.contains_key(&id) {
            continue;
        }
        let answer = call(
            http.post(format!("{base}/api/v1/devices")).json(&json!({
                "id": id,
                "tags": { "simulated": "true", "hw": hw },
            })),
            &args.api.token,
        )
        .map_err(|e| format!("provisioning {id}: {e} (use another --prefix, or --credentials)"))?;
        let field = |k: &str| {
            answer[k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("provisioning {id}: no {k} in the answer"))
        };
        let c = Creds {
            password: field("mqtt_password")?,
            mac_key: field("mac_key")?,
            hw: hw.clone(),
        };
        creds.insert(id, c);
        added += 1;
    }
    if let Some(path) = &args.credentials {
        let text = serde_json::to_string_pretty(&creds).map_err(|e| e.to_string())?;
        write_private(path, &text)?;
    }
    eprintln!(
        "provisioned {added} devices, reusing {}",
        args.devices - added
    );
    Ok(creds)
}

/// Writes `text` readable by the owner only (it holds device secrets).
fn write_private(path: &std::path::Path, text: &str) -> Result<(), String> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The factory image and the edges of `model@version`, from the API.
fn factory(
    args: &SimulateArgs,
    http: &reqwest::blocking::Client,
    model: &str,
) -> Result<(Factory, Arc<ReferenceProfile>), String> {
    let base = args.api.api.trim_end_matches('/');
    let versions = call(
        http.get(format!(
            "{base}/api/v1/models/{}/versions",
            url_segment(model)?
        )),
        &args.api.token,
    )?;
    let v = versions
        .as_array()
        .and_then(|vs| {
            vs.iter()
                .find(|v| v["model_version"] == args.version.as_str())
        })
        .ok_or_else(|| format!("{model}@{} is not registered", args.version))?;
    let sha = v["sha256"].as_str().ok_or("no sha256 in the version")?;
    let seq = v["seq"].as_u64().ok_or("no seq in the version")? as u32;
    let image = http
        .get(format!("{base}/ota/v1/objects/{sha}"))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.bytes())
        .map_err(|e| format!("cannot download {model}@{}: {e}", args.version))?;
    let profile = http
        .get(format!(
            "{base}/api/v1/models/{}/{}/profile",
            url_segment(model)?,
            url_segment(&args.version)?
        ))
        .bearer_auth(&args.api.token)
        .send()
        .ok()
        .filter(|r| r.status().is_success())
        .and_then(|r| r.json::<MonitoringProfile>().ok());
    let edges = match profile {
        Some(p) => device_profile(&p)?,
        None => {
            eprintln!(
                "{model}@{} has no monitoring profile; devices bin with the reference edges",
                args.version
            );
            ReferenceProfile::default()
        }
    };
    Ok((
        Factory {
            model_version: args.version.clone(),
            model_seq: seq,
            image: Arc::new(image.to_vec()),
        },
        Arc::new(edges),
    ))
}

pub fn run(args: SimulateArgs) -> Result<(), String> {
    if args.devices == 0 || args.hw.is_empty() {
        return Err("--devices and --hw must not be empty".into());
    }
    if args.feature > 7 {
        return Err("--feature must be 0-7".into());
    }
    let (host, port) = args
        .mqtt
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("--mqtt {:?}: expected host:port", args.mqtt))?;
    let http = reqwest::blocking::Client::new();
    let creds = provision(&args, &http)?;
    let keys = call(
        http.get(format!(
            "{}/api/v1/ota/keys",
            args.api.api.trim_end_matches('/')
        )),
        &args.api.token,
    )?;
    let trusted: Vec<(Vec<u8>, [u8; 32])> = keys
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| {
            let kid = hex::decode(k["kid"].as_str()?).ok()?;
            let public = hex::decode(k["public_key"].as_str()?)
                .ok()?
                .try_into()
                .ok()?;
            Some((kid, public))
        })
        .collect();
    let mut factories = BTreeMap::new();
    for hw in &args.hw {
        let model = model_of(&args.model, hw);
        factories.insert(hw.clone(), (model.clone(), factory(&args, &http, &model)?));
    }
    let cohort = args.cohort.clone().unwrap_or_else(|| args.hw[0].clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(simulate(
        args, host, port, creds, trusted, factories, cohort,
    ))
}

#[allow(clippy::too_many_arguments)]
async fn simulate(
    args: SimulateArgs,
    host: String,
    port: u16,
    creds: BTreeMap<String, Creds>,
    trusted: Vec<(Vec<u8>, [u8; 32])>,
    factories: BTreeMap<String, (String, (Factory, Arc<ReferenceProfile>))>,
    cohort: String,
) -> Result<(), String> {
    let start = Instant::now();
    let scenario_at = start + Duration::from_secs(args.after_secs);
    let (stop_tx, stop) = watch::channel(false);
    let (events_tx, mut events) = mpsc::unbounded_channel::<SimEvent>();
    for (n, (id, c)) in creds.iter().take(args.devices).enumerate() {
        let Some((model, (factory, edges))) = factories.get(&c.hw) else {
            continue;
        };
        let key: [u8; 32] = hex::decode(&c.mac_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| format!("{id}: bad mac_key in the credentials"))?;
        let affected = c.hw == cohort;
        let (scenario, feature, magnitude) = (args.scenario, args.feature, args.magnitude);
        let bad = args.bad_version.clone();
        let bad_for_test = args.bad_version.clone();
        let edges = edges.clone();
        let behaviour = Behaviour {
            summary_interval: Duration::from_millis(args.interval_ms.max(100)),
            inferences: args.inferences,
            labelled: args.labelled,
            stream: Arc::new(move |ctx| {
                let started = Instant::now() >= scenario_at;
                window_data(
                    scenario,
                    affected,
                    started,
                    feature,
                    magnitude,
                    ctx.model_version,
                    &bad,
                )
            }),
            self_test: Arc::new(move |_, version| {
                !(scenario == Scenario::InstallFail && affected && version == bad_for_test)
            }),
            // A version the simulator has no profile for bins with the factory's edges.
            profile: Arc::new(move |_| edges.clone()),
            power_loss_in_install: scenario == Scenario::PowerLoss && affected,
            offline: (scenario == Scenario::Offline && affected && n % 3 == 0).then(|| {
                let from = Duration::from_secs(args.after_secs);
                (from, from + Duration::from_secs(120))
            }),
        };
        let spec = DeviceSpec {
            id: id.clone(),
            password: c.password.clone(),
            mac_key: DeviceKey(key),
            hw: c.hw.clone(),
            fw: 10,
            arena: 256 * 1024,
            model_id: model.clone(),
            factory: factory.clone(),
            slot_size: (factory.image.len() as u32 * 2).max(64 * 1024),
            trusted: trusted.clone(),
            broker_host: host.clone(),
            broker_port: port,
            seed: n as u64 + 1,
            behaviour,
        };
        tokio::spawn(tinyfleet_sim::run(
            spec,
            Some(events_tx.clone()),
            stop.clone(),
        ));
        if n % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(events_tx);
    eprintln!(
        "{} devices running against {host}:{port}; scenario {:?} on {cohort} after {} s",
        args.devices, args.scenario, args.after_secs
    );

    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut report = tokio::time::interval(Duration::from_secs(10));
    report.tick().await;
    let deadline =
        (args.duration_secs > 0).then(|| start + Duration::from_secs(args.duration_secs));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            e = events.recv() => {
                let Some(e) = e else { break };
                let name = match &e.kind {
                    SimEventKind::Online { .. } => "hellos",
                    SimEventKind::Summary { .. } => "summaries",
                    SimEventKind::Offer { .. } => "offers",
                    SimEventKind::Progress(r) => match r.state {
                        5 => "confirmed",
                        6 => "failed",
                        7 => "reverted",
                        8 => "rejected",
                        _ => "progress reports",
                    },
                    SimEventKind::PowerLost => "power losses",
                    SimEventKind::Offline => "went offline",
                    SimEventKind::Error(err) => {
                        eprintln!("{}: {err}", e.device);
                        "device errors"
                    }
                };
                *counts.entry(name).or_default() += 1;
            }
            _ = report.tick() => {
                let secs = start.elapsed().as_secs_f64();
                let sent = counts.get("summaries").copied().unwrap_or(0);
                eprintln!("[{secs:5.0} s] {} ({:.0} summaries/s)", summary(&counts), sent as f64 / secs);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            _ = &mut ctrl_c => break,
        }
    }
    let _ = stop_tx.send(true);
    // Let the devices disconnect cleanly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let secs = start.elapsed().as_secs_f64();
    let out = json!({
        "devices": args.devices,
        "seconds": secs,
        "counts": counts,
        "summaries_per_second": counts.get("summaries").copied().unwrap_or(0) as f64 / secs,
    });
    if args.api.json {
        println!("{out}");
    } else {
        println!("{}", summary(&counts));
    }
    let failed = counts.get("device errors").copied().unwrap_or(0);
    if failed > 0 {
        return Err(format!("{failed} simulated devices failed (see above)"));
    }
    Ok(())
}

fn summary(counts: &BTreeMap<&'static str, u64>) -> String {
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    if parts.is_empty() {
        "nothing yet".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_touch_only_their_cohort_and_only_after_they_start() {
        let at = |scenario, affected, started| {
            window_data(scenario, affected, started, 3, 1.0, "1.0", "2.0")
        };
        assert_eq!(
            at(Scenario::CovariateShift, false, true),
            WindowData::default()
        );
        assert_eq!(
            at(Scenario::CovariateShift, true, false),
            WindowData::default()
        );
        assert_eq!(at(Scenario::CovariateShift, true, true).shift[3], 1.0);
        assert_eq!(at(Scenario::BrokenSensor, true, true).stuck, Some((3, 0.0)));
        assert_eq!(at(Scenario::PriorShift, true, true).prior, Some((0, 1.0)));
        assert_eq!(at(Scenario::ConceptDrift, true, true).concept_flip, 1.0);
        // A bad model is bad whenever it runs, on the cohort it was built for.
        let bad = window_data(Scenario::BadModel, true, false, 3, 1.0, "2.0", "2.0");
        assert_eq!(bad.accuracy, 0.65);
        assert_eq!(model_of("kws-{hw}", "stm32l4"), "kws-stm32l4");
    }
}
