use std::sync::Arc;

use super::*;

fn encoded_lines(m: &Metrics, name: &str) -> Vec<String> {
    m.encode()
        .lines()
        .filter(|l| l.starts_with(name))
        .map(str::to_string)
        .collect()
}

#[test]
fn empty_labels_read_unknown_and_flags_read_dash_until_a_failure() {
    let m = Arc::new(Metrics::new());
    let labels = TrafficLabels::new(Reporter::destination, None, None, None, None);
    m.open(labels.clone()).close(ResponseFlags::None, 3, 4);
    m.open(labels).close(ResponseFlags::Deny, 0, 0);
    let opened = encoded_lines(&m, "istio_tcp_connections_opened_total{");
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert!(opened[0].starts_with(
        r#"istio_tcp_connections_opened_total{reporter="destination",source_workload="unknown","#
    ));
    assert!(opened[0].contains(r#"response_flags="-",connection_security_policy="unknown"} 2"#));
    let failed = encoded_lines(&m, "istio_tcp_connections_failed_total{");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains(r#"response_flags="DENY""#), "{failed:?}");
    let closed = encoded_lines(&m, "istio_tcp_connections_closed_total{");
    assert_eq!(closed.len(), 2, "{closed:?}");
    let recv = encoded_lines(&m, "istio_tcp_received_bytes_total{");
    assert!(recv.len() == 1 && recv[0].ends_with(" 3"), "{recv:?}");
    let sent = encoded_lines(&m, "istio_tcp_sent_bytes_total{");
    assert!(sent.len() == 1 && sent[0].ends_with(" 4"), "{sent:?}");
}

#[test]
fn a_record_dropped_without_close_still_counts_the_close() {
    let m = Arc::new(Metrics::new());
    drop(m.open(TrafficLabels::new(Reporter::source, None, None, None, None)));
    let closed = encoded_lines(&m, "istio_tcp_connections_closed_total{");
    assert!(closed.len() == 1 && closed[0].ends_with(" 1"), "{closed:?}");
}

#[test]
fn every_family_is_exposed_with_its_type_once_used() {
    let m = Arc::new(Metrics::new());
    // prometheus-client leaves families without samples out, as ztunnel's output does: before any
    // traffic there is only the build information (and the process's own figures, its log's drops).
    let fresh = m.encode();
    assert!(
        fresh.contains("\nmeshnode_log_dropped_lines_total 0\n"),
        "{fresh}"
    );
    let samples: Vec<&str> = fresh
        .lines()
        .filter(|l| {
            !l.starts_with('#') && !l.starts_with("process_") && !l.starts_with("meshnode_log_")
        })
        .collect();
    assert_eq!(
        samples,
        [format!(
            r#"istio_build{{component="ztunnel",tag="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )],
        "{fresh}"
    );
    let value = |name: &str| -> i64 {
        let line = fresh
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {fresh}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // This test process has stdin, stdout and stderr at least, and a limit above that.
    assert!(value("process_open_fds") >= 3, "{fresh}");
    assert!(
        value("process_max_fds") > value("process_open_fds"),
        "{fresh}"
    );
    assert!(
        value("process_resident_memory_bytes") > 1_000_000,
        "{fresh}"
    );
    assert!(value("process_threads") >= 1, "{fresh}");
    let labels = TrafficLabels::new(Reporter::destination, None, None, None, None);
    m.open(labels).close(ResponseFlags::Deny, 1, 1);
    let text = m.encode();
    for name in [
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_connections_failed",
        "istio_tcp_received_bytes",
        "istio_tcp_sent_bytes",
    ] {
        assert!(text.contains(&format!("# TYPE {name} counter")), "{text}");
    }
    assert!(
        text.contains("# TYPE istio_tcp_sockets_open gauge"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn sockets_open_counts_each_reporters_open_connections_until_they_close() {
    let m = Arc::new(Metrics::new());
    let labels = |r| TrafficLabels::new(r, None, None, None, None);
    let a = m.open(labels(Reporter::source));
    let b = m.open(labels(Reporter::source));
    let c = m.open(labels(Reporter::destination));
    let gauge = |m: &Metrics, r: &str| {
        encoded_lines(m, &format!("istio_tcp_sockets_open{{reporter=\"{r}\"}}"))
            .first()
            .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
    };
    assert_eq!(gauge(&m, "source"), Some(2));
    assert_eq!(gauge(&m, "destination"), Some(1));
    a.close(ResponseFlags::Connect, 0, 0);
    drop(c); // cancelled: still closed once
    assert_eq!(gauge(&m, "source"), Some(1));
    assert_eq!(gauge(&m, "destination"), Some(0));
    b.close(ResponseFlags::None, 1, 1);
    assert_eq!(gauge(&m, "source"), Some(0));
}

#[test]
fn unusable_waypoints_are_counted_by_waypoint_binding_and_reason() {
    use crate::state::{GatewayAddress, GatewayDestination};
    let m = Metrics::new();
    let gw = GatewayAddress {
        destination: GatewayDestination::Address {
            network: "net1".into(),
            ip: "10.0.0.9".parse().unwrap(),
        },
        hbone_mtls_port: 15008,
    };
    let labels = WaypointLabels::new(&gw, WaypointBinding::workload, WaypointFailure::unreachable);
    m.waypoint_unavailable(&labels);
    m.waypoint_unavailable(&labels);
    let lines = encoded_lines(&m, "meshnode_waypoint_unavailable_total{");
    assert_eq!(
        lines,
        [
            r#"meshnode_waypoint_unavailable_total{waypoint="net1/10.0.0.9",binding="workload",reason="unreachable"} 2"#
        ]
    );
    assert!(m
        .encode()
        .contains("# TYPE meshnode_waypoint_unavailable counter"));
}

#[tokio::test]
async fn metrics_are_served_on_metrics_and_on_ztunnels_stats_prometheus_alias() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(listener, Arc::new(Metrics::new()), stopped));
    for (path, want) in [
        ("/metrics", "200"),
        ("/stats/prometheus", "200"),
        ("/stats/prometheus?format=text", "200"),
        ("/stats", "404"),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {want}")),
            "{path}: {answer}"
        );
        if want == "200" {
            assert!(answer.contains("istio_build{"), "{path}: {answer}");
        }
    }
}

#[test]
fn locality_labels_follow_the_workloads_and_are_absent_when_neither_is_known() {
    let state = crate::state::LocalConfig::parse(
        r#"
workloads:
- {uid: c1, name: client, namespace: default, serviceAccount: sleep, workloadIps: [10.0.0.1], protocol: HBONE,
   locality: {region: eu-west1, zone: eu-west1-b}}
- {uid: s1, name: server, namespace: default, serviceAccount: web, workloadIps: [10.0.0.2], protocol: HBONE}
"#,
    )
    .unwrap()
    .into_state()
    .unwrap();
    let client = state.workload_by_addr("", [10, 0, 0, 1].into()).unwrap();
    let server = state.workload_by_addr("", [10, 0, 0, 2].into()).unwrap();
    let m = Arc::new(Metrics::new());
    let id = client.identity.clone();
    m.open(TrafficLabels::new(
        Reporter::destination,
        Some(client),
        Some(&id),
        Some(server),
        None,
    ))
    .close(ResponseFlags::None, 1, 1);
    m.open(TrafficLabels::new(Reporter::source, None, None, None, None))
        .close(ResponseFlags::None, 1, 1);
    let opened = encoded_lines(&m, "istio_tcp_connections_opened_total{");
    assert_eq!(opened.len(), 2, "{opened:?}");
    let known = opened
        .iter()
        .find(|l| l.contains(r#"reporter="destination""#))
        .unwrap();
    assert!(
        known.contains(r#"connection_security_policy="mutual_tls",source_region="eu-west1",source_zone="eu-west1-b",destination_region="unknown",destination_zone="unknown"}"#),
        "{known}"
    );
    let unknown = opened
        .iter()
        .find(|l| l.contains(r#"reporter="source""#))
        .unwrap();
    assert!(
        !unknown.contains("_region") && !unknown.contains("_zone"),
        "{unknown}"
    );
}
