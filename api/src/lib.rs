//! The fleet API: token-protected JSON over HTTP (axum), an OpenAPI document, and Prometheus
//! metrics for the service itself.
//!
//! - `/api/v1/...` needs `Authorization: Bearer <token>`; tokens have a role, `read` or
//!   `operator` (provisioning and revocation need `operator`). Tokens are compared as SHA-256
//!   digests in constant time and never logged.
//! - `/metrics`, `/openapi.json`, `/healthz` and the web UI's assets (`/`, `/ui/...`) are open:
//!   they carry no fleet data. So is `/ota/v1/objects/{sha256}`: devices hold no API token,
//!   and they check what they download against the digest in a signed manifest.
//! - Store access is synchronous and runs in `spawn_blocking`; handlers never block the runtime.
//! - Errors are JSON `{"error": "..."}` with the right status: 400 for bad input, 401/403 for
//!   auth, 404, 409 for conflicts; internal causes are logged, not returned.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tinyfleet_ingest::aggregate::WindowAgg;
use tinyfleet_ingest::metrics::Metrics;
use tinyfleet_store::{DeviceQuery, Store, StoreError};

mod monitoring;
mod openapi;
mod ota;
mod rollouts;
mod ui;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Operator,
}

/// An API token as configured: its SHA-256 (hex) and role. Plain tokens never stay in memory
/// longer than it takes to hash them.
#[derive(Clone, Deserialize, Serialize)]
pub struct ApiToken {
    pub name: String,
    pub sha256: String,
    pub role: Role,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    /// A token entry from its plain value.
    pub fn from_plain(name: &str, token: &str, role: Role) -> Self {
        Self {
            name: name.to_owned(),
            sha256: hex::encode(Sha256::digest(token.as_bytes())),
            role,
        }
    }
}

/// Extra Prometheus text for `/metrics`, produced on each scrape.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub tokens: Arc<Vec<ApiToken>>,
    /// Drift, alerts and silences.
    pub monitor: tinyfleet_monitor::Monitor,
    /// Model versions, patches and signed offers.
    pub ota: Arc<tinyfleet_ota_service::Ota>,
    /// Staged rollouts and continuous-delivery policies.
    pub rollouts: Arc<tinyfleet_ota_service::service::Rollouts>,
    /// Extra Prometheus text appended to `/metrics` (e.g. the broker's or a sink's).
    pub extra_metrics: ExtraMetrics,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("store", &self.store)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// The API's error type.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    Forbidden,
    NotFound(String),
    Conflict(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "missing or unknown bearer token".to_owned(),
            ),
            ApiError::Forbidden => (
                StatusCode::FORBIDDEN,
                "this token's role may not do that (operator needed)".to_owned(),
            ),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "api internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the server log".to_owned(),
                )
            }
        };
        let mut resp = (status, Json(serde_json::json!({ "error": msg }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DeviceExists(_) => ApiError::Conflict(e.to_string()),
            StoreError::NoDevice(_) => ApiError::NotFound(e.to_string()),
            StoreError::BadDeviceId(_) | StoreError::ReservedDeviceId(_) => {
                ApiError::BadRequest(e.to_string())
            }
            e => ApiError::Internal(e.to_string()),
        }
    }
}

/// The caller, authenticated by its bearer token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        for t in state.tokens.iter() {
            let Ok(want) = hex::decode(&t.sha256) else {
                continue;
            };
            if want.len() == 32
                && want
                    .iter()
                    .zip(digest.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
            {
                return Ok(Caller {
                    name: t.name.clone(),
                    role: t.role,
                });
            }
        }
        Err(ApiError::Unauthorized)
    }
}

impl Caller {
    fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
}

