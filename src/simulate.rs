//! `tinyfleet simulate`: simulated devices against any deployment, through its API (to
//! provision devices and fetch the factory model and its profile) and its MQTT broker.
//!
//! Each device runs the real device client (monitor, encoder, authenticator) and the real OTA
//! installer on a simulated flash (`tinyfleet-sim`). A scenario applies to one hardware cohort
//! from a given time on, with a known ground truth, so a deployment's detectors and rollout
//! gates can be checked against it; with `--scenario none` it is a load generator.
//!
//! As a load generator (`scripts/load-test.sh`): devices start at `--connect-rate` per second;
//! several processes can share one credentials file (`--provision-only` once, then `--skip`
//! and `--devices` per process: a process holds at most as many connections as its open-file
//! limit); `--mqtt` may list several broker addresses (devices are spread over them, e.g. to
//! use more than one loopback address's ephemeral ports); `--report` writes connections held,
//! summaries sent and acknowledged over time, PUBACK latencies and, with `--latency-sample`,
//! the time from publishing a summary until the API shows it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use serde_json::json;
use tinyfleet_device::DeviceKey;
use tinyfleet_device::testkit::ReferenceProfile;
use tinyfleet_drift::profile::MonitoringProfile;
use tinyfleet_sim::load::{HistSnapshot, Load, LoadStats, Published};
use tinyfleet_sim::{Behaviour, DeviceSpec, Factory, SimEvent, SimEventKind, WindowData};
use tokio::sync::{Semaphore, mpsc, watch};

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
    /// The MQTT broker devices connect to; several `host:port`, comma-separated, spread the
    /// devices over them (round robin).
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
    #[command(flatten)]
    pub load: Box<LoadArgs>,
}

/// Options for load tests (`scripts/load-test.sh`).
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Run devices number `skip` to `skip + devices - 1` (several processes sharing one
    /// credentials file each run their own range).
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Devices start (connect) at this rate, per second, so that a large fleet's CONNECTs do
    /// not arrive as one storm.
    #[arg(long, default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// Connection attempts (TCP connect to CONNACK) in progress at a time across this
    /// process's devices; 0: no limit. Keeps a slow broker from being buried under retries.
    #[arg(long, default_value_t = 200)]
    pub connecting: usize,
    /// How long a connection attempt waits for its CONNACK before it is retried, in seconds.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
    /// Provision the devices (and write --credentials), then exit.
    #[arg(long)]
    pub provision_only: bool,
    /// Concurrent provisioning requests.
    #[arg(long, default_value_t = 4)]
    pub provision_parallel: usize,
    /// Write a JSON report here at the end: connections held, summaries sent and acknowledged
    /// over time, PUBACK and connection latencies, publish-to-visible latencies.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Time the summaries of this many devices (spread over the range) from publishing until
    /// the API shows them (`GET /api/v1/devices/{id}`: its `health_seq` reaches the summary).
    #[arg(long, default_value_t = 0)]
    pub latency_sample: usize,
    /// How often the sampled devices with summaries not yet visible are polled, in ms (the
    /// resolution of the publish-to-visible latency).
    #[arg(long, default_value_t = 200)]
    pub latency_poll_ms: u64,
    /// Seconds between progress lines (and rows of the report's timeline).
    #[arg(long, default_value_t = 10)]
    pub report_every_secs: u64,
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
    let missing: Vec<(String, &String)> = devices(args)
        .filter(|(id, _)| !creds.contains_key(id))
        .collect();
    let provision_one = |(id, hw): &(String, &String)| -> Result<(String, Creds), String> {
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
            hw: (*hw).clone(),
        };
        Ok((id.clone(), c))
    };
    // A few requests at a time (each one is a committed SQLite transaction on the server).
    let workers = args.load.provision_parallel.clamp(1, 64);
    // Each worker stops at its first error; what was provisioned is kept (and written below).
    let results: Vec<Provisioned> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let part: Vec<&(String, &String)> =
                    missing.iter().skip(w).step_by(workers).collect();
                let provision_one = &provision_one;
                scope.spawn(move || {
                    let mut done = Vec::with_capacity(part.len());
                    for device in part {
                        match provision_one(device) {
                            Ok(c) => done.push(c),
                            Err(e) => return (done, Some(e)),
                        }
                    }
                    (done, None)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (Vec::new(), Some("a provisioning thread panicked".into())))
            })
            .collect()
    });
    let mut added = 0;
    let mut failed = None;
    for (done, error) in results {
        added += done.len();
        creds.extend(done);
        failed = failed.or(error);
    }
    // Written only when it changed: processes started with the same file after a
    // --provision-only run read it concurrently.
    if let Some(path) = &args.credentials
        && added > 0
    {
        let text = serde_json::to_string_pretty(&creds).map_err(|e| e.to_string())?;
        write_private(path, &text)?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    eprintln!(
        "provisioned {added} devices, reusing {}",
        args.devices - added
    );
    Ok(creds)
}

