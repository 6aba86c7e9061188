//! The deployment files under `deploy/` stay true to the binary: every TOML configuration
//! passes the real `tinyfleet config check`, every `TINYFLEET__...` (and `TINYFLEET_FILE__...`)
//! variable they name is a real setting of `tinyfleet config default`, the compose and
//! Kubernetes YAML parses, the ports of the Dockerfile, compose file, manifests and unit agree
//! with the configurations they run, secrets only reach containers as files, and the Mosquitto
//! files are what `tinyfleet broker` generates. With `systemd-analyze` installed, the units
//! are verified too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use toml::{Table, Value};
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn deploy() -> PathBuf {
    Path::new(ROOT).join("deploy")
}

/// `tinyfleet args...` with no `TINYFLEET__` variable of this process leaking in.
fn tinyfleet(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tinyfleet"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TINYFLEET_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args).output().expect("run tinyfleet")
}

fn stdout_of(args: &[&str]) -> String {
    let out = tinyfleet(args);
    assert!(
        out.status.success(),
        "tinyfleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Every file under `deploy/` (the compose setup's generated secrets and local backups left
/// out).
fn deploy_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("list deploy/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if path.ends_with("compose/secrets") || path.ends_with("compose/backups") {
                    continue;
                }
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(), &mut out);
    out.sort();
    out
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn toml_file(path: impl AsRef<Path>) -> Table {
    let path = path.as_ref();
    toml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_docs(path: impl AsRef<Path>) -> Vec<Yaml> {
    let path = path.as_ref();
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The port of a `listen = "host:port"` setting at `section.listen`.
fn listen_port(config: &Table, section: &str) -> u16 {
    let listen = config[section]["listen"]
        .as_str()
        .unwrap_or_else(|| panic!("[{section}] listen"));
    listen
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("[{section}] listen = {listen}: {e}"))
        .port()
}

fn rel(path: &Path) -> String {
    path.strip_prefix(ROOT)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_toml_configuration_passes_config_check() {
    let tomls: Vec<PathBuf> = deploy_files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    // docker, systemd, compose (embedded and Mosquitto), Kubernetes.
    assert!(tomls.len() >= 5, "{tomls:?}");
    for path in &tomls {
        let out = tinyfleet(&["config", "check", path.to_str().expect("UTF-8 path")]);
        assert!(
            out.status.success(),
            "{}: {}",
            rel(path),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("ok: "), "{}: {stdout}", rel(path));
    }
}

/// `tinyfleet config default` with its commented-out settings (`#key = ...`, `#[section]`)
/// enabled: every setting there is.
fn every_setting() -> Table {
    let default = stdout_of(&["config", "default"]);
    let text: Vec<&str> = default
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '[') => rest,
            _ => line,
        })
        .collect();
    toml::from_str(&text.join("\n")).expect("the uncommented default configuration parses")
}

/// Whether `TINYFLEET__<rest>` names a setting: parts separated by `__`, upper-case parts
/// matched to lower-case keys, numbers indexing arrays (of which any element documents the
/// fields).
fn names_a_setting(all: &Table, rest: &str) -> Result<(), String> {
    let mut node = Value::Table(all.clone());
    for part in rest.split("__") {
        let key = if part.chars().any(|c| c.is_ascii_lowercase()) {
            part.to_owned()
        } else {
            part.to_ascii_lowercase()
        };
        node = match node {
            Value::Table(t) => t
                .get(&key)
                .cloned()
                .ok_or_else(|| format!("no setting `{key}`"))?,
            Value::Array(items) if key.parse::<usize>().is_ok() => {
                let mut merged = Table::new();
                for item in items {
                    if let Value::Table(t) = item {
                        merged.extend(t);
                    }
                }
                Value::Table(merged)
            }
            _ => return Err(format!("`{key}` is below a plain value")),
        };
    }
    Ok(())
}

