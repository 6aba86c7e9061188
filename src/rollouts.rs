//! `tinyfleet rollout ...`: staged rollouts from a terminal, over the HTTP API.

use clap::Subcommand;
use serde_json::{Value, json};

use crate::devices::{ApiArgs, call, url_segment};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout of a registered version (it replaces every version of the model
    /// with a lower seq). Without --stages or --plan the defaults apply (1 % -> 10 % -> 50 % ->
    /// 100 %, day-long soaks).
    Start {
        model: String,
        version: String,
        /// Rollout id (default `{model}-{version}-{6 hex}`).
        #[arg(long)]
        id: Option<String>,
        /// Stages as `PERCENT:MIN_DEVICES:SOAK[:DEADLINE]`, comma-separated, cumulative
        /// percentages; durations like `90s`, `10m`, `24h`, `3d`. Example:
        /// `1:10:24h,10:0:24h,100:0:12h`.
        #[arg(long)]
        stages: Option<String>,
        /// A JSON file with plan fields (`stages`, `install`, `quality`, `filter`,
        /// `offers_per_minute`, `maintenance`); --stages and --id override it.
        #[arg(long)]
        plan: Option<std::path::PathBuf>,
    },
    /// List rollouts, newest first.
    List,
    /// A rollout's stages, device counts, gates, pause and rollback.
    Status { id: String },
    /// A rollout's audit log.
    Audit {
        id: String,
        /// Records after this audit id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Stop new offers (offers out stay out; a failing gate still aborts).
    Pause {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a paused rollout.
    Resume { id: String },
    /// Open the next stage (or complete) now, whatever the gates say.
    Advance { id: String },
    /// Abort: withdraw the offers and roll back every device that took the new version.
    Abort {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `90s`, `10m`, `24h`, `3d`, `500ms` -> milliseconds.
pub(crate) fn duration_ms(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit: ms, s, m, h or d"))?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| format!("duration {s:?}: expected a number and a unit, e.g. 24h"))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("duration {s:?}: unit must be ms, s, m, h or d")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

/// `PERCENT:MIN_DEVICES:SOAK[:DEADLINE]`, comma-separated -> the plan's `stages`. Without a
/// deadline a stage pauses when still inconclusive 72 h (or twice its soak, if longer) after
/// it was fully offered.
fn parse_stages(spec: &str) -> Result<Value, String> {
    let mut stages = Vec::new();
    for (i, part) in spec.split(',').enumerate() {
        let fields: Vec<&str> = part.trim().split(':').collect();
        let bad = |what: &str| format!("--stages item {} ({part:?}): {what}", i + 1);
        if !(3..=4).contains(&fields.len()) {
            return Err(bad("expected PERCENT:MIN_DEVICES:SOAK[:DEADLINE]"));
        }
        let percent: f64 = fields[0]
            .parse()
            .map_err(|_| bad("PERCENT must be a number"))?;
        let min_devices: u32 = fields[1]
            .parse()
            .map_err(|_| bad("MIN_DEVICES must be a whole number"))?;
        let soak = duration_ms(fields[2]).map_err(|e| bad(&e))?;
        let deadline = match fields.get(3) {
            Some(d) => duration_ms(d).map_err(|e| bad(&e))?,
            None => (72 * 3_600_000i64).max(soak.saturating_mul(2)),
        };
        stages.push(json!({
            "share": percent / 100.0,
            "min_devices": min_devices,
            "soak_ms": soak,
            "deadline_ms": deadline,
        }));
    }
    Ok(Value::Array(stages))
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC (RFC 3339 made easier to read
/// in a table: no `T`, no fraction, no `Z`).
fn utc(ms: i64) -> String {
    let mut t = tinyfleet_alerts::payload::rfc3339_ms(ms.div_euclid(1000) * 1000);
    t = t.replacen('T', " ", 1);
    t.trim_end_matches('Z').to_owned()
}

fn opt_time(v: &Value) -> String {
    v.as_i64().map_or("-".into(), utc)
}

/// A JSON number as text (so table widths apply).
fn n(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// `{"operator": "ops"}` -> `operator:ops`, `"soak"` -> `soak`.
fn cause(v: &Value) -> String {
    match v {
        Value::String(c) => c.clone(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}:{}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

fn print_list(list: &Value) {
    println!(
        "{:<32} {:<12} {:<16} {:<12} {:>5} {:>8} {:>9} {:>6}",
        "ID", "MODEL", "TARGET", "STATE", "STAGE", "TARGETED", "CONFIRMED", "FAILED"
    );
    for r in list.as_array().into_iter().flatten() {
        let t = &r["totals"];
        let stages = r["stages"].as_array().map_or(0, Vec::len);
        println!(
            "{:<32} {:<12} {:<16} {:<12} {:>5} {:>8} {:>9} {:>6}",
            s(&r["id"]),
            s(&r["model_id"]),
            s(&r["target"]["version"]),
            s(&r["state"]),
            format!("{}/{stages}", r["stage"].as_u64().unwrap_or(0) + 1),
            n(&t["targeted"]),
            n(&t["confirmed"]),
            t["failed"].as_u64().unwrap_or(0) + t["rejected"].as_u64().unwrap_or(0)
        );
    }
}

fn rate(c: &Value) -> String {
    format!("{}/{} {}", c["bad"], c["done"], s(&c["verdict"]))
}

fn print_status(r: &Value) {
    let replaces: Vec<&str> = r["replaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| s(&v["version"]))
        .collect();
    println!(
        "rollout {}: {} {} (seq {}) replacing {}",
        s(&r["id"]),
        s(&r["model_id"]),
        s(&r["target"]["version"]),
        r["target"]["seq"],
        replaces.join(", ")
    );
    println!(
        "state   {} at stage {} (created {} UTC)",
        s(&r["state"]),
        r["stage"].as_u64().unwrap_or(0) + 1,
        opt_time(&r["created_ms"])
    );
    if let Some(h) = r["holding"].as_str() {
        println!("holding {h}");
    }
    if r["paused"].is_object() {
        let p = &r["paused"];
        println!(
            "paused  since {} by {}: {}",
            opt_time(&p["at_ms"]),
            cause(&p["cause"]),
            s(&p["note"])
        );
    }
    println!();
    println!(
        "{:<5} {:>6} {:<8} {:>8} {:>7} {:>7} {:>8} {:>9} {:>9} {:>6} {:>8} {:>8} {:>9}  SOAK UNTIL",
        "STAGE",
        "SHARE",
        "STATE",
        "TARGETED",
        "OFFERED",
        "PENDING",
        "DOWNLOAD",
        "INSTALLED",
        "CONFIRMED",
        "FAILED",
        "REJECTED",
        "REVERTED",
        "TIMED_OUT"
    );
    for st in r["stages"].as_array().into_iter().flatten() {
        let c = &st["counts"];
        println!(
            "{:<5} {:>5.1}% {:<8} {:>8} {:>7} {:>7} {:>8} {:>9} {:>9} {:>6} {:>8} {:>8} {:>9}  {}",
            st["index"].as_u64().unwrap_or(0) + 1,
            st["share"].as_f64().unwrap_or(0.0) * 100.0,
            s(&st["state"]),
            n(&c["targeted"]),
            n(&c["offered"]),
            n(&c["pending"]),
            n(&c["downloading"]),
            n(&c["installed"]),
            n(&c["confirmed"]),
            n(&c["failed"]),
            n(&c["rejected"]),
            n(&c["reverted"]),
            n(&c["timed_out"]),
            opt_time(&st["soak_until_ms"])
        );
    }
    let g = &r["gates"];
    if g.is_object() {
        println!();
        println!("gates   {}: {}", s(&g["verdict"]), s(&g["reason"]));
        let i = &g["install"];
        for (name, e) in [("overall", &i["cumulative"]), ("stage", &i["stage"])] {
            println!(
                "  install {name:<8} {}  failure {}  revert {}  timeout {}",
                s(&e["verdict"]),
                rate(&e["failure"]),
                rate(&e["revert"]),
                rate(&e["timeout"])
            );
        }
        let q = &g["quality"];
        println!(
            "  quality {}: {} ({} canary / {} control devices, {} windows)",
            s(&q["verdict"]),
            s(&q["reason"]),
            q["canary_devices"],
            q["control_devices"],
            q["windows"]
        );
        for m in ["labelled", "estimated", "latency", "resets"] {
            let c = &q[m];
            let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.4}"));
            println!(
                "    {m:<10} {:<13} canary {:>10} control {:>10} limit {}",
                s(&c["verdict"]),
                f(&c["canary"]),
                f(&c["control"]),
                c["limit"]
            );
        }
    }
    let rb = &r["rollback"];
    if rb.is_object() {
        let c = &rb["counts"];
        println!();
        println!(
            "rollback started {}, completed {}: {} devices; offered {}, confirmed {}, failed {}, pending {}",
            opt_time(&rb["started_ms"]),
            opt_time(&rb["completed_ms"]),
            rb["devices"],
            n(&c["offered"]),
            n(&c["confirmed"]),
            c["failed"].as_u64().unwrap_or(0) + c["rejected"].as_u64().unwrap_or(0),
            c["pending"]
        );
        for (old, v) in rb["versions"].as_object().into_iter().flatten() {
            println!(
                "  {old} rolls back as {} (seq {})",
                s(&v["version"]),
                v["seq"]
            );
        }
        for w in rb["waiting_for_versions"].as_array().into_iter().flatten() {
            println!("  {} waits for its rollback version", s(w));
        }
    }
}

fn print_audit(log: &Value) {
    println!(
        "{:>6} {:<19} {:<22} {:>5} {:<20}  NOTE",
        "ID", "TIME (UTC)", "EVENT", "STAGE", "CAUSE"
    );
    for a in log.as_array().into_iter().flatten() {
        let stage = a["stage"]
            .as_u64()
            .map_or("-".into(), |k| (k + 1).to_string());
        let mut note = s(&a["note"]).to_owned();
        if let Some(reason) = a["gates"]["reason"].as_str().filter(|r| !note.contains(r)) {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str("gates: ");
            note.push_str(reason);
        }
        println!(
            "{:>6} {:<19} {:<22} {:>5} {:<20}  {note}",
            n(&a["id"]),
            opt_time(&a["at_ms"]),
            s(&a["event"]),
            stage,
            cause(&a["cause"])
        );
    }
}

pub fn run(api: &ApiArgs, command: RolloutCommand) -> Result<(), String> {
    let client = reqwest::blocking::Client::new();
    let base = format!("{}/api/v1/rollouts", api.api.trim_end_matches('/'));
    let one = |id: &str, action: &str| -> Result<String, String> {
        let id = url_segment(id)?;
        Ok(if action.is_empty() {
            format!("{base}/{id}")
        } else {
            format!("{base}/{id}/{action}")
        })
    };
    let out = match command {
        RolloutCommand::Start {
            model,
            version,
            id,
            stages,
            plan,
        } => {
            let mut body = match plan {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    serde_json::from_str::<Value>(&text)
                        .map_err(|e| format!("{} is not JSON: {e}", path.display()))?
                }
                None => json!({}),
            };
            let Some(fields) = body.as_object_mut() else {
                return Err("--plan must hold a JSON object of plan fields".into());
            };
            fields.insert("model_id".into(), model.into());
            fields.insert("version".into(), version.into());
            if let Some(id) = id {
                fields.insert("id".into(), id.into());
            }
            if let Some(spec) = stages {
                fields.insert("stages".into(), parse_stages(&spec)?);
            }
            let status = call(client.post(&base).json(&body), &api.token)?;
            if !api.json {
                println!("rollout {} started", s(&status["id"]));
                print_status(&status);
            }
            status
        }
        RolloutCommand::List => {
            let list = call(client.get(&base), &api.token)?;
            if !api.json {
                print_list(&list);
            }
            list
        }
        RolloutCommand::Status { id } => {
            let status = call(client.get(one(&id, "")?), &api.token)?;
            if !api.json {
                print_status(&status);
            }
            status
        }
        RolloutCommand::Audit { id, after, limit } => {
            let log = call(
                client
                    .get(one(&id, "audit")?)
                    .query(&[("after", after.to_string()), ("limit", limit.to_string())]),
                &api.token,
            )?;
            if !api.json {
                print_audit(&log);
            }
            log
        }
        RolloutCommand::Pause { id, reason } => act(api, &client, &one(&id, "pause")?, &reason)?,
        RolloutCommand::Resume { id } => act(api, &client, &one(&id, "resume")?, "")?,
        RolloutCommand::Advance { id } => act(api, &client, &one(&id, "advance")?, "")?,
        RolloutCommand::Abort { id, reason } => act(api, &client, &one(&id, "abort")?, &reason)?,
    };
    if api.json {
        println!("{out}");
    }
    Ok(())
}

/// An operator's action; prints the new state.
fn act(
    api: &ApiArgs,
    client: &reqwest::blocking::Client,
    url: &str,
    reason: &str,
) -> Result<Value, String> {
    let status = call(
        client.post(url).json(&json!({ "reason": reason })),
        &api.token,
    )?;
    if !api.json {
        println!(
            "rollout {}: {} at stage {}",
            s(&status["id"]),
            s(&status["state"]),
            status["stage"].as_u64().unwrap_or(0) + 1
        );
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_and_durations_parse() {
        let st = parse_stages("1:10:24h, 10:0:90m:2d,100:0:12h").unwrap();
        assert_eq!(st[0]["share"], 0.01);
        assert_eq!(st[0]["min_devices"], 10);
        assert_eq!(st[0]["soak_ms"], 86_400_000);
        assert_eq!(st[0]["deadline_ms"], 72 * 3_600_000);
        assert_eq!(st[1]["soak_ms"], 90 * 60_000);
        assert_eq!(st[1]["deadline_ms"], 2 * 86_400_000);
        assert_eq!(st[2]["share"], 1.0);
        assert!(parse_stages("1:10").unwrap_err().contains("item 1"));
        assert!(parse_stages("1:x:1h").unwrap_err().contains("MIN_DEVICES"));
        assert!(parse_stages("1:1:10").unwrap_err().contains("unit"));
        assert!(duration_ms("5w").is_err());
        assert_eq!(duration_ms("250ms"), Ok(250));
        assert_eq!(duration_ms("60s"), Ok(60_000));
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn causes_print_flat() {
        assert_eq!(cause(&json!({"operator": "ops"})), "operator:ops");
        assert_eq!(cause(&json!("soak")), "soak");
    }
}
