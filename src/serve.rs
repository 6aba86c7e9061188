//! `tinyfleet serve`: wires the store, the broker (embedded or external), ingest and the API
//! into one process, and shuts them down in order on SIGINT/SIGTERM (ingest commits what it
//! holds before the process exits).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rand::RngCore;
use rumqttc::QoS;
use tinyfleet_alerts::Deliverer;
use tinyfleet_api::{ApiState, ApiToken, Role};
use tinyfleet_broker::EmbeddedBroker;
use tinyfleet_broker::client::ClientConfig;
use tinyfleet_ingest::auth::{FleetAuth, SERVICE_USER};
use tinyfleet_ingest::influx::InfluxEvents;
use tinyfleet_ingest::metrics::Metrics;
use tinyfleet_ingest::pipeline::{Pipeline, PipelineConfig};
use tinyfleet_ingest::shell::{self, EventSink, ShellConfig};
use tinyfleet_ingest::source::SourceConfig;
use tinyfleet_monitor::{Monitor, Publish};
use tinyfleet_sink_influx::InfluxSink;
use tinyfleet_store::Store;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ServeRole};
use crate::mosquitto::BrokerPasswords;
use crate::ota_bridge::{self, BlockCounters, MqttOffers, RolloutFeed};
use tinyfleet_ota_service::service::Rollouts;

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// API tokens from the config, or the generated operator token in `<data_dir>/api-token`.
fn api_tokens(config: &Config, data_dir: &Path) -> Result<Vec<ApiToken>, String> {
    if !config.api.tokens.is_empty() {
        return config.api.tokens.iter().map(|t| t.to_api_token()).collect();
    }
    let path = data_dir.join("api-token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = random_hex(32);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            std::io::Write::write_all(&mut f, token.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            eprintln!(
                "tinyfleet: no API tokens configured; generated an operator token in {}",
                path.display()
            );
            token
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    Ok(vec![ApiToken::from_plain(
        "generated",
        &token,
        Role::Operator,
    )])
}

/// Where a running server listens.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub mqtt: SocketAddr,
    pub api: SocketAddr,
}

/// The largest fleet the embedded broker is recommended for (`docs/benchmarks.md`, "Load": at
/// 5,000 devices it connects all in under a minute; at 10,000 it needs 5 minutes and drops
/// summaries while connecting).
const EMBEDDED_BROKER_FLEET: usize = 5_000;

/// Runs until SIGINT/SIGTERM or until `stop` resolves.
pub async fn serve(
    config: Config,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    serve_with(config, stop, None).await
}

