//! Staged rollouts: create, list, status, audit log, operator actions, and continuous-delivery
//! policies per model. Everything goes through the synchronous
//! [`Rollouts`](tinyfleet_ota_service::service::Rollouts) service in `spawn_blocking`;
//! changes need the operator role and are recorded under the token's name.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use tinyfleet_ota_service::service::{CreateRollout, RolloutPolicy, ServiceError};
use tinyfleet_store::now_ms;

use crate::{ApiError, ApiState, Caller, Role, blocking};

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound(m) => ApiError::NotFound(m),
            ServiceError::Conflict(m) => ApiError::Conflict(m),
            ServiceError::Invalid(m) => ApiError::BadRequest(m),
            ServiceError::Store(e) => e.into(),
            e @ ServiceError::Internal(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// A JSON body: bad JSON or unknown fields are a 400 naming the problem.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

/// `POST /api/v1/rollouts`: starts a rollout (operator); 201 with its status.
pub(crate) async fn create(
    caller: Caller,
    State(s): State<ApiState>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let req: CreateRollout = parse(&body)?;
    let status = blocking(move || Ok(s.rollouts.create(req, &caller.name, now_ms())?)).await?;
    Ok((StatusCode::CREATED, Json(status)))
}

pub(crate) async fn list(
    _caller: Caller,
    State(s): State<ApiState>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(blocking(move || Ok(s.rollouts.list())).await?))
}

