//! The web UI in a real headless Chromium (driven over W3C WebDriver by `chromedriver`) against
//! `tinyfleet serve` fed by simulated devices: pages render with data, charts draw, an operator
//! pauses a rollout from the UI and a read-only user cannot. With `TF_SCREENSHOTS=1` the main
//! pages are saved to `docs/screenshots/` for the README.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium chromium-driver`; scripts/test.sh
//! installs them). Without them the tests are skipped with a message, unless
//! `TF_REQUIRE_BROWSER` is set (scripts/test.sh sets it), which makes that a failure.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::webdriver::{self, Browser, encode_uri_component};
use support::{READ_TOKEN, Server, SimFleet, TOKEN, wait_for};
use tinyfleet_device::testkit::ReferenceProfile;
use tinyfleet_drift::profile::{BuildOptions, build_profile};
use tinyfleet_sim::{Behaviour, Factory, WindowData};

const DEVICES: usize = 12;
const COHORT: &str = "kws@1.0/nrf52840";
const ROLLOUT: &str = "kws-2";
/// A device of the shifted half.
const DEVICE: &str = "node-00";
const SHIFTED_FEATURE: usize = 5;
/// How long a page may take to fetch and render its data.
const PAGE: Duration = Duration::from_secs(20);

/// A browser session, or `None` (with the reason printed) when the browser is not installed and
/// `TF_REQUIRE_BROWSER` is unset.
fn browser() -> Option<Browser> {
    if let Err(why) = webdriver::binaries() {
        if std::env::var_os("TF_REQUIRE_BROWSER").is_some() {
            panic!("TF_REQUIRE_BROWSER is set but {why}");
        }
        eprintln!("SKIPPED: {why}; set TF_REQUIRE_BROWSER=1 to make this a failure");
        return None;
    }
    Some(Browser::start().unwrap_or_else(|e| panic!("{e}")))
}

