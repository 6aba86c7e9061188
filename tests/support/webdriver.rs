//! A minimal W3C WebDriver client for browser tests: `chromedriver` as a child process on a free
//! port, one headless Chromium session, and the handful of commands the tests use. The session
//! is deleted and chromedriver killed on drop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key under which W3C WebDriver returns element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How often waits poll the page.
const POLL: Duration = Duration::from_millis(100);

/// The browser binaries, if both are installed: `(chromedriver, chromium)`. `CHROMEDRIVER` and
/// `CHROME_BIN` override the search of `PATH`.
pub fn binaries() -> Result<(PathBuf, PathBuf), String> {
    let driver = from_env_or_path("CHROMEDRIVER", &["chromedriver"]);
    let browser = from_env_or_path(
        "CHROME_BIN",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    match (driver, browser) {
        (Some(d), Some(b)) => Ok((d, b)),
        (d, b) => {
            let mut missing = Vec::new();
            if d.is_none() {
                missing.push("chromedriver");
            }
            if b.is_none() {
                missing.push("chromium");
            }
            Err(format!(
                "{} not installed (Debian: apt-get install chromium chromium-driver)",
                missing.join(" and ")
            ))
        }
    }
}

fn from_env_or_path(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// A WebDriver error: the command, the HTTP status and W3C error code, and the message.
#[derive(Debug, Clone)]
pub struct WdError {
    pub command: String,
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message: String = self
            .message
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        write!(f, "{}: {}: {message}", self.command, self.error)
    }
}

/// A reference to an element of the current page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

/// A headless Chromium driven by its own chromedriver.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    http: reqwest::blocking::Client,
    /// `http://127.0.0.1:PORT`
    root: String,
    /// `{root}/session/{id}`
    session: String,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session.
    pub fn start() -> Result<Browser, String> {
        let (driver_bin, browser_bin) = binaries()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let mut driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", driver_bin.display()))?;
        let root = format!("http://127.0.0.1:{port}");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http
                .get(format!("{root}/status"))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            if let Ok(Some(status)) = driver.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = driver.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("chromedriver exited with {status}: {err}"));
            }
            if Instant::now() > deadline {
                let _ = driver.kill();
                let _ = driver.wait();
                return Err(format!("chromedriver on port {port} not ready within 20 s"));
            }
            std::thread::sleep(POLL);
        }
        let mut browser = Browser {
            driver,
            http,
            session: String::new(),
            root,
        };
        let created = browser.call(
            "POST",
            "/session",
            Some(json!({
                "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:loggingPrefs": { "browser": "ALL" },
                    "goog:chromeOptions": {
                        "binary": browser_bin,
                        "args": [
                            "--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1400,1000",
                        ],
                    },
                }},
            })),
        );
        let id = created
            .as_ref()
            .ok()
            .and_then(|v| v["sessionId"].as_str())
            .map(str::to_owned);
        match id {
            Some(id) => browser.session = format!("/session/{id}"),
            None => return Err(format!("cannot create a Chromium session: {created:?}")),
        }
        Ok(browser)
    }

    /// One WebDriver command; `path` is relative to the driver's root. The response's `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WdError> {
        let url = format!("{}{path}", self.root);
        let command = format!("{method} {path}");
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self
                .http
                .post(&url)
                .json(&body.unwrap_or_else(|| json!({}))),
        };
        let resp = req.send().map_err(|e| WdError {
            command: command.clone(),
            error: "transport".into(),
            message: e.to_string(),
        })?;
        let status = resp.status();
        let v: Value = resp.json().map_err(|e| WdError {
            command: command.clone(),
            error: format!("HTTP {status}"),
            message: format!("not JSON: {e}"),
        })?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if !status.is_success() || value.get("error").is_some_and(Value::is_string) {
            return Err(WdError {
                command,
                error: value["error"]
                    .as_str()
                    .unwrap_or("unknown error")
                    .to_owned(),
                message: value["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(value)
    }

    /// A command on the session.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WdError> {
        self.call(method, &format!("{}{path}", self.session), body)
    }

    /// Navigates to `url` (a same-document navigation when only the fragment changes).
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    pub fn current_url(&self) -> String {
        self.cmd("GET", "/url", None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The first element matching `css`, if any.
    pub fn try_find(&self, css: &str) -> Result<Option<Element>, WdError> {
        match self.cmd(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        ) {
            Ok(v) => Ok(element(&v)),
            Err(e) if e.error == "no such element" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The first element matching `css`; panics (with the page's text) when there is none.
    pub fn find(&self, css: &str) -> Element {
        match self.try_find(css) {
            Ok(Some(e)) => e,
            Ok(None) => panic!("no element matches {css:?}\n{}", self.describe()),
            Err(e) => panic!("find {css:?}: {e}\n{}", self.describe()),
        }
    }

    /// Every element matching `css`.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.cmd(
            "POST",
            "/elements",
            Some(json!({ "using": "css selector", "value": css })),
        )
        .ok()
        .and_then(|v| v.as_array().map(|a| a.iter().filter_map(element).collect()))
        .unwrap_or_default()
    }

    /// Whether some element matches `css`.
    pub fn exists(&self, css: &str) -> bool {
        matches!(self.try_find(css), Ok(Some(_)))
    }

    /// The rendered text of `el`.
    pub fn try_text(&self, el: &Element) -> Result<String, WdError> {
        self.cmd("GET", &format!("/element/{}/text", el.0), None)
            .map(|v| v.as_str().unwrap_or("").to_owned())
    }

    pub fn text(&self, el: &Element) -> String {
        self.try_text(el)
            .unwrap_or_else(|e| panic!("text of {el:?}: {e}\n{}", self.describe()))
    }

    /// The text of the first element matching `css`, if there is one (and it is not gone
    /// stale while reading).
    pub fn text_of(&self, css: &str) -> Option<String> {
        let el = self.try_find(css).ok()??;
        self.try_text(&el).ok()
    }

    /// An attribute of `el` (`None` when absent).
    pub fn try_attr(&self, el: &Element, name: &str) -> Result<Option<String>, WdError> {
        self.cmd("GET", &format!("/element/{}/attribute/{name}", el.0), None)
            .map(|v| v.as_str().map(str::to_owned))
    }

    pub fn attr(&self, el: &Element, name: &str) -> Option<String> {
        self.try_attr(el, name)
            .unwrap_or_else(|e| panic!("attribute {name} of {el:?}: {e}\n{}", self.describe()))
    }

    /// The attribute `name` of the first element matching `css`, if both exist.
    pub fn attr_of(&self, css: &str, name: &str) -> Option<String> {
        let el = self.try_find(css).ok()??;
        self.try_attr(&el, name).ok()?
    }

    /// Whether `el` is displayed (WebDriver's notion: rendered and not hidden by CSS).
    pub fn try_displayed(&self, el: &Element) -> Result<bool, WdError> {
        self.cmd("GET", &format!("/element/{}/displayed", el.0), None)
            .map(|v| v.as_bool().unwrap_or(false))
    }

    /// Whether some element matching `css` is displayed.
    pub fn displayed(&self, css: &str) -> bool {
        self.find_all(css)
            .iter()
            .any(|el| self.try_displayed(el).unwrap_or(false))
    }

    pub fn try_click(&self, el: &Element) -> Result<(), WdError> {
        self.cmd("POST", &format!("/element/{}/click", el.0), None)
            .map(drop)
    }

    pub fn click(&self, el: &Element) {
        self.try_click(el)
            .unwrap_or_else(|e| panic!("click {el:?}: {e}\n{}", self.describe()));
    }

    /// Moves the mouse to `(x, y)` in the viewport (say, off a link it left hovered).
    pub fn mouse_to(&self, x: i64, y: i64) {
        let _ = self.cmd(
            "POST",
            "/actions",
            Some(json!({ "actions": [{
                "type": "pointer", "id": "mouse", "parameters": { "pointerType": "mouse" },
                "actions": [{ "type": "pointerMove", "x": x, "y": y, "origin": "viewport" }],
            }]})),
        );
    }

    /// Types `text` into `el` (after clearing it).
    pub fn send_keys(&self, el: &Element, text: &str) {
        let _ = self.cmd("POST", &format!("/element/{}/clear", el.0), None);
        self.cmd(
            "POST",
            &format!("/element/{}/value", el.0),
            Some(json!({ "text": text })),
        )
        .unwrap_or_else(|e| panic!("type into {el:?}: {e}\n{}", self.describe()));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns what it returns.
    pub fn try_execute(&self, script: &str, args: Vec<Value>) -> Result<Value, WdError> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.try_execute(script, args)
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script` asynchronously: it reports its result by calling its last argument.
    pub fn execute_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
        )
        .unwrap_or_else(|e| panic!("async script failed: {e}\n{script}"))
    }

    /// `document.body.innerText`, empty when there is no body yet.
    pub fn body_text(&self) -> String {
        self.try_execute(
            "return document.body ? document.body.innerText : '';",
            vec![],
        )
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
    }

    /// The browser console's messages since the last call (chromedriver's log endpoint), as
    /// `LEVEL message` lines.
    pub fn console(&self) -> Vec<String> {
        self.cmd("POST", "/se/log", Some(json!({ "type": "browser" })))
            .ok()
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .map(|e| {
                            format!(
                                "{} {}",
                                e["level"].as_str().unwrap_or("?"),
                                e["message"].as_str().unwrap_or("")
                            )
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// The URL and an excerpt of the page's text, for error messages.
    pub fn describe(&self) -> String {
        let text = self.body_text();
        let mut excerpt: String = text.chars().take(1500).collect();
        if excerpt.len() < text.len() {
            excerpt.push_str(" [...]");
        }
        let console = self.console();
        let console = match console.len() {
            0 => String::new(),
            n => format!(
                "\nbrowser console (last {}):\n{}",
                n.min(20),
                console[n.saturating_sub(20)..].join("\n")
            ),
        };
        format!(
            "page {}; its text:\n---\n{}\n---{console}",
            self.current_url(),
            excerpt.trim()
        )
    }

    /// Waits until `f` returns `Some`, polling every 100 ms, up to `timeout`; on a timeout
    /// panics with what it waited for, the URL and the page's text.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for an element matching `css`.
    pub fn wait_for_element(&self, css: &str, timeout: Duration) -> Element {
        self.wait_for(&format!("an element matching {css:?}"), timeout, |b| {
            b.try_find(css).ok().flatten()
        })
    }

    /// Saves a PNG of the viewport to `path` (creating its directory).
    pub fn screenshot(&self, path: &Path) {
        let png = self
            .cmd("GET", "/screenshot", None)
            .ok()
            .and_then(|v| v.as_str().and_then(base64_decode))
            .unwrap_or_else(|| panic!("screenshot for {} failed", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &self.session, None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn element(v: &Value) -> Option<Element> {
    v.get(ELEMENT_KEY)
        .and_then(Value::as_str)
        .map(|s| Element(s.to_owned()))
}

/// Standard base64 (with or without padding); `None` on anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `s` percent-encoded as JavaScript's `encodeURIComponent` does.
pub fn encode_uri_component(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
