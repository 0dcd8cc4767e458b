//! Metrics, health and the status page, against real Redis and a real
//! browser.

use std::sync::OnceLock;
use std::time::Duration;

use redstream::prelude::*;

use crate::support::{TestContext, eventually, numbered, start_group};

/// The process-wide Prometheus recorder (one per test binary).
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| redstream::metrics::install_prometheus().expect("recorder"))
}

/// The value of one sample line of the exposition text.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (label_part, value) = if let Some(rest) = rest.strip_prefix('{') {
            let end = rest.find('}')?;
            (&rest[..end], rest[end + 1..].trim())
        } else {
            ("", rest.trim())
        };
        let all = labels
            .iter()
            .all(|(k, v)| label_part.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

#[actix_rt::test]
async fn metrics_show_known_traffic() {
    let prometheus = prometheus();
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("metered");
    let handler = handler_fn(|v: serde_json::Value, meta: Meta| async move {
        let n = v["n"].as_u64().unwrap();
        Ok(match n {
            0..15 => Outcome::Ack,
            15..18 if meta.attempt() == 1 => Outcome::retry(),
            15..18 => Outcome::Ack,
            _ => Outcome::dead_letter("unwanted"),
        })
    });
    let processor = start_group(ctx.settings(), Group::new(&stream, "g", handler)).await;
    let events = (0..20).map(numbered).collect();
    processor
        .producer()
        .publish_batch(&stream, events)
        .await
        .unwrap();
    let labels = [("stream", stream.as_str()), ("group", "g")];
    let outcome = |o: &'static str| [("stream", stream.as_str()), ("group", "g"), ("outcome", o)];
    eventually(
        Duration::from_secs(10),
        "18 acked, 2 dead-lettered",
        || async {
            let text = prometheus.render();
            sample(&text, "redstream_handled_total", &outcome("ack")) == Some(18.0)
                && sample(&text, "redstream_handled_total", &outcome("dead_letter")) == Some(2.0)
        },
    )
    .await;
    // The gauges come from the pending check (every 100 ms in tests).
    eventually(Duration::from_secs(5), "gauges updated", || async {
        let text = prometheus.render();
        sample(&text, "redstream_dead_letters", &labels) == Some(2.0)
            && sample(&text, "redstream_group_pending", &labels) == Some(0.0)
    })
    .await;
    let text = prometheus.render();
    assert_eq!(
        sample(&text, "redstream_handled_total", &outcome("retry")),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            "redstream_published_total",
            &[("stream", stream.as_str())]
        ),
        Some(20.0)
    );
    assert_eq!(
        sample(&text, "redstream_handler_seconds_count", &labels),
        Some(23.0)
    );
    assert_eq!(
        sample(&text, "redstream_end_to_end_seconds_count", &labels),
        Some(18.0)
    );
    assert_eq!(
        sample(&text, "redstream_delivery_attempt_count", &labels),
        Some(23.0)
    );
    assert_eq!(
        sample(&text, "redstream_delivery_attempt_sum", &labels),
        Some(26.0)
    );
    assert_eq!(sample(&text, "redstream_group_lag", &labels), Some(0.0));
    assert_eq!(
        sample(&text, "redstream_consumer_restarts_total", &labels),
        Some(0.0)
    );
    assert!(sample(&text, "redstream_producer_capacity", &[]).is_some());
    processor.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn health_goes_unready_while_redis_is_down_and_ready_after() {
    let Some((mut server, ctx)) = TestContext::on_own_server() else {
        return;
    };
    let stream = ctx.stream("health");
    let mut settings = ctx.settings();
    settings.redis.command_timeout_ms = 500;
    settings.redis.connect_timeout_ms = 300;
    let noop = handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) });
    let processor = start_group(settings, Group::new(&stream, "g", noop).with_members(2)).await;
    let handle = processor.handle();
    eventually(Duration::from_secs(5), "ready", || async {
        handle.health().await.ready
    })
    .await;

    server.stop(crate::support::redis_server::Stop::Kill9);
    eventually(
        Duration::from_secs(10),
        "unready, Redis failing",
        || async {
            let h = handle.health().await;
            !h.ready && h.live && h.checks.iter().any(|c| c.name == "redis" && !c.ok)
        },
    )
    .await;

    server.restart(crate::support::redis_server::Stop::Kill9);
    eventually(Duration::from_secs(20), "ready again", || async {
        handle.health().await.ready
    })
    .await;
    // The members that lost their connections run again.
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert!(status.all_alive(), "{status:?}");
    let report = processor.shutdown().await.unwrap();
    assert!(report.settled);
    assert!(!handle.health().await.ready, "not ready once stopped");
}

#[actix_rt::test]
async fn the_status_page_and_json_show_real_data() {
    use actix_web::{App, HttpServer};

    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("status");
    let noop = handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) });
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "billing", noop).with_members(2),
    )
    .await;
    let events = (0..7).map(numbered).collect();
    processor
        .producer()
        .publish_batch(&stream, events)
        .await
        .unwrap();
    let handle = processor.handle();
    eventually(Duration::from_secs(5), "7 acked", || async {
        handle.group_status(&stream, "billing").await.unwrap().acked == 7
    })
    .await;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let scope_handle = handle.clone();
    let server = HttpServer::new(move || {
        App::new().service(redstream::web::scope("/ops", scope_handle.clone()))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    let server_handle = server.handle();
    actix_rt::spawn(server);
    let base = format!("http://127.0.0.1:{port}/ops");

    // JSON.
    let body = http_get(&format!("{base}/status.json")).await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let group = json["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["stream"] == stream.as_str())
        .unwrap();
    assert_eq!(group["group"], "billing");
    assert_eq!(group["acked"], 7);
    assert_eq!(group["members"].as_array().unwrap().len(), 2);
    assert_eq!(json["health"]["ready"], true);
    let health = http_get(&format!("{base}/health")).await;
    assert!(health.contains("\"ready\":true"), "{health}");

    // The page, rendered by a real browser: its script must have built the
    // group table from the data.
    match chromium() {
        Some(browser) => {
            // Off this thread: the page's handlers ask the actors that run
            // on it.
            let url = format!("{base}/status");
            let profile = tempfile::tempdir().unwrap();
            let profile_arg = format!("--user-data-dir={}", profile.path().display());
            let dom = actix_rt::task::spawn_blocking(move || {
                std::process::Command::new(browser)
                    .args([
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-quic",
                        "--no-first-run",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        &profile_arg,
                        "--virtual-time-budget=3000",
                        "--dump-dom",
                        &url,
                    ])
                    .output()
                    .expect("chromium runs")
            })
            .await
            .unwrap();
            let dom = String::from_utf8_lossy(&dom.stdout);
            let row = format!("<td>{stream}</td><td>billing</td>");
            assert!(
                dom.contains(&row),
                "the browser rendered the group row: {dom}"
            );
            assert!(
                dom.contains("<td class=\"ok\">ok</td><td>answers</td>"),
                "{dom}"
            );
        }
        None => {
            assert!(!crate::support::in_ci(), "chromium is missing, and CI=true");
            eprintln!("SKIPPED the browser check: no chromium (scripts/test.sh installs it)");
        }
    }
    server_handle.stop(false).await;
    processor.shutdown().await.unwrap();
}

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// A plain HTTP/1.1 GET over a TCP socket (no HTTP client dependency).
async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    body.to_owned()
}
