//! `tinyfleet`: the command-line entry point. It wires the library crates together and holds no
//! logic of its own beyond argument parsing and printing.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backup;
mod config;
mod demo;
mod devices;
mod mosquitto;
mod ops;
mod ota_bridge;
mod rollouts;
mod serve;
mod simulate;

#[derive(Debug, Parser)]
#[command(
    name = "tinyfleet",
    version,
    about = "Fleet monitoring and OTA for tiny ML devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker, ingest and the API in one process until SIGINT/SIGTERM.
    Serve {
        /// TOML configuration file; without one, everything runs embedded with defaults.
        #[arg(long, short)]
        config: Option<std::path::PathBuf>,
        /// Overrides `data_dir` from the configuration.
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// A consistent backup of a data directory (database snapshot, keys, artifacts, journal),
    /// taken while `serve` runs.
    Backup(backup::BackupArgs),
    /// Check a backup and restore it into a new or empty data directory (`serve` stopped).
    Restore(backup::RestoreArgs),
    /// The configuration file: print the documented defaults, or check a file.
    Config {
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// Simulated devices (the real device client and installer) against any MQTT broker:
    /// scenarios with known ground truth, or load.
    Simulate(simulate::SimulateArgs),
    /// External broker files: Mosquitto's ACL and configuration settings.
    Broker {
        #[command(subcommand)]
        command: mosquitto::BrokerCommand,
    },
    /// Alerts and silences through the API.
    Alerts {
        #[command(flatten)]
        api: devices::ApiArgs,
        #[command(subcommand)]
        command: ops::AlertCommand,
    },
    /// OTA signing keys: list the trusted ones (API), generate one for rotation.
    Keys {
        #[command(subcommand)]
        command: ops::KeyCommand,
    },
    /// Provision, list, show and revoke devices through the API.
    Device {
        #[command(flatten)]
        api: devices::ApiArgs,
        #[command(subcommand)]
        command: devices::DeviceCommand,
    },
    /// Register model versions (artifacts) for OTA and list them, through the API.
    Model {
        #[command(flatten)]
        api: devices::ApiArgs,
        #[command(subcommand)]
        command: devices::ModelCommand,
    },
    /// Staged rollouts through the API: start, list, status, audit, pause, resume, advance,
    /// abort.
    Rollout {
        #[command(flatten)]
        api: devices::ApiArgs,
        #[command(subcommand)]
        command: rollouts::RolloutCommand,
    },
    /// Build a model version's monitoring profile from a reference data set (CSV).
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Evaluate the drift detectors on generated fleets with known ground truth: detection
    /// delay, missed detections and false alarms per scenario (Markdown).
    DriftEval {
        /// Devices per simulated fleet.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Independent runs per scenario.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The whole product on this machine: `serve` plus a simulated fleet that drifts in one
    /// cohort; an alert fires, a retraining trigger arrives, the retrained model is pushed and
    /// rolled out in stages. Prints what happens.
    Demo {
        /// Simulated devices (three hardware cohorts).
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Address of the API.
        #[arg(long, default_value = "127.0.0.1:8080")]
        api: std::net::SocketAddr,
        /// Data directory (default: a new one under the system's temporary directory).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
        /// Summaries each device sends before the drift starts (5 s each).
        #[arg(long, default_value_t = 6)]
        drift_after: u64,
        /// Exit (0) once the retrained model reached its cohort; non-zero on an abort or after
        /// --timeout-secs.
        #[arg(long)]
        exit_when_done: bool,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

#[derive(Debug, clap::Subcommand)]
enum ProfileCommand {
    /// Quantile bin edges, reference counts and the confidence calibration map from a CSV with
    /// a header: feature columns, `prediction`, `confidence`, optional `label` and `latency_us`.
    Build {
        /// The reference data set.
        #[arg(long)]
        csv: std::path::PathBuf,
        /// Model id the profile belongs to.
        #[arg(long)]
        model: String,
        /// Model version the profile belongs to.
        #[arg(long)]
        version: String,
        /// Bins per feature (the device client's `B`).
        #[arg(long, default_value_t = 16)]
        bins: usize,
        /// Confidence bins (the device client's `K`).
        #[arg(long, default_value_t = 8)]
        conf_bins: usize,
        /// Feature columns in device order (default: every other column, in header order).
        #[arg(long, value_delimiter = ',')]
        features: Option<Vec<String>>,
        /// Where to write the profile (JSON); default standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Store a profile (as `build` writes it) with its model version on a running server, which
    /// validates it; drift is evaluated against it from the next window on.
    Upload {
        #[command(flatten)]
        api: devices::ApiArgs,
        /// The profile (JSON).
        file: std::path::PathBuf,
    },
}

fn profile(command: ProfileCommand) -> Result<(), String> {
    let (csv, model, version, bins, conf_bins, features, out) = match command {
        ProfileCommand::Build {
            csv,
            model,
            version,
            bins,
            conf_bins,
            features,
            out,
        } => (csv, model, version, bins, conf_bins, features, out),
        ProfileCommand::Upload { api, file } => return devices::upload_profile(&api, &file),
    };
    let file =
        std::fs::File::open(&csv).map_err(|e| format!("cannot open {}: {e}", csv.display()))?;
    let options = tinyfleet_drift::profile::BuildOptions {
        model_id: model,
        model_version: version,
        bins,
        conf_bins,
        features,
        ..tinyfleet_drift::profile::BuildOptions::default()
    };
    let profile = tinyfleet_drift::profile::build_profile(std::io::BufReader::new(file), &options)
        .map_err(|e| format!("{}: {e}", csv.display()))?;
    let json = serde_json::to_string_pretty(&profile).map_err(|e| e.to_string())?;
    match out {
        Some(path) => std::fs::write(&path, json + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        None => println!("{json}"),
    }
    eprintln!(
        "profile of {}@{}: {} rows, {} features, {} classes, reference accuracy {}",
        profile.model_id,
        profile.model_version,
        profile.n,
        profile.features.len(),
        profile.classes.len(),
        profile
            .accuracy
            .map_or("unknown (no labels)".to_owned(), |a| format!("{a:.3}"))
    );
    Ok(())
}

fn drift_eval(devices: usize, runs: usize) -> Result<(), String> {
    if devices < 100 || runs == 0 {
        return Err("drift-eval needs --devices >= 100 and --runs >= 1".into());
    }
    let opts = tinyfleet_drift::evaluate::EvalOptions {
        devices,
        runs,
        ..tinyfleet_drift::evaluate::EvalOptions::default()
    };
    let results = tinyfleet_drift::evaluate::run(&opts);
    print!("{}", tinyfleet_drift::evaluate::markdown(&opts, &results));
    Ok(())
}

/// glibc gives threads that allocate at the same time arenas of their own (up to 8 per core)
/// and keeps what is freed in them. `serve`'s bursts (the monitor parses every device window of
/// a closed window, ingest opens the next ones) land on ever other threads, and its RSS grew by
/// ~120 MB per window at 50,000 devices without levelling off; with two arenas it levels off
/// (`docs/benchmarks.md`, "serve's memory over many windows"). glibc reads the variable only
/// when a process starts, and setting it from inside takes `unsafe` code (forbidden here), so
/// the process executes itself again with it set, keeping its pid. An operator's own
/// `MALLOC_ARENA_MAX` is left alone.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt as _;
        /// The arenas a long-running process may use.
        const MALLOC_ARENAS: &str = "2";
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        // Returns only when the exec failed.
        let error = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("MALLOC_ARENA_MAX", MALLOC_ARENAS)
            .exec();
        eprintln!(
            "warning: cannot limit malloc arenas ({error}); memory may grow with each window"
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve { .. } | Command::Demo { .. }) {
        limit_malloc_arenas();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TINYFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve { config, data_dir } => run_serve(config.as_deref(), data_dir),
        Command::Backup(args) => backup::backup(args),
        Command::Restore(args) => backup::restore(args),
        Command::Config { command } => config::run_command(command),
        Command::Broker { command } => mosquitto::run_command(command),
        Command::Simulate(args) => simulate::run(args),
        Command::Alerts { api, command } => ops::alerts(&api, command),
        Command::Keys { command } => ops::keys(command),
        Command::Device { api, command } => devices::run(&api, command),
        Command::Model { api, command } => devices::model(&api, command),
        Command::Rollout { api, command } => rollouts::run(&api, command),
        Command::Profile { command } => profile(command),
        Command::DriftEval { devices, runs } => drift_eval(devices, runs),
        Command::Demo {
            devices,
            api,
            data_dir,
            drift_after,
            exit_when_done,
            timeout_secs,
        } => demo::run(demo::DemoOptions {
            devices,
            api,
            data_dir,
            drift_after,
            exit_when_done,
            timeout: std::time::Duration::from_secs(timeout_secs),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tinyfleet: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(
    config: Option<&std::path::Path>,
    data_dir: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let mut config = config::Config::load(config)?;
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tinyfleet")
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(serve::serve(config, std::future::pending()))
}