/// What one provisioning worker did: the devices it provisioned, and the error it stopped at.
type Provisioned = (Vec<(String, Creds)>, Option<String>);

/// The ids and hardware of the devices this process runs.
fn devices(args: &SimulateArgs) -> impl Iterator<Item = (String, &String)> {
    (args.load.skip..args.load.skip + args.devices).map(|n| {
        (
            format!("{}-{n:05}", args.prefix),
            &args.hw[n % args.hw.len()],
        )
    })
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
    if args.load.connect_rate.is_nan() || args.load.connect_rate <= 0.0 {
        return Err("--connect-rate must be above 0".into());
    }
    let brokers = args
        .mqtt
        .split(',')
        .map(|a| {
            a.trim()
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| format!("--mqtt {a:?}: expected host:port"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let http = reqwest::blocking::Client::new();
    let creds = provision(&args, &http)?;
    if args.load.provision_only {
        return Ok(());
    }
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
    runtime.block_on(simulate(args, brokers, creds, trusted, factories, cohort))
}

async fn simulate(
    args: SimulateArgs,
    brokers: Vec<(String, u16)>,
    creds: BTreeMap<String, Creds>,
    trusted: Vec<(Vec<u8>, [u8; 32])>,
    factories: BTreeMap<String, (String, (Factory, Arc<ReferenceProfile>))>,
    cohort: String,
) -> Result<(), String> {
    let start = Instant::now();
    let scenario_at = start + Duration::from_secs(args.after_secs);
    let (stop_tx, stop) = watch::channel(false);
    let (events_tx, mut events) = mpsc::unbounded_channel::<SimEvent>();
    let stats = Arc::new(LoadStats::default());
    let (probe_tx, probe_rx) = mpsc::unbounded_channel::<Published>();
    let sample_every =
        (args.load.latency_sample > 0).then(|| (args.devices / args.load.latency_sample).max(1));
    let connecting =
        (args.load.connecting > 0).then(|| Arc::new(Semaphore::new(args.load.connecting)));
    let mut specs = Vec::with_capacity(args.devices);
    for (i, (id, hw)) in devices(&args).enumerate() {
        let n = args.load.skip + i;
        let c = creds
            .get(&id)
            .ok_or_else(|| format!("{id}: not in the credentials"))?;
        let Some((model, (factory, edges))) = factories.get(hw) else {
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
            offline: (scenario == Scenario::Offline && affected && n.is_multiple_of(3)).then(
                || {
                    let from = Duration::from_secs(args.after_secs);
                    (from, from + Duration::from_secs(120))
                },
            ),
        };
        let (host, port) = &brokers[n % brokers.len()];
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
            broker_port: *port,
            seed: n as u64 + 1,
            behaviour,
        };
        let sampled =
            sample_every.is_some_and(|k| i.is_multiple_of(k) && i / k < args.load.latency_sample);
        let load = Load {
            probe: sampled.then(|| probe_tx.clone()),
            connecting: connecting.clone(),
            connect_timeout: Duration::from_secs(args.load.connect_timeout_secs.max(1)),
            ..Load::new(stats.clone())
        };
        specs.push((spec, load));
    }
    drop(probe_tx);
    let started = specs.len();
    eprintln!(
        "starting {started} devices against {} at {} per second; scenario {:?} on {cohort} after {} s",
        args.mqtt, args.load.connect_rate, args.scenario, args.after_secs
    );
    // Devices start at the configured rate, while progress is reported.
    let ramp_done = Arc::new(std::sync::OnceLock::<Instant>::new());
    let starter = {
        let (events_tx, stop, ramp_done) = (events_tx.clone(), stop.clone(), ramp_done.clone());
        let pace = Duration::from_secs_f64(1.0 / args.load.connect_rate);
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now();
            for (spec, load) in specs {
                if *stop.borrow() {
                    break;
                }
                tokio::spawn(tinyfleet_sim::run_with(
                    spec,
                    Some(events_tx.clone()),
                    stop.clone(),
                    Some(load),
                ));
                next += pace;
                tokio::time::sleep_until(next).await;
            }
            let _ = ramp_done.set(Instant::now());
        })
    };
    drop(events_tx);
    let visibility = Arc::new(std::sync::Mutex::new(Visibility::default()));
    let poller = (args.load.latency_sample > 0).then(|| {
        tokio::spawn(poll_visibility(
            args.api.api.trim_end_matches('/').to_owned(),
            args.api.token.clone(),
            probe_rx,
            Duration::from_millis(args.load.latency_poll_ms.max(10)),
            visibility.clone(),
            stop.clone(),
        ))
    });

    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let every = Duration::from_secs(args.load.report_every_secs.max(1));
    let mut report = tokio::time::interval(every);
    report.tick().await;
    let deadline =
        (args.duration_secs > 0).then(|| start + Duration::from_secs(args.duration_secs));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut timeline = Vec::new();
    let mut last_ack = stats.ack_latency.snapshot();
    let mut last_visible = 0;
    // The steady phase, reported apart: from SIGUSR1 (a load script marks it), or else from
    // one summary interval after every device of this process was connected.
    let interval = Duration::from_millis(args.interval_ms.max(100));
    let mut steady: Option<(Instant, HistSnapshot, u64, u64)> = None;
    let mut all_connected: Option<Instant> = None;
    let mut marked = false;
    let mut mark = MarkSignal::new()?;
    let steady_now = |stats: &LoadStats| {
        (
            Instant::now(),
            stats.ack_latency.snapshot(),
            stats.summaries_sent.load(Ordering::Relaxed),
            stats.summaries_acked.load(Ordering::Relaxed),
        )
    };
    loop {
        tokio::select! {
            _ = mark.recv() => {
                eprintln!("[{:5.0} s] steady phase marked", start.elapsed().as_secs_f64());
                steady = Some(steady_now(&stats));
                marked = true;
            }
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
                let ack = stats.ack_latency.snapshot();
                let ack_now = ack.since(&last_ack);
                last_ack = ack.clone();
                let (visible_now, visible_count) = {
                    let v = visibility.lock().unwrap_or_else(|e| e.into_inner());
                    let mut now: Vec<f64> = v.samples[last_visible..].iter().map(|s| s.1).collect();
                    now.sort_by(f64::total_cmp);
                    (now, v.samples.len())
                };
                last_visible = visible_count;
                let connected = stats.connected.load(Ordering::Relaxed);
                let sent = stats.summaries_sent.load(Ordering::Relaxed);
                let acked = stats.summaries_acked.load(Ordering::Relaxed);
                let row = json!({
                    "t": secs,
                    "unix_ms": unix_ms(Instant::now()),
                    "connected": connected,
                    "connects": stats.connects.load(Ordering::Relaxed),
                    "connect_failures": stats.connect_failures.load(Ordering::Relaxed),
                    "connections_lost": stats.connections_lost.load(Ordering::Relaxed),
                    "summaries_sent": sent,
                    "summaries_acked": acked,
                    "ack_p50_ms": ack_now.quantile_ms(0.5),
                    "ack_p99_ms": ack_now.quantile_ms(0.99),
                    "visible_n": visible_now.len(),
                    "visible_p50_ms": quantile(&visible_now, 0.5),
                    "visible_p99_ms": quantile(&visible_now, 0.99),
                });
                let ms = |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.0}"));
                eprintln!(
                    "[{secs:5.0} s] {} connected, {} lost, {} failed connects; {sent} summaries sent, {acked} acked (PUBACK p99 {} ms), visible p99 {} ms; {}",
                    connected,
                    row["connections_lost"],
                    row["connect_failures"],
                    ms(&row["ack_p99_ms"]),
                    ms(&row["visible_p99_ms"]),
                    summary(&counts),
                );
                timeline.push(row);
                if all_connected.is_none() && ramp_done.get().is_some() && connected >= started as i64 {
                    all_connected = Some(Instant::now());
                }
                if steady.is_none()
                    && !marked
                    && all_connected.is_some_and(|at| at.elapsed() >= interval)
                {
                    steady = Some(steady_now(&stats));
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            _ = &mut ctrl_c => break,
        }
    }
    let ended = Instant::now();
    let ack_end = stats.ack_latency.snapshot();
    let (sent_end, acked_end) = (
        stats.summaries_sent.load(Ordering::Relaxed),
        stats.summaries_acked.load(Ordering::Relaxed),
    );
    let _ = stop_tx.send(true);
    starter.abort();
    if let Some(p) = poller {
        let _ = p.await;
    }
    // Let the devices disconnect cleanly.
    let closing = Instant::now();
    while stats.connected.load(Ordering::Relaxed) > 0 && closing.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut out = json!({
        "devices": args.devices,
        "started": started,
        "skip": args.load.skip,
        "seconds": secs,
        "counts": counts,
        "summaries_per_second": counts.get("summaries").copied().unwrap_or(0) as f64 / secs,
    });
    if args.load.report.is_some() || args.api.json {
        let v = visibility.lock().unwrap_or_else(|e| e.into_inner());
        let steady_json = steady.as_ref().map(|(at, ack, sent, acked)| {
            let secs = ended.duration_since(*at).as_secs_f64();
            let from = unix_ms(*at);
            let mut visible: Vec<f64> = v
                .samples
                .iter()
                .filter(|s| s.0 >= from)
                .map(|s| s.1)
                .collect();
            visible.sort_by(f64::total_cmp);
            json!({
                "from_unix_ms": from,
                "to_unix_ms": unix_ms(ended),
                "seconds": secs,
                "summaries_sent_per_second": (sent_end - sent) as f64 / secs,
                "summaries_acked_per_second": (acked_end - acked) as f64 / secs,
                "ack_latency_ms": hist_json(&ack_end.since(ack)),
                "visible_ms": samples_json(&visible),
            })
        });
        let mut all_visible: Vec<f64> = v.samples.iter().map(|s| s.1).collect();
        all_visible.sort_by(f64::total_cmp);
        out["connect_rate"] = json!(args.load.connect_rate);
        out["interval_ms"] = json!(args.interval_ms);
        out["ramp_done_unix_ms"] = json!(ramp_done.get().map(|t| unix_ms(*t)));
        out["all_connected_unix_ms"] = json!(all_connected.map(unix_ms));
        out["steady_marked"] = json!(marked);
        out["steady"] = json!(steady_json);
        out["ack_latency_ms"] = hist_json(&ack_end);
        out["connect_latency_ms"] = hist_json(&stats.connect_latency.snapshot());
        out["visible_ms"] = samples_json(&all_visible);
        out["visible_samples"] = json!(v.samples);
        out["visible_expired"] = json!(v.expired);
        out["visibility_polls"] = json!(v.polls);
        out["visibility_poll_errors"] = json!(v.errors);
        out["api_rtt_ms"] = {
            let mut rtt = v.api_rtt_ms.clone();
            rtt.sort_by(f64::total_cmp);
            samples_json(&rtt)
        };
        out["latency_poll_ms"] = json!(args.load.latency_poll_ms);
        out["timeline"] = json!(timeline);
    }
    if let Some(path) = &args.load.report {
        let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
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

/// SIGUSR1, where there are signals: marks the start of the steady phase.
struct MarkSignal {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl MarkSignal {
    fn new() -> Result<Self, String> {
        Ok(Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .map_err(|e| format!("cannot handle SIGUSR1: {e}"))?,
        })
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            if self.signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

/// Publish-to-visible measurements of the sampled devices.
#[derive(Debug, Default)]
struct Visibility {
    /// `(published at, unix ms; latency, ms)`.
    samples: Vec<(u64, f64)>,
    /// Summaries not visible within [`VISIBLE_TIMEOUT`].
    expired: u64,
    polls: u64,
    errors: u64,
    /// Round trip of each poll request.
    api_rtt_ms: Vec<f64>,
}

/// A sampled summary not visible after this long is counted as expired.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `GET /api/v1/devices/{id}` of each sampled device that has summaries not yet visible,
/// every `every`, until `stop`: a summary `(boot, seq)` is visible once the device's
/// `(health_boot, health_seq)` reaches it. Its latency is the poll's answer time minus the
/// publish time: an upper bound, at most one poll period (plus the request) late.
async fn poll_visibility(
    api: String,
    token: String,
    mut rx: mpsc::UnboundedReceiver<Published>,
    every: Duration,
    out: Arc<std::sync::Mutex<Visibility>>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    else {
        return;
    };
    let mut pending: HashMap<Arc<str>, VecDeque<Published>> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        while let Ok(p) = rx.try_recv() {
            pending.entry(p.device.clone()).or_default().push_back(p);
        }
        let mut expired = 0;
        for q in pending.values_mut() {
            while q.front().is_some_and(|p| p.at.elapsed() > VISIBLE_TIMEOUT) {
                q.pop_front();
                expired += 1;
            }
        }
        let due: Vec<Arc<str>> = pending
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(d, _)| d.clone())
            .collect();
        let mut answers = Vec::with_capacity(due.len());
        // At most 16 requests at a time.
        for chunk in due.chunks(16) {
            let mut set = tokio::task::JoinSet::new();
            for device in chunk {
                let (http, device) = (http.clone(), device.clone());
                let url = format!("{api}/api/v1/devices/{device}");
                let token = token.clone();
                set.spawn(async move {
                    let sent = Instant::now();
                    let state = async {
                        let v: serde_json::Value = http
                            .get(url)
                            .bearer_auth(token)
                            .send()
                            .await
                            .ok()?
                            .error_for_status()
                            .ok()?
                            .json()
                            .await
                            .ok()?;
                        let s = &v["state"];
                        Some((
                            s["health_boot"].as_u64().unwrap_or(0) as u32,
                            s["health_seq"].as_u64().map(|x| x as u32),
                        ))
                    }
                    .await;
                    (device, sent, Instant::now(), state)
                });
            }
            while let Some(Ok(a)) = set.join_next().await {
                answers.push(a);
            }
        }
        let mut v = out.lock().unwrap_or_else(|e| e.into_inner());
        v.expired += expired;
        for (device, sent, answered, state) in answers {
            v.polls += 1;
            v.api_rtt_ms
                .push(answered.duration_since(sent).as_secs_f64() * 1000.0);
            let Some((boot, seq)) = state else {
                v.errors += 1;
                continue;
            };
            let Some(seq) = seq else { continue };
            let Some(q) = pending.get_mut(&device) else {
                continue;
            };
            while let Some(p) = q.front() {
                if (p.boot, p.seq) > (boot, seq) {
                    break;
                }
                let latency = answered.saturating_duration_since(p.at);
                v.samples
                    .push((unix_ms(p.at), latency.as_secs_f64() * 1000.0));
                q.pop_front();
            }
        }
    }
}

/// `at` as milliseconds since the Unix epoch.
fn unix_ms(at: Instant) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let age = Instant::now().saturating_duration_since(at);
    now.saturating_sub(age).as_millis() as u64
}

/// The `q` quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

fn samples_json(sorted: &[f64]) -> serde_json::Value {
    json!({
        "count": sorted.len(),
        "p50": quantile(sorted, 0.5),
        "p90": quantile(sorted, 0.9),
        "p99": quantile(sorted, 0.99),
        "max": sorted.last(),
    })
}

/// Quantiles of a histogram, and its non-empty buckets (`[upper edge ms, count]`) so that
/// reports of several processes can be merged.
fn hist_json(h: &HistSnapshot) -> serde_json::Value {
    let step = h.resolution_us as f64 / 1000.0;
    let buckets: Vec<(f64, u64)> = h
        .counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| ((i + 1) as f64 * step, *c))
        .chain((h.overflow > 0).then_some((h.max_us as f64 / 1000.0, h.overflow)))
        .collect();
    json!({
        "count": h.count(),
        "p50": h.quantile_ms(0.5),
        "p90": h.quantile_ms(0.9),
        "p99": h.quantile_ms(0.99),
        "max": (h.count() > 0).then_some(h.max_us as f64 / 1000.0),
        "buckets": buckets,
    })
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