#[test]
fn every_tinyfleet_variable_names_a_real_setting() {
    let all = every_setting();
    let mut checked = BTreeSet::new();
    for path in deploy_files() {
        let text = read(&path);
        for prefix in ["TINYFLEET__", "TINYFLEET_FILE__"] {
            for (at, _) in text.match_indices(prefix) {
                // Part of a longer name (`XTINYFLEET__`)?
                if text[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    continue;
                }
                let rest: String = text[at + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let rest = rest.trim_end_matches('_');
                // The prefix alone, or the placeholder of the syntax.
                if rest.is_empty() || rest == "SECTION__FIELD" {
                    continue;
                }
                if let Err(e) = names_a_setting(&all, rest) {
                    panic!("{}: {prefix}{rest}: {e}", rel(&path));
                }
                checked.insert(format!("{prefix}{rest}"));
            }
        }
    }
    for expected in [
        "TINYFLEET__DATA_DIR",
        "TINYFLEET__INFLUX__TOKEN",
        "TINYFLEET_FILE__MQTT__PASSWORD",
        "TINYFLEET__BROKER__TLS__CERT_PATH",
    ] {
        assert!(
            checked.contains(expected),
            "{expected} not seen: {checked:?}"
        );
    }
    // The check itself refuses a wrong name.
    assert!(names_a_setting(&all, "INFLUX__TOKN").is_err());
    assert!(names_a_setting(&all, "API__TOKENS__0__SHA256").is_ok());
}

/// A compose service.
fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &compose["services"][name];
    assert!(!s.is_badvalue(), "no service {name}");
    s
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The container side of each `ports:` entry (`"${MQTT_PORT:-1883}:1883"` -> 1883).
fn container_ports(service: &Yaml) -> BTreeSet<u16> {
    strings(&service["ports"])
        .iter()
        .map(|p| {
            let port = p.rsplit(':').next().expect("port");
            port.parse()
                .unwrap_or_else(|e| panic!("port mapping {p}: {e}"))
        })
        .collect()
}

/// `volumes:` entries as (source, target).
fn mounts(service: &Yaml) -> Vec<(String, String)> {
    strings(&service["volumes"])
        .iter()
        .map(|v| {
            let mut parts = v.split(':');
            let source = parts.next().expect("source").to_owned();
            let target = parts.next().expect("target").to_owned();
            (source, target)
        })
        .collect()
}

fn environment(service: &Yaml) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(map) = service["environment"].as_hash() {
        for (k, v) in map {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                other => panic!("environment value {other:?}"),
            };
            out.insert(k.as_str().expect("name").to_owned(), value);
        }
    }
    out
}

/// The `--config` argument of a command line.
fn config_arg(args: &[String]) -> &str {
    let at = args.iter().position(|a| a == "--config").expect("--config");
    &args[at + 1]
}