fn image(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// A server with `kws` 1.0 (and its monitoring profile) and 2.0 registered for nrf52840, a
/// fleet of 12 devices on 1.0 sending labelled summaries every 400 ms (half of them with
/// feature 5 shifted after 3 s); [`Fixture::start_rollout`] then starts rollout `kws-2` of
/// 2.0, whose canary stage soaks for 10 minutes, so it stays `running`.
struct Fixture {
    server: Server,
    fleet: SimFleet,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with(
            &dir.path().join("data"),
            "window_secs = 2\ncheckpoint_ms = 200",
            "[monitor]\ngrace_secs = 0\ntick_ms = 100\n[ota]\nrollout_tick_ms = 200",
        );
        let http = reqwest::blocking::Client::new();
        let v1 = image(1, 20_000);
        let v2: Vec<u8> = v1.iter().map(|b| b.wrapping_add(1)).collect();
        for (version, seq, bytes) in [("1.0", 1, &v1), ("2.0", 2, &v2)] {
            let resp = http
                .post(format!(
                    "{}/api/v1/models/kws/versions/{version}?seq={seq}&hw=nrf52840",
                    server.api
                ))
                .bearer_auth(TOKEN)
                .body(bytes.clone())
                .send()
                .unwrap();
            assert_eq!(resp.status().as_u16(), 201, "{}", resp.text().unwrap());
        }
        let csv = tinyfleet_sim::reference_csv(&WindowData::default(), 8_000, 7);
        let opts = BuildOptions {
            model_id: "kws".into(),
            model_version: "1.0".into(),
            ..BuildOptions::default()
        };
        let profile = build_profile(csv.as_bytes(), &opts).unwrap();
        let resp = http
            .put(format!("{}/api/v1/models/kws/1.0/profile", server.api))
            .bearer_auth(TOKEN)
            .json(&profile)
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().unwrap());
        // The bin edges the devices are flashed with, from the profile.
        let edges = Arc::new(ReferenceProfile {
            features: profile.feature_edges::<8, 16>().unwrap(),
            latency: profile
                .latency_edges::<8>()
                .unwrap_or(ReferenceProfile::default().latency),
        });

        let mut fleet = SimFleet::new();
        let factory = Factory {
            model_version: "1.0".into(),
            model_seq: 1,
            image: Arc::new(v1),
        };
        let shift_at = Instant::now() + Duration::from_secs(3);
        for i in 0..DEVICES {
            let shifted = i % 2 == 0;
            let edges = edges.clone();
            let behaviour = Behaviour {
                summary_interval: Duration::from_millis(400),
                inferences: 100,
                labelled: 40,
                stream: Arc::new(move |_| {
                    let mut data = WindowData::default();
                    if shifted && Instant::now() >= shift_at {
                        data.shift[SHIFTED_FEATURE] = 1.5;
                        data.accuracy = 0.8;
                    }
                    data
                }),
                profile: Arc::new(move |_| edges.clone()),
                ..Behaviour::default()
            };
            let id = format!("node-{i:02}");
            fleet.add(&server, &id, "nrf52840", factory.clone(), behaviour);
        }
        wait_for("the fleet online", Duration::from_secs(30), || {
            let page = server.get("/api/v1/devices?limit=100");
            let online = page["devices"]
                .as_array()?
                .iter()
                .filter(|d| d["online"] == true)
                .count();
            (online == DEVICES).then_some(())
        });
        Fixture {
            server,
            fleet,
            _dir: dir,
        }
    }

    /// Starts rollout `kws-2` of 2.0: a canary stage of 5 devices soaking for 10 minutes.
    fn start_rollout(&self) {
        let (status, created) = self.server.post(
            "/api/v1/rollouts",
            TOKEN,
            json!({
                "model_id": "kws", "version": "2.0", "id": ROLLOUT,
                "stages": [
                    { "share": 0.25, "min_devices": 5, "soak_ms": 600_000, "deadline_ms": 3_600_000 },
                    { "share": 1.0, "min_devices": 0, "soak_ms": 500, "deadline_ms": 3_600_000 }
                ],
                "install": { "min_done": 5 },
                "quality": { "required": false },
            }),
        );
        assert_eq!(status, 201, "{created}");
    }

    /// Waits until the API has a firing drift alert; its alertname.
    fn drift_alert(&self) -> String {
        wait_for("a firing drift alert", Duration::from_secs(60), || {
            let alerts = self.server.get("/api/v1/alerts");
            alerts.as_array()?.iter().find_map(|a| {
                let name = a["labels"]["alertname"].as_str()?;
                (a["state"] == "firing" && name.ends_with("Drift")).then(|| name.to_owned())
            })
        })
    }

    fn rollout(&self) -> Value {
        self.server.get(&format!("/api/v1/rollouts/{ROLLOUT}"))
    }

    fn stop(self) {
        self.fleet.stop();
        self.server.stop();
    }
}

/// The current page as the UI reports it: `(data-page, data-loaded == "true", location.hash)`.
fn page_state(b: &Browser) -> Option<(String, bool, String)> {
    let v = b
        .try_execute(
            "const m = document.querySelector('main#page');
             return m ? [m.getAttribute('data-page') || '', m.getAttribute('data-loaded') === 'true',
                         location.hash] : null;",
            vec![],
        )
        .ok()?;
    let a = v.as_array()?;
    Some((
        a.first()?.as_str()?.to_owned(),
        a.get(1)?.as_bool()?,
        a.get(2)?.as_str()?.to_owned(),
    ))
}

/// Waits until `main#page` is `page` (one of `pages`, for detail pages whose name the contract
/// leaves open) and has loaded its data.
fn wait_loaded(b: &Browser, pages: &[&str]) -> String {
    b.wait_for(&format!("page {pages:?} loaded"), PAGE, |b| {
        let (page, loaded, _) = page_state(b)?;
        (loaded && pages.contains(&page.as_str())).then_some(page)
    })
}

