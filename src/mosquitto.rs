//! Mosquitto as the external broker: `serve` keeps its password file in step with the device
//! registry, and `tinyfleet broker` prints the ACL file and the `mosquitto.conf` settings.
//!
//! Device passwords are derived from the master key (never stored), so the file can be
//! rewritten at any time; see `tinyfleet_broker::mosquitto` for the formats.

use std::path::PathBuf;
use std::time::Duration;

use tinyfleet_broker::mosquitto::{self, PasswordFile};
use tinyfleet_store::Registry;
use tokio::sync::watch;

use crate::config::MqttConfig;

/// How often the registry is compared with the written file.
const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// `tinyfleet broker ...`.
#[derive(Debug, clap::Subcommand)]
pub enum BrokerCommand {
    /// Print Mosquitto's ACL file: each device (username = device id) confined to its own
    /// topics, the service users with the whole `tf/` tree.
    #[command(name = "mosquitto-acl")]
    Acl {
        /// The MQTT username of tinyfleet's services (`[mqtt] username`); repeatable.
        #[arg(long = "service-user", default_value = "tinyfleet-ingest")]
        service_users: Vec<String>,
    },
    /// Print a `mosquitto.conf` for tinyfleet: a device listener and a service listener.
    #[command(name = "mosquitto-conf")]
    Conf {
        /// Where `serve` writes the password file (`[mqtt] password_file`).
        #[arg(long)]
        password_file: PathBuf,
        /// Where the ACL file from `tinyfleet broker mosquitto-acl` is.
        #[arg(long)]
        acl_file: PathBuf,
        /// The devices' listener, `port` or `address:port`.
        #[arg(long, default_value = "1883")]
        device_listener: String,
        /// The listener of tinyfleet's own connections (`[mqtt] host`/`port`); keep it internal.
        #[arg(long, default_value = "127.0.0.1:1884")]
        service_listener: String,
    },
    /// Print the bridge section of an edge Mosquitto: devices connect to edges, tinyfleet to
    /// the core; device messages go up, offers and blocks come down (see docs/scaling.md).
    #[command(name = "mosquitto-bridge")]
    Bridge {
        /// The bridge's name, also its client id on the core; unique per edge.
        #[arg(long)]
        name: String,
        /// The core broker's service listener, `host:port`.
        #[arg(long)]
        core: String,
        /// The core's service user the bridge logs in as (list it in the core's ACL).
        #[arg(long, default_value = "tinyfleet-bridge")]
        username: String,
        /// A file holding that user's password (it is copied into the printed section).
        #[arg(long)]
        password_file: PathBuf,
    },
}

pub fn run_command(command: BrokerCommand) -> Result<(), String> {
    let text = match command {
        BrokerCommand::Acl { service_users } => {
            let users: Vec<&str> = service_users.iter().map(String::as_str).collect();
            mosquitto::acl_file(&users)
        }
        BrokerCommand::Conf {
            password_file,
            acl_file,
            device_listener,
            service_listener,
        } => mosquitto::config_snippet(
            &password_file,
            &acl_file,
            &device_listener,
            &service_listener,
        ),
        BrokerCommand::Bridge {
            name,
            core,
            username,
            password_file,
        } => {
            let password = std::fs::read_to_string(&password_file)
                .map_err(|e| format!("cannot read {}: {e}", password_file.display()))?;
            let password = password.trim();
            if password.is_empty() || password.contains(char::is_whitespace) {
                return Err(format!(
                    "{}: the password must be one non-empty word",
                    password_file.display()
                ));
            }
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err("--name must be one non-empty word".into());
            }
            mosquitto::bridge_snippet(&name, &core, &username, password)
        }
    };
    print!("{text}");
    Ok(())
}

/// Keeps `[mqtt] password_file` holding every active device and the service user.
pub struct BrokerPasswords {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

struct Sync {
    path: PathBuf,
    reload: Vec<String>,
    service: Option<(String, String)>,
    registry: Registry,
    file: PasswordFile,
}

impl Sync {
    /// Writes the file if the users changed; runs the reload command after a write.
    async fn once(&mut self) -> Result<bool, String> {
        // Devices provisioned or revoked through another process on the same store count too.
        let registry = self.registry.clone();
        let (mut users, legacy) = tokio::task::spawn_blocking(move || {
            if let Err(e) = registry.refresh() {
                tracing::warn!(error = %e, "registry refresh failed");
            }
            registry.broker_passwords()
        })
        .await
        .map_err(|e| e.to_string())?;
        if legacy > 0 {
            tracing::warn!(
                devices = legacy,
                "devices provisioned before derived passwords cannot be written to the \
                 broker's password file; re-provision them"
            );
        }
        if let Some(service) = &self.service {
            users.push(service.clone());
        }
        // Hashing new users costs PBKDF2 each: off the runtime.
        let mut file = std::mem::take(&mut self.file);
        let path = self.path.clone();
        let count = users.len();
        let (file, written) = tokio::task::spawn_blocking(move || {
            let (text, changed) = file.render(&users);
            let written = changed.then(|| mosquitto::write_atomically(&path, &text));
            (file, written)
        })
        .await
        .map_err(|e| e.to_string())?;
        self.file = file;
        match written {
            None => return Ok(false),
            Some(Err(e)) => {
                // Rendered but not written: hash everything again next time, and write.
                self.file = PasswordFile::default();
                return Err(format!("cannot write {}: {e}", self.path.display()));
            }
            Some(Ok(())) => {}
        }
        tracing::info!(path = %self.path.display(), users = count, "broker password file written");
        if !self.reload.is_empty() {
            let reload = self.reload.clone();
            let status = tokio::task::spawn_blocking(move || {
                std::process::Command::new(&reload[0])
                    .args(&reload[1..])
                    .status()
            })
            .await;
            match status {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => tracing::warn!(%status, "reload_command failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "reload_command could not run"),
                Err(e) => tracing::warn!(error = %e, "reload_command task failed"),
            }
        }
        Ok(true)
    }
}

impl BrokerPasswords {
    /// Writes the file once (an error if it cannot be written), then keeps it in step.
    pub async fn start(config: &MqttConfig, registry: Registry) -> Result<Self, String> {
        let Some(path) = config.password_file.clone() else {
            return Err("no password_file".into());
        };
        let service = match (&config.username, &config.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            _ => None,
        };
        let mut sync = Sync {
            path,
            reload: config.reload_command.clone(),
            service,
            registry,
            file: PasswordFile::default(),
        };
        sync.once().await?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = sync.once().await {
                            tracing::error!(error = %e, "broker password file not updated");
                        }
                    }
                    _ = stopped.changed() => break,
                }
            }
        });
        Ok(Self { stop, task })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
