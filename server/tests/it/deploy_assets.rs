//! The operations assets shipped under `deploy/` are tested, not just YAML: the Prometheus alert
//! rules pass `promtool`'s checks and their unit tests, and every metric that the alert rules and
//! the Grafana dashboard and the Kubernetes autoscaler name is one a running replica really exports;
//! the Kubernetes manifests render, validate and keep their promises.

use std::{collections::BTreeSet, process::Command};

use shoal_testkit::topology::repo_root;

use crate::helpers::*;

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/shoal.json";
/// The Kubernetes files naming metrics: the autoscaler, the adapter's rules, the PrometheusRule.
const KUBERNETES_METRICS: [&str; 3] = [
    "deploy/kubernetes/base/horizontalpodautoscaler.yaml",
    "deploy/kubernetes/monitoring/prometheus-adapter-rules.yaml",
    "deploy/kubernetes/monitoring/prometheusrule.yaml",
];

/// Runs `program` with `args` in the repository: its output, as an error when it fails.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
        .map_err(|e| format!("{program} could not run ({e})"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Runs `promtool` with `args` in the repository; its output when it fails.
fn promtool(args: &[&str]) -> Result<String, String> {
    run("promtool", args).map_err(|e| {
        format!("{e}\n(promtool: scripts/install-deps.sh installs it, Debian's prometheus)")
    })
}

#[test]
fn the_alert_rules_are_valid_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", ALERTS]).unwrap_or_else(|e| panic!("{e}"));
    let rules = std::fs::read_to_string(repo_root().join(ALERTS)).expect("alerts");
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{checked}"
    );
    // Every rule has a test that shows it firing (its name as an `alertname` with an expected
    // alert) and one that shows it quiet.
    let tests = std::fs::read_to_string(repo_root().join(ALERT_TESTS)).expect("alert tests");
    for name in &names {
        assert!(
            tests.contains(&format!(
                "alertname: {name}\n        exp_alerts:\n          - "
            )),
            "no test shows {name} firing"
        );
        assert!(
            tests.contains(&format!("alertname: {name}\n        exp_alerts: []")),
            "no test shows {name} quiet"
        );
    }
    let tested = promtool(&["test", "rules", ALERT_TESTS]).unwrap_or_else(|e| panic!("{e}"));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every `shoal_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("shoal_") {
        let preceded_by_word = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_word {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The series names a `/metrics` page can carry: each family's samples (a counter's `_total`, a
/// histogram's `_bucket`, `_sum` and `_count`), whether or not it has samples yet.
fn exported_series(page: &str) -> BTreeSet<String> {
    let mut series = BTreeSet::new();
    for line in page.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    series.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        series.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    series.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#')
            && let Some(name) = line.split(['{', ' ']).next()
            && !name.is_empty()
        {
            series.insert(name.to_owned());
        }
    }
    series
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_name_is_exported() {
    let mut wanted = BTreeSet::new();
    for file in [ALERTS, DASHBOARD].into_iter().chain(KUBERNETES_METRICS) {
        let text = std::fs::read_to_string(repo_root().join(file)).expect(file);
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} names no shoal metric");
        wanted.extend(names.into_iter().map(|name| (name, file)));
    }
    let topology = start(cluster_options(1)).await;
    let page = reqwest::get(format!("{}/metrics", topology.replicas[0].base_url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let exported = exported_series(&page);
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, _)| !exported.contains(name))
        .map(|(name, file)| format!("{name} ({file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "named but not exported by a running replica: {missing:?}"
    );
}

/// The dashboard is one Grafana imports: an input for its Prometheus data source and a
/// `datasource` variable every query uses, unique panel ids, panels inside the 24-column grid and
/// not overlapping, each query with an expression and a unique reference in its panel.
#[test]
fn the_dashboard_is_well_formed() {
    let text = std::fs::read_to_string(repo_root().join(DASHBOARD)).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "no datasource variable"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| grid[k].as_u64().expect("gridPos"));
        assert!(x + w <= 24, "panel {id} leaves the grid");
        for column in x..x + w {
            for row in y..y + h {
                assert!(cells.insert((column, row)), "panel {id} overlaps another");
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {id}");
        let mut refs = BTreeSet::new();
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                expr.contains("shoal_") || expr.contains("up{"),
                "panel {id}: {expr}"
            );
            assert!(
                refs.insert(target["refId"].to_string()),
                "panel {id}: refId twice"
            );
            assert_eq!(target["datasource"]["uid"], "${datasource}", "panel {id}");
            queries += 1;
        }
    }
    assert!(queries >= 30, "{queries} queries");
}

/// Every dashboard query is valid PromQL: with Grafana's variables given values, each becomes a
/// recording rule that `promtool check rules` parses.
#[test]
fn the_dashboard_queries_are_valid_promql() {
    let text = std::fs::read_to_string(repo_root().join(DASHBOARD)).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut count = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            rules.push_str(&format!(
                "      - record: dashboard:query{count}\n        expr: {}\n",
                serde_json::Value::String(expr)
            ));
            count += 1;
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, rules).expect("write");
    let checked =
        promtool(&["check", "rules", &path.to_string_lossy()]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        checked.contains(&format!("SUCCESS: {count} rules found")),
        "{checked}"
    );
}

/// Every overlay renders and validates strictly, and keeps the deployment's promises
/// (`scripts/check-kubernetes.sh` says which).
#[test]
fn the_kubernetes_manifests_render_validate_and_keep_their_promises() {
    let text = run("bash", &["scripts/check-kubernetes.sh"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(text.contains("checked 3 overlays"), "{text}");
}

#[test]
fn metric_names_are_read_whole() {
    assert_eq!(
        metric_names("rate(shoal_a_total[5m]) / x_shoal_b + {{shoal_c}}"),
        BTreeSet::from(["shoal_a_total".to_owned(), "shoal_c".to_owned()])
    );
    let page = "# HELP shoal_x X.\n# TYPE shoal_x counter\n# TYPE shoal_h histogram\n# TYPE shoal_g gauge\nshoal_g 1\n# EOF\n";
    let series = exported_series(page);
    for name in [
        "shoal_x_total",
        "shoal_h_bucket",
        "shoal_h_sum",
        "shoal_h_count",
        "shoal_g",
    ] {
        assert!(series.contains(name), "{name} in {series:?}");
    }
    assert!(!series.contains("shoal_x"));
}
