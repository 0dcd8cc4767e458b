//! `docs/grafana/`: the dashboard and the alert rules parse, and every
//! `redstream_*` metric they name is one that `src/metrics.rs` defines (a
//! renamed metric fails here, not silently on an operator's dashboard).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The values of the `pub const … = "redstream_…";` names in
/// `src/metrics.rs`'s `names` module, read as text.
fn defined_metrics() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    let start = source.find("pub mod names {").expect("the names module");
    let end = start + source[start..].find("\n}").expect("its end");
    let names: BTreeSet<String> = source[start..end]
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_owned))
        .collect();
    assert!(names.len() > 20, "read too few names: {names:?}");
    names
}

/// Every `redstream_…` token in `text`.
fn named_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("redstream_") {
        let token: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + token.len()..];
        out.insert(token);
    }
    out
}

/// `name` is defined, or is a histogram's `_bucket`, `_sum` or `_count`
/// series of a defined one.
fn is_defined(name: &str, defined: &BTreeSet<String>) -> bool {
    defined.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| defined.contains(base))
        })
}

fn undefined(text: &str, defined: &BTreeSet<String>) -> Vec<String> {
    named_metrics(text)
        .into_iter()
        .filter(|n| !is_defined(n, defined))
        .collect()
}

#[test]
fn the_check_catches_an_unknown_metric() {
    let defined = defined_metrics();
    assert!(defined.contains("redstream_group_longest_pending_seconds"));
    assert_eq!(
        undefined(
            "rate(redstream_handler_seconds_bucket[5m]) + redstream_group_oldest_pending_seconds",
            &defined
        ),
        vec!["redstream_group_oldest_pending_seconds".to_owned()]
    );
}

#[test]
fn the_dashboard_names_only_defined_metrics() {
    let text = read("docs/grafana/dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard.json parses");
    let panels = dashboard["panels"].as_array().expect("panels");
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    // Every query reads through the datasource variable.
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
    );
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
    }
    let named = named_metrics(&text);
    for wanted in [
        "redstream_group_longest_pending_seconds",
        "redstream_group_queue_latency_seconds",
        "redstream_dead_letters",
        "redstream_group_members",
        "redstream_database_available",
    ] {
        assert!(named.contains(wanted), "the dashboard shows {wanted}");
    }
    assert_eq!(undefined(&text, &defined_metrics()), Vec::<String>::new());
}

#[test]
fn the_alert_rules_name_only_defined_metrics_and_say_what_to_run() {
    let text = read("docs/grafana/alerts.yml");
    let rules: serde_json::Value = serde_norway::from_str(&text).expect("alerts.yml parses");
    let rules = rules["groups"][0]["rules"].as_array().expect("rules");
    assert!(rules.len() >= 7, "{} rules", rules.len());
    for rule in rules {
        let name = rule["alert"].as_str().expect("alert name");
        assert!(
            rule["expr"].as_str().is_some_and(|e| !e.is_empty()),
            "{name}: expr"
        );
        for key in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][key].is_string(),
                "{name}: annotation {key}"
            );
        }
        let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
        assert!(
            runbook.contains("`redstream "),
            "{name}: the runbook names a CLI command"
        );
    }
    // `redstream_dead_letters` is per stream: no rule may group it by group.
    for rule in rules {
        let expr = rule["expr"].as_str().unwrap_or_default();
        if expr.contains("redstream_dead_letters") {
            assert!(!expr.contains("group"), "{expr}");
        }
    }
    assert_eq!(undefined(&text, &defined_metrics()), Vec::<String>::new());
}
