//! Monitoring endpoints: model monitoring profiles, drift evaluations and findings, alerts and
//! silences. Reads and changes go through the [`Monitor`](tinyfleet_monitor::Monitor).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use tinyfleet_alerts::{AlertState, Matcher, Silence, SilenceError};
use tinyfleet_drift::profile::MonitoringProfile;
use tinyfleet_monitor::MonitorError;
use tinyfleet_store::now_ms;

use crate::{ApiError, ApiState, Caller, Role, blocking};

impl From<MonitorError> for ApiError {
    fn from(e: MonitorError) -> Self {
        match e {
            MonitorError::Store(e) => e.into(),
            MonitorError::Silence(SilenceError::NotFound(id)) => {
                ApiError::NotFound(format!("no silence {id}"))
            }
            MonitorError::Silence(SilenceError::TooMany(n)) => {
                ApiError::Conflict(format!("{n} silences stored; expire some first"))
            }
            e @ (MonitorError::Silence(_) | MonitorError::Profile(_)) => {
                ApiError::BadRequest(e.to_string())
            }
        }
    }
}

fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

pub(crate) async fn models(
    _caller: Caller,
    State(s): State<ApiState>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(blocking(move || Ok(s.store.profile_list()?)).await?))
}

pub(crate) async fn get_profile(
    _caller: Caller,
    State(s): State<ApiState>,
    Path((id, version)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let text = blocking(move || {
        s.store
            .profile(&id, &version)?
            .ok_or_else(|| ApiError::NotFound(format!("no monitoring profile for {id}@{version}")))
    })
    .await?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ApiError::Internal(format!("stored profile unreadable: {e}")))?;
    Ok(Json(value))
}

/// Stores a model version's monitoring profile (`tinyfleet profile build` writes one).
pub(crate) async fn put_profile(
    caller: Caller,
    State(s): State<ApiState>,
    Path((id, version)): Path<(String, String)>,
    body: Result<Json<MonitoringProfile>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let profile = json_body(body)?;
    let who = caller.name.clone();
    let (id2, version2) = (id.clone(), version.clone());
    blocking(move || {
        Ok(s.monitor
            .put_profile(&id2, &version2, &profile, &who, now_ms())?)
    })
    .await?;
    tracing::info!(model = %id, version = %version, by = %caller.name, "monitoring profile stored");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub(crate) struct DriftParams {
    since: Option<i64>,
    limit: Option<usize>,
}

/// Findings in force and the recorded evaluations (newest first).
pub(crate) async fn drift(
    _caller: Caller,
    State(s): State<ApiState>,
    Query(p): Query<DriftParams>,
) -> Result<impl IntoResponse, ApiError> {
    let out = blocking(move || {
        let evaluations = s.monitor.evaluations(
            p.since.unwrap_or(i64::MIN),
            p.limit.unwrap_or(10).clamp(1, 1000),
        )?;
        Ok(serde_json::json!({
            "active_findings": s.monitor.active_findings(),
            "evaluations": evaluations,
        }))
    })
    .await?;
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
pub(crate) struct AlertParams {
    /// `pending`, `firing` or `resolved`.
    state: Option<String>,
}

pub(crate) async fn alerts(
    _caller: Caller,
    State(s): State<ApiState>,
    Query(p): Query<AlertParams>,
) -> Result<impl IntoResponse, ApiError> {
    let wanted = match p.state.as_deref() {
        None => None,
        Some("pending") => Some(AlertState::Pending),
        Some("firing") => Some(AlertState::Firing),
        Some("resolved") => Some(AlertState::Resolved),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "state {other:?} must be pending, firing or resolved"
            )));
        }
    };
    // The monitor's lock is held during an evaluation: wait for it off the runtime.
    let alerts = blocking(move || {
        let mut alerts = s.monitor.alerts(now_ms());
        if let Some(w) = wanted {
            alerts.retain(|a| a.state == w);
        }
        Ok(alerts)
    })
    .await?;
    Ok(Json(alerts))
}

pub(crate) async fn silences(
    _caller: Caller,
    State(s): State<ApiState>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        blocking(move || Ok(s.monitor.silences(now_ms()))).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SilenceBody {
    matchers: Vec<Matcher>,
    /// Default: now.
    starts_at_ms: Option<i64>,
    /// Give this or `duration_secs`.
    ends_at_ms: Option<i64>,
    duration_secs: Option<u64>,
    comment: String,
    /// Default: the token's name.
    created_by: Option<String>,
    /// Updates that silence instead of creating one.
    id: Option<String>,
}

/// Creates (or updates) a silence; returns its id.
pub(crate) async fn create_silence(
    caller: Caller,
    State(s): State<ApiState>,
    body: Result<Json<SilenceBody>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let b = json_body(body)?;
    let now = now_ms();
    let starts_at_ms = b.starts_at_ms.unwrap_or(now);
    let ends_at_ms = match (b.ends_at_ms, b.duration_secs) {
        (Some(end), None) => end,
        (None, Some(d)) => starts_at_ms.saturating_add((d as i64).saturating_mul(1000)),
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of ends_at_ms or duration_secs".into(),
            ));
        }
    };
    let silence = Silence {
        id: b.id.unwrap_or_default(),
        matchers: b.matchers,
        starts_at_ms,
        ends_at_ms,
        created_by: b.created_by.unwrap_or_else(|| caller.name.clone()),
        comment: b.comment,
    };
    let id = blocking(move || Ok(s.monitor.add_silence(now, silence)?)).await?;
    tracing::info!(silence = %id, by = %caller.name, "silence stored");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": id }))))
}

/// Ends a silence now (it stays listed as expired for a while).
pub(crate) async fn expire_silence(
    caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let id2 = id.clone();
    blocking(move || Ok(s.monitor.expire_silence(now_ms(), &id2)?)).await?;
    tracing::info!(silence = %id, by = %caller.name, "silence expired");
    Ok(StatusCode::NO_CONTENT)
}
