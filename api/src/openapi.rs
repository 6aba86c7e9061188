//! The OpenAPI 3.1 document served at `/openapi.json`. A test checks that every route of the
//! router is described here and nothing else.

use serde_json::{Value, json};

fn op(summary: &str, params: Value, ok: &str, extra: Value) -> Value {
    let mut responses = json!({
        ok: { "description": "success" },
        "401": { "$ref": "#/components/responses/Unauthorized" },
    });
    if let (Some(r), Some(e)) = (responses.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    json!({
        "summary": summary,
        "security": [{ "bearer": [] }],
        "parameters": params,
        "responses": responses,
    })
}

fn q(name: &str, desc: &str, ty: &str) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": desc,
            "schema": { "type": ty } })
}

fn id_param() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } })
}

fn version_param() -> Value {
    json!({ "name": "version", "in": "path", "required": true, "schema": { "type": "string" } })
}

/// Models, drift, alerts and silences.
fn monitoring_paths() -> Value {
    let not_found = json!({ "404": { "$ref": "#/components/responses/Error" } });
    json!({
            "/api/v1/models": {
                "get": op("model versions with a monitoring profile", json!([]), "200", json!({}))
            },
            "/api/v1/models/{id}/{version}/profile": {
                "get": op("a model version's monitoring profile", json!([id_param(), version_param()]), "200", not_found.clone()),
                "put": {
                    "summary": "store a model version's monitoring profile (operator); the JSON \
                                `tinyfleet profile build` writes, validated, its model id and \
                                version must match the path",
                    "security": [{ "bearer": [] }],
                    "parameters": [id_param(), version_param()],
                    "requestBody": { "required": true, "content": { "application/json": {
                        "schema": { "type": "object" } } } },
                    "responses": {
                        "204": { "description": "stored" },
                        "400": { "$ref": "#/components/responses/Error" },
                        "401": { "$ref": "#/components/responses/Unauthorized" },
                        "403": { "$ref": "#/components/responses/Error" }
                    }
                }
            },
            "/api/v1/drift": {
                "get": op("drift findings in force and recorded evaluations (newest first) with their scores", json!([
                    q("since", "window start, ms since epoch", "integer"),
                    q("limit", "evaluations, 1-1000 (10)", "integer")
                ]), "200", json!({}))
            },
            "/api/v1/alerts": {
                "get": op("alerts: pending, firing and recently resolved, with silences and inhibitions", json!([
                    q("state", "pending | firing | resolved", "string")
                ]), "200", json!({ "400": { "$ref": "#/components/responses/Error" } }))
            },
            "/api/v1/silences": {
                "get": op("silences (pending, active, recently expired)", json!([]), "200", json!({})),
                "post": {
                    "summary": "create or update a silence (operator)",
                    "security": [{ "bearer": [] }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object", "required": ["matchers", "comment"], "additionalProperties": false,
                        "properties": {
                            "matchers": { "type": "array", "items": { "type": "object",
                                "required": ["name", "value", "op"],
                                "properties": { "name": { "type": "string" }, "value": { "type": "string" },
                                                "op": { "enum": ["=", "!=", "=~", "!~"] } } } },
                            "starts_at_ms": { "type": "integer" },
                            "ends_at_ms": { "type": "integer" },
                            "duration_secs": { "type": "integer" },
                            "comment": { "type": "string" },
                            "created_by": { "type": "string" },
                            "id": { "type": "string" }
                        }
                    } } } },
                    "responses": {
                        "201": { "description": "{\"id\": ...}" },
                        "400": { "$ref": "#/components/responses/Error" },
                        "401": { "$ref": "#/components/responses/Unauthorized" },
                        "403": { "$ref": "#/components/responses/Error" },
                        "404": { "$ref": "#/components/responses/Error" }
                    }
                }
            },
            "/api/v1/silences/{id}": {
                "delete": op("expire a silence now (operator)", json!([id_param()]), "204", not_found.clone())
            }
    })
}

