//! Metrics, health and the status page, against real Redis and a real
//! browser.

use std::sync::OnceLock;
use std::time::Duration;

use redstream::prelude::*;
use redstream::{CheckStatus, Health, HealthCheck};

use crate::support::browser::{Browse, artifacts_dir, browse, chromium, http_get, serve_ops};
use crate::support::{TestContext, eventually, numbered, publish_all, start_group};

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
    let by_stream = [("stream", stream.as_str())];
    eventually(Duration::from_secs(5), "gauges updated", || async {
        let text = prometheus.render();
        sample(&text, "redstream_dead_letters", &by_stream) == Some(2.0)
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
    // Restarts and lost entries per member, one series each.
    let status = processor.group_status(&stream, "g").await.unwrap();
    for m in &status.members {
        let member = [
            ("stream", stream.as_str()),
            ("group", "g"),
            ("member", m.name.as_str()),
        ];
        for name in [
            "redstream_consumer_restarts_total",
            "redstream_ownership_lost_total",
        ] {
            assert_eq!(sample(&text, name, &member), Some(0.0), "{name} {member:?}");
        }
    }
    assert_eq!(
        series(&text, "redstream_consumer_restarts_total", &stream).len(),
        status.members.len()
    );
    assert_eq!(
        sample(&text, "redstream_group_members", &labels),
        Some(status.members.len() as f64)
    );
    assert_eq!(
        sample(
            &text,
            "redstream_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert!(sample(&text, "redstream_producer_capacity", &[]).is_some());
    processor.shutdown().await.unwrap();
    let text = prometheus.render();
    assert_eq!(
        sample(&text, "redstream_group_members", &labels),
        Some(0.0),
        "no member runs once stopped"
    );
}

/// The sample lines of metric `name` (not of its `_total`, `_count`…
/// relatives) whose labels mention `stream`.
fn series<'a>(text: &'a str, name: &str, stream: &str) -> Vec<&'a str> {
    let quoted = format!("stream=\"{stream}\"");
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && line.contains(&quoted)
        })
        .collect()
}