/// [`serve`], telling `ready` the addresses once devices may connect (for `tinyfleet demo`).
pub async fn serve_with(
    config: Config,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
) -> Result<(), String> {
    let data_dir = config.data_dir.clone();
    let store = {
        let (dir, url) = (data_dir.clone(), config.store.postgres_url.clone());
        let options = config.store.postgres_options();
        tokio::task::spawn_blocking(move || match url {
            Some(url) => Store::open_postgres_with(&dir, &url, &options),
            None => Store::open(&dir),
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
    };
    // Devices provisioned or revoked by another process on the same store reach this one's
    // registry (broker auth, ingest verify) within this interval.
    let (refresh_stop, refresh_task) = refresh_registry(store.clone());
    let tokens = api_tokens(&config, &data_dir)?;
    let service_password = random_hex(24);
    let ingest_subscribed = Arc::new(AtomicBool::new(false));

    let (client, mqtt_addr, share_group) = match (&config.broker, &config.mqtt) {
        (Some(broker), _) => {
            let auth = Arc::new(FleetAuth {
                registry: store.registry().clone(),
                service_password: service_password.clone(),
                devices_allowed: ingest_subscribed.clone(),
            });
            let broker_config = broker.clone();
            let broker: EmbeddedBroker =
                tokio::task::spawn_blocking(move || EmbeddedBroker::start(&broker_config, auth))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("embedded broker: {e}"))?;
            // The broker has no shutdown: it lives as long as the process, even when this
            // handle is dropped.
            let addr = broker.local_addr();
            let fleet = store.registry().active_count();
            if fleet > EMBEDDED_BROKER_FLEET {
                tracing::warn!(
                    devices = fleet,
                    "the embedded broker (rumqttd) connects devices ever more slowly as the \
                     fleet grows (15-25 per second near 10,000 connected, docs/benchmarks.md); above \
                     {EMBEDDED_BROKER_FLEET} devices use Mosquitto ([mqtt], docs/scaling.md)"
                );
            }
            let client = ClientConfig {
                url_host: addr.ip().to_string(),
                port: addr.port(),
                client_id: "tinyfleet-ingest".to_owned(),
                username: Some(SERVICE_USER.to_owned()),
                password: Some(service_password.clone()),
                max_packet: config
                    .broker
                    .as_ref()
                    .map_or(ClientConfig::default().max_packet, |b| b.max_packet()),
                ..ClientConfig::default()
            };
            (client, addr, None)
        }
        (None, Some(m)) => {
            let client = ClientConfig {
                url_host: m.host.clone(),
                port: m.port,
                client_id: m.client_id.clone(),
                username: m.username.clone(),
                password: m.password.clone(),
                ..ClientConfig::default()
            };
            let addr = tokio::net::lookup_host((m.host.as_str(), m.port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], m.port)));
            (client, addr, m.share_group.clone())
        }
        (None, None) => return Err("no broker configured".into()),
    };

    // Mosquitto's password file holds the devices before ingest (and devices) connect.
    let password_file = match config.mqtt.as_ref() {
        Some(m) if m.password_file.is_some() => Some(
            BrokerPasswords::start(m, store.registry().clone())
                .await
                .map_err(|e| format!("config [mqtt] password_file: {e}"))?,
        ),
        _ => None,
    };

    let metrics = Arc::new(Metrics::default());
    let mut pipeline = Pipeline::new(
        PipelineConfig {
            window_ms: config.ingest.window_secs as i64 * 1000,
            offline_after_ms: config.ingest.offline_after_secs as i64 * 1000,
            max_payload: config
                .broker
                .as_ref()
                .map_or(tinyfleet_ingest::decode::DEFAULT_MAX_PAYLOAD, |b| {
                    b.max_payload
                }),
            collect_events: config.influx.is_some(),
            replica: config
                .ingest
                .shared_store
                .then(|| config.mqtt.as_ref().map(|m| m.client_id.clone()))
                .flatten(),
        },
        store.clone(),
        metrics.clone(),
    );
    // Block requests go to the OTA service as soon as ingest has verified them.
    let block_counters = Arc::new(BlockCounters::default());
    let (block_hook, block_rx) = ota_bridge::block_queue(block_counters.clone());
    pipeline.on_block_request(block_hook);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (tx, rx) = mpsc::channel(config.ingest.max_batch.max(1000) * 2);
    let client_template = client.clone();
    let source = tokio::spawn(tinyfleet_ingest::source::run(
        SourceConfig {
            client,
            share_group,
            connections: config.ingest.connections,
            stall_timeout: (config.ingest.stall_timeout_secs > 0)
                .then(|| std::time::Duration::from_secs(config.ingest.stall_timeout_secs)),
        },
        tx,
        metrics.clone(),
        ingest_subscribed.clone(),
        shutdown_rx.clone(),
    ));
    let shell_config = ShellConfig {
        max_batch: config.ingest.max_batch,
        flush_interval: std::time::Duration::from_millis(config.ingest.flush_ms),
        retention: std::time::Duration::from_secs(config.ingest.retention_days * 86_400),
        journal: config
            .ingest
            .journal
            .then(|| data_dir.join("ingest.journal")),
        checkpoint_interval: std::time::Duration::from_millis(config.ingest.checkpoint_ms),
        shared_store: config.ingest.shared_store,
        ..ShellConfig::default()
    };
    let all = config.role == ServeRole::All;
    let (rollout_feed, rollout_feed_rx) = RolloutFeed::new();
    let mut sinks: Vec<Arc<dyn EventSink>> = Vec::new();
    if all {
        sinks.push(Arc::new(rollout_feed));
    }
    let mut influx = None;
    if let Some(influx_config) = &config.influx {
        let (sink, task) = InfluxSink::spawn(influx_config.clone())
            .map_err(|e| format!("config [influx]: {e}"))?;
        sinks.push(Arc::new(InfluxEvents::new(sink.clone(), metrics.clone())));
        influx = Some((sink, task));
    }
    let ingest = tokio::spawn(shell::run(
        pipeline,
        rx,
        shell_config,
        sinks,
        shutdown_rx.clone(),
    ));

    // The service's own MQTT connection: alert events, OTA blocks and offers.
    let publisher_client = ClientConfig {
        client_id: match &config.mqtt {
            Some(m) => format!("{}-publisher", m.client_id),
            None => "tinyfleet-publisher".to_owned(),
        },
        clean_session: true,
        manual_acks: false,
        ..client_template
    };
    let (publisher, mut publisher_conn) = tinyfleet_broker::client::connect(&publisher_client);
    let mut publisher_shutdown = shutdown_rx.clone();
    let publisher_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = publisher_conn.next() => {}
                _ = publisher_shutdown.changed() => break,
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|e| format!("cannot listen on {} for the API: {e}", config.api.listen))?;
    let api_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let ota = {
        let mut ota_config = config.ota.clone();
        if ota_config.public_url.is_empty() {
            if api_addr.ip().is_unspecified() {
                tracing::warn!(
                    "ota.public_url is not set and the API listens on every address: offers \
                     carry no download URL (MQTT block transfer only); set ota.public_url"
                );
            } else {
                // Devices download from the API's own address unless told otherwise.
                ota_config.public_url = format!("http://{api_addr}");
            }
        }
        let (store, dir) = (store.clone(), data_dir.clone());
        tokio::task::spawn_blocking(move || {
            tinyfleet_ota_service::Ota::open(store, &dir, ota_config)
        })
        .await
        .map_err(|e| e.to_string())??
    };
    let ota = Arc::new(ota);
    let blocks_task = tokio::spawn(ota_bridge::serve_blocks(
        ota.clone(),
        publisher.clone(),
        block_rx,
        block_counters.clone(),
        shutdown_rx.clone(),
    ));
    let front = if all {
        Front::Control(
            start_control(
                &config,
                &store,
                &influx,
                &publisher,
                &ota,
                rollout_feed_rx,
                metrics.clone(),
                tokens,
                block_counters.clone(),
                listener,
                shutdown_rx.clone(),
            )
            .await?,
        )
    } else {
        drop(tokens);
        let (metrics, blocks) = (metrics.clone(), block_counters.clone());
        let mut api_shutdown = shutdown_rx.clone();
        let router = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok\n" }))
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let (metrics, blocks) = (metrics.clone(), blocks.clone());
                    async move {
                        let mut out = metrics.render();
                        out.push_str(&blocks.render_prometheus());
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4",
                            )],
                            out,
                        )
                    }
                }),
            );
        let api = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = api_shutdown.changed().await;
                })
                .await
        });
        tracing::info!("ingest replica: monitor, rollouts and the API run in the `all` process");
        drop(rollout_feed_rx);
        Front::Replica(api)
    };

    // Report ready once ingest holds its subscriptions (devices are let in from then on).
    let wait_start = std::time::Instant::now();
    while !ingest_subscribed.load(Ordering::SeqCst) {
        if wait_start.elapsed() > std::time::Duration::from_secs(30) {
            tracing::warn!("ingest has not subscribed to the broker after 30 s; still trying");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // One machine-readable line: tests and scripts read the real ports from it.
    println!(
        "tinyfleet serving: mqtt={mqtt_addr} api=http://{api_addr} data={}",
        data_dir.display()
    );
    if let Some(ready) = ready {
        let _ = ready.send(Ready {
            mqtt: mqtt_addr,
            api: api_addr,
        });
    }

    tokio::select! {
        _ = stop => {}
        _ = signal() => {}
    }
    tracing::info!("shutting down: committing ingest state");
    let _ = shutdown_tx.send(true);
    let _ = source.await;
    let _ = ingest.await;
    let _ = blocks_task.await;
    match front {
        Front::Control(control) => control.stop().await,
        Front::Replica(api) => {
            let _ = api.await;
        }
    }
    let _ = publisher_task.await;
    if let Some(p) = password_file {
        p.stop().await;
    }
    let _ = refresh_stop.send(true);
    let _ = refresh_task.await;
    if let Some((sink, task)) = influx {
        if !sink.flush(std::time::Duration::from_secs(5)).await {
            tracing::warn!(
                backlog = sink.stats().queued,
                "time-series points not written before exit"
            );
        }
        drop(sink);
        task.abort();
    }
    Ok(())
}

/// What faces users: the whole control plane (`role = "all"`), or a replica's health and
/// metrics endpoint.
enum Front {
    Control(Control),
    Replica(tokio::task::JoinHandle<std::io::Result<()>>),
}

/// The control plane of the `all` process: monitor, rollouts and the whole API.
struct Control {
    monitor: Monitor,
    delivery_task: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Control {
    async fn stop(self) {
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = self.api.await;
        if !self.monitor.flush(std::time::Duration::from_secs(5)).await {
            tracing::warn!("alert notifications not delivered before exit");
        }
        self.delivery_task.abort();
    }
}

/// Starts the monitor, the rollouts and the API (the singletons of a deployment).
#[allow(clippy::too_many_arguments)]
async fn start_control(
    config: &Config,
    store: &Store,
    influx: &Option<(InfluxSink, tokio::task::JoinHandle<()>)>,
    publisher: &rumqttc::AsyncClient,
    ota: &Arc<tinyfleet_ota_service::Ota>,
    rollout_feed_rx: ota_bridge::RolloutFeedRx,
    metrics: Arc<Metrics>,
    tokens: Vec<ApiToken>,
    block_counters: Arc<BlockCounters>,
    listener: tokio::net::TcpListener,
    shutdown_rx: watch::Receiver<bool>,
) -> Result<Control, String> {
    // The monitor: drift, health and presence -> alerts, retraining triggers, MQTT events.
    let (deliverer, delivery_task) =
        Deliverer::spawn(&config.alerts).map_err(|e| format!("config [alerts]: {e}"))?;
    let alert_mqtt = publisher.clone();
    let publish: Publish = Arc::new(move |topic: String, body: Vec<u8>| {
        if let Err(e) = alert_mqtt.try_publish(topic, QoS::AtLeastOnce, false, body) {
            tracing::warn!(error = %e, "alert event not published on MQTT");
        }
    });
    let monitor = {
        let (store, config) = (store.clone(), config.monitor_config());
        let sink = influx.as_ref().map(|(sink, _)| sink.clone());
        tokio::task::spawn_blocking(move || {
            Monitor::open(store, config, deliverer, sink, Some(publish))
        })
        .await
        .map_err(|e| e.to_string())??
    };
    let monitor_task = tokio::spawn(monitor.clone().run(shutdown_rx.clone()));

    // Rollouts: offers out as retained MQTT messages; progress, presence and quality in.
    let (offers, offers_task) = MqttOffers::spawn(publisher.clone(), shutdown_rx.clone());
    let rollouts = {
        let (store, ota) = (store.clone(), ota.clone());
        let rollouts = tokio::task::spawn_blocking(move || {
            Rollouts::open(store, ota, Arc::new(offers), tinyfleet_store::now_ms())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot open the rollouts: {e}"))?;
        Arc::new(rollouts)
    };
    // Progress, presence and hellos: this process's ingest at once, and every process's
    // (ingest replicas included) from the store's change feed.
    let feed_task = tokio::spawn(ota_bridge::feed_rollouts(
        rollouts.clone(),
        store.clone(),
        rollout_feed_rx,
        ota_bridge::FEED_POLL,
        shutdown_rx.clone(),
    ));
    let tick_task = tokio::spawn(ota_bridge::tick_rollouts(
        rollouts.clone(),
        std::time::Duration::from_millis(config.ota.rollout_tick_ms),
        shutdown_rx.clone(),
    ));
    {
        let rollouts = rollouts.clone();
        monitor.observe_windows(Arc::new(move |start, windows, profiles| {
            let observations = ota_bridge::quality_observations(start, windows, profiles);
            rollouts.on_window(&observations, tinyfleet_store::now_ms());
        }));
    }
    let api_state = ApiState {
        store: store.clone(),
        metrics: metrics.clone(),
        tokens: Arc::new(tokens),
        monitor: monitor.clone(),
        ota: ota.clone(),
        rollouts: rollouts.clone(),
        extra_metrics: {
            let monitor = monitor.clone();
            Arc::new(move || {
                let mut out = monitor.render_prometheus(tinyfleet_store::now_ms());
                out.push_str(&block_counters.render_prometheus());
                out
            })
        },
    };
    let mut api_shutdown = shutdown_rx.clone();
    let api = tokio::spawn(async move {
        axum::serve(listener, tinyfleet_api::router(api_state))
            .with_graceful_shutdown(async move {
                let _ = api_shutdown.changed().await;
            })
            .await
    });

    Ok(Control {
        monitor,
        delivery_task,
        tasks: vec![monitor_task, feed_task, tick_task, offers_task],
        api,
    })
}

/// How often the registry re-reads devices changed by other processes.
const REGISTRY_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// Re-reads the registry's changed rows every [`REGISTRY_REFRESH`] until told to stop.
fn refresh_registry(store: Store) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(REGISTRY_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => return,
            }
            let registry = store.registry().clone();
            match tokio::task::spawn_blocking(move || registry.refresh()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "registry refresh failed"),
                Err(e) => tracing::warn!(error = %e, "registry refresh task failed"),
            }
        }
    });
    (stop, task)
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
