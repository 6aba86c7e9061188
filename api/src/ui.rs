//! The built-in web UI: static assets embedded in the binary (`dashboards/web/`), served at `/`
//! and `/ui/...`, and the small aggregation endpoints the pages need so a browser never has to
//! fetch the whole fleet (`/api/v1/whoami`, `/api/v1/overview`, `/api/v1/cohorts/drift`).
//!
//! The assets are open (they carry no fleet data); the pages ask for the API token and send it
//! as a bearer token on every call, like any other client.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tinyfleet_alerts::AlertState;
use tinyfleet_drift::engine::{Scope, ScopeKind, Subject};
use tinyfleet_ingest::aggregate::WindowAgg;
use tinyfleet_ota_service::rollout::RolloutState;
use tinyfleet_store::{now_ms, parse_cohort_key};

use crate::{ApiError, ApiState, Caller, blocking, describe};

/// `(path under /ui/, content type, bytes)`.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../dashboards/web/index.html"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../dashboards/web/style.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboards/web/app.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboards/web/charts.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../../dashboards/web/favicon.svg"),
    ),
    (
        "pages/overview.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboards/web/pages/overview.js"),
    ),
    (
        "pages/cohorts.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboards/web/pages/cohorts.js"),
    ),
    (
        "pages/devices.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboards/web/pages/devices.js"),
    ),
    (
        "pages/models.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboards/web/pages/models.js"),
    ),
    (
        "pages/rollouts.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboards/web/pages/rollouts.js"),
    ),
    (
        "pages/alerts.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboards/web/pages/alerts.js"),
    ),
];

