//! The console's write actions: off unless turned on with a token, refused
//! without it, logged when done, and a click on redrive in a real browser
//! brings dead letters back to their stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use actix_web::test as actix_test;
use actix_web::{App, http::StatusCode};
use redstream::prelude::*;
use redstream::web::{ActionToken, Console};
use serde_json::json;

use crate::support::browser::{WebDriver, artifacts_dir, chromium, serve_console};
use crate::support::{TestContext, eventually, numbered, publish_all, start_group};

const TOKEN: &str = "console-test-token-0123456789";

/// A group whose handler dead-letters every event until `fixed`, then
/// acks and counts them.
async fn shipping(ctx: &TestContext, stream: &str) -> (Processor, Arc<AtomicBool>, Arc<AtomicU64>) {
    let fixed = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU64::new(0));
    let (f, h) = (Arc::clone(&fixed), Arc::clone(&handled));
    let handler = handler_fn(move |_: serde_json::Value, _: Meta| {
        let (fixed, handled) = (Arc::clone(&f), Arc::clone(&h));
        async move {
            if !fixed.load(Ordering::SeqCst) {
                return Ok(Outcome::dead_letter("carrier down"));
            }
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Ack)
        }
    });
    let processor = start_group(ctx.settings(), Group::new(stream, "shipping", handler)).await;
    (processor, fixed, handled)
}

/// [`shipping`] on `stream`, with three events published and
/// dead-lettered.
async fn three_dead_letters(
    ctx: &TestContext,
    stream: &str,
) -> (Processor, Arc<AtomicBool>, Arc<AtomicU64>) {
    let started = shipping(ctx, stream).await;
    publish_all(
        &started.0.producer(),
        stream,
        (0..3).map(numbered).collect(),
    )
    .await;
    eventually(Duration::from_secs(10), "3 dead letters", || async {
        dead_letters(ctx, stream).await == 3
    })
    .await;
    started
}

async fn dead_letters(ctx: &TestContext, stream: &str) -> u64 {
    ctx.xlen(&format!("{stream}:dlq")).await
}

#[test]
fn a_token_too_short_or_with_spaces_is_refused_naming_the_key() {
    let short = ActionToken::new("secret").unwrap_err().to_string();
    assert!(
        short.contains("console.action_token") && short.contains("at least 16"),
        "{short}"
    );
    let spaced = ActionToken::new("a token with some spaces")
        .unwrap_err()
        .to_string();
    assert!(spaced.contains("no spaces"), "{spaced}");
    assert_eq!(
        format!("{:?}", ActionToken::new(TOKEN).unwrap()),
        "ActionToken(…)",
        "Debug shows nothing of the token"
    );
}

