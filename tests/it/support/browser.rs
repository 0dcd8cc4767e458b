//! A real browser for the status page tests: headless Chromium for the
//! DOM and screenshots, ChromeDriver (WebDriver over HTTP) for clicks, and
//! a plain HTTP/1.1 client over a TCP socket (no HTTP client dependency).

use std::time::Duration;

use serde_json::{Value, json};

/// Serves the ops scope of `handle` under `/ops` on a free loopback port.
pub fn serve_ops(handle: &redstream::ProcessorHandle) -> (u16, actix_web::dev::ServerHandle) {
    serve_console(redstream::web::Console::new(handle.clone()))
}

/// Serves `console` under `/ops` on a free loopback port.
pub fn serve_console(console: redstream::web::Console) -> (u16, actix_web::dev::ServerHandle) {
    use actix_web::{App, HttpServer};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(move || App::new().service(console.clone().scope("/ops")))
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
    let server_handle = server.handle();
    actix_rt::spawn(server);
    (port, server_handle)
}

/// Where the browser tests leave their screenshots: `target/test-artifacts`.
pub fn artifacts_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What to take from a page in headless Chromium.
pub enum Browse {
    /// The DOM after the page's scripts ran.
    Dom,
    /// A screenshot at this window size.
    Shot(std::path::PathBuf, (u32, u32)),
}

/// Opens `url` in headless Chromium (off this thread: the page's handlers
/// ask the actors that run on it) and returns the DOM, or takes a shot.
pub async fn browse(browser: &'static str, url: &str, what: Browse) -> String {
    let url = url.to_owned();
    let profile = tempfile::tempdir().unwrap();
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let out = actix_rt::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(browser);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            &profile_arg,
        ]);
        match &what {
            Browse::Dom => {
                cmd.args(["--virtual-time-budget=3000", "--dump-dom"]);
            }
            Browse::Shot(path, (w, h)) => {
                cmd.arg("--virtual-time-budget=3000")
                    .arg(format!("--screenshot={}", path.display()))
                    .arg(format!("--window-size={w},{h}"));
            }
        }
        cmd.arg(&url).output().expect("chromium runs")
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// A plain HTTP/1.1 GET; the body (the head too when it cannot be split).
pub async fn http_get(url: &str) -> String {
    http(url, "GET", &[], None).await.1
}

/// A plain HTTP/1.1 request over a TCP socket: the status and the body.
pub async fn http(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes()).await.unwrap();
    // Read the head, then as much body as it announces (a server may keep
    // the connection open whatever `Connection: close` asked), else to the
    // end.
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break response.len();
        }
        response.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&response[..head_end]).into_owned();
    let lower = head.to_ascii_lowercase();
    let length: Option<usize> = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let body_start = (head_end + 4).min(response.len());
    let mut body = response[body_start..].to_vec();
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            stream.read_to_end(&mut body).await.unwrap();
        }
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if lower.contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// ChromeDriver driving one headless Chromium session: real clicks and
/// typing (WebDriver's element click scrolls the element into view and
/// fails when something covers it), over HTTP on a free loopback port.
/// Stopped by [`WebDriver::quit`], or killed when dropped.
pub struct WebDriver {
    base: String,
    session: String,
    driver: std::process::Child,
    _profile: tempfile::TempDir,
}

/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl WebDriver {
    /// Starts ChromeDriver and a session of `browser`; `None` when
    /// ChromeDriver is not installed.
    pub async fn start(browser: &str, (width, height): (u32, u32)) -> Option<WebDriver> {
        let binary = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let driver = std::process::Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        let mut ready = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver listens on {base}");
        let mut webdriver = WebDriver {
            base,
            session: String::new(),
            driver,
            _profile: profile,
        };
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", webdriver._profile.path().display()),
        ];
        let session = webdriver
            .call(
                "POST",
                "/session",
                json!({ "capabilities": { "alwaysMatch": {
                    "goog:chromeOptions": { "binary": browser, "args": args }
                } } }),
            )
            .await;
        webdriver.session = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("a WebDriver session: {session}"))
            .to_owned();
        Some(webdriver)
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let body = (method == "POST").then(|| body.to_string());
        let (status, reply) = http(&url, method, &[], body.as_deref()).await;
        let reply: Value = serde_json::from_str(&reply).unwrap_or(Value::String(reply));
        assert_eq!(status, 200, "WebDriver {method} {path}: {reply}");
        reply["value"].clone()
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.path("/url"), json!({ "url": url }))
            .await;
    }

    /// The first element matching `css`, waiting up to 10 s for it.
    pub async fn find(&self, css: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let url = format!("{}{}", self.base, self.path("/element"));
            let body = json!({ "using": "css selector", "value": css }).to_string();
            let (status, reply) = http(&url, "POST", &[], Some(&body)).await;
            if status == 200 {
                let reply: Value = serde_json::from_str(&reply).unwrap();
                return reply["value"][ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("an element reference: {reply}"))
                    .to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no element `{css}` on the page: {reply}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element as a user would.
    pub async fn click(&self, element: &str) {
        self.call(
            "POST",
            &self.path(&format!("/element/{element}/click")),
            json!({}),
        )
        .await;
    }

    /// Types `text` into the element.
    pub async fn type_into(&self, element: &str, text: &str) {
        self.call(
            "POST",
            &self.path(&format!("/element/{element}/value")),
            json!({ "text": text }),
        )
        .await;
    }

    /// The element's rendered text.
    pub async fn text(&self, element: &str) -> String {
        self.call(
            "GET",
            &self.path(&format!("/element/{element}/text")),
            Value::Null,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Waits up to `within` for the text of the first element matching
    /// `css` to contain `wanted`; returns that text.
    pub async fn wait_for_text(&self, css: &str, wanted: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let element = self.find(css).await;
            let text = self.text(&element).await;
            if text.contains(wanted) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{css}` reads `{text}`, not `{wanted}`"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a screenshot of the window as PNG.
    pub async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let png = self
            .call("GET", &self.path("/screenshot"), Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session and stops ChromeDriver.
    pub async fn quit(mut self) {
        let _ = http(
            &format!("{}{}", self.base, self.path("")),
            "DELETE",
            &[],
            None,
        )
        .await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