#[test]
fn compose_runs_what_its_configurations_say() {
    let dir = deploy().join("compose");
    let docs = yaml_docs(dir.join("compose.yaml"));
    let compose = &docs[0];
    let secrets: BTreeSet<String> = compose["secrets"]
        .as_hash()
        .expect("secrets")
        .keys()
        .map(|k| k.as_str().expect("name").to_owned())
        .collect();
    let services = compose["services"].as_hash().expect("services");
    assert!(services.len() >= 6, "{services:?}");
    for (name, s) in services {
        let name = name.as_str().expect("service name");
        // Bind mounts name files that exist.
        for (source, _) in mounts(s) {
            if source.starts_with('.') {
                assert!(dir.join(&source).exists(), "{name}: {source} is missing");
            }
        }
        // Secrets only as files: a variable that sounds secret holds a /run/secrets path.
        let used: BTreeSet<String> = strings(&s["secrets"]).into_iter().collect();
        for (key, value) in environment(s) {
            let upper = key.to_ascii_uppercase();
            if upper.contains("TOKEN") || upper.contains("PASSWORD") || upper.contains("SECRET") {
                let secret = value.strip_prefix("/run/secrets/").unwrap_or_else(|| {
                    panic!("{name}: {key} must name a file in /run/secrets, not hold a value")
                });
                assert!(used.contains(secret), "{name}: {key}: {secret} not mounted");
            }
        }
        for secret in &used {
            assert!(
                secrets.contains(secret),
                "{name}: undefined secret {secret}"
            );
        }
    }

    // Embedded: the published ports are the broker's and the API's.
    let embedded = toml_file(dir.join("tinyfleet.toml"));
    let tf = service(compose, "tinyfleet");
    assert_eq!(
        container_ports(tf),
        BTreeSet::from([
            listen_port(&embedded, "broker"),
            listen_port(&embedded, "api")
        ])
    );
    let config_path = config_arg(&strings(&tf["command"])).to_owned();
    assert!(
        mounts(tf).contains(&("./tinyfleet.toml".to_owned(), config_path.clone())),
        "the embedded service runs ./tinyfleet.toml"
    );
    assert!(
        mounts(tf).iter().any(
            |(s, t)| s == "tinyfleet-data" && Some(t.as_str()) == embedded["data_dir"].as_str()
        ),
        "the data volume is mounted at data_dir"
    );
    assert_eq!(
        embedded["influx"]["url"].as_str(),
        Some("http://influxdb:8086")
    );

    // Mosquitto: tinyfleet publishes only its API, reaches Mosquitto's service listener and
    // writes the password file Mosquitto reads, through the shared volume.
    let external = toml_file(dir.join("tinyfleet-mosquitto.toml"));
    let tfm = service(compose, "tinyfleet-mosquitto");
    assert_eq!(
        container_ports(tfm),
        BTreeSet::from([listen_port(&external, "api")])
    );
    assert_eq!(
        config_arg(&strings(&tfm["command"])),
        config_path,
        "both tinyfleet services read the same path"
    );
    assert!(mounts(tfm).contains(&("./tinyfleet-mosquitto.toml".to_owned(), config_path)));
    let mqtt = &external["mqtt"];
    assert_eq!(mqtt["host"].as_str(), Some("mosquitto"));
    let conf = read(dir.join("mosquitto/mosquitto.conf"));
    let listeners: Vec<u16> = conf
        .lines()
        .filter_map(|l| l.strip_prefix("listener "))
        .map(|l| {
            l.split_whitespace()
                .next()
                .expect("port")
                .parse()
                .expect("port")
        })
        .collect();
    assert_eq!(
        listeners,
        [1883, mqtt["port"].as_integer().expect("[mqtt] port") as u16],
        "device listener, then service listener"
    );
    let mosquitto = service(compose, "mosquitto");
    assert_eq!(container_ports(mosquitto), BTreeSet::from([listeners[0]]));
    let password_file = Path::new(mqtt["password_file"].as_str().expect("password_file"));
    let auth_in_tinyfleet = mounts(tfm)
        .into_iter()
        .find(|(s, _)| s == "mosquitto-auth")
        .expect("tinyfleet mounts mosquitto-auth")
        .1;
    assert_eq!(
        Path::new(&auth_in_tinyfleet),
        password_file.parent().unwrap()
    );
    let auth_in_mosquitto = mounts(mosquitto)
        .into_iter()
        .find(|(s, _)| s == "mosquitto-auth")
        .expect("mosquitto mounts mosquitto-auth")
        .1;
    let mosquitto_password_file = format!(
        "{auth_in_mosquitto}/{}",
        password_file.file_name().unwrap().to_str().unwrap()
    );
    let acl_in_mosquitto = mounts(mosquitto)
        .into_iter()
        .find(|(s, _)| s == "./mosquitto/tinyfleet.acl")
        .expect("the ACL is mounted")
        .1;
    // The generated parts, verbatim.
    let generated = stdout_of(&[
        "broker",
        "mosquitto-conf",
        "--password-file",
        &mosquitto_password_file,
        "--acl-file",
        &acl_in_mosquitto,
        "--device-listener",
        "1883",
        "--service-listener",
        &mqtt["port"].as_integer().unwrap().to_string(),
    ]);
    assert!(
        conf.contains(&generated),
        "mosquitto.conf no longer holds `tinyfleet broker mosquitto-conf`'s output:\n{generated}"
    );
    let user = mqtt["username"].as_str().expect("[mqtt] username");
    assert_eq!(
        read(dir.join("mosquitto/tinyfleet.acl")),
        stdout_of(&["broker", "mosquitto-acl", "--service-user", user]),
        "mosquitto/tinyfleet.acl is not `tinyfleet broker mosquitto-acl`'s output"
    );
    let run = read(dir.join("mosquitto/run.sh"));
    assert!(run.contains(&format!("PASSWD={mosquitto_password_file}")));

    // TLS proxy: listens where it is published, forwards to the embedded broker.
    let nginx = read(dir.join("tls-proxy/nginx.conf"));
    assert!(nginx.contains("listen 8883 ssl;"));
    assert_eq!(
        container_ports(service(compose, "tls-proxy")),
        BTreeSet::from([8883])
    );
    assert!(nginx.contains(&format!("tinyfleet:{};", listen_port(&embedded, "broker"))));

    // Grafana is provisioned from dashboards/grafana.
    for (source, _) in mounts(service(compose, "grafana")) {
        if source.starts_with("../../dashboards") {
            assert!(dir.join(&source).is_dir(), "{source}");
        }
    }
}