/// Two groups read one stream and dead-letter every event into its one
/// dead-letter stream: one `redstream_dead_letters` series for the stream
/// (summing it over groups no longer counts the DLQ twice). A handler panic
/// restarts one member: its `member` series counts it, its sibling's not.
#[actix_rt::test]
async fn metrics_count_one_dlq_per_stream_and_restarts_per_member() {
    let prometheus = prometheus();
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("fanned");
    let a = handler_fn(|v: serde_json::Value, meta: Meta| async move {
        if v["n"] == 0 && meta.attempt() == 1 {
            panic!("poison for group a");
        }
        Ok(Outcome::dead_letter("not wanted by a"))
    });
    let b = handler_fn(|_: serde_json::Value, _: Meta| async {
        Ok(Outcome::dead_letter("not wanted by b"))
    });
    let processor = Processor::builder(ctx.settings())
        .group(Group::new(&stream, "a", a).with_members(2))
        .group(Group::new(&stream, "b", b).with_members(1))
        .start()
        .await
        .unwrap();
    publish_all(
        &processor.producer(),
        &stream,
        (0..4).map(numbered).collect(),
    )
    .await;
    let dlq = redstream::dead_letter_stream(&stream);
    eventually(Duration::from_secs(10), "8 dead letters", || async {
        ctx.xlen(&dlq).await == 8
    })
    .await;
    let by_stream = [("stream", stream.as_str())];
    eventually(Duration::from_secs(5), "the gauge shows 8", || async {
        sample(&prometheus.render(), "redstream_dead_letters", &by_stream) == Some(8.0)
    })
    .await;
    let text = prometheus.render();
    let dead_letters = series(&text, "redstream_dead_letters", &stream);
    assert_eq!(
        dead_letters.len(),
        1,
        "one series per stream: {dead_letters:?}"
    );
    assert!(!dead_letters[0].contains("group="), "{dead_letters:?}");

    let status = processor.group_status(&stream, "a").await.unwrap();
    let crashed = status
        .members
        .iter()
        .find(|m| m.restarts == 1)
        .unwrap_or_else(|| panic!("one member of a restarted: {status:?}"));
    let restarts = |member: &str| {
        sample(
            &text,
            "redstream_consumer_restarts_total",
            &[
                ("stream", stream.as_str()),
                ("group", "a"),
                ("member", member),
            ],
        )
    };
    for m in &status.members {
        let expected = if m.name == crashed.name { 1.0 } else { 0.0 };
        assert_eq!(restarts(&m.name), Some(expected), "{}: {text}", m.name);
    }
    eventually(
        Duration::from_secs(5),
        "both members of a running",
        || async {
            let text = prometheus.render();
            sample(
                &text,
                "redstream_group_members",
                &[("stream", stream.as_str()), ("group", "a")],
            ) == Some(2.0)
                && sample(
                    &text,
                    "redstream_group_members",
                    &[("stream", stream.as_str()), ("group", "b")],
                ) == Some(1.0)
        },
    )
    .await;
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
            !h.ready
                && h.live
                && h.checks
                    .iter()
                    .any(|c| c.name == "redis" && !c.ok && c.status == CheckStatus::Failed)
        },
    )
    .await;
    // Over HTTP too: 503, with the failed check in the JSON.
    let (code, json) = health_over_http(&handle).await;
    assert_eq!(code, 503, "{json}");
    assert_eq!(json["ready"], false, "{json}");
    let redis = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "redis")
        .unwrap();
    assert_eq!(redis["status"], "failed", "{json}");
    assert_eq!(redis["ok"], false, "{json}");

    server.restart(crate::support::redis_server::Stop::Kill9);
    eventually(Duration::from_secs(20), "ready again", || async {
        handle.health().await.ready
    })
    .await;
    // The members that lost their connections run again (restarting, they
    // left the group degraded, not the process unready).
    eventually(Duration::from_secs(5), "no longer degraded", || async {
        let h = handle.health().await;
        h.ready && !h.degraded
    })
    .await;
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert!(status.all_alive(), "{status:?}");
    let report = processor.shutdown().await.unwrap();
    assert!(report.settled);
    assert!(!handle.health().await.ready, "not ready once stopped");
}

/// `/ops/health` answered in-process: the status code and the JSON.
async fn health_over_http(handle: &redstream::ProcessorHandle) -> (u16, serde_json::Value) {
    use actix_web::test::{TestRequest, call_service, init_service, read_body};
    let app =
        init_service(actix_web::App::new().service(redstream::web::scope("/ops", handle.clone())))
            .await;
    let response = call_service(&app, TestRequest::get().uri("/ops/health").to_request()).await;
    let code = response.status().as_u16();
    let body = read_body(response).await;
    (code, serde_json::from_slice(&body).unwrap())
}