/// Only same-origin scripts, styles and calls; no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; form-action 'none'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// One embedded asset with its content type. Assets are revalidated on every use
/// (`no-cache` + a content ETag answered with 304), so an upgrade is never mixed with stale
/// modules, and an unchanged asset costs one small round trip.
fn asset(path: &str, headers: &HeaderMap) -> Response {
    let Some((_, ctype, body)) = ASSETS.iter().find(|(p, _, _)| *p == path) else {
        return ApiError::NotFound(format!("no UI asset {path}")).into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&Sha256::digest(body)[..12]));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, HeaderValue::from_static(ctype))],
            *body,
        )
            .into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /`: the UI's page.
pub(crate) async fn index(headers: HeaderMap) -> Response {
    asset("index.html", &headers)
}

/// `GET /ui/{file}`.
pub(crate) async fn file(Path(file): Path<String>, headers: HeaderMap) -> Response {
    asset(&file, &headers)
}

/// `GET /ui/pages/{file}`.
pub(crate) async fn page(Path(file): Path<String>, headers: HeaderMap) -> Response {
    asset(&format!("pages/{file}"), &headers)
}

/// `GET /api/v1/whoami`: the caller's token name and role (the UI hides operator-only
/// controls from read-only tokens).
pub(crate) async fn whoami(caller: Caller) -> impl IntoResponse {
    Json(json!({ "name": caller.name, "role": caller.role }))
}

/// Live rollouts are those still able to change devices.
fn live(state: RolloutState) -> bool {
    matches!(
        state,
        RolloutState::Running | RolloutState::Paused | RolloutState::RollingBack
    )
}

/// `GET /api/v1/overview`: the fleet at a glance, aggregated on the server: devices by
/// presence state, devices per cohort (model version and hardware) by state with the cohort's
/// latest window health, alerts by state and severity (the firing ones listed, at most 100),
/// drift findings in force, and the live rollouts with their totals.
pub(crate) async fn overview(
    _caller: Caller,
    State(s): State<ApiState>,
) -> Result<impl IntoResponse, ApiError> {
    let out = blocking(move || {
        let now = now_ms();
        let mut totals: BTreeMap<&str, u64> = ["online", "offline", "unseen", "revoked"]
            .into_iter()
            .map(|k| (k, 0))
            .collect();
        let mut cohorts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut unknown_model = 0u64;
        for (state, cohort, n) in s.store.fleet_counts()? {
            if let Some(t) = totals.get_mut(state.as_str()) {
                *t += n;
            }
            match cohort {
                Some(c) if state != "revoked" => {
                    *cohorts.entry(c).or_default().entry(state).or_default() += n;
                }
                None if state != "revoked" && state != "unseen" => unknown_model += n,
                _ => {}
            }
        }
        let latest: BTreeMap<String, i64> = s
            .store
            .cohorts()?
            .into_iter()
            .map(|(c, _, latest)| (c, latest))
            .collect();
        let mut rows = Vec::new();
        for (cohort, by_state) in &cohorts {
            let (model_id, model_version, hw) = parse_cohort_key(cohort).unwrap_or(("", "", ""));
            let get = |k: &str| by_state.get(k).copied().unwrap_or(0);
            let window = match latest.get(cohort) {
                Some(&start) => s
                    .store
                    .cohort_window(cohort, start)?
                    .map(|w| json!({ "start_ms": start, "derived": describe(w.agg)["derived"] })),
                None => None,
            };
            rows.push(json!({
                "cohort": cohort, "model_id": model_id, "model_version": model_version, "hw": hw,
                "devices": by_state.values().sum::<u64>(),
                "online": get("online"), "offline": get("offline"),
                "latest": window,
            }));
        }
        let alerts = s.monitor.alerts(now);
        let mut by_severity: BTreeMap<String, u64> = BTreeMap::new();
        let (mut pending, mut suppressed) = (0u64, 0u64);
        let mut firing: Vec<_> = alerts
            .iter()
            .filter(|a| {
                pending += u64::from(a.state == AlertState::Pending);
                a.state == AlertState::Firing
            })
            .collect();
        for a in &firing {
            let sev = a
                .labels
                .get("severity")
                .cloned()
                .unwrap_or_else(|| "none".into());
            *by_severity.entry(sev).or_default() += 1;
            suppressed += u64::from(a.suppressed);
        }
        let firing_total = firing.len();
        firing.sort_by_key(|a| (a.suppressed, std::cmp::Reverse(a.starts_at_ms)));
        firing.truncate(100);
        let rollouts: Vec<Value> = s
            .rollouts
            .list()
            .into_iter()
            .filter(|r| live(r.state))
            .map(|r| {
                json!({
                    "id": r.id, "model_id": r.model_id, "target": r.target, "state": r.state,
                    "stage": r.stage, "stages": r.stages.len(), "totals": r.totals,
                    "holding": r.holding,
                    "verdict": r.gates.as_ref().map(|g| g.verdict),
                })
            })
            .collect();
        Ok(json!({
            "generated_ms": now,
            "devices": totals,
            "devices_without_model": unknown_model,
            "cohorts": rows,
            "alerts": {
                "firing": firing_total, "pending": pending, "suppressed": suppressed,
                "firing_by_severity": by_severity,
                "firing_list": firing,
            },
            "active_findings": s.monitor.active_findings().len(),
            "rollouts": rollouts,
        }))
    })
    .await?;
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
pub(crate) struct CohortDriftParams {
    cohort: Option<String>,
    /// Evaluations to go back over (24; 1-200).
    limit: Option<usize>,
}

/// The parts of a recorded evaluation the cohort view reads.
#[derive(Debug, Deserialize)]
struct EvalLite {
    window_start_ms: i64,
    #[serde(default)]
    scores: Vec<ScoreLite>,
}

#[derive(Debug, Deserialize)]
struct ScoreLite {
    scope: Scope,
    subject: Subject,
    n: Option<u64>,
    psi: Option<f64>,
    psi_critical: Option<f64>,
    p_value: Option<f64>,
    accuracy: Option<f64>,
    band: Option<f64>,
    observed_accuracy: Option<f64>,
    reference_accuracy: Option<f64>,
    #[serde(default)]
    significant: bool,
}

/// `GET /api/v1/cohorts/drift?cohort=model@version/hw`: what the cohort page draws, from the
/// last `limit` drift evaluations: PSI per feature and window (the hardware scope of the
/// cohort, or the model version's when the engine tested no hardware scope), estimated
/// accuracy with its band next to the observed one per window, the class distribution of the
/// latest window against the profile's reference, and the findings in force for the cohort.
pub(crate) async fn cohort_drift(
    _caller: Caller,
    State(s): State<ApiState>,
    Query(p): Query<CohortDriftParams>,
) -> Result<impl IntoResponse, ApiError> {
    let cohort = p
        .cohort
        .ok_or_else(|| ApiError::BadRequest("query parameter cohort is required".into()))?;
    let Some((model_id, model_version, hw)) =
        parse_cohort_key(&cohort).map(|(m, v, h)| (m.to_owned(), v.to_owned(), h.to_owned()))
    else {
        return Err(ApiError::BadRequest(format!(
            "cohort {cohort:?} must be model_id@model_version/hw"
        )));
    };
    let limit = p.limit.unwrap_or(24).clamp(1, 200);
    let out = blocking(move || {
        let mut evals: Vec<EvalLite> = s
            .store
            .drift_evaluations(i64::MIN, limit)?
            .into_iter()
            .filter_map(
                |(start, text)| match serde_json::from_str::<EvalLite>(&text) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::warn!(window = start, error = %e, "unreadable drift evaluation");
                        None
                    }
                },
            )
            .collect();
        evals.reverse(); // oldest first
        let in_model = |sc: &Scope| sc.model_id == model_id && sc.model_version == model_version;
        let hw_scope = |sc: &Scope| in_model(sc) && sc.kind == ScopeKind::Hardware && sc.key == hw;
        let any_hw = evals
            .iter()
            .any(|e| e.scores.iter().any(|x| hw_scope(&x.scope)));
        let wanted = |sc: &Scope| {
            if any_hw {
                hw_scope(sc)
            } else {
                in_model(sc) && sc.kind == ScopeKind::Model
            }
        };
        let scope_id = if any_hw {
            format!("{model_id}@{model_version}/hw={hw}")
        } else {
            format!("{model_id}@{model_version}")
        };
        let mut features: Vec<String> = Vec::new();
        let mut cells = Vec::new();
        let mut accuracy = Vec::new();
        let mut class_psi = Vec::new();
        let mut windows = Vec::new();
        for e in &evals {
            let mut acc = (None, None, None, None);
            let mut any = false;
            for sc in e.scores.iter().filter(|x| wanted(&x.scope)) {
                any = true;
                match &sc.subject {
                    Subject::Feature(name) => {
                        if !features.contains(name) {
                            features.push(name.clone());
                        }
                        cells.push(json!({
                            "feature": name, "window_start_ms": e.window_start_ms,
                            "psi": sc.psi, "psi_critical": sc.psi_critical,
                            "p_value": sc.p_value, "significant": sc.significant, "n": sc.n,
                        }));
                    }
                    Subject::EstimatedAccuracy => {
                        acc.0 = sc.accuracy;
                        acc.1 = sc.band;
                        acc.2 = acc.2.or(sc.observed_accuracy);
                        acc.3 = acc.3.or(sc.reference_accuracy);
                    }
                    Subject::Accuracy => {
                        acc.2 = sc.accuracy.or(acc.2);
                        acc.3 = acc.3.or(sc.reference_accuracy);
                    }
                    Subject::Classes => class_psi.push(json!({
                        "window_start_ms": e.window_start_ms, "psi": sc.psi,
                        "significant": sc.significant,
                    })),
                    Subject::Latency => {}
                }
            }
            if any {
                windows.push(e.window_start_ms);
            }
            if acc.0.is_some() || acc.2.is_some() {
                accuracy.push(json!({
                    "window_start_ms": e.window_start_ms, "estimated": acc.0, "band": acc.1,
                    "observed": acc.2, "reference": acc.3,
                }));
            }
        }
        // Class distribution: the latest cohort window against the profile's reference.
        let reference: Option<Vec<u64>> = s
            .store
            .profile(&model_id, &model_version)?
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| serde_json::from_value(v["classes"].clone()).ok());
        let latest_start = s
            .store
            .cohorts()?
            .into_iter()
            .find(|(c, _, _)| *c == cohort)
            .map(|(_, _, latest)| latest);
        let current = match latest_start {
            Some(start) => s
                .store
                .cohort_window(&cohort, start)?
                .and_then(|w| serde_json::from_value::<WindowAgg>(w.agg).ok())
                .map(|a| (start, a.classes)),
            None => None,
        };
        let shares = |c: &[u64]| {
            let total: u64 = c.iter().sum();
            c.iter()
                .map(|&x| {
                    if total == 0 {
                        0.0
                    } else {
                        x as f64 / total as f64
                    }
                })
                .collect::<Vec<_>>()
        };
        let findings: Vec<_> = s
            .monitor
            .active_findings()
            .into_iter()
            .filter(|f| {
                in_model(&f.scope)
                    && (f.scope.kind == ScopeKind::Model
                        || (f.scope.kind == ScopeKind::Hardware && f.scope.key == hw))
            })
            .collect();
        let seen: BTreeSet<i64> = windows.iter().copied().collect();
        Ok(json!({
            "cohort": cohort,
            "scope": scope_id,
            "windows": seen,
            "features": features,
            "cells": cells,
            "accuracy": accuracy,
            "classes": {
                "reference": reference.as_deref().map(shares),
                "current": current.as_ref().map(|(_, c)| shares(c)),
                "current_counts": current.as_ref().map(|(_, c)| c),
                "window_start_ms": current.as_ref().map(|(s, _)| s),
                "psi": class_psi,
            },
            "findings": findings,
        }))
    })
    .await?;
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::http::StatusCode;
    use tinyfleet_store::{Batch, DeviceState, Presence};

    use crate::tests::{call, raw, state};

    #[tokio::test]
    async fn assets_are_served_with_their_types() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::router(state(dir.path()));
        let (st, h, body) = raw(&app, "GET", "/", None, &[], vec![]).await;
        assert_eq!(st, StatusCode::OK);
        assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
        assert_eq!(h["cache-control"], "no-cache");
        let html = String::from_utf8(body).unwrap();
        assert!(html.contains(r#"id="token""#) && html.contains(r#"id="login""#));
        assert!(html.contains(r#"src="/ui/app.js""#));
        for (path, ty) in [
            ("/ui/app.js", "text/javascript"),
            ("/ui/charts.js", "text/javascript"),
            ("/ui/style.css", "text/css"),
            ("/ui/index.html", "text/html"),
            ("/ui/favicon.svg", "image/svg+xml"),
            ("/ui/pages/overview.js", "text/javascript"),
            ("/ui/pages/rollouts.js", "text/javascript"),
        ] {
            let (st, h, body) = raw(&app, "GET", path, None, &[], vec![]).await;
            assert_eq!(st, StatusCode::OK, "{path}");
            assert!(
                h["content-type"].to_str().unwrap().starts_with(ty),
                "{path}"
            );
            assert!(!body.is_empty());
            // Revalidation with the ETag.
            let etag = h["etag"].to_str().unwrap().to_owned();
            let (st, _, body) =
                raw(&app, "GET", path, None, &[("if-none-match", &etag)], vec![]).await;
            assert_eq!(st, StatusCode::NOT_MODIFIED, "{path}");
            assert!(body.is_empty());
        }
        for path in ["/ui/nope.js", "/ui/pages/nope.js", "/ui/..%2Fsecret"] {
            assert_eq!(
                raw(&app, "GET", path, None, &[], vec![]).await.0,
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
    }

    #[tokio::test]
    async fn whoami_for_both_roles() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::router(state(dir.path()));
        assert_eq!(
            call(&app, "GET", "/api/v1/whoami", None, "").await.0,
            StatusCode::UNAUTHORIZED
        );
        let (st, me) = call(&app, "GET", "/api/v1/whoami", Some("op-token"), "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(me, serde_json::json!({ "name": "ops", "role": "operator" }));
        let (_, me) = call(&app, "GET", "/api/v1/whoami", Some("read-token"), "").await;
        assert_eq!(me, serde_json::json!({ "name": "viewer", "role": "read" }));
    }

    #[tokio::test]
    async fn overview_counts_devices_by_state_and_cohort() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(dir.path());
        let store = s.store.clone();
        let app = crate::router(s);
        assert_eq!(
            call(&app, "GET", "/api/v1/overview", None, "").await.0,
            StatusCode::UNAUTHORIZED
        );
        // 5 online on kws@1/a, 2 offline on kws@1/a, 1 online on kws@2/b, 2 unseen, 1 revoked.
        let mut states = Vec::new();
        for i in 0..11 {
            let id = format!("d{i:02}");
            store.registry().provision(&id, BTreeMap::new()).unwrap();
            let (version, hw, online) = match i {
                0..5 => ("1", "a", true),
                5..7 => ("1", "a", false),
                7 => ("2", "b", true),
                8 => ("1", "a", true), // revoked below
                _ => continue,         // unseen
            };
            states.push(DeviceState {
                id,
                presence: Presence {
                    online,
                    ..Presence::default()
                },
                model_id: Some("kws".into()),
                model_version: Some(version.into()),
                hw: Some(hw.into()),
                ..DeviceState::default()
            });
        }
        store
            .commit(&Batch {
                states,
                ..Batch::default()
            })
            .unwrap();
        store.registry().revoke("d08").unwrap();
        let (st, o) = call(&app, "GET", "/api/v1/overview", Some("read-token"), "").await;
        assert_eq!(st, StatusCode::OK, "{o}");
        assert_eq!(
            o["devices"],
            serde_json::json!({ "online": 6, "offline": 2, "unseen": 2, "revoked": 1 })
        );
        let cohorts = o["cohorts"].as_array().unwrap();
        assert_eq!(cohorts.len(), 2);
        assert_eq!(cohorts[0]["cohort"], "kws@1/a");
        assert_eq!(cohorts[0]["devices"], 7);
        assert_eq!(cohorts[0]["online"], 5);
        assert_eq!(cohorts[0]["offline"], 2);
        assert_eq!(cohorts[1]["cohort"], "kws@2/b");
        assert_eq!(cohorts[1]["model_version"], "2");
        assert_eq!(cohorts[1]["devices"], 1);
        assert_eq!(o["alerts"]["firing"], 0);
        assert_eq!(o["rollouts"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn cohort_drift_needs_a_cohort() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::router(state(dir.path()));
        let read = Some("read-token");
        let (st, _) = call(&app, "GET", "/api/v1/cohorts/drift", read, "").await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (st, _) = call(&app, "GET", "/api/v1/cohorts/drift?cohort=nope", read, "").await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (st, d) = call(
            &app,
            "GET",
            "/api/v1/cohorts/drift?cohort=kws%401%2Fa",
            read,
            "",
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(d["cells"], serde_json::json!([]));
        assert_eq!(d["scope"], "kws@1");
    }
}
