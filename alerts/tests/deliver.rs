//! Delivery over real HTTP: an axum server on 127.0.0.1:0 records every request it receives
//! and answers with scripted statuses. Tests wait for requests on a channel with a timeout,
//! never by sleeping.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};

use tinyfleet_alerts::{
    AlertManager, AlertsConfig, Condition, Deliverer, DeliveryConfig, Receiver, ReceiverKind,
    RetrainDecision, RetrainRequest, RetrainTrigger,
};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Received {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

#[derive(Clone)]
struct Server {
    tx: mpsc::UnboundedSender<Received>,
    /// Statuses to answer, in order; 200 once empty (204 for GitHub-shaped paths).
    script: Arc<Mutex<VecDeque<u16>>>,
    /// When set, each request waits for a permit before it is answered.
    gate: Option<Arc<Semaphore>>,
}

async fn handle(
    State(server): State<Server>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let is_dispatch = uri.path().ends_with("/dispatches");
    server
        .tx
        .send(Received {
            method,
            uri,
            headers,
            body,
        })
        .unwrap();
    if let Some(gate) = &server.gate {
        gate.acquire().await.unwrap().forget();
    }
    let scripted = server.script.lock().unwrap().pop_front();
    let code = scripted.unwrap_or(if is_dispatch { 204 } else { 200 });
    StatusCode::from_u16(code).unwrap()
}

/// Starts the recording server; returns its address and the channel of received requests.
async fn start_server(
    script: &[u16],
    gate: Option<Arc<Semaphore>>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = Server {
        tx,
        script: Arc::new(Mutex::new(script.iter().copied().collect())),
        gate,
    };
    let app = Router::new().fallback(handle).with_state(server);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no request within the timeout")
        .expect("server gone")
}

fn fast_delivery() -> DeliveryConfig {
    DeliveryConfig {
        queue_capacity: 100,
        max_attempts: 4,
        backoff_min_ms: 5,
        backoff_max_ms: 20,
        request_timeout_ms: 5_000,
    }
}

fn webhook(name: &str, url: String, token: Option<&str>) -> Receiver {
    Receiver {
        name: name.into(),
        kind: ReceiverKind::AlertmanagerWebhook { url, max_alerts: 0 },
        bearer_token: token.map(str::to_owned),
    }
}

fn config(receivers: Vec<Receiver>) -> AlertsConfig {
    let default_receivers = receivers
        .iter()
        .filter(|r| r.kind.takes_alerts())
        .map(|r| r.name.clone())
        .collect();
    AlertsConfig {
        receivers,
        default_receivers,
        delivery: fast_delivery(),
        external_url: "http://fleet.example:8080".into(),
        retrain: tinyfleet_alerts::TriggerPolicy { cooldown_ms: 0 },
        ..AlertsConfig::default()
    }
}

fn trigger(manager: &mut AlertManager) -> RetrainTrigger {
    let request = RetrainRequest {
        model_id: "kws".into(),
        model_version: "1.2.0".into(),
        cohort: "eu-west".into(),
        reason: "PSI 0.31 on feature 3".into(),
        window_start_ms: 1_714_521_600_000,
        payload: serde_json::json!({
            "features": [{ "index": 3, "psi": 0.31, "histogram": [1, 2, 3] }],
            "importance": [0.1, 0.9]
        }),
    };
    match manager.retrain(1_714_525_200_000, request) {
        RetrainDecision::Trigger(t) => t,
        other => panic!("expected a trigger, got {other:?}"),
    }
}

fn stats_of(d: &Deliverer, name: &str) -> tinyfleet_alerts::ReceiverStats {
    d.stats().into_iter().find(|s| s.receiver == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_webhook_v4_over_http() {
    let (addr, mut rx) = start_server(&[], None).await;
    let cfg = config(vec![webhook(
        "ops",
        format!("http://{addr}/hook?tenant=a"),
        Some("s3cr3t-token"),
    )]);
    let mut manager = AlertManager::new(cfg.clone()).unwrap();
    let (deliverer, _workers) = Deliverer::spawn(&cfg).unwrap();

    let conditions = vec![
        Condition::new("FeatureDrift", 0.31)
            .label("device", "d1")
            .label("kind", "drift")
            .annotation("summary", "drift on d1"),
        Condition::new("FeatureDrift", 0.42)
            .label("device", "d2")
            .label("kind", "drift")
            .annotation("summary", "drift on d2"),
    ];
    let notifications = manager.evaluate(1_714_521_600_000, "drift", conditions);
    assert_eq!(notifications.len(), 2);
    deliverer.notify(&notifications);

    let req = next(&mut rx).await;
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.uri.path(), "/hook");
    assert_eq!(req.uri.query(), Some("tenant=a"));
    assert_eq!(req.header("authorization"), Some("Bearer s3cr3t-token"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert!(req.header("idempotency-key").is_none());
    let body = req.json();
    assert_eq!(body["version"], "4");
    assert_eq!(body["status"], "firing");
    assert_eq!(body["receiver"], "ops");
    assert_eq!(body["groupKey"], "{}/{receiver=\"ops\"}:{}");
    assert_eq!(body["truncatedAlerts"], 0);
    assert_eq!(body["externalURL"], "http://fleet.example:8080");
    assert_eq!(body["groupLabels"], serde_json::json!({}));
    assert_eq!(
        body["commonLabels"],
        serde_json::json!({ "alertname": "FeatureDrift", "kind": "drift", "severity": "warning" })
    );
    assert_eq!(body["commonAnnotations"], serde_json::json!({}));
    let alerts = body["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 2);
    for a in alerts {
        assert_eq!(a["status"], "firing");
        assert_eq!(a["startsAt"], "2024-05-01T00:00:00Z");
        assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(a["generatorURL"], "http://fleet.example:8080");
        let fp = a["fingerprint"].as_str().unwrap();
        assert_eq!(fp.len(), 16);
        let labels: tinyfleet_alerts::Labels = serde_json::from_value(a["labels"].clone()).unwrap();
        assert_eq!(fp, tinyfleet_alerts::fingerprint(&labels));
    }

    // Resolution of one of them, in a second message.
    let notifications = manager.evaluate(
        1_714_521_660_000,
        "drift",
        vec![
            Condition::new("FeatureDrift", 0.42)
                .label("device", "d2")
                .label("kind", "drift"),
        ],
    );
    deliverer.notify(&notifications);
    let body = next(&mut rx).await.json();
    assert_eq!(body["status"], "resolved");
    assert_eq!(body["alerts"][0]["status"], "resolved");
    assert_eq!(body["alerts"][0]["labels"]["device"], "d1");
    assert_eq!(body["alerts"][0]["endsAt"], "2024-05-01T00:01:00Z");

    assert!(deliverer.flush(WAIT).await);
    let s = stats_of(&deliverer, "ops");
    assert_eq!(
        (s.sent, s.failed, s.retried, s.dropped, s.queued),
        (2, 0, 0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrain_webhook_and_github_dispatch_over_http() {
    let (addr, mut rx) = start_server(&[], None).await;
    let cfg = config(vec![
        Receiver {
            name: "retrain".into(),
            kind: ReceiverKind::RetrainWebhook {
                url: format!("http://{addr}/retrain"),
            },
            bearer_token: None,
        },
        Receiver {
            name: "gh".into(),
            kind: ReceiverKind::GitHubDispatch {
                api_base: format!("http://{addr}/api/v3/"),
                owner: "acme".into(),
                repo: "models".into(),
            },
            bearer_token: Some("ghp_TESTTOKEN".into()),
        },
    ]);
    let mut manager = AlertManager::new(cfg.clone()).unwrap();
    let (deliverer, _workers) = Deliverer::spawn(&cfg).unwrap();
    let t = trigger(&mut manager);
    deliverer.retrain(&t);

    let mut got = [next(&mut rx).await, next(&mut rx).await];
    got.sort_by_key(|r| r.uri.path().to_owned());
    let (dispatch, generic) = (&got[0], &got[1]);

    // Generic webhook.
    assert_eq!(generic.uri.path(), "/retrain");
    assert_eq!(generic.method, Method::POST);
    assert_eq!(
        generic.header("idempotency-key"),
        Some(t.idempotency_key.as_str())
    );
    assert!(generic.header("authorization").is_none());
    let body = generic.json();
    assert_eq!(body["idempotency_key"], t.idempotency_key.as_str());
    assert_eq!(body["event"], "tinyfleet.retrain");
    assert_eq!(
        body["model"],
        serde_json::json!({ "id": "kws", "version": "1.2.0" })
    );
    assert_eq!(body["cohort"], "eu-west");
    assert_eq!(body["reason"], "PSI 0.31 on feature 3");
    assert_eq!(body["window_start"], "2024-05-01T00:00:00Z");
    assert_eq!(body["payload"]["features"][0]["histogram"][2], 3);

    // GitHub repository_dispatch.
    assert_eq!(dispatch.method, Method::POST);
    assert_eq!(dispatch.uri.path(), "/api/v3/repos/acme/models/dispatches");
    assert_eq!(
        dispatch.header("accept"),
        Some("application/vnd.github+json")
    );
    assert_eq!(
        dispatch.header("authorization"),
        Some("Bearer ghp_TESTTOKEN")
    );
    assert_eq!(dispatch.header("x-github-api-version"), Some("2022-11-28"));
    assert!(
        dispatch
            .header("user-agent")
            .is_some_and(|ua| ua.starts_with("tinyfleet-alerts/")),
        "GitHub refuses requests without a User-Agent"
    );
    let body = dispatch.json();
    assert_eq!(body["event_type"], "tinyfleet-retrain");
    let cp = body["client_payload"].as_object().unwrap();
    assert!(
        cp.len() <= 10,
        "GitHub allows at most 10 top-level properties"
    );
    assert_eq!(cp["idempotency_key"], t.idempotency_key.as_str());
    assert_eq!(cp["model"]["id"], "kws");
    assert_eq!(cp["payload"]["importance"][1], 0.9);

    assert!(deliverer.flush(WAIT).await);
    assert_eq!(stats_of(&deliverer, "gh").sent, 1, "204 counts as sent");
    assert_eq!(stats_of(&deliverer, "retrain").sent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_after_500_429_503_then_succeeds_with_the_same_key() {
    let (addr, mut rx) = start_server(&[500, 429, 503], None).await;
    let cfg = config(vec![Receiver {
        name: "retrain".into(),
        kind: ReceiverKind::RetrainWebhook {
            url: format!("http://{addr}/retrain"),
        },
        bearer_token: None,
    }]);
    let mut manager = AlertManager::new(cfg.clone()).unwrap();
    let (deliverer, _workers) = Deliverer::spawn(&cfg).unwrap();
    let t = trigger(&mut manager);
    deliverer.retrain(&t);

    let first = next(&mut rx).await;
    for _ in 0..3 {
        let again = next(&mut rx).await;
        assert_eq!(again.body, first.body, "a retry sends the same body");
        assert_eq!(
            again.header("idempotency-key"),
            Some(t.idempotency_key.as_str())
        );
    }
    assert!(deliverer.flush(WAIT).await);
    let s = stats_of(&deliverer, "retrain");
    assert_eq!((s.sent, s.failed, s.retried), (1, 0, 3));
    assert!(s.last_error.unwrap().contains("503"));
    assert!(rx.try_recv().is_err(), "nothing after the success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_on_400_and_gives_up_after_max_attempts() {
    let (addr, mut rx) = start_server(&[400, 500, 500, 500, 500], None).await;
    let cfg = config(vec![webhook("ops", format!("http://{addr}/hook"), None)]);
    let mut manager = AlertManager::new(cfg.clone()).unwrap();
    let (deliverer, _workers) = Deliverer::spawn(&cfg).unwrap();

    deliverer.notify(&manager.evaluate(0, "presence", vec![Condition::new("DeviceOffline", 1.0)]));
    next(&mut rx).await;
    assert!(deliverer.flush(WAIT).await);
    let s = stats_of(&deliverer, "ops");
    assert_eq!((s.sent, s.failed, s.retried), (0, 1, 0));
    assert!(s.last_error.unwrap().contains("400"));
    assert!(rx.try_recv().is_err(), "a 400 is not retried");

    // Four 500s with max_attempts = 4: three retries, then failed.
    deliverer.notify(&manager.evaluate(1, "presence", vec![]));
    for _ in 0..4 {
        next(&mut rx).await;
    }
    assert!(deliverer.flush(WAIT).await);
    let s = stats_of(&deliverer, "ops");
    assert_eq!((s.sent, s.failed, s.retried), (0, 2, 3));
    assert!(rx.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_the_oldest_and_never_blocks() {
    let gate = Arc::new(Semaphore::new(0));
    let (addr, mut rx) = start_server(&[], Some(Arc::clone(&gate))).await;
    let mut cfg = config(vec![webhook("ops", format!("http://{addr}/hook"), None)]);
    cfg.delivery.queue_capacity = 2;
    let mut manager = AlertManager::new(cfg.clone()).unwrap();
    let (deliverer, _workers) = Deliverer::spawn(&cfg).unwrap();

    let fire = |m: &mut AlertManager, i: usize| {
        m.evaluate(
            0,
            &format!("s{i}"),
            vec![Condition::new("A", 1.0).label("n", i.to_string())],
        )
    };
    // The first message is in flight (the server holds it) ...
    deliverer.notify(&fire(&mut manager, 0));
    assert_eq!(next(&mut rx).await.json()["alerts"][0]["labels"]["n"], "0");
    // ... four more into a queue of two: the two oldest are dropped, without waiting.
    for i in 1..=4 {
        deliverer.notify(&fire(&mut manager, i));
    }
    let s = stats_of(&deliverer, "ops");
    assert_eq!((s.dropped, s.queued), (2, 3));
    gate.add_permits(3);
    let mut ns = Vec::new();
    for _ in 0..2 {
        ns.push(
            next(&mut rx).await.json()["alerts"][0]["labels"]["n"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(ns, vec!["3", "4"], "newest kept, in order");
    assert!(deliverer.flush(WAIT).await);
    let s = stats_of(&deliverer, "ops");
    assert_eq!((s.sent, s.dropped, s.queued), (3, 2, 0));

    let text = deliverer.render_prometheus();
    assert!(
        text.contains("tinyfleet_alerts_delivery_sent_total{receiver=\"ops\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("tinyfleet_alerts_delivery_dropped_total{receiver=\"ops\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tinyfleet_alerts_delivery_queued gauge"),
        "{text}"
    );
}

/// A `MakeWriter` collecting log output in memory.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// Current-thread runtime: the workers run on this thread, under the thread-local subscriber.
#[tokio::test]
async fn secrets_never_reach_logs_or_errors_and_workers_end_on_drop() {
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // A port with nothing listening: connection refused, retried, then failed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (addr, mut rx) = start_server(&[500], None).await;
    let mut cfg = config(vec![
        webhook(
            "dead",
            format!("http://user:pa55word@{closed}/hook?token=QUERYSECRET"),
            Some("BEARERSECRET"),
        ),
        webhook(
            "flaky",
            format!("http://user:pa55word@{addr}/hook?token=QUERYSECRET"),
            Some("BEARERSECRET"),
        ),
    ]);
    cfg.delivery.max_attempts = 2;
    let mut manager = AlertManager::new(cfg.clone()).unwrap();
    let (deliverer, workers) = Deliverer::spawn(&cfg).unwrap();
    deliverer.notify(&manager.evaluate(0, "presence", vec![Condition::new("DeviceOffline", 1.0)]));
    for _ in 0..2 {
        let req = next(&mut rx).await;
        // The bearer token replaces the basic auth reqwest derives from URL credentials.
        assert_eq!(req.header("authorization"), Some("Bearer BEARERSECRET"));
        assert_eq!(req.uri.query(), Some("token=QUERYSECRET"));
    }
    assert!(deliverer.flush(WAIT).await);
    let dead = stats_of(&deliverer, "dead");
    assert_eq!((dead.sent, dead.failed, dead.retried), (0, 1, 1));
    assert_eq!(stats_of(&deliverer, "flaky").sent, 1);

    let debug = format!("{deliverer:?} {cfg:?}");
    drop(deliverer);
    tokio::time::timeout(WAIT, workers)
        .await
        .expect("workers end once the last handle is dropped")
        .unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("will retry"),
        "expected retry logs, got:\n{text}"
    );
    assert!(text.contains(&format!("http://{closed}/hook")), "{text}");
    for haystack in [&text, &debug, &dead.last_error.unwrap_or_default()] {
        for secret in ["pa55word", "QUERYSECRET", "BEARERSECRET", "user:"] {
            assert!(
                !haystack.contains(secret),
                "{secret} leaked into:\n{haystack}"
            );
        }
    }
}