/// Runs `act` (which changes the location to `route`, a fragment such as `#/devices/node-00`)
/// and waits until the app has routed there: a `hashchange` listener of ours runs after the
/// app's own, so once it has seen `route` the previous page's `data-loaded` is gone.
fn navigate(b: &Browser, route: &str, act: impl FnOnce(&Browser)) {
    let here = b.execute("return location.hash;", vec![]);
    if here == route {
        act(b);
        return;
    }
    b.execute(
        "window.__tfRouted = null;
         window.addEventListener('hashchange', () => { window.__tfRouted = location.hash; },
                                 { once: true });",
        vec![],
    );
    act(b);
    b.wait_for(&format!("the app routed to {route}"), PAGE, |b| {
        let routed = b.try_execute("return window.__tfRouted;", vec![]).ok()?;
        (routed == route).then_some(())
    });
}

/// Goes to `route` within the loaded app.
fn go(b: &Browser, route: &str) {
    navigate(b, route, |b| {
        b.execute("location.hash = arguments[0];", vec![json!(route)]);
    });
}

/// Clicks the navigation link to `page` and waits for it to load.
fn nav(b: &Browser, page: &str) {
    let link = b.wait_for_element(&format!("nav a[data-page=\"{page}\"]"), PAGE);
    navigate(b, &format!("#/{page}"), |b| b.click(&link));
    wait_loaded(b, &[page]);
}

/// `data-points` of `svg.chart[data-chart=name]` once it is drawn (more than zero points).
fn chart_drawn(b: &Browser, name: &str) -> u64 {
    let css = format!("svg.chart[data-chart=\"{name}\"]");
    b.wait_for(
        &format!("chart {name} drawn ({css} with data-points > 0)"),
        PAGE,
        |b| {
            b.attr_of(&css, "data-points")?
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
        },
    )
}

/// Clicks the first element matching `css` once there is one (again if a refresh of the page
/// replaced it between finding and clicking).
fn click(b: &Browser, css: &str) {
    b.wait_for(&format!("a clickable {css:?}"), PAGE, |b| {
        let el = b.try_find(css).ok()??;
        b.try_click(&el).ok()
    });
}

/// Opens the app and logs in with `token`; the text of `#whoami`.
fn login(b: &Browser, server: &Server, token: &str) -> String {
    b.goto(&format!("{}/#/overview", server.api));
    let input = b.wait_for_element("input#token", PAGE);
    b.send_keys(&input, token);
    click(b, "button#login");
    let who = b.wait_for("#whoami after login", PAGE, |b| {
        b.text_of("#whoami").filter(|t| !t.trim().is_empty())
    });
    b.wait_for("the login form hidden after login", PAGE, |b| {
        (!b.displayed("input#token")).then_some(())
    });
    who
}

fn integer(b: &Browser, css: &str) -> Option<i64> {
    b.text_of(css)?.trim().parse().ok()
}

/// The overview: every device online, the cohort in the versions table.
fn check_overview(b: &Browser) {
    nav(b, "overview");
    let online = b.wait_for("#online-count == 12", PAGE, |b| {
        integer(b, "#online-count").filter(|&n| n == DEVICES as i64)
    });
    assert_eq!(online, DEVICES as i64);
    let offline = integer(b, "#offline-count")
        .unwrap_or_else(|| panic!("#offline-count is not an integer\n{}", b.describe()));
    assert_eq!(offline, 0);
    b.wait_for(&format!("{COHORT} in table#versions"), PAGE, |b| {
        let rows = b.find_all("table#versions tbody tr");
        rows.iter()
            .any(|r| b.try_text(r).is_ok_and(|t| t.contains(COHORT)))
            .then_some(())
    });
    assert!(b.exists("table#active-alerts"), "{}", b.describe());
}