/// The check of group `g` on `stream`.
fn group_check(health: &Health, stream: &str) -> HealthCheck {
    let name = format!("group {stream}/g");
    health
        .checks
        .iter()
        .find(|c| c.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no check {name}: {health:?}"))
}

/// One poison event panics its handler: the only member restarts (a long
/// backoff here, so the restart can be watched). The whole time readiness
/// stays true; the group shows degraded, then ok again.
#[actix_rt::test]
async fn a_restarting_member_leaves_readiness_true_and_shows_degraded() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("degraded");
    let mut settings = ctx.settings();
    settings.supervision.restart_min_ms = 2_000;
    settings.supervision.restart_max_ms = 2_000;
    settings.supervision.unready_after_ms = 30_000;
    let handler = handler_fn(|v: serde_json::Value, meta: Meta| async move {
        if v["n"] == 3 && meta.attempt() == 1 {
            panic!("poison event 3");
        }
        Ok(Outcome::Ack)
    });
    let processor = start_group(settings, Group::new(&stream, "g", handler).with_members(1)).await;
    let handle = processor.handle();
    eventually(Duration::from_secs(5), "ready, not degraded", || async {
        let h = handle.health().await;
        h.ready && !h.degraded && group_check(&h, &stream).status == CheckStatus::Ok
    })
    .await;
    publish_all(
        &processor.producer(),
        &stream,
        (0..6).map(numbered).collect(),
    )
    .await;

    // Watch the restart: every answer is ready; one is degraded.
    let started = std::time::Instant::now();
    let degraded = loop {
        let h = handle.health().await;
        assert!(
            h.ready,
            "a restarting member made the process unready: {h:?}"
        );
        if h.degraded {
            break h;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never degraded: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let check = group_check(&degraded, &stream);
    assert_eq!(check.status, CheckStatus::Degraded, "{degraded:?}");
    assert!(check.ok, "a degraded check passes: {check:?}");
    assert!(
        check.detail.contains("0 of 1 members running") && check.detail.contains("poison event 3"),
        "{check:?}"
    );
    // Over HTTP, still within the 2 s backoff: 200, and the JSON says
    // degraded.
    let (code, json) = health_over_http(&handle).await;
    assert_eq!(code, 200, "{json}");
    assert_eq!(
        (&json["ready"], &json["degraded"]),
        (&true.into(), &true.into()),
        "{json}"
    );
    let group = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == format!("group {stream}/g"))
        .unwrap();
    assert_eq!(group["status"], "degraded", "{json}");
    assert_eq!(group["ok"], true, "{json}");

    // The member comes back and handles event 3 again: ok.
    eventually(Duration::from_secs(10), "ok again", || async {
        let h = handle.health().await;
        assert!(h.ready, "{h:?}");
        !h.degraded && group_check(&h, &stream).status == CheckStatus::Ok
    })
    .await;
    ctx.eventually_nothing_pending(&stream, "g", Duration::from_secs(5))
        .await;
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert_eq!(status.restarts(), 1, "{status:?}");
    processor.shutdown().await.unwrap();
}

/// A group with no member running for longer than
/// `supervision.unready_after_ms` makes the process unready: here the only
/// member's name lease is taken by someone else, so it stops and is not
/// restarted. Degraded first, then failed; ready again once the lease is
/// back.
#[actix_rt::test]
async fn a_group_without_a_running_member_past_the_bound_is_unready() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("no-member");
    let mut settings = ctx.settings();
    settings.supervision.unready_after_ms = 1_500;
    let noop = handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) });
    let processor = start_group(settings, Group::new(&stream, "g", noop).with_members(1)).await;
    let handle = processor.handle();
    eventually(Duration::from_secs(5), "ready", || async {
        handle.health().await.ready
    })
    .await;
    let status = processor.group_status(&stream, "g").await.unwrap();
    let lease = format!("{stream}:lease:g:{}", status.members[0].name);
    let mut c = ctx.conn().await;
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("another-process")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let mut seen_degraded = false;
    let unready = loop {
        let h = handle.health().await;
        if !h.ready {
            break h;
        }
        if group_check(&h, &stream).status == CheckStatus::Degraded {
            seen_degraded = true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never unready: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        seen_degraded,
        "degraded (and ready) before the bound passed"
    );
    let check = group_check(&unready, &stream);
    assert_eq!(check.status, CheckStatus::Failed, "{unready:?}");
    assert!(check.detail.contains("no member running for"), "{check:?}");
    assert!(unready.live, "the actors still answer: {unready:?}");
    let (code, json) = health_over_http(&handle).await;
    assert_eq!(code, 503, "{json}");

    let _: () = redis::cmd("DEL")
        .arg(&lease)
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "ready again", || async {
        let h = handle.health().await;
        h.ready && group_check(&h, &stream).status == CheckStatus::Ok
    })
    .await;
    processor.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn the_status_page_and_json_show_real_data() {
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

    let (port, server_handle) = serve_ops(&handle);
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

    // Every process's members: this one's, live, with its pid.
    let deployment = json["deployment"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["stream"] == stream.as_str())
        .unwrap();
    eventually(Duration::from_secs(5), "members recorded", || async {
        handle
            .deployment()
            .await
            .iter()
            .any(|d| d.stream == stream && d.live_members() == 2)
    })
    .await;
    let _ = deployment;

    // The page, rendered by a real browser: its script must have built the
    // group table, the processes and the problems from the data.
    match chromium() {
        Some(browser) => {
            let artifacts = artifacts_dir();
            // At rest: the group row, this process live, no problem.
            let dom = browse(browser, &format!("{base}/status"), Browse::Dom).await;
            let row = format!(
                "<td>{stream}</td><td><button class=\"link\" title=\"pending entries and dead letters of {stream}/billing\">billing</button></td>"
            );
            assert!(
                dom.contains(&row),
                "the browser rendered the group row: {dom}"
            );
            assert!(
                dom.contains("<td class=\"ok\">ok</td><td>answers</td>"),
                "{dom}"
            );
            let pid = format!("<td>{}</td><td class=\"ok\">live</td>", std::process::id());
            assert!(dom.contains(&pid), "this process is listed live: {dom}");
            assert!(dom.contains("<li class=\"ok\">none seen</li>"), "{dom}");
            browse(
                browser,
                &format!("{base}/status"),
                Browse::Shot(artifacts.join("status-rest.png"), (1280, 900)),
            )
            .await;
            browse(
                browser,
                &format!("{base}/status"),
                Browse::Shot(artifacts.join("status-narrow.png"), (420, 900)),
            )
            .await;

            // Under load: a backlog that slow handlers work through, four
            // at a time: lag, queue latency and entries in flight show.
            let busy = ctx.stream("status-load");
            let slow = handler_fn(|_: serde_json::Value, _: Meta| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Outcome::Ack)
            });
            let busy_processor = start_group(
                ctx.settings(),
                Group::new(&busy, "loaded", slow)
                    .with_members(1)
                    .with_in_flight(4),
            )
            .await;
            publish_all(
                &busy_processor.producer(),
                &busy,
                (0..2_000).map(numbered).collect(),
            )
            .await;
            let busy_handle = busy_processor.handle();
            eventually(Duration::from_secs(10), "work in flight", || async {
                let status = busy_handle.group_status(&busy, "loaded").await.unwrap();
                status.acked > 0 && status.members.iter().any(|m| m.in_flight > 0)
            })
            .await;
            let (busy_port, busy_server_handle) = serve_ops(&busy_handle);
            let busy_url = format!("http://127.0.0.1:{busy_port}/ops/status");
            let dom = browse(browser, &busy_url, Browse::Dom).await;
            assert!(
                dom.contains(" in flight)") && dom.contains(" in flight, "),
                "entries in flight per member, here and in the processes: {dom}"
            );
            browse(
                browser,
                &busy_url,
                Browse::Shot(artifacts.join("status-load.png"), (1280, 900)),
            )
            .await;
            busy_server_handle.stop(false).await;
            busy_processor.shutdown().await.unwrap();

            // Under load and failing: every event makes the handler panic
            // (after a moment, so it lasts): members restart, dead letters
            // rise, a backlog waits.
            let stuck = ctx.stream("status-failing");
            let poison = handler_fn(|_: serde_json::Value, _: Meta| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!("poison event");
                #[allow(unreachable_code)]
                Ok(Outcome::Ack)
            });
            let stuck_processor = start_group(
                ctx.settings(),
                Group::new(&stuck, "failing", poison)
                    .with_members(1)
                    .with_in_flight(1)
                    .with_retry(RetryPolicy::default().with_max_attempts(1)),
            )
            .await;
            publish_all(
                &stuck_processor.producer(),
                &stuck,
                (0..100).map(numbered).collect(),
            )
            .await;
            let stuck_handle = stuck_processor.handle();
            eventually(Duration::from_secs(10), "a restart", || async {
                stuck_handle
                    .group_status(&stuck, "failing")
                    .await
                    .unwrap()
                    .restarts()
                    > 0
            })
            .await;
            let (stuck_port, stuck_server_handle) = serve_ops(&stuck_handle);
            let stuck_url = format!("http://127.0.0.1:{stuck_port}/ops/status");
            let dom = browse(browser, &stuck_url, Browse::Dom).await;
            assert!(
                dom.contains("restarted")
                    && dom.contains("poison event")
                    && dom.contains("new dead letters in"),
                "restarts and rising dead letters are problems, in words: {dom}"
            );
            assert!(dom.contains("<li class=\"warn\">"), "{dom}");
            browse(
                browser,
                &stuck_url,
                Browse::Shot(artifacts.join("status-failure.png"), (1280, 900)),
            )
            .await;

            // The drill-down: the dead letters by reason with their error,
            // as JSON and on the page.
            let details = http_get(&format!(
                "http://127.0.0.1:{stuck_port}/ops/status/group.json?stream={stuck}&group=failing"
            ))
            .await;
            let details: serde_json::Value = serde_json::from_str(&details).unwrap();
            let reasons = details["dead_letters"].as_array().unwrap();
            assert_eq!(reasons[0]["reason"], "max_attempts_exceeded", "{details}");
            assert!(reasons[0]["count"].as_u64().unwrap() > 0);
            assert!(
                reasons[0]["newest_error"]
                    .as_str()
                    .unwrap()
                    .contains("poison event"),
                "{details}"
            );
            let missing = http_get(&format!(
                "http://127.0.0.1:{stuck_port}/ops/status/group.json?stream={stuck}&group=nope"
            ))
            .await;
            assert!(missing.contains("this process runs no group"), "{missing}");
            let key = format!("{stuck}/failing")
                .replace(':', "%3A")
                .replace('/', "%2F");
            let details_url = format!("{stuck_url}#details={key}");
            let dom = browse(browser, &details_url, Browse::Dom).await;
            assert!(
                dom.contains("Dead letters by reason")
                    && dom.contains("<td>max_attempts_exceeded</td><td>failing</td>"),
                "the drill-down rendered: {dom}"
            );
            browse(
                browser,
                &details_url,
                Browse::Shot(artifacts.join("status-details.png"), (1280, 1400)),
            )
            .await;

            // Offline: the page saved to a file cannot poll; it says so.
            let page = http_get(&format!("{base}/status")).await;
            let body = page
                .split_once("\r\n\r\n")
                .map_or(page.as_str(), |(_, b)| b);
            let saved = artifacts.join("status-saved.html");
            std::fs::write(&saved, body).unwrap();
            let file_url = format!("file://{}", saved.display());
            let dom = browse(browser, &file_url, Browse::Dom).await;
            assert!(
                dom.contains("offline: this process has not answered")
                    || dom.contains("stale: the last update failed"),
                "{dom}"
            );
            browse(
                browser,
                &file_url,
                Browse::Shot(artifacts.join("status-offline.png"), (1280, 900)),
            )
            .await;
            for shot in [
                "status-rest.png",
                "status-narrow.png",
                "status-load.png",
                "status-failure.png",
                "status-details.png",
                "status-offline.png",
            ] {
                let size = std::fs::metadata(artifacts.join(shot))
                    .map(|m| m.len())
                    .unwrap_or(0);
                assert!(size > 1_000, "{shot} was taken ({size} bytes)");
            }
            stuck_server_handle.stop(false).await;
            stuck_processor.shutdown().await.unwrap();
        }
        None => {
            assert!(!crate::support::in_ci(), "chromium is missing, and CI=true");
            eprintln!("SKIPPED the browser check: no chromium (scripts/test.sh installs it)");
        }
    }
    server_handle.stop(false).await;
    processor.shutdown().await.unwrap();
}
