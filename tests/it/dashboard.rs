//! The Grafana dashboard (deploy/grafana/) and the PodMonitor (deploy/podmonitor.yaml) agree
//! with the binary: every query names a series a fresh sidecar exports and only labels that
//! series carries, and the PodMonitor scrapes the decode pods' metrics port on /metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sidecar::connector::Connector;
use sidecar::observe::metrics::Metrics;

const DASHBOARD: &str = "deploy/grafana/llm-d-routing-sidecar.json";
const PODMONITOR: &str = "deploy/podmonitor.yaml";
const SIDECAR: &str = "routing-sidecar";
/// Labels Prometheus adds to every series scraped through a PodMonitor (target labels).
const TARGET_LABELS: [&str; 6] = [
    "namespace",
    "pod",
    "container",
    "endpoint",
    "job",
    "instance",
];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// The non-null documents of a YAML file.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every panel, those nested in rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            if p["type"] == "row" {
                walk(&p["panels"], out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every panel target's `expr`, with its panel's title.
fn exprs(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_string())))
        })
        .collect()
}

/// What one series name can be queried with.
#[derive(Debug)]
struct Series {
    family: String,
    labels: BTreeSet<String>,
}

/// The labels of each metric documented in docs/operating.md's table (`| \`name\` | type |
/// \`label\`, … | meaning |`), by the name the table gives (counters with `_total`).
fn documented_labels() -> BTreeMap<String, BTreeSet<String>> {
    let doc = read("docs/operating.md");
    assert!(
        doc.contains("| Metric | Type | Labels |"),
        "docs/operating.md: the metrics table's header moved"
    );
    let backticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    doc.lines()
        .filter(|l| l.starts_with("| `llm_d_"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').collect();
            let name = backticked(cells.get(1)?).into_iter().next()?;
            Some((name, backticked(cells.get(3)?).into_iter().collect()))
        })
        .collect()
}

/// The exposition of a sidecar that has just started, as the binary builds its registry.
/// `Metrics::new()` alone is not it: a family with no series yet (`requests_total`, the
/// latency histograms: their labels include the connector) has no `# TYPE` line at all.
fn fresh_exposition() -> String {
    Metrics::for_connector(Connector::NixlV2).render()
}

/// Every series name a fresh sidecar's exposition has, from its `# TYPE <family> <type>`
/// lines: prometheus-client's text encoder writes a counter as `# TYPE x_total counter` with
/// samples `x_total` (OpenMetrics would say `x`; both are handled); a histogram has `_bucket`
/// (with `le`), `_sum` and `_count` series, never the bare family. Labels are the documented
/// ones (docs/operating.md), those seen on the exposition's samples, and the scrape's target
/// labels.
fn exported_series() -> BTreeMap<String, Series> {
    let exposition = fresh_exposition();
    let documented = documented_labels();
    let mut families: Vec<(String, String)> = Vec::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(family), Some(kind)) = (words.next(), words.next()) else {
                panic!("malformed TYPE line {line:?}");
            };
            families.push((family.to_string(), kind.to_string()));
        }
    }
    assert!(!families.is_empty(), "no # TYPE lines in:\n{exposition}");
    // Labels on the samples present at startup, by sample name.
    let mut sampled: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let set = sampled.entry(name.to_string()).or_default();
        let (pairs, _) = rest.rsplit_once('}').expect("closed label set");
        // `a="x",b="y"`: a value may hold a comma, not a quote followed by one.
        for pair in pairs.split("\",").filter(|p| !p.is_empty()) {
            set.insert(pair.split('=').next().unwrap().trim().to_string());
        }
    }
    let mut series = BTreeMap::new();
    for (family, kind) in families {
        let names: Vec<(String, Option<&str>)> = match kind.as_str() {
            "counter" if family.ends_with("_total") => vec![(family.clone(), None)],
            "counter" => vec![(format!("{family}_total"), None)],
            "histogram" => vec![
                (format!("{family}_bucket"), Some("le")),
                (format!("{family}_sum"), None),
                (format!("{family}_count"), None),
            ],
            _ => vec![(family.clone(), None)],
        };
        let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for key in [family.clone(), format!("{family}_total")] {
            labels.extend(documented.get(&key).into_iter().flatten().cloned());
        }
        for (name, extra) in names {
            let mut labels = labels.clone();
            labels.extend(sampled.get(&name).into_iter().flatten().cloned());
            labels.extend(extra.map(str::to_string));
            series.insert(
                name,
                Series {
                    family: family.clone(),
                    labels,
                },
            );
        }
    }
    series
}

