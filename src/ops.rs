//! `tinyfleet alerts ...` and `tinyfleet keys ...`: alerts and silences over the API, and the
//! OTA signing keys (list over the API; generate a key file for rotation, offline).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::devices::{ApiArgs, call, url_segment};

#[derive(Debug, Subcommand)]
pub enum AlertCommand {
    /// List alerts (all, or one state).
    List {
        /// pending, firing or resolved
        #[arg(long)]
        state: Option<String>,
    },
    /// Silence alerts whose labels match every `--match name=value` (or `name=~regex`) for a
    /// while, with a comment saying why.
    Silence {
        #[arg(long = "match", required = true)]
        matchers: Vec<String>,
        /// e.g. 30m, 2h, 1d
        #[arg(long, default_value = "2h")]
        duration: String,
        #[arg(long)]
        comment: String,
    },
    /// List silences.
    Silences,
    /// End a silence now.
    Expire { id: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// The keys devices must trust (from the API): the signing key first.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Generate a new Ed25519 signing key into FILE (mode 0600) and print its key id and
    /// public key, for rotation: build firmware that trusts it next to the current key, list
    /// the current one in `[ota] trusted_keys`, point `[ota] signing_key` at the new file and
    /// restart.
    Generate {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// `30m`, `2h`, `1d` in seconds (the rollout commands' durations).
fn duration_secs(s: &str) -> Result<u64, String> {
    let ms = crate::rollouts::duration_ms(s)?;
    u64::try_from(ms / 1000)
        .ok()
        .filter(|&d| d > 0)
        .ok_or_else(|| format!("duration {s:?}: at least one second"))
}

/// `name=value`, `name!=value`, `name=~regex`, `name!~regex` as an API matcher.
fn matcher(s: &str) -> Result<Value, String> {
    for op in ["!=", "=~", "!~", "="] {
        if let Some((name, value)) = s.split_once(op)
            && !name.is_empty()
            && !name.contains(['=', '!', '~'])
        {
            return Ok(json!({ "name": name, "op": op, "value": value }));
        }
    }
    Err(format!(
        "matcher {s:?}: expected name=value, name!=value, name=~regex or name!~regex"
    ))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn alerts(api: &ApiArgs, command: AlertCommand) -> Result<(), String> {
    let http = reqwest::blocking::Client::new();
    let base = api.api.trim_end_matches('/');
    let out = match command {
        AlertCommand::List { state } => {
            let mut req = http.get(format!("{base}/api/v1/alerts"));
            if let Some(state) = &state {
                req = req.query(&[("state", state)]);
            }
            let list = call(req, &api.token)?;
            if !api.json {
                println!(
                    "{:<9} {:<24} {:<9} SCOPE / DEVICE",
                    "STATE", "ALERT", "SEVERITY"
                );
                for a in list.as_array().into_iter().flatten() {
                    let l = &a["labels"];
                    let at = if l["device"].is_null() {
                        text(&l["scope"])
                    } else {
                        text(&l["device"])
                    };
                    let feature = l["feature"]
                        .as_str()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default();
                    println!(
                        "{:<9} {:<24} {:<9} {at}{feature}",
                        text(&a["state"]),
                        text(&l["alertname"]),
                        text(&l["severity"]),
                    );
                }
                return Ok(());
            }
            list
        }
        AlertCommand::Silence {
            matchers,
            duration,
            comment,
        } => {
            let matchers = matchers
                .iter()
                .map(|m| matcher(m))
                .collect::<Result<Vec<_>, _>>()?;
            let body = json!({
                "matchers": matchers,
                "duration_secs": duration_secs(&duration)?,
                "comment": comment,
            });
            let created = call(
                http.post(format!("{base}/api/v1/silences")).json(&body),
                &api.token,
            )?;
            if !api.json {
                println!("silence {} created", text(&created["id"]));
                return Ok(());
            }
            created
        }
        AlertCommand::Silences => {
            let list = call(http.get(format!("{base}/api/v1/silences")), &api.token)?;
            if !api.json {
                println!("{:<38} {:<8} {:<16} COMMENT", "ID", "STATE", "BY");
                for s in list.as_array().into_iter().flatten() {
                    println!(
                        "{:<38} {:<8} {:<16} {}",
                        text(&s["id"]),
                        text(&s["state"]),
                        text(&s["created_by"]),
                        text(&s["comment"])
                    );
                }
                return Ok(());
            }
            list
        }
        AlertCommand::Expire { id } => {
            call(
                http.delete(format!("{base}/api/v1/silences/{}", url_segment(&id)?)),
                &api.token,
            )?;
            if !api.json {
                println!("silence {id} expired");
                return Ok(());
            }
            json!({ "expired": id })
        }
    };
    println!("{out}");
    Ok(())
}

pub fn keys(command: KeyCommand) -> Result<(), String> {
    match command {
        KeyCommand::List { api } => {
            let base = api.api.trim_end_matches('/');
            let list = call(
                reqwest::blocking::Client::new().get(format!("{base}/api/v1/ota/keys")),
                &api.token,
            )?;
            if api.json {
                println!("{list}");
            } else {
                println!("{:<18} {:<8} {:<9} PUBLIC KEY", "KID", "ALG", "SIGNING");
                for k in list.as_array().into_iter().flatten() {
                    println!(
                        "{:<18} {:<8} {:<9} {}",
                        text(&k["kid"]),
                        text(&k["alg"]),
                        if k["signing"] == false { "no" } else { "yes" },
                        text(&k["public_key"])
                    );
                }
            }
        }
        KeyCommand::Generate { file, json } => {
            if file.exists() {
                return Err(format!(
                    "{} exists; keys are never overwritten",
                    file.display()
                ));
            }
            let signer = tinyfleet_ota_service::keys::Signer::load_or_generate(&file)?;
            let out = json!({
                "file": file.display().to_string(),
                "kid": hex::encode(signer.kid()),
                "public_key": hex::encode(signer.public_key()),
                "alg": "EdDSA",
            });
            if json {
                println!("{out}");
            } else {
                println!(
                    "generated {} (mode 0600)\nkid        {}\npublic key {}",
                    file.display(),
                    text(&out["kid"]),
                    text(&out["public_key"])
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_and_durations_parse() {
        assert_eq!(
            matcher("alertname=FeatureDrift").unwrap(),
            json!({"name": "alertname", "op": "=", "value": "FeatureDrift"})
        );
        assert_eq!(matcher("scope=~kws@.*").unwrap()["op"], "=~");
        assert_eq!(matcher("device!=d1").unwrap()["op"], "!=");
        assert!(matcher("=x").is_err());
        assert_eq!(duration_secs("90s"), Ok(90));
        assert_eq!(duration_secs("30m"), Ok(1800));
        assert_eq!(duration_secs("1d"), Ok(86_400));
        assert!(duration_secs("2w").is_err());
        assert!(duration_secs("0h").is_err());
    }
}