#[test]
fn the_image_exposes_and_checks_what_its_configuration_listens_on() {
    let dockerfile = read(deploy().join("docker/Dockerfile"));
    let config = toml_file(deploy().join("docker/tinyfleet.toml"));
    let exposed: BTreeSet<u16> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| {
            l.split_whitespace()
                .map(|p| p.parse::<u16>().expect("port"))
        })
        .collect();
    assert_eq!(exposed, BTreeSet::from([1883, 8883, 8080]));
    assert!(exposed.contains(&listen_port(&config, "broker")));
    let api = listen_port(&config, "api");
    assert!(exposed.contains(&api));
    assert!(
        dockerfile.contains(&format!("${{TINYFLEET_HEALTH_PORT:-{api}}}")),
        "the health check probes the API port"
    );
    assert!(dockerfile.contains("GET /healthz "));
    assert!(dockerfile.contains("cargo build --release --locked -p tinyfleet"));
    assert!(
        dockerfile.contains(
            "COPY --chmod=0644 deploy/docker/tinyfleet.toml /etc/tinyfleet/tinyfleet.toml"
        )
    );
    assert!(dockerfile.contains(r#"CMD ["serve", "--config", "/etc/tinyfleet/tinyfleet.toml"]"#));
    assert!(dockerfile.contains(&format!(
        "VOLUME [\"{}\"]",
        config["data_dir"].as_str().expect("data_dir")
    )));
    assert!(dockerfile.contains("USER 10001:10001"));
    // /healthz is what the API serves.
    let api_src = read(Path::new(ROOT).join("api/src/lib.rs"));
    assert!(api_src.contains(".route(\"/healthz\""));
}

#[test]
fn kubernetes_manifests_agree_with_their_configuration() {
    let dir = deploy().join("k8s");
    let kustomization = &yaml_docs(dir.join("kustomization.yaml"))[0];
    for resource in strings(&kustomization["resources"]) {
        assert!(dir.join(&resource).is_file(), "{resource}");
    }
    let generated = &kustomization["configMapGenerator"][0];
    let config_file = strings(&generated["files"]).remove(0);
    let config = toml_file(dir.join(&config_file));
    let mut kinds = BTreeMap::new();
    for path in deploy_files()
        .into_iter()
        .filter(|p| p.starts_with(&dir) && p.extension().is_some_and(|e| e == "yaml"))
    {
        for doc in yaml_docs(&path) {
            if let Some(kind) = doc["kind"].as_str() {
                kinds.insert(
                    (
                        kind.to_owned(),
                        doc["metadata"]["name"].as_str().map(str::to_owned),
                    ),
                    doc.clone(),
                );
            }
        }
    }
    let sts = &kinds[&("StatefulSet".to_owned(), Some("tinyfleet".to_owned()))];
    assert_eq!(
        sts["spec"]["replicas"].as_i64(),
        Some(1),
        "SQLite: one writer"
    );
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let container = &pod["containers"][0];
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert!(!container["resources"]["limits"]["memory"].is_badvalue());
    let ports: BTreeMap<String, u16> = container["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("name").to_owned(),
                p["containerPort"].as_i64().expect("port") as u16,
            )
        })
        .collect();
    assert_eq!(ports["mqtt"], listen_port(&config, "broker"));
    assert_eq!(ports["http"], listen_port(&config, "api"));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["path"].as_str(),
            Some("/healthz")
        );
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("http"));
    }
    // The configuration file is the generated ConfigMap, where --config reads it.
    let config_mount = container["volumeMounts"]
        .as_vec()
        .expect("mounts")
        .iter()
        .find(|m| m["name"].as_str() == Some("config"))
        .expect("config mount")["mountPath"]
        .as_str()
        .expect("path")
        .to_owned();
    assert_eq!(
        config_arg(&strings(&container["args"])),
        format!("{config_mount}/{config_file}")
    );
    let data_mount = container["volumeMounts"]
        .as_vec()
        .expect("mounts")
        .iter()
        .find(|m| m["name"].as_str() == Some("data"))
        .expect("data mount")["mountPath"]
        .as_str()
        .expect("path")
        .to_owned();
    assert_eq!(Some(data_mount.as_str()), config["data_dir"].as_str());
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"].as_str(),
        generated["name"].as_str()
    );
    // Every Service targets a named port of the container.
    let mut services = 0;
    for ((kind, name), doc) in &kinds {
        if kind != "Service" {
            continue;
        }
        services += 1;
        for port in doc["spec"]["ports"].as_vec().expect("ports") {
            let target = port["targetPort"].as_str().expect("named targetPort");
            assert!(ports.contains_key(target), "{name:?}: {target}");
            assert_eq!(port["port"].as_i64(), Some(i64::from(ports[target])));
        }
    }
    assert!(services >= 2);
    // The TLS component listens where the container declares mqtts.
    let tls = &yaml_docs(dir.join("components/tls/kustomization.yaml"))[0];
    let patch = tls["patches"][0]["patch"].as_str().expect("patch");
    let ops = &YamlLoader::load_from_str(patch).expect("the patch parses")[0];
    let listen = ops
        .as_vec()
        .expect("JSON patch")
        .iter()
        .find(|op| op["value"]["name"].as_str() == Some("TINYFLEET__BROKER__TLS__LISTEN"))
        .expect("TLS listen")["value"]["value"]
        .as_str()
        .expect("value")
        .parse::<SocketAddr>()
        .expect("address");
    assert_eq!(listen.port(), ports["mqtts"]);
}