/// A series selector in a PromQL expression: the metric name and its matchers' labels.
#[derive(Debug, PartialEq)]
struct Selector {
    metric: String,
    matchers: Vec<String>,
}

/// What a PromQL expression references: `llm_d_…` selectors, and the labels named in
/// `by`/`without`/`on`/`ignoring` clauses.
#[derive(Debug, Default, PartialEq)]
struct References {
    selectors: Vec<Selector>,
    grouping: Vec<String>,
}

/// A small PromQL scanner: enough to find selectors and grouping labels. Strings and range
/// brackets (`[$__rate_interval]`) are skipped, so label values and Grafana variables in them
/// are never taken for names.
fn references(expr: &str) -> References {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let skip_space = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let skip_string = |i: usize| {
        let quote = b[i];
        let mut j = i + 1;
        while j < b.len() && b[j] != quote {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        assert!(j < b.len(), "unterminated string in {expr:?}");
        j + 1
    };
    let word = |i: usize| {
        let mut j = i;
        while j < b.len() && ident(b[j]) {
            j += 1;
        }
        (expr[i..j].to_string(), j)
    };
    let mut refs = References::default();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(i);
        } else if c == b'[' {
            i += expr[i..].find(']').expect("closed range") + 1;
        } else if c.is_ascii_digit() {
            while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if ident(c) {
            let (name, end) = word(i);
            let next = skip_space(end);
            let opens = |ch: u8| next < b.len() && b[next] == ch;
            i = end;
            if matches!(name.as_str(), "by" | "without" | "on" | "ignoring") && opens(b'(') {
                let close = next + expr[next..].find(')').expect("closed grouping");
                refs.grouping.extend(
                    expr[next + 1..close]
                        .split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
                i = close + 1;
            } else if name.starts_with("llm_d_") {
                let mut matchers = Vec::new();
                if opens(b'{') {
                    let mut j = next + 1;
                    loop {
                        j = skip_space(j);
                        match b.get(j) {
                            Some(b'}') => break,
                            Some(b',') => j += 1,
                            Some(&ch) if ident(ch) => {
                                let (label, end) = word(j);
                                matchers.push(label);
                                j = skip_space(end);
                                while matches!(b.get(j), Some(b'=' | b'!' | b'~')) {
                                    j += 1;
                                }
                                j = skip_space(j);
                                assert!(
                                    matches!(b.get(j), Some(b'"' | b'\'' | b'`')),
                                    "matcher without a string value in {expr:?}"
                                );
                                j = skip_string(j);
                            }
                            other => panic!("unexpected {other:?} in a selector of {expr:?}"),
                        }
                    }
                    i = j + 1;
                }
                refs.selectors.push(Selector {
                    metric: name,
                    matchers,
                });
            }
        } else {
            i += 1;
        }
    }
    refs
}

/// Checks one expression against the exported series; returns the series it selects.
fn check_expr(
    where_: &str,
    expr: &str,
    exported: &BTreeMap<String, Series>,
    filtered_by_variables: bool,
) -> Vec<String> {
    let refs = references(expr);
    assert!(
        !refs.selectors.is_empty(),
        "{where_}: no llm_d_ series in {expr:?}"
    );
    // Nothing named llm_d_… escaped the scanner (in a string, say).
    assert_eq!(
        expr.matches("llm_d_").count(),
        refs.selectors.len(),
        "{where_}: {expr:?}"
    );
    for s in &refs.selectors {
        let series = exported.get(&s.metric).unwrap_or_else(|| {
            panic!(
                "{where_}: {} is not a series a fresh sidecar exports ({expr:?}); exported: {:?}",
                s.metric,
                exported.keys().collect::<Vec<_>>()
            )
        });
        for label in s.matchers.iter().chain(&refs.grouping) {
            assert!(
                series.labels.contains(label),
                "{where_}: {} (family {}) has no label {label:?} ({expr:?}); it has {:?}",
                s.metric,
                series.family,
                series.labels
            );
        }
        if filtered_by_variables {
            for var in ["namespace", "pod"] {
                assert!(
                    s.matchers.iter().any(|m| m == var),
                    "{where_}: {} is not filtered by ${var} ({expr:?})",
                    s.metric
                );
            }
        }
    }
    refs.selectors.into_iter().map(|s| s.metric).collect()
}

#[test]
fn the_promql_scanner_finds_selectors_and_groupings() {
    let refs = references(
        r#"histogram_quantile(0.99, sum by (le, connector) (rate(llm_d_a_bucket{pod=~"$pod", x!="llm}d"}[$__rate_interval]))) / sum(llm_d_b) without (route)"#,
    );
    assert_eq!(
        refs,
        References {
            selectors: vec![
                Selector {
                    metric: "llm_d_a_bucket".into(),
                    matchers: vec!["pod".into(), "x".into()],
                },
                Selector {
                    metric: "llm_d_b".into(),
                    matchers: vec![],
                },
            ],
            grouping: vec!["le".into(), "connector".into(), "route".into()],
        }
    );
}

#[test]
fn the_catalogue_of_exported_series_is_what_a_scrape_has() {
    // What exported_series() relies on; if the encoder changes, so must it.
    let exported = exported_series();
    let requests = &exported["llm_d_sidecar_requests_total"];
    assert_eq!(requests.family, "llm_d_sidecar_requests_total");
    for label in ["connector", "route", "outcome", "pod"] {
        assert!(requests.labels.contains(label), "{requests:?}");
    }
    let bucket = &exported["llm_d_sidecar_prefill_duration_seconds_bucket"];
    assert!(bucket.labels.contains("le") && bucket.labels.contains("connector"));
    assert!(!exported["llm_d_sidecar_prefill_duration_seconds_sum"]
        .labels
        .contains("le"));
    assert!(!exported.contains_key("llm_d_sidecar_prefill_duration_seconds"));
    assert!(!exported.contains_key("llm_d_sidecar_requests"));
    // Every family the sidecar documents as exported is in the fresh exposition.
    for name in sidecar::observe::metrics::NAMES {
        assert!(
            exported.values().any(|s| s.family == name),
            "{name} has no # TYPE line in a fresh sidecar's exposition:\n{}",
            fresh_exposition()
        );
    }
}

#[test]
fn the_dashboard_is_valid_and_every_panel_has_a_query() {
    let d = dashboard();
    assert!(d["uid"].as_str().is_some_and(|s| !s.is_empty()), "uid");
    assert!(d["title"].as_str().is_some_and(|s| !s.is_empty()), "title");
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let panels = panels(&d);
    assert!(!panels.is_empty());
    let mut ids = BTreeSet::new();
    let mut cells: Vec<(String, [u64; 4])> = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: id {id} is used twice");
        let kind = p["type"].as_str().unwrap_or_default();
        assert!(
            ["timeseries", "stat"].contains(&kind),
            "{title}: type {kind:?}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let grid = &p["gridPos"];
        let pos = ["x", "y", "w", "h"].map(|k| {
            grid[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        let [x, _, w, h] = pos;
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {grid}");
        for (other, [ox, oy, ow, oh]) in &cells {
            let [x, y, w, h] = pos;
            let apart = x + w <= *ox || ox + ow <= x || y + h <= *oy || oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        cells.push((title.to_string(), pos));
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "{title}: no target");
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: a target without expr"
            );
            assert!(
                ref_ids.insert(t["refId"].as_str().unwrap_or_default()),
                "{title}: refId repeated or missing"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }

    // The datasource, namespace and pod variables the queries use.
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["namespace", "pod"] {
        assert_eq!(var(name)["type"], "query", "${name}");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}", "${name}");
    }
}

#[test]
fn every_query_names_exported_series_and_their_labels() {
    let d = dashboard();
    let exported = exported_series();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut quantiles: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (title, expr) in exprs(&d) {
        let series = check_expr(&title, &expr, &exported, true);
        let grouping = references(&expr).grouping;
        for s in &series {
            used.entry(s.clone())
                .or_default()
                .extend(grouping.iter().cloned());
        }
        if let Some(rest) = expr.strip_prefix("histogram_quantile(") {
            let q = rest.split(',').next().unwrap().trim().to_string();
            for s in &series {
                quantiles.entry(s.clone()).or_default().insert(q.clone());
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["definition"]
                .as_str()
                .or(v["query"]["query"].as_str())
                .or(v["query"].as_str())
                .unwrap_or_else(|| panic!("${}: no query", v["name"]));
            check_expr(&format!("${}", v["name"]), q, &exported, false);
        }
    }

    // The panels asked for: each series, grouped by these labels somewhere.
    let wanted: [(&str, &[&str]); 9] = [
        ("llm_d_sidecar_requests_total", &["outcome", "route"]),
        ("llm_d_sidecar_in_flight_requests", &["route"]),
        ("llm_d_sidecar_prefill_duration_seconds_bucket", &["le"]),
        ("llm_d_sidecar_decode_first_byte_seconds_bucket", &["le"]),
        ("llm_d_sidecar_cancellations_total", &["phase"]),
        ("llm_d_sidecar_upstream_errors_total", &["leg", "kind"]),
        ("llm_d_sidecar_relayed_bytes_total", &["direction"]),
        ("llm_d_sidecar_prefill_retries_total", &["reason"]),
        ("llm_d_sidecar_connections_refused_total", &["reason"]),
    ];
    for (series, by) in wanted {
        let grouped = used
            .get(series)
            .unwrap_or_else(|| panic!("no panel queries {series}"));
        for label in by {
            assert!(
                grouped.contains(*label),
                "no panel shows {series} by {label}"
            );
        }
    }
    for histogram in [
        "llm_d_sidecar_prefill_duration_seconds_bucket",
        "llm_d_sidecar_decode_first_byte_seconds_bucket",
    ] {
        let qs = quantiles.get(histogram).cloned().unwrap_or_default();
        for q in ["0.5", "0.9", "0.99"] {
            assert!(qs.contains(q), "no quantile {q} of {histogram}: {qs:?}");
        }
    }
}

#[test]
fn the_podmonitor_scrapes_the_decode_pods_metrics_port() {
    let docs = yaml_documents(PODMONITOR);
    assert_eq!(docs.len(), 1, "{PODMONITOR}: one document");
    let monitor = &docs[0];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "PodMonitor");
    assert!(monitor["metadata"]["name"].is_string());

    let decode = yaml_documents("deploy/decode.yaml")
        .into_iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["name"] == SIDECAR))
        })
        .expect("deploy/decode.yaml: a Deployment running the sidecar");
    let prefill = yaml_documents("deploy/prefill.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("deploy/prefill.yaml: a Deployment");
    let selector = &monitor["spec"]["selector"];
    assert!(
        selector["matchExpressions"].is_null(),
        "matchLabels only (what this test evaluates)"
    );
    let match_labels = selector["matchLabels"].as_object().expect("matchLabels");
    assert!(!match_labels.is_empty());
    let selects = |d: &Value| {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        match_labels.iter().all(|(k, v)| &labels[k] == v)
    };
    assert!(selects(&decode), "the selector misses the decode pods");
    assert!(
        !selects(&prefill),
        "the prefill pods run no sidecar: nothing to scrape"
    );

    let sidecar = decode["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == SIDECAR)
        .unwrap();
    let metrics_port: u64 = sidecar["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|a| a.trim_start_matches('-').strip_prefix("metrics-port="))
        .expect("the sidecar's -metrics-port")
        .parse()
        .expect("a port number");
    let endpoints = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("podMetricsEndpoints");
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    let endpoint = &endpoints[0];
    let port_name = endpoint["port"].as_str().expect("a named port");
    let port = sidecar["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == port_name)
        .unwrap_or_else(|| panic!("the sidecar container has no port named {port_name}"));
    assert_eq!(port["containerPort"], metrics_port, "{port_name}");
    assert_eq!(endpoint["path"], "/metrics");
    let seconds = |key: &str| -> u64 {
        let v = endpoint[key].as_str().unwrap_or_else(|| panic!("{key}"));
        v.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key}: {v:?}, expected whole seconds"))
    };
    assert!(seconds("scrapeTimeout") <= seconds("interval"));

    // Applied on its own: kustomization.yaml must build without the operator's CRDs.
    let kustomization = &yaml_documents("deploy/kustomization.yaml")[0];
    let resources = kustomization["resources"].as_array().expect("resources");
    assert!(
        !resources.iter().any(|r| r == "podmonitor.yaml"),
        "podmonitor.yaml needs the Prometheus Operator's CRDs: not a default resource"
    );
}
