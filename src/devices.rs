//! `tinyfleet device ...`: the device registry from a terminal, over the HTTP API.

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// API base URL.
    #[arg(long, env = "TINYFLEET_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Bearer token (or the TINYFLEET_TOKEN environment variable).
    #[arg(long, env = "TINYFLEET_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device; prints its MQTT password and message key (shown only this once).
    Add {
        id: String,
        /// User tag, `key=value`; repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// List devices.
    List {
        #[arg(long)]
        cohort: Option<String>,
        /// `key=value`
        #[arg(long)]
        tag: Option<String>,
        /// online, offline, unseen or revoked
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one device: registry record, presence and latest health.
    Show { id: String },
    /// Revoke a device: its connections and messages are refused from now on.
    Revoke { id: String },
}

pub(crate) fn call(
    req: reqwest::blocking::RequestBuilder,
    token: &str,
) -> Result<serde_json::Value, String> {
    let resp = req
        .bearer_auth(token)
        .send()
        .map_err(|e| format!("cannot reach the API: {e}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().unwrap_or(serde_json::Value::Null);
    if status.is_success() {
        Ok(body)
    } else {
        let msg = body["error"].as_str().unwrap_or("no details");
        Err(format!("API answered {status}: {msg}"))
    }
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Register a model version: uploads the artifact (e.g. a .tflite file) and, with
    /// `--profile`, its monitoring profile.
    Push {
        /// The artifact.
        file: std::path::PathBuf,
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        /// Anti-rollback sequence number: above every registered version of the model.
        #[arg(long)]
        seq: u32,
        /// Target hardware (the devices' `hw`).
        #[arg(long)]
        hw: String,
        /// Lowest firmware build that runs it.
        #[arg(long, default_value_t = 0)]
        min_fw: u32,
        /// Tensor arena it needs, bytes.
        #[arg(long, default_value_t = 0)]
        arena: u32,
        /// Its monitoring profile (as `tinyfleet profile build` writes it).
        #[arg(long)]
        profile: Option<std::path::PathBuf>,
    },
    /// List a model's versions.
    List { model: String },
}

/// A request body that draws an upload progress bar on stderr when stderr is a terminal.
fn with_progress(bytes: Vec<u8>, what: &str) -> reqwest::blocking::Body {
    use std::io::IsTerminal;
    let len = bytes.len() as u64;
    if !std::io::stderr().is_terminal() || len < 64 * 1024 {
        return reqwest::blocking::Body::from(bytes);
    }
    reqwest::blocking::Body::sized(
        Progress {
            inner: std::io::Cursor::new(bytes),
            len,
            shown: u64::MAX,
            what: what.to_owned(),
        },
        len,
    )
}

/// Reads through to `inner`, redrawing `[#####     ] 48% file` at each whole percent.
struct Progress {
    inner: std::io::Cursor<Vec<u8>>,
    len: u64,
    shown: u64,
    what: String,
}

impl std::io::Read for Progress {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let pct = self.inner.position() * 100 / self.len.max(1);
        if pct != self.shown {
            self.shown = pct;
            let bar = (pct / 5) as usize;
            eprint!(
                "\r[{}{}] {pct:>3}% {}",
                "#".repeat(bar),
                " ".repeat(20 - bar),
                self.what
            );
            if pct == 100 {
                eprintln!();
            }
        }
        Ok(n)
    }
}

pub(crate) fn url_segment(s: &str) -> Result<&str, String> {
    if s.is_empty() || s.contains(['/', '?', '#', '%', '&']) {
        Err(format!("{s:?} cannot be used in a URL path"))
    } else {
        Ok(s)
    }
}

pub fn model(api: &ApiArgs, command: ModelCommand) -> Result<(), String> {
    let client = reqwest::blocking::Client::new();
    let base = api.api.trim_end_matches('/');
    match command {
        ModelCommand::Push {
            file,
            model,
            version,
            seq,
            hw,
            min_fw,
            arena,
            profile,
        } => {
            let bytes =
                std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let url = format!(
                "{base}/api/v1/models/{}/versions/{}",
                url_segment(&model)?,
                url_segment(&version)?
            );
            let registered = call(
                client
                    .post(url)
                    .query(&[
                        ("seq", seq.to_string()),
                        ("hw", hw),
                        ("min_fw", min_fw.to_string()),
                        ("arena", arena.to_string()),
                    ])
                    .header("content-type", "application/octet-stream")
                    .body(with_progress(bytes, &file.display().to_string())),
                &api.token,
            )?;
            if let Some(p) = profile {
                upload_profile(api, &p)?;
            }
            if api.json {
                println!("{registered}");
            } else {
                println!(
                    "{}@{} seq {} for {}: {} bytes, sha256 {}",
                    registered["model_id"].as_str().unwrap_or(""),
                    registered["model_version"].as_str().unwrap_or(""),
                    registered["seq"],
                    registered["hw"].as_str().unwrap_or(""),
                    registered["size"],
                    registered["sha256"].as_str().unwrap_or("")
                );
            }
        }
        ModelCommand::List { model } => {
            let url = format!("{base}/api/v1/models/{}/versions", url_segment(&model)?);
            let list = call(client.get(url), &api.token)?;
            if api.json {
                println!("{list}");
            } else {
                println!(
                    "{:<16} {:>6} {:<12} {:>10}  SHA256",
                    "VERSION", "SEQ", "HW", "BYTES"
                );
                for v in list.as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {:>6} {:<12} {:>10}  {}",
                        v["model_version"].as_str().unwrap_or(""),
                        v["seq"],
                        v["hw"].as_str().unwrap_or(""),
                        v["size"],
                        v["sha256"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}

/// `tinyfleet profile upload`: stores a profile under the model id and version it names.
pub fn upload_profile(api: &ApiArgs, file: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let profile: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", file.display()))?;
    let (Some(model), Some(version)) = (
        profile["model_id"].as_str(),
        profile["model_version"].as_str(),
    ) else {
        return Err(format!(
            "{} has no model_id/model_version; build it with `tinyfleet profile build`",
            file.display()
        ));
    };
    let segment = |s: &str| -> Result<String, String> {
        if s.is_empty() || s.contains(['/', '?', '#', '%']) {
            Err(format!(
                "model id or version {s:?} cannot be used in a URL path"
            ))
        } else {
            Ok(s.to_owned())
        }
    };
    let url = format!(
        "{}/api/v1/models/{}/{}/profile",
        api.api.trim_end_matches('/'),
        segment(model)?,
        segment(version)?
    );
    call(
        reqwest::blocking::Client::new().put(url).json(&profile),
        &api.token,
    )?;
    eprintln!("profile of {model}@{version} stored");
    Ok(())
}

pub fn run(api: &ApiArgs, command: DeviceCommand) -> Result<(), String> {
    let client = reqwest::blocking::Client::new();
    let base = api.api.trim_end_matches('/');
    match command {
        DeviceCommand::Add { id, tags } => {
            let mut map = serde_json::Map::new();
            for t in tags {
                let (k, v) = t
                    .split_once('=')
                    .ok_or_else(|| format!("--tag {t:?} must be key=value"))?;
                map.insert(k.to_owned(), v.into());
            }
            let body = serde_json::json!({ "id": id, "tags": map });
            let creds = call(
                client.post(format!("{base}/api/v1/devices")).json(&body),
                &api.token,
            )?;
            if api.json {
                println!("{creds}");
            } else {
                println!(
                    "device        {}",
                    creds["device_id"].as_str().unwrap_or("")
                );
                println!(
                    "mqtt password {}",
                    creds["mqtt_password"].as_str().unwrap_or("")
                );
                println!("message key   {}", creds["mac_key"].as_str().unwrap_or(""));
                println!("Store these on the device now: they are not shown again.");
            }
        }
        DeviceCommand::List {
            cohort,
            tag,
            state,
            limit,
        } => {
            let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            query.extend(cohort.map(|c| ("cohort", c)));
            query.extend(tag.map(|t| ("tag", t)));
            query.extend(state.map(|s| ("state", s)));
            let page = call(
                client.get(format!("{base}/api/v1/devices")).query(&query),
                &api.token,
            )?;
            if api.json {
                println!("{page}");
            } else {
                println!(
                    "{:<24} {:<8} {:<32} {:>6}",
                    "DEVICE", "STATE", "COHORT", "LOST"
                );
                for d in page["devices"].as_array().into_iter().flatten() {
                    let state = if d["revoked"] == true {
                        "revoked"
                    } else if d["online"] == true {
                        "online"
                    } else if d["last_seen_ms"].is_null() {
                        "unseen"
                    } else {
                        "offline"
                    };
                    println!(
                        "{:<24} {:<8} {:<32} {:>6}",
                        d["id"].as_str().unwrap_or(""),
                        state,
                        d["cohort"].as_str().unwrap_or("-"),
                        d["lost_summaries"]
                    );
                }
                if let Some(next) = page["next"].as_str() {
                    println!("(more after {next})");
                }
            }
        }
        DeviceCommand::Show { id } => {
            let d = call(
                client.get(format!("{base}/api/v1/devices/{id}")),
                &api.token,
            )?;
            println!(
                "{}",
                serde_json::to_string_pretty(&d).map_err(|e| e.to_string())?
            );
        }
        DeviceCommand::Revoke { id } => {
            call(
                client.post(format!("{base}/api/v1/devices/{id}/revoke")),
                &api.token,
            )?;
            println!("revoked {id}");
        }
    }
    Ok(())
}