pub(crate) async fn status(
    _caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(blocking(move || Ok(s.rollouts.status(&id)?)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditParams {
    /// Records with an id above this one.
    after: Option<i64>,
    limit: Option<u32>,
}

pub(crate) async fn audit(
    _caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(p): Query<AuditParams>,
) -> Result<impl IntoResponse, ApiError> {
    let (after, limit) = (p.after.unwrap_or(0), p.limit.unwrap_or(100).clamp(1, 1000));
    Ok(Json(
        blocking(move || Ok(s.rollouts.audit(&id, after, limit)?)).await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: String,
}

/// An operator's action on a rollout.
#[derive(Debug, Clone, Copy)]
enum Op {
    Pause,
    Resume,
    Advance,
    Abort,
}

async fn operate(
    caller: Caller,
    s: ApiState,
    id: String,
    body: Bytes,
    op: Op,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        ReasonBody::default()
    } else {
        parse::<ReasonBody>(&body)?
    }
    .reason;
    if reason.len() > 1024 {
        return Err(ApiError::BadRequest("reason: at most 1024 bytes".into()));
    }
    let who = caller.name.clone();
    let status = blocking(move || {
        let (r, now) = (&s.rollouts, now_ms());
        Ok(match op {
            Op::Pause => r.pause(&id, &who, &reason, now)?,
            Op::Resume => r.resume(&id, &who, now)?,
            Op::Advance => r.advance(&id, &who, now)?,
            Op::Abort => r.abort(&id, &who, &reason, now)?,
        })
    })
    .await?;
    tracing::info!(rollout = %status.id, op = ?op, by = %caller.name, "rollout operation");
    Ok(Json(status))
}

pub(crate) async fn pause(
    caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    operate(caller, s, id, body, Op::Pause).await
}

pub(crate) async fn resume(
    caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    operate(caller, s, id, body, Op::Resume).await
}

pub(crate) async fn advance(
    caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    operate(caller, s, id, body, Op::Advance).await
}

pub(crate) async fn abort(
    caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    operate(caller, s, id, body, Op::Abort).await
}

pub(crate) async fn get_policy(
    _caller: Caller,
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let policy = blocking(move || {
        s.rollouts
            .policy(&model)?
            .ok_or_else(|| ApiError::NotFound(format!("no rollout policy for {model}")))
    })
    .await?;
    Ok(Json(policy))
}

/// `PUT`: sets the model's continuous-delivery policy (operator); every version registered
/// from then on starts a rollout with these plan fields when none of the model is active.
pub(crate) async fn put_policy(
    caller: Caller,
    State(s): State<ApiState>,
    Path(model): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let policy: RolloutPolicy = parse(&body)?;
    let m = model.clone();
    blocking(move || Ok(s.rollouts.set_policy(&m, Some(&policy), now_ms())?)).await?;
    tracing::info!(model = %model, by = %caller.name, "rollout policy set");
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn delete_policy(
    caller: Caller,
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let m = model.clone();
    let existed = blocking(move || Ok(s.rollouts.set_policy(&m, None, now_ms())?)).await?;
    if !existed {
        return Err(ApiError::NotFound(format!("no rollout policy for {model}")));
    }
    tracing::info!(model = %model, by = %caller.name, "rollout policy removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::http::StatusCode;
    use tinyfleet_store::{Batch, DeviceState, Presence};

    use crate::tests::{call, state};

    #[tokio::test]
    async fn rollouts_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(dir.path());
        let store = s.store.clone();
        let app = crate::router(s);
        let op = Some("op-token");
        let read = Some("read-token");
        for i in 0..12 {
            let id = format!("d{i:02}");
            store.registry().provision(&id, BTreeMap::new()).unwrap();
            store
                .commit(&Batch {
                    states: vec![DeviceState {
                        id,
                        presence: Presence {
                            online: true,
                            ..Presence::default()
                        },
                        model_id: Some("kws".into()),
                        model_version: Some("1.0".into()),
                        hw: Some("nrf52840".into()),
                        ..DeviceState::default()
                    }],
                    ..Batch::default()
                })
                .unwrap();
        }
        let upload = |v: &'static str, seq: u32, byte: u8| {
            let app = app.clone();
            async move {
                let (st, _, body) = crate::tests::raw(
                    &app,
                    "POST",
                    &format!("/api/v1/models/kws/versions/{v}?seq={seq}&hw=nrf52840"),
                    Some("op-token"),
                    &[],
                    vec![byte; 4000],
                )
                .await;
                let json: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                (st, json)
            }
        };
        assert_eq!(upload("1.0", 1, 1).await.0, StatusCode::CREATED);

        // A continuous-delivery policy: validated, stored, and used by the next upload.
        let policy = r#"{"stages":[{"share":0.5,"min_devices":5,"soak_ms":60000,"deadline_ms":600000},
                                   {"share":1.0,"soak_ms":60000,"deadline_ms":600000}],
                         "quality":{"required":false},"install":{"min_done":5}}"#;
        let uri = "/api/v1/models/kws/policy";
        assert_eq!(
            call(&app, "GET", uri, read, "").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            call(&app, "PUT", uri, read, policy).await.0,
            StatusCode::FORBIDDEN
        );
        let (st, err) = call(&app, "PUT", uri, op, r#"{"offers_per_minute":0}"#).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert!(err["error"].as_str().unwrap().contains("offers_per_minute"));
        assert_eq!(
            call(&app, "PUT", uri, op, r#"{"bogus":1}"#).await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call(&app, "PUT", uri, op, policy).await.0,
            StatusCode::NO_CONTENT
        );
        let (st, got) = call(&app, "GET", uri, read, "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(got["install"]["min_done"], 5);

        let (st, body) = upload("1.1", 2, 2).await;
        assert_eq!(st, StatusCode::CREATED);
        let id = body["rollout"]
            .as_str()
            .expect("the policy started a rollout");
        assert_eq!(
            call(&app, "DELETE", uri, op, "").await.0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            call(&app, "DELETE", uri, op, "").await.0,
            StatusCode::NOT_FOUND
        );

        let (st, list) = call(&app, "GET", "/api/v1/rollouts", read, "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(list.as_array().unwrap().len(), 1);
        let (st, status) = call(&app, "GET", &format!("/api/v1/rollouts/{id}"), read, "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(status["state"], "running");
        assert_eq!(status["target"]["version"], "1.1");
        assert_eq!(status["totals"]["targeted"], 12);
        assert!(status["stages"][0]["counts"]["offered"].as_u64().unwrap() >= 5);
        assert!(status["gates"]["install"]["verdict"].is_string());
        assert_eq!(
            call(&app, "GET", "/api/v1/rollouts/nope", read, "").await.0,
            StatusCode::NOT_FOUND
        );

        // A second active rollout of the model: 409; a bad body: 400; read tokens: 403.
        let create = r#"{"model_id":"kws","version":"1.1","id":"second"}"#;
        assert_eq!(
            call(&app, "POST", "/api/v1/rollouts", read, create).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            call(&app, "POST", "/api/v1/rollouts", op, create).await.0,
            StatusCode::CONFLICT
        );
        assert_eq!(
            call(
                &app,
                "POST",
                "/api/v1/rollouts",
                op,
                r#"{"model_id":"kws"}"#
            )
            .await
            .0,
            StatusCode::BAD_REQUEST
        );

        // Operator actions, with and without a reason.
        let act = |a: &str| format!("/api/v1/rollouts/{id}/{a}");
        assert_eq!(
            call(&app, "POST", &act("pause"), read, "").await.0,
            StatusCode::FORBIDDEN
        );
        let (st, s) = call(&app, "POST", &act("pause"), op, r#"{"reason":"lunch"}"#).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(s["state"], "paused");
        assert_eq!(s["paused"]["note"], "lunch");
        assert_eq!(
            call(&app, "POST", &act("pause"), op, "").await.0,
            StatusCode::CONFLICT
        );
        let (st, s) = call(&app, "POST", &act("resume"), op, "").await;
        assert_eq!((st, s["state"].as_str()), (StatusCode::OK, Some("running")));
        let (st, s) = call(&app, "POST", &act("advance"), op, "").await;
        assert_eq!((st, s["stage"].as_u64()), (StatusCode::OK, Some(1)));
        let (st, s) = call(&app, "POST", &act("abort"), op, r#"{"reason":"test"}"#).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(s["state"], "rolling_back");

        let (st, log) = call(&app, "GET", &act("audit"), read, "").await;
        assert_eq!(st, StatusCode::OK);
        let log = log.as_array().unwrap();
        let events: Vec<&str> = log.iter().map(|a| a["event"].as_str().unwrap()).collect();
        assert_eq!(&events[..3], ["created", "stage_opened", "paused"]);
        assert!(events.contains(&"aborted"));
        assert_eq!(log[2]["cause"]["operator"], "ops");
        let after = log[1]["id"].as_i64().unwrap();
        let (_, page) = call(
            &app,
            "GET",
            &format!("{}?after={after}&limit=1", act("audit")),
            read,
            "",
        )
        .await;
        assert_eq!(page.as_array().unwrap().len(), 1);
        assert_eq!(page[0]["event"], "paused");
    }
}