/// Model versions, offers, keys and object downloads.
fn ota_paths() -> Value {
    let not_found = json!({ "404": { "$ref": "#/components/responses/Error" } });
    let version = json!({ "name": "version", "in": "path", "required": true, "schema": { "type": "string" } });
    json!({
        "/api/v1/models/{id}/versions/{version}": {
            "post": {
                "summary": "register a model version (operator); the body is the artifact, e.g. a .tflite file",
                "security": [{ "bearer": [] }],
                "parameters": [id_param(), version,
                    { "name": "seq", "in": "query", "required": true, "description": "anti-rollback sequence number, above every registered version of the model", "schema": { "type": "integer" } },
                    { "name": "hw", "in": "query", "required": true, "description": "target hardware", "schema": { "type": "string" } },
                    q("min_fw", "lowest firmware build that runs it (0)", "integer"),
                    q("arena", "tensor arena bytes it needs (0: not stated)", "integer")],
                "requestBody": { "required": true, "content": { "application/octet-stream": {} } },
                "responses": {
                    "201": { "description": "the registered version with its SHA-256" },
                    "400": { "$ref": "#/components/responses/Error" },
                    "401": { "$ref": "#/components/responses/Unauthorized" },
                    "403": { "$ref": "#/components/responses/Error" },
                    "409": { "$ref": "#/components/responses/Error" },
                    "413": { "description": "larger than ota.max_artifact_bytes" }
                }
            }
        },
        "/api/v1/models/{id}/versions": {
            "get": op("a model's registered versions, highest seq first", json!([id_param()]), "200", json!({}))
        },
        "/api/v1/models/{id}/versions/{version}/offer": {
            "get": op("a signed offer (COSE_Sign1 manifest, application/cose); a TFP1 patch from `base` when smaller than the image",
                      json!([id_param(), version_param(), q("base", "SHA-256 (hex) of the image the device runs", "string")]),
                      "200", not_found)
        },
        "/api/v1/ota/keys": {
            "get": op("the public keys devices must trust for offers (kid, Ed25519 public key)", json!([]), "200", json!({}))
        },
        "/ota/v1/objects/{sha}": {
            "get": {
                "summary": "an OTA object (image or patch) by SHA-256; open (devices hold no token; the signed manifest names the digest); Range supported",
                "parameters": [{ "name": "sha", "in": "path", "required": true, "schema": { "type": "string" } },
                               { "name": "Range", "in": "header", "required": false, "schema": { "type": "string" } }],
                "responses": {
                    "200": { "description": "the object" },
                    "206": { "description": "the requested range" },
                    "404": { "$ref": "#/components/responses/Error" },
                    "416": { "description": "range not satisfiable" }
                }
            }
        }
    })
}