/// The cohort page: the drift heatmap has cells, accuracy and classes are charted.
fn check_cohort(b: &Browser) {
    go(b, &format!("#/cohorts/{}", encode_uri_component(COHORT)));
    wait_loaded(b, &["cohorts", "cohort"]);
    let heatmap = "svg.chart[data-chart=\"drift-heatmap\"]";
    chart_drawn(b, "drift-heatmap");
    let cells = b.wait_for("heatmap cells", PAGE, |b| {
        let n = b.find_all(&format!("{heatmap} rect.cell")).len();
        (n > 0).then_some(n)
    });
    assert!(cells > 0);
    chart_drawn(b, "accuracy");
    chart_drawn(b, "classes");
}

/// A device's page: its health chart has points.
fn check_device(b: &Browser) {
    go(b, &format!("#/devices/{DEVICE}"));
    wait_loaded(b, &["devices", "device"]);
    chart_drawn(b, "health");
    let text = b.body_text();
    assert!(text.contains(DEVICE), "{}", b.describe());
}

/// The alerts page lists the drift alert `alertname`.
fn check_alerts(b: &Browser, alertname: &str) {
    nav(b, "alerts");
    b.wait_for(&format!("{alertname} in table#alerts"), PAGE, |b| {
        let rows = b.find_all("table#alerts tr[data-alert]");
        rows.iter()
            .any(|r| b.try_text(r).is_ok_and(|t| t.contains(alertname)))
            .then_some(())
    });
    assert!(b.exists("table#silences"), "{}", b.describe());
}

/// The rollouts page lists the rollout; its detail page shows `state`.
fn check_rollout(b: &Browser, state: &str) {
    nav(b, "rollouts");
    b.wait_for_element(
        &format!("table#rollouts tr[data-rollout=\"{ROLLOUT}\"]"),
        PAGE,
    );
    go(b, &format!("#/rollouts/{ROLLOUT}"));
    wait_loaded(b, &["rollouts", "rollout"]);
    wait_state(b, state);
    chart_drawn(b, "funnel");
    for table in ["table#gates", "table#audit"] {
        assert!(b.exists(table), "no {table}\n{}", b.describe());
    }
}

fn wait_state(b: &Browser, state: &str) {
    b.wait_for(&format!("#rollout-state {state:?}"), PAGE, |b| {
        b.text_of("#rollout-state")
            .filter(|t| t.trim() == state)
            .map(drop)
    });
}

/// An operator sees every page with data and pauses the rollout from its page.
#[test]
fn an_operator_sees_the_fleet_and_pauses_a_rollout() {
    let Some(b) = browser() else { return };
    let f = Fixture::start();
    let who = login(&b, &f.server, TOKEN);
    assert!(who.contains("ops") && who.contains("operator"), "{who}");

    // Before the rollout: its canaries reboot into the new version.
    check_overview(&b);
    // The list pages load too.
    for page in ["cohorts", "devices", "models"] {
        nav(&b, page);
    }
    f.start_rollout();
    let alertname = f.drift_alert();
    check_cohort(&b);
    check_device(&b);
    check_alerts(&b, &alertname);
    check_rollout(&b, "running");

    click(&b, "button[data-action=\"pause\"]");
    let reason = b.wait_for_element("input#action-reason", PAGE);
    b.send_keys(&reason, "drift on f5 under investigation");
    click(&b, "button#action-confirm");
    wait_state(&b, "paused");
    let status = f.rollout();
    assert_eq!(status["state"], "paused", "{status}");
    b.wait_for("the pause in table#audit", PAGE, |b| {
        b.text_of("table#audit")
            .filter(|t| t.contains("paused") && t.contains("ops"))
            .map(drop)
    });
    // The audit names the operator (`operator:ops`; as JSON, `{"operator": "ops"}`).
    let audit = f.server.get(&format!("/api/v1/rollouts/{ROLLOUT}/audit"));
    let paused = audit
        .as_array()
        .and_then(|a| a.iter().find(|e| e["event"] == "paused"))
        .unwrap_or_else(|| panic!("no pause in the audit: {audit}"));
    assert!(
        paused["cause"]["operator"] == "ops" || paused["cause"] == "operator:ops",
        "{paused}"
    );
    assert!(
        b.text_of("#error").is_none_or(|t| t.trim().is_empty()),
        "{}",
        b.describe()
    );
    drop(b);
    f.stop();
}