#[actix_rt::test]
async fn actions_are_off_by_default_need_the_token_and_are_logged() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("console-http");
    let (processor, _fixed, _handled) = three_dead_letters(&ctx, &stream).await;
    let handle = processor.handle();
    let letters = handle
        .group_details(&stream, "shipping")
        .await
        .unwrap()
        .unwrap()
        .letters;
    assert_eq!(letters.len(), 3, "the newest letters are listed");
    assert_eq!(letters[0].reason, "rejected: carrier down");
    let post = |path: &str, token: Option<&str>, body: serde_json::Value| {
        let mut request = actix_test::TestRequest::post()
            .uri(&format!("/ops/actions/{path}"))
            .peer_addr("127.0.0.1:40000".parse().unwrap())
            .set_json(body);
        if let Some(token) = token {
            request = request.insert_header(("Authorization", format!("Bearer {token}")));
        }
        request.to_request()
    };
    let one = json!({ "stream": stream, "ids": [letters[0].id] });

    // Read-only unless turned on.
    let read_only =
        actix_test::init_service(App::new().service(Console::new(handle.clone()).scope("/ops")))
            .await;
    let refused =
        actix_test::call_service(&read_only, post("delete", Some(TOKEN), one.clone())).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let page = actix_test::call_and_read_body(
        &read_only,
        actix_test::TestRequest::get()
            .uri("/ops/status.json")
            .to_request(),
    )
    .await;
    let page: serde_json::Value = serde_json::from_slice(&page).unwrap();
    assert_eq!(page["actions"], false, "the page shows no buttons");

    let (_logs, logged) = crate::support::capture_logs(tracing::Level::INFO);
    let console = Console::new(handle.clone()).with_actions(ActionToken::new(TOKEN).unwrap());
    let app = actix_test::init_service(App::new().service(console.scope("/ops"))).await;
    for (token, why) in [
        (None, "no token"),
        (Some("console-test-token-wrong!!"), "wrong token"),
    ] {
        let answer = actix_test::call_service(&app, post("delete", token, one.clone())).await;
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{why}");
    }
    assert_eq!(dead_letters(&ctx, &stream).await, 3, "nothing was deleted");
    let cases = [
        (
            "delete",
            json!({ "stream": stream }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "delete",
            json!({ "stream": stream, "ids": ["1-0"], "reason": "rejected" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "retry-now",
            json!({ "stream": stream, "ids": ["1-0"] }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "delete",
            json!({ "stream": "someone-elses", "reason": "rejected" }),
            StatusCode::NOT_FOUND,
        ),
        ("purge", one.clone(), StatusCode::NOT_FOUND),
    ];
    for (action, body, status) in cases {
        let answer = actix_test::call_service(&app, post(action, Some(TOKEN), body.clone())).await;
        assert_eq!(answer.status(), status, "{action} {body}");
    }

    // With the token: one letter deleted, and the action logged with who.
    let answer = actix_test::call_service(&app, post("delete", Some(TOKEN), one.clone())).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let report: serde_json::Value = actix_test::read_body_json(answer).await;
    assert_eq!(report["deleted"], 1, "{report}");
    assert_eq!(dead_letters(&ctx, &stream).await, 2);
    let logs = String::from_utf8(logged.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("redstream::console")
            && logs.contains("console action delete")
            && logs.contains("peer=127.0.0.1:40000"),
        "{logs}"
    );
    assert!(
        logs.contains("console action refused: wrong token"),
        "{logs}"
    );
    processor.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn retry_now_redelivers_a_waiting_entry_at_once() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("console-retry");
    let attempts = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&attempts);
    // The first attempt asks for a retry in an hour.
    let handler = handler_fn(move |_: serde_json::Value, _: Meta| {
        let seen = Arc::clone(&seen);
        async move {
            match seen.fetch_add(1, Ordering::SeqCst) {
                0 => Ok(Outcome::retry_after(Duration::from_secs(3600))),
                _ => Ok(Outcome::Ack),
            }
        }
    });
    let processor = start_group(ctx.settings(), Group::new(&stream, "billing", handler)).await;
    publish_all(&processor.producer(), &stream, vec![numbered(1)]).await;
    let handle = processor.handle();
    let admin = redstream::RedisBroker::connect(&ctx.settings().redis, "console-test")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        let waiting = redstream::Admin::waiting_retries(&admin, &stream, "billing", 10)
            .await
            .unwrap();
        if !waiting.is_empty() {
            break waiting;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the entry waits for its retry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = waiting[0].id.clone();
    let console = Console::new(handle.clone()).with_actions(ActionToken::new(TOKEN).unwrap());
    let app = actix_test::init_service(App::new().service(console.scope("/ops"))).await;
    let request = actix_test::TestRequest::post()
        .uri("/ops/actions/retry-now")
        .insert_header(("Authorization", format!("Bearer {TOKEN}")))
        .set_json(json!({ "stream": stream, "group": "billing", "ids": [id, "1-1"] }))
        .to_request();
    let answer = actix_test::call_service(&app, request).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let report: serde_json::Value = actix_test::read_body_json(answer).await;
    assert_eq!(report["made_due"], 1, "only the waiting entry: {report}");
    eventually(Duration::from_secs(10), "redelivered and acked", || async {
        attempts.load(Ordering::SeqCst) == 2 && ctx.pending(&stream, "billing").await == 0
    })
    .await;
    let status = handle.group_status(&stream, "billing").await.unwrap();
    assert_eq!((status.retried, status.acked), (1, 1));
    processor.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_click_on_redrive_brings_the_dead_letters_back() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let Some(browser) = chromium() else {
        assert!(!crate::support::in_ci(), "chromium is missing, and CI=true");
        eprintln!("SKIPPED the click test: no chromium (scripts/test.sh installs it)");
        return;
    };
    let stream = ctx.stream("console-click");
    let (processor, fixed, handled) = three_dead_letters(&ctx, &stream).await;
    // The carrier is back: the next delivery succeeds.
    fixed.store(true, Ordering::SeqCst);
    let handle = processor.handle();
    let console = Console::new(handle.clone()).with_actions(ActionToken::new(TOKEN).unwrap());
    let (port, server) = serve_console(console);
    let Some(driver) = WebDriver::start(browser, (1280, 1200)).await else {
        assert!(
            !crate::support::in_ci(),
            "chromedriver is missing, and CI=true"
        );
        eprintln!("SKIPPED the click test: no chromedriver (scripts/test.sh installs it)");
        return;
    };
    let key = format!("{stream}/shipping")
        .replace(':', "%3A")
        .replace('/', "%2F");
    driver
        .goto(&format!("http://127.0.0.1:{port}/ops/status#details={key}"))
        .await;
    let redrive = "#details-dead tr[data-reason=\"rejected\"] button[data-action=\"redrive\"]";
    let button = driver.find(redrive).await;
    assert_eq!(driver.text(&button).await, "redrive 3");

    // Without the token the click does nothing but say so.
    driver.click(&button).await;
    driver.click(&button).await;
    driver
        .wait_for_text(
            "#action-result",
            "enter the console token",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(dead_letters(&ctx, &stream).await, 3);

    let input = driver.find("#token").await;
    driver.type_into(&input, TOKEN).await;
    driver.click(&driver.find("#token-use").await).await;
    driver
        .wait_for_text(
            "#action-result",
            "token set for this tab",
            Duration::from_secs(5),
        )
        .await;
    driver
        .screenshot(&artifacts_dir().join("status-actions.png"))
        .await;
    // One click arms the button; only the second acts.
    driver.click(&button).await;
    assert_eq!(driver.text(&button).await, "confirm redrive 3");
    assert_eq!(dead_letters(&ctx, &stream).await, 3, "armed, not done");
    driver.click(&button).await;
    driver
        .wait_for_text(
            "#action-result",
            "3 redriven to the stream",
            Duration::from_secs(10),
        )
        .await;
    eventually(Duration::from_secs(10), "the 3 events handled", || async {
        handled.load(Ordering::SeqCst) == 3 && ctx.pending(&stream, "shipping").await == 0
    })
    .await;
    assert_eq!(dead_letters(&ctx, &stream).await, 0);
    // The drill-down reloaded after the action.
    driver
        .wait_for_text(
            "#details-dead tbody",
            "no dead letters",
            Duration::from_secs(5),
        )
        .await;
    driver
        .screenshot(&artifacts_dir().join("status-actions-done.png"))
        .await;
    driver.quit().await;
    server.stop(false).await;
    processor.shutdown().await.unwrap();
}