/// Staged rollouts and continuous-delivery policies.
fn rollout_paths() -> Value {
    let not_found = json!({ "404": { "$ref": "#/components/responses/Error" } });
    let change = json!({
        "400": { "$ref": "#/components/responses/Error" },
        "403": { "$ref": "#/components/responses/Error" },
        "404": { "$ref": "#/components/responses/Error" },
        "409": { "$ref": "#/components/responses/Error" }
    });
    let plan_fields = json!({
        "filter": { "type": "object", "description": "{hw, tag: {key, value}}; hw defaults to the version's" },
        "stages": { "type": "array", "description": "[{share, min_devices, soak_ms, deadline_ms}]; shares cumulative" },
        "install": { "type": "object", "description": "install-health gate (min_done, confidence, max_failure_rate, max_revert_rate, max_timeout_rate, report_timeout_ms, min_stage_done_share)" },
        "quality": { "type": "object", "description": "quality gate (required, confidence, minimum samples incl. min_class_predictions, max_accuracy_drop, max_estimated_drop, max_latency_ratio, max_reset_increase, max_class_divergence, max_drift_increase)" },
        "offers_per_minute": { "type": "integer" },
        "maintenance": { "type": "array", "description": "[{start_hour, end_hour}] UTC windows for offers" }
    });
    let mut create_props = json!({
        "model_id": { "type": "string" },
        "version": { "type": "string", "description": "the registered version to roll out; it replaces every version of the model with a lower seq" },
        "id": { "type": "string", "description": "default {model}-{version}-{6 hex}" }
    });
    if let (Some(c), Some(p)) = (create_props.as_object_mut(), plan_fields.as_object()) {
        c.extend(p.clone());
    }
    let reason_body = json!({ "required": false, "content": { "application/json": { "schema": {
        "type": "object", "additionalProperties": false,
        "properties": { "reason": { "type": "string" } } } } } });
    let action = |summary: &str, with_reason: bool| {
        let mut o = op(summary, json!([id_param()]), "200", change.clone());
        if with_reason {
            o["requestBody"] = reason_body.clone();
        }
        o
    };
    json!({
        "/api/v1/rollouts": {
            "get": op("every rollout's status, newest first", json!([]), "200", json!({})),
            "post": {
                "summary": "start a staged rollout (operator); plan fields left out take their defaults",
                "security": [{ "bearer": [] }],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["model_id", "version"], "additionalProperties": false,
                    "properties": create_props
                } } } },
                "responses": {
                    "201": { "description": "the rollout's status" },
                    "400": { "$ref": "#/components/responses/Error" },
                    "401": { "$ref": "#/components/responses/Unauthorized" },
                    "403": { "$ref": "#/components/responses/Error" },
                    "404": { "$ref": "#/components/responses/Error" },
                    "409": { "description": "another rollout of the model is active, or the id is taken" }
                }
            }
        },
        "/api/v1/rollouts/{id}": {
            "get": op("a rollout's status: state, stages with per-stage device counts (targeted, offered, pending, downloading, installed, confirmed, failed, rejected, reverted, timed out), gate values and verdicts, pause and rollback",
                      json!([id_param()]), "200", not_found.clone())
        },
        "/api/v1/rollouts/{id}/audit": {
            "get": op("a rollout's audit log, oldest first, each record with its id", json!([
                id_param(),
                q("after", "records with an id above this one (0)", "integer"),
                q("limit", "1-1000 (100)", "integer")
            ]), "200", not_found)
        },
        "/api/v1/rollouts/{id}/pause": { "post": action("pause: no new offers (operator)", true) },
        "/api/v1/rollouts/{id}/resume": { "post": action("resume a paused rollout; the stage's deadline starts over (operator)", false) },
        "/api/v1/rollouts/{id}/advance": { "post": action("open the next stage (or complete) now, whatever the gates say (operator)", false) },
        "/api/v1/rollouts/{id}/abort": { "post": action("abort: withdraw the offers and roll back every device that took the new version (operator)", true) },
        "/api/v1/models/{id}/policy": {
            "get": op("the model's continuous-delivery policy", json!([id_param()]), "200",
                      json!({ "404": { "$ref": "#/components/responses/Error" } })),
            "put": {
                "summary": "set the model's continuous-delivery policy (operator): every version registered from now on starts a rollout with these plan fields when no rollout of the model is active",
                "security": [{ "bearer": [] }],
                "parameters": [id_param()],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "additionalProperties": false, "properties": plan_fields
                } } } },
                "responses": {
                    "204": { "description": "stored" },
                    "400": { "$ref": "#/components/responses/Error" },
                    "401": { "$ref": "#/components/responses/Unauthorized" },
                    "403": { "$ref": "#/components/responses/Error" }
                }
            },
            "delete": op("remove the model's continuous-delivery policy (operator)", json!([id_param()]), "204",
                         json!({ "403": { "$ref": "#/components/responses/Error" },
                                 "404": { "$ref": "#/components/responses/Error" } }))
        }
    })
}