/// A read-only user sees a rollout but gets no actions, and the API refuses them anyway.
#[test]
fn a_read_only_user_cannot_act_on_a_rollout() {
    let Some(b) = browser() else { return };
    let f = Fixture::start();
    f.start_rollout();
    let who = login(&b, &f.server, READ_TOKEN);
    assert!(who.contains("viewer"), "{who}");

    go(&b, &format!("#/rollouts/{ROLLOUT}"));
    wait_loaded(&b, &["rollouts", "rollout"]);
    wait_state(&b, "running");
    let buttons = b.find_all("button[data-action]");
    assert!(
        buttons.is_empty(),
        "a read-only user has {} action buttons\n{}",
        buttons.len(),
        b.describe()
    );

    // From the page, with the viewer's token: refused.
    let status = b.execute_async(
        "const done = arguments[arguments.length - 1];
         fetch('/api/v1/rollouts/' + arguments[0] + '/pause', {
           method: 'POST',
           headers: { 'Authorization': 'Bearer ' + arguments[1],
                      'Content-Type': 'application/json' },
           body: JSON.stringify({ reason: 'not allowed' }),
         }).then(r => done(r.status), e => done(String(e)));",
        vec![json!(ROLLOUT), json!(READ_TOKEN)],
    );
    assert_eq!(status, 403, "pause with the viewer token");
    let rollout = f.rollout();
    assert_eq!(rollout["state"], "running", "{rollout}");

    click(&b, "button#logout");
    b.wait_for("the login form after logout", PAGE, |b| {
        b.displayed("input#token").then_some(())
    });
    assert!(
        b.text_of("#whoami").is_none_or(|t| t.trim().is_empty()),
        "{}",
        b.describe()
    );
    drop(b);
    f.stop();
}

/// With `TF_SCREENSHOTS=1`: screenshots of the main pages for the README.
#[test]
fn screenshots_of_the_main_pages() {
    if std::env::var("TF_SCREENSHOTS").as_deref() != Ok("1") {
        eprintln!("SKIPPED: set TF_SCREENSHOTS=1 to write docs/screenshots/*.png");
        return;
    }
    let Some(b) = browser() else { return };
    let f = Fixture::start();
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    let shot = |name: &str| -> PathBuf {
        let path = shots.join(format!("{name}.png"));
        // No focus ring on the link or button clicked last.
        b.execute(
            "document.activeElement && document.activeElement.blur();",
            vec![],
        );
        b.screenshot(&path);
        path
    };
    login(&b, &f.server, TOKEN);
    let alertname = f.drift_alert();
    // A dozen windows of history for the charts.
    wait_for("12 windows of history", Duration::from_secs(60), || {
        let windows = f.server.get(&format!("/api/v1/devices/{DEVICE}/windows"));
        (windows.as_array()?.len() >= 12).then_some(())
    });
    check_overview(&b);
    shot("overview");
    f.start_rollout();
    // The canaries have installed: the funnel has something to show.
    wait_for("the canaries on 2.0", Duration::from_secs(60), || {
        (f.rollout()["totals"]["confirmed"].as_u64() >= Some(5)).then_some(())
    });
    check_cohort(&b);
    shot("cohort");
    check_device(&b);
    shot("device");
    check_rollout(&b, "running");
    shot("rollout");
    check_alerts(&b, &alertname);
    let last = shot("alerts");
    assert!(std::fs::metadata(&last).unwrap().len() > 1000);
    drop(b);
    f.stop();
}