/// The whole HTTP surface.
pub fn router(state: ApiState) -> Router {
    // The artifact upload takes up to the configured size; everything else the default 2 MB.
    let max_artifact = usize::try_from(state.ota.config().max_artifact_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .route("/", get(ui::index))
        .route("/ui/{file}", get(ui::file))
        .route("/ui/pages/{file}", get(ui::page))
        .route("/api/v1/whoami", get(ui::whoami))
        .route("/api/v1/overview", get(ui::overview))
        .route("/api/v1/cohorts/drift", get(ui::cohort_drift))
        .route("/api/v1/devices", get(list_devices).post(provision))
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/devices/{id}/revoke", post(revoke))
        .route("/api/v1/devices/{id}/windows", get(device_windows))
        .route("/api/v1/cohorts", get(cohorts))
        .route("/api/v1/cohorts/windows", get(cohort_windows))
        .route("/api/v1/ingest", get(ingest_counters))
        .route("/api/v1/models", get(monitoring::models))
        .route(
            "/api/v1/models/{id}/{version}/profile",
            get(monitoring::get_profile).put(monitoring::put_profile),
        )
        .route("/api/v1/drift", get(monitoring::drift))
        .route("/api/v1/alerts", get(monitoring::alerts))
        .route(
            "/api/v1/silences",
            get(monitoring::silences).post(monitoring::create_silence),
        )
        .route("/api/v1/silences/{id}", delete(monitoring::expire_silence))
        .route(
            "/api/v1/models/{id}/versions/{version}",
            post(ota::upload).layer(DefaultBodyLimit::max(max_artifact)),
        )
        .route("/api/v1/models/{id}/versions", get(ota::versions))
        .route(
            "/api/v1/models/{id}/versions/{version}/offer",
            get(ota::offer),
        )
        .route("/api/v1/ota/keys", get(ota::keys))
        .route(
            "/api/v1/models/{id}/policy",
            get(rollouts::get_policy)
                .put(rollouts::put_policy)
                .delete(rollouts::delete_policy),
        )
        .route(
            "/api/v1/rollouts",
            get(rollouts::list).post(rollouts::create),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::status))
        .route("/api/v1/rollouts/{id}/audit", get(rollouts::audit))
        .route("/api/v1/rollouts/{id}/pause", post(rollouts::pause))
        .route("/api/v1/rollouts/{id}/resume", post(rollouts::resume))
        .route("/api/v1/rollouts/{id}/advance", post(rollouts::advance))
        .route("/api/v1/rollouts/{id}/abort", post(rollouts::abort))
        .route("/ota/v1/objects/{sha}", get(ota::object))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

/// Error answers that do not come from [`ApiError`] get its JSON form too, `{"error": "..."}`,
/// with their status kept: axum's own rejections (a body over its limit, a path or query
/// parameter that does not parse, invalid UTF-8 in a path) and unknown methods. Without this
/// they are plain text, or empty, and clients that expect JSON errors stumble on bad input.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Rejection texts are short; anything else is replaced by the status's reason.
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({ "error": text }).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn metrics(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    // The extra metrics may wait for locks (the monitor's, during an evaluation).
    let body = blocking(move || {
        let mut body = s.metrics.render();
        body.push_str(&(s.extra_metrics)());
        Ok(body)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body))
}

#[derive(Debug, Deserialize)]
struct ListParams {
    cohort: Option<String>,
    /// `key=value`
    tag: Option<String>,
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_devices(
    _caller: Caller,
    State(s): State<ApiState>,
    Query(p): Query<ListParams>,
) -> Result<impl IntoResponse, ApiError> {
    let tag = match p.tag {
        None => None,
        Some(t) => Some(
            t.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| ApiError::BadRequest(format!("tag {t:?} must be key=value")))?,
        ),
    };
    if let Some(st) = &p.state
        && !["online", "offline", "unseen", "revoked"].contains(&st.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "state {st:?} must be online, offline, unseen or revoked"
        )));
    }
    let q = DeviceQuery {
        cohort: p.cohort,
        tag,
        state: p.state,
        after: p.after,
        limit: p.limit.unwrap_or(100).clamp(1, 1000),
    };
    let page = blocking(move || Ok(s.store.list_devices(&q)?)).await?;
    Ok(Json(page))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionBody {
    id: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

async fn provision(
    caller: Caller,
    State(s): State<ApiState>,
    body: Result<Json<ProvisionBody>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let who = caller.name.clone();
    let creds = blocking(move || Ok(s.store.registry().provision(&body.id, body.tags)?)).await?;
    tracing::info!(device = %creds.device_id, by = %who, "device provisioned");
    Ok((StatusCode::CREATED, Json(creds)))
}

async fn revoke(
    caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let who = caller.name.clone();
    let id2 = id.clone();
    blocking(move || Ok(s.store.registry().revoke(&id2)?)).await?;
    tracing::info!(device = %id, by = %who, "device revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn device(
    _caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let out = blocking(move || {
        let record = s
            .store
            .registry()
            .get(&id)
            .ok_or_else(|| ApiError::NotFound(format!("no device {id}")))?;
        let state = s.store.device_state(&id)?;
        // The newest OTA progress report, with its state's name.
        use tinyfleet_ota_service::rollout::InstallState;
        let ota = s.store.device_ota(&id)?.map(|o| {
            let mut v = serde_json::json!(o);
            v["state_name"] = serde_json::json!(InstallState::from_code(o.state));
            v
        });
        Ok(serde_json::json!({ "device": record, "state": state, "ota": ota }))
    })
    .await?;
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
struct WindowParams {
    since: Option<i64>,
    limit: Option<usize>,
    cohort: Option<String>,
}

/// A stored window with derived figures next to the raw aggregate.
fn describe(agg: serde_json::Value) -> serde_json::Value {
    let parsed: Option<WindowAgg> = serde_json::from_value(agg.clone()).ok();
    let derived = parsed.map(|a| {
        serde_json::json!({
            "accuracy": a.accuracy(),
            "feature_means": a.features.iter().map(|f| f.mean()).collect::<Vec<_>>(),
            "feature_sds": a.features.iter().map(|f| f.sd()).collect::<Vec<_>>(),
            "battery_avg_mv": (a.health.battery_n > 0)
                .then(|| a.health.battery_sum_mv as f64 / a.health.battery_n as f64),
            "rssi_avg_dbm": (a.health.rssi_n > 0)
                .then(|| a.health.rssi_sum_dbm as f64 / a.health.rssi_n as f64),
        })
    });
    serde_json::json!({ "derived": derived, "agg": agg })
}

async fn device_windows(
    _caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(p): Query<WindowParams>,
) -> Result<impl IntoResponse, ApiError> {
    let out = blocking(move || {
        if s.store.registry().get(&id).is_none() {
            return Err(ApiError::NotFound(format!("no device {id}")));
        }
        let windows = s.store.device_windows(
            &id,
            p.since.unwrap_or(i64::MIN),
            p.limit.unwrap_or(100).clamp(1, 1000),
        )?;
        Ok(windows
            .into_iter()
            .map(|w| {
                serde_json::json!({
                    "start_ms": w.start_ms, "cohort": w.cohort, "window": describe(w.agg)
                })
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(out))
}

async fn cohorts(
    _caller: Caller,
    State(s): State<ApiState>,
) -> Result<impl IntoResponse, ApiError> {
    let out = blocking(move || {
        let mut out = Vec::new();
        for (cohort, windows, latest) in s.store.cohorts()? {
            let latest_window = s.store.cohort_window(&cohort, latest)?;
            let devices = s.store.cohort_window_devices(&cohort, latest)?;
            out.push(serde_json::json!({
                "cohort": cohort,
                "windows": windows,
                "latest_start_ms": latest,
                "latest_devices": devices,
                "latest": latest_window.map(|w| describe(w.agg)),
            }));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(out))
}

async fn cohort_windows(
    _caller: Caller,
    State(s): State<ApiState>,
    Query(p): Query<WindowParams>,
) -> Result<impl IntoResponse, ApiError> {
    let cohort = p
        .cohort
        .ok_or_else(|| ApiError::BadRequest("query parameter cohort is required".into()))?;
    let out = blocking(move || {
        let windows = s.store.cohort_windows(
            &cohort,
            p.since.unwrap_or(i64::MIN),
            p.limit.unwrap_or(100).clamp(1, 1000),
        )?;
        windows
            .into_iter()
            .map(|w| {
                let devices = s.store.cohort_window_devices(&w.cohort, w.start_ms)?;
                Ok(serde_json::json!({
                    "start_ms": w.start_ms, "devices": devices, "window": describe(w.agg)
                }))
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await?;
    Ok(Json(out))
}

async fn ingest_counters(_caller: Caller, State(s): State<ApiState>) -> impl IntoResponse {
    let counters: BTreeMap<String, i64> = s.metrics.snapshot().into_iter().collect();
    Json(counters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// Offers published by the rollout service, for tests.
    #[derive(Debug, Default)]
    pub(crate) struct NullSink;

    impl tinyfleet_ota_service::service::OfferSink for NullSink {
        fn publish(&self, _device: &str, _offer: Option<Vec<u8>>) {}
    }

    fn app(dir: &std::path::Path) -> Router {
        router(state(dir))
    }

    pub(crate) fn state(dir: &std::path::Path) -> ApiState {
        let store = Store::open(dir).unwrap();
        let alerts = tinyfleet_alerts::AlertsConfig::default();
        let (deliverer, _) = tinyfleet_alerts::Deliverer::spawn(&alerts).unwrap();
        let monitor = tinyfleet_monitor::Monitor::open(
            store.clone(),
            tinyfleet_monitor::MonitorConfig {
                window_ms: 60_000,
                min_grace_ms: 0,
                settings: Default::default(),
                health: Default::default(),
                drift: Default::default(),
                alerts,
            },
            deliverer,
            None,
            None,
        )
        .unwrap();
        let ota = Arc::new(
            tinyfleet_ota_service::Ota::open(store.clone(), dir, Default::default()).unwrap(),
        );
        let rollouts = Arc::new(
            tinyfleet_ota_service::service::Rollouts::open(
                store.clone(),
                ota.clone(),
                Arc::new(NullSink),
                0,
            )
            .unwrap(),
        );
        ApiState {
            store,
            monitor,
            ota,
            rollouts,
            metrics: Arc::new(Metrics::default()),
            tokens: Arc::new(vec![
                ApiToken::from_plain("ops", "op-token", Role::Operator),
                ApiToken::from_plain("viewer", "read-token", Role::Read),
            ]),
            extra_metrics: Arc::new(String::new),
        }
    }

    pub(crate) async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    #[tokio::test]
    async fn auth_roles_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        assert_eq!(
            call(&app, "GET", "/api/v1/devices", None, "").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&app, "GET", "/api/v1/devices", Some("nope"), "")
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        let body = r#"{"id":"dev-1","tags":{"site":"a"}}"#;
        assert_eq!(
            call(&app, "POST", "/api/v1/devices", Some("read-token"), body)
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        let (st, creds) = call(&app, "POST", "/api/v1/devices", Some("op-token"), body).await;
        assert_eq!(st, StatusCode::CREATED);
        assert_eq!(creds["mqtt_password"].as_str().unwrap().len(), 64);
        assert_eq!(
            call(&app, "POST", "/api/v1/devices", Some("op-token"), body)
                .await
                .0,
            StatusCode::CONFLICT
        );
        let (st, err) = call(
            &app,
            "POST",
            "/api/v1/devices",
            Some("op-token"),
            "{not json",
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert!(err["error"].is_string());
        assert_eq!(
            call(
                &app,
                "POST",
                "/api/v1/devices",
                Some("op-token"),
                r#"{"id":"a/b"}"#
            )
            .await
            .0,
            StatusCode::BAD_REQUEST
        );
        let (st, page) = call(
            &app,
            "GET",
            "/api/v1/devices?tag=site=a",
            Some("read-token"),
            "",
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(page["devices"][0]["id"], "dev-1");
        assert_eq!(
            call(
                &app,
                "GET",
                "/api/v1/devices?state=weird",
                Some("read-token"),
                ""
            )
            .await
            .0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call(&app, "GET", "/api/v1/devices/nope", Some("read-token"), "")
                .await
                .0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            call(
                &app,
                "POST",
                "/api/v1/devices/dev-1/revoke",
                Some("op-token"),
                ""
            )
            .await
            .0,
            StatusCode::NO_CONTENT
        );
        let (_, page) = call(
            &app,
            "GET",
            "/api/v1/devices?state=revoked",
            Some("read-token"),
            "",
        )
        .await;
        assert_eq!(page["devices"][0]["id"], "dev-1");
        assert_eq!(
            call(&app, "GET", "/openapi.json", None, "").await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn profiles_alerts_and_silences() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let profile = tinyfleet_drift::sim::profile(2_000, 7);
        let body = serde_json::to_string(&profile).unwrap();
        let path = "/api/v1/models/sim/1/profile";
        assert_eq!(
            call(&app, "PUT", path, Some("read-token"), &body).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            call(&app, "PUT", path, Some("op-token"), &body).await.0,
            StatusCode::NO_CONTENT
        );
        let (st, err) = call(
            &app,
            "PUT",
            "/api/v1/models/sim/2/profile",
            Some("op-token"),
            &body,
        )
        .await;
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "model version must match the path"
        );
        assert!(err["error"].as_str().unwrap().contains("sim@1"));
        let mut broken = profile.clone();
        broken.features[0].hist.upper.reverse();
        let (st, err) = call(
            &app,
            "PUT",
            path,
            Some("op-token"),
            &serde_json::to_string(&broken).unwrap(),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
        let (st, back) = call(&app, "GET", path, Some("read-token"), "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(back["features"].as_array().unwrap().len(), 8);
        let (_, models) = call(&app, "GET", "/api/v1/models", Some("read-token"), "").await;
        assert_eq!(models[0]["model_id"], "sim");
        assert_eq!(models[0]["updated_by"], "ops");
        assert_eq!(
            call(
                &app,
                "GET",
                "/api/v1/models/sim/9/profile",
                Some("read-token"),
                ""
            )
            .await
            .0,
            StatusCode::NOT_FOUND
        );

        let silence = r#"{"matchers":[{"name":"device","value":"d1","op":"="}],
                          "duration_secs":3600,"comment":"maintenance"}"#;
        assert_eq!(
            call(
                &app,
                "POST",
                "/api/v1/silences",
                Some("read-token"),
                silence
            )
            .await
            .0,
            StatusCode::FORBIDDEN
        );
        let (st, created) = call(&app, "POST", "/api/v1/silences", Some("op-token"), silence).await;
        assert_eq!(st, StatusCode::CREATED);
        let id = created["id"].as_str().unwrap().to_owned();
        let (_, list) = call(&app, "GET", "/api/v1/silences", Some("read-token"), "").await;
        assert_eq!(list[0]["state"], "active");
        assert_eq!(list[0]["created_by"], "ops");
        let everything = r#"{"matchers":[{"name":"device","value":".*","op":"=~"}],
                             "duration_secs":60,"comment":"all"}"#;
        assert_eq!(
            call(
                &app,
                "POST",
                "/api/v1/silences",
                Some("op-token"),
                everything
            )
            .await
            .0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call(
                &app,
                "DELETE",
                &format!("/api/v1/silences/{id}"),
                Some("op-token"),
                ""
            )
            .await
            .0,
            StatusCode::NO_CONTENT
        );
        let (_, list) = call(&app, "GET", "/api/v1/silences", Some("read-token"), "").await;
        assert_eq!(list[0]["state"], "expired");
        assert_eq!(
            call(
                &app,
                "DELETE",
                "/api/v1/silences/nope",
                Some("op-token"),
                ""
            )
            .await
            .0,
            StatusCode::NOT_FOUND
        );
        let (st, alerts) = call(
            &app,
            "GET",
            "/api/v1/alerts?state=firing",
            Some("read-token"),
            "",
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(alerts, serde_json::json!([]));
        assert_eq!(
            call(
                &app,
                "GET",
                "/api/v1/alerts?state=odd",
                Some("read-token"),
                ""
            )
            .await
            .0,
            StatusCode::BAD_REQUEST
        );
        let (st, drift) = call(&app, "GET", "/api/v1/drift", Some("read-token"), "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(drift["evaluations"], serde_json::json!([]));
    }

    pub(crate) async fn raw(
        app: &Router,
        method: &str,
        uri: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes().to_vec();
        (parts.status, parts.headers, bytes)
    }

    #[tokio::test]
    async fn model_versions_offers_and_ranged_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let image: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let url = "/api/v1/models/kws/versions/1.0?seq=1&hw=nrf52840&arena=40000";
        let (st, _, _) = raw(&app, "POST", url, Some("read-token"), &[], image.clone()).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _, body) = raw(&app, "POST", url, Some("op-token"), &[], image.clone()).await;
        assert_eq!(
            st,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let sha = v["sha256"].as_str().unwrap().to_owned();
        assert_eq!(v["created_by"], "ops");
        let lower = "/api/v1/models/kws/versions/0.9?seq=1&hw=nrf52840";
        let (st, _, _) = raw(&app, "POST", lower, Some("op-token"), &[], image.clone()).await;
        assert_eq!(st, StatusCode::CONFLICT, "anti-rollback");
        let (st, _, _) = raw(
            &app,
            "POST",
            "/api/v1/models/kws/versions/2?hw=x",
            Some("op-token"),
            &[],
            image.clone(),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "seq is required");
        let (_, list) = call(
            &app,
            "GET",
            "/api/v1/models/kws/versions",
            Some("read-token"),
            "",
        )
        .await;
        assert_eq!(list[0]["model_version"], "1.0");

        let (st, headers, offer) = raw(
            &app,
            "GET",
            "/api/v1/models/kws/versions/1.0/offer",
            Some("read-token"),
            &[],
            vec![],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/cose")
        );
        let (_, keys) = call(&app, "GET", "/api/v1/ota/keys", Some("read-token"), "").await;
        let public: [u8; 32] = hex::decode(keys[0]["public_key"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let kid = hex::decode(keys[0]["kid"].as_str().unwrap()).unwrap();
        let trusted = [tinyfleet_device::ota::manifest::TrustedKey { kid: &kid, public }];
        let mut scratch = [0u8; 2048];
        let m =
            tinyfleet_device::ota::manifest::verify_offer(&offer, &trusted, &mut scratch).unwrap();
        assert_eq!(hex::encode(m.object.0), sha);
        let (st, _, _) = raw(
            &app,
            "GET",
            "/api/v1/models/kws/versions/1.0/offer?base=zz",
            Some("read-token"),
            &[],
            vec![],
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);

        // Downloads: whole, ranged (resume), suffix, unsatisfiable, unknown.
        let obj = format!("/ota/v1/objects/{sha}");
        let (st, h, all) = raw(&app, "GET", &obj, None, &[], vec![]).await;
        assert_eq!((st, all.len()), (StatusCode::OK, 5000));
        assert_eq!(h[header::ACCEPT_RANGES], "bytes");
        let (st, h, part) = raw(&app, "GET", &obj, None, &[("range", "bytes=4096-")], vec![]).await;
        assert_eq!(st, StatusCode::PARTIAL_CONTENT);
        assert_eq!(h[header::CONTENT_RANGE], "bytes 4096-4999/5000");
        assert_eq!(part, image[4096..]);
        let (_, _, mid) = raw(&app, "GET", &obj, None, &[("range", "bytes=10-19")], vec![]).await;
        assert_eq!(mid, image[10..20]);
        let (_, _, tail) = raw(&app, "GET", &obj, None, &[("range", "bytes=-3")], vec![]).await;
        assert_eq!(tail, image[4997..]);
        let (st, h, _) = raw(&app, "GET", &obj, None, &[("range", "bytes=5000-")], vec![]).await;
        assert_eq!(st, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(h[header::CONTENT_RANGE], "bytes */5000");
        let (st, _, _) = raw(
            &app,
            "GET",
            &format!("/ota/v1/objects/{}", "0".repeat(64)),
            None,
            &[],
            vec![],
        )
        .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
}