/// The document.
pub fn document() -> Value {
    let not_found = json!({ "404": { "$ref": "#/components/responses/Error" } });
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tinyfleet fleet API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Devices, their health and presence, cohort aggregates and ingest \
                            counters. Every /api/v1 call needs a bearer token; provisioning and \
                            revocation need the operator role."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "responses": {
                "Unauthorized": { "description": "missing or unknown token" },
                "Error": {
                    "description": "an error",
                    "content": { "application/json": { "schema": {
                        "type": "object", "properties": { "error": { "type": "string" } }
                    } } }
                }
            }
        },
        "paths": {
            "/healthz": { "get": { "summary": "liveness", "responses": { "200": { "description": "ok" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics of the service",
                                    "responses": { "200": { "description": "text exposition" } } } },
            "/openapi.json": { "get": { "summary": "this document",
                                         "responses": { "200": { "description": "OpenAPI 3.1" } } } },
            "/": { "get": { "summary": "the web UI (open; the page asks for an API token)",
                            "responses": { "200": { "description": "HTML" } } } },
            "/ui/{file}": { "get": { "summary": "a web UI asset (open, embedded in the binary; revalidated by ETag)",
                                      "parameters": [{ "name": "file", "in": "path", "required": true, "schema": { "type": "string" } }],
                                      "responses": { "200": { "description": "the asset" },
                                                     "304": { "description": "not modified" },
                                                     "404": { "$ref": "#/components/responses/Error" } } } },
            "/ui/pages/{file}": { "get": { "summary": "a web UI page module (open, embedded in the binary)",
                                            "parameters": [{ "name": "file", "in": "path", "required": true, "schema": { "type": "string" } }],
                                            "responses": { "200": { "description": "the module" },
                                                           "304": { "description": "not modified" },
                                                           "404": { "$ref": "#/components/responses/Error" } } } },
            "/api/v1/whoami": {
                "get": op("the caller's token name and role: {name, role: read | operator}", json!([]), "200", json!({}))
            },
            "/api/v1/overview": {
                "get": op("the fleet at a glance, aggregated: devices by state (online, offline, unseen, revoked), \
                           devices per cohort by state with the cohort's latest window health, alerts by state and \
                           severity with the firing ones (at most 100), drift findings in force, live rollouts",
                          json!([]), "200", json!({}))
            },
            "/api/v1/cohorts/drift": {
                "get": op("a cohort's drift over the last evaluations: PSI per feature and window, estimated \
                           accuracy with its band and the observed one, class distribution against the reference, \
                           findings in force", json!([
                    q("cohort", "cohort key model_id@model_version/hw (required)", "string"),
                    q("limit", "evaluations to go back over, 1-200 (24)", "integer")
                ]), "200", json!({ "400": { "$ref": "#/components/responses/Error" } }))
            },
            "/api/v1/devices": {
                "get": op("list devices (cursor paging by id)", json!([
                    q("cohort", "model_id@model_version/hw", "string"),
                    q("tag", "user tag as key=value", "string"),
                    q("state", "online | offline | unseen | revoked", "string"),
                    q("after", "cursor: the `next` of the previous page", "string"),
                    q("limit", "page size, 1-1000 (100)", "integer"),
                ]), "200", json!({ "400": { "$ref": "#/components/responses/Error" } })),
                "post": {
                    "summary": "provision a device; returns its MQTT password and message key once",
                    "security": [{ "bearer": [] }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object", "required": ["id"], "additionalProperties": false,
                        "properties": {
                            "id": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$" },
                            "tags": { "type": "object", "additionalProperties": { "type": "string" } }
                        }
                    } } } },
                    "responses": {
                        "201": { "description": "credentials: device_id, mqtt_password, mac_key (hex)" },
                        "400": { "$ref": "#/components/responses/Error" },
                        "401": { "$ref": "#/components/responses/Unauthorized" },
                        "403": { "$ref": "#/components/responses/Error" },
                        "409": { "$ref": "#/components/responses/Error" }
                    }
                }
            },
            "/api/v1/devices/{id}": {
                "get": op("one device: registry record, presence, latest health", json!([id_param()]), "200", not_found.clone())
            },
            "/api/v1/devices/{id}/revoke": {
                "post": op("revoke a device (operator)", json!([id_param()]), "204", not_found.clone())
            },
            "/api/v1/devices/{id}/windows": {
                "get": op("a device's windowed aggregates (history)", json!([
                    id_param(), q("since", "window start, ms since epoch", "integer"),
                    q("limit", "1-1000 (100)", "integer")
                ]), "200", not_found.clone())
            },
            "/api/v1/cohorts": {
                "get": op("cohorts with their latest window", json!([]), "200", json!({}))
            },
            "/api/v1/cohorts/windows": {
                "get": op("a cohort's windowed aggregates", json!([
                    q("cohort", "cohort key (required)", "string"),
                    q("since", "window start, ms since epoch", "integer"),
                    q("limit", "1-1000 (100)", "integer")
                ]), "200", json!({ "400": { "$ref": "#/components/responses/Error" } }))
            },
            "/api/v1/ingest": {
                "get": op("ingest counters: received, accepted by kind, rejected by reason, lost summaries",
                          json!([]), "200", json!({}))
            }
        }
    });
    for extra in [monitoring_paths(), ota_paths(), rollout_paths()] {
        if let (Some(paths), Value::Object(more)) = (doc["paths"].as_object_mut(), extra) {
            paths.extend(more);
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented() {
        let doc = super::document();
        let paths = doc["paths"].as_object().unwrap();
        let src = include_str!("lib.rs");
        let routes: Vec<&str> = src
            .split(".route(")
            .skip(1)
            .filter_map(|chunk| chunk.split('"').nth(1))
            .collect();
        assert!(routes.len() >= 9);
        for r in &routes {
            assert!(
                paths.contains_key(*r),
                "route {r} missing from openapi.json"
            );
        }
        assert_eq!(
            paths.len(),
            routes.len(),
            "openapi.json documents routes that do not exist"
        );
    }
}