#[test]
fn the_systemd_unit_runs_its_configuration() {
    let dir = deploy().join("systemd");
    let unit = read(dir.join("tinyfleet.service"));
    let config = toml_file(dir.join("tinyfleet.toml"));
    let data_dir = config["data_dir"].as_str().expect("data_dir");
    for line in [
        "ExecStart=/usr/local/bin/tinyfleet serve --config /etc/tinyfleet/tinyfleet.toml",
        "StateDirectory=tinyfleet",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
    assert!(unit.contains(&format!("ReadWritePaths={data_dir}")));
    assert!(unit.contains(&format!("Environment=TINYFLEET__DATA_DIR={data_dir}")));
    assert!(unit.contains(&format!("WorkingDirectory={data_dir}")));
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("LimitNOFILE")
        .parse()
        .expect("number");
    assert!(nofile >= 100_000);
    let backup = read(dir.join("tinyfleet-backup.service"));
    assert!(backup.contains("tinyfleet backup --config /etc/tinyfleet/tinyfleet.toml"));
    assert!(backup.contains(&format!("ReadWritePaths={data_dir} ")));

    // `systemd-analyze verify` where it exists (with the test's binary as ExecStart).
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        eprintln!("systemd-analyze is not installed: units not verified");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut units = Vec::new();
    for name in [
        "tinyfleet.service",
        "tinyfleet-backup.service",
        "tinyfleet-backup.timer",
    ] {
        let text = read(dir.join(name))
            .replace("/usr/local/bin/tinyfleet", env!("CARGO_BIN_EXE_tinyfleet"));
        let path = tmp.path().join(name);
        std::fs::write(&path, text).expect("write unit");
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
