//! OTA endpoints: registering model versions (the artifact is the request body), listing them,
//! signed offers, the signing key's public half, and object downloads with HTTP Range (open:
//! devices hold no API token, and what they fetch is checked against the signed manifest).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tinyfleet_ota_service::{OtaError, Upload, artifacts};
use tinyfleet_store::now_ms;

use crate::{ApiError, ApiState, Caller, Role, blocking};

impl From<OtaError> for ApiError {
    fn from(e: OtaError) -> Self {
        match e {
            OtaError::NotFound(m) => ApiError::NotFound(m),
            OtaError::Conflict(m) => ApiError::Conflict(m),
            OtaError::Invalid(m) => ApiError::BadRequest(m),
            OtaError::Store(e) => e.into(),
            e @ OtaError::Io(_) => ApiError::Internal(e.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UploadParams {
    seq: u32,
    hw: String,
    #[serde(default)]
    min_fw: u32,
    #[serde(default)]
    arena: u32,
}

/// Registers a model version; the body is the artifact (e.g. a .tflite file). With a
/// continuous-delivery policy set for the model, a rollout of it starts (its id is in the
/// answer's `rollout`).
pub(crate) async fn upload(
    caller: Caller,
    State(s): State<ApiState>,
    Path((id, version)): Path<(String, String)>,
    Query(p): Query<UploadParams>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let up = Upload {
        model_id: id,
        model_version: version,
        seq: p.seq,
        hw: p.hw,
        min_fw: p.min_fw,
        arena: p.arena,
        by: caller.name.clone(),
    };
    let (ota, rollouts) = (s.ota.clone(), s.rollouts.clone());
    let out = blocking(move || {
        let registered = ota.register(&up, &body, now_ms())?;
        let mut out = serde_json::to_value(&registered)
            .map_err(|e| ApiError::Internal(format!("cannot serialise the version: {e}")))?;
        // Continuous delivery: a policy of the model may start a rollout of this version. The
        // version is registered either way; a policy that cannot start is logged.
        match rollouts.on_version_registered(&up.model_id, &up.model_version, now_ms()) {
            Ok(Some(status)) => out["rollout"] = status.id.into(),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(model = %up.model_id, version = %up.model_version, error = %e, "rollout policy could not start a rollout")
            }
        }
        Ok(out)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(out)))
}

pub(crate) async fn versions(
    _caller: Caller,
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let ota = s.ota.clone();
    Ok(Json(blocking(move || Ok(ota.versions(&id)?)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OfferParams {
    /// SHA-256 (hex) of the image the device runs: the offer is a patch from it if smaller.
    base: Option<String>,
}

/// A signed offer (COSE_Sign1, `application/cose; cose-type="cose-sign1"`).
pub(crate) async fn offer(
    _caller: Caller,
    State(s): State<ApiState>,
    Path((id, version)): Path<(String, String)>,
    Query(p): Query<OfferParams>,
) -> Result<Response, ApiError> {
    if let Some(b) = &p.base
        && !artifacts::is_digest(b)
    {
        return Err(ApiError::BadRequest(format!(
            "base {b:?} must be a lowercase hex SHA-256"
        )));
    }
    let ota = s.ota.clone();
    let bytes = blocking(move || {
        let target = ota.version(&id, &version)?;
        Ok(ota.offer(&target, p.base.as_deref(), now_ms())?)
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/cose; cose-type=\"cose-sign1\""),
        )],
        bytes,
    )
        .into_response())
}

/// The key devices must trust for offers.
pub(crate) async fn keys(_caller: Caller, State(s): State<ApiState>) -> impl IntoResponse {
    let signer = s.ota.signer();
    let mut keys = vec![serde_json::json!({
        "kid": hex::encode(signer.kid()),
        "public_key": hex::encode(signer.public_key()),
        "alg": "EdDSA",
        "signing": true,
    })];
    // Keys devices keep trusting during a rotation (validated hex at startup).
    for public in &s.ota.config().trusted_keys {
        if let Ok(Ok(bytes)) = hex::decode(public).map(<[u8; 32]>::try_from) {
            keys.push(serde_json::json!({
                "kid": hex::encode(tinyfleet_ota_service::keys::kid_of(&bytes)),
                "public_key": public,
                "alg": "EdDSA",
                "signing": false,
            }));
        }
    }
    Json(serde_json::Value::Array(keys))
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against `size`: `Ok(None)` for no (usable) Range,
/// `Err(())` when unsatisfiable.
fn byte_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: answer with the whole object (allowed by RFC 9110).
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (a, "") => (a.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().map_err(|_| ())?, b.parse().map_err(|_| ())?);
            if b < a {
                return Err(());
            }
            (a, b.min(size.saturating_sub(1)))
        }
    };
    if size == 0 || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// An OTA object (image or patch) by its SHA-256, with Range support for resumable downloads.
pub(crate) async fn object(
    State(s): State<ApiState>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !artifacts::is_digest(&sha) {
        return Err(ApiError::NotFound(format!("no object {sha}")));
    }
    let ota = s.ota.clone();
    let sha2 = sha.clone();
    let size = blocking(move || Ok(ota.artifacts().size(&sha2).map_err(OtaError::from)?))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no object {sha}")))?;
    let etag = format!("\"{sha}\"");
    let range = match byte_range(&headers, size) {
        Ok(r) => r,
        Err(()) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response());
        }
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };
    let ota = s.ota.clone();
    let data = blocking(move || {
        Ok(ota
            .artifacts()
            .read_range(&sha, start, len)
            .map_err(OtaError::from)?
            .unwrap_or_default())
    })
    .await?;
    let mut resp = Response::new(Body::from(data));
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}
