//! Multi-network: a client on network `net1` reaches a service whose endpoint is on `net2` only through
//! `net2`'s east-west gateway, with double HBONE, as Istio ambient does across networks. Real processes in
//! network namespaces: the client pod's node proxy (dedicated mode, its outbound captured by iptables),
//! `meshnode gateway` in a namespace of its own, and the server pod's node proxy. The client's namespace
//! has no route to the server's: only the gateway joins the two.
//!
//! - the call arrives, and each hop saw the identity it should: the gateway terminated the outer tunnel
//!   (the client's identity in its access line, forwarded to the server's proxy), the server's proxy
//!   terminated the inner one (the client's identity again, from the inner TLS, the source marked as
//!   from another network);
//! - a service whose names (subject alt names) the server cannot present is refused inside the gateway's
//!   tunnel: the inner identity check is the client's own;
//! - a gateway that presents another identity than the state gives it is refused at the outer tunnel;
//! - a workload on another network without a gateway is never dialled: refused.
//!
//! Needs root, `ip`, `iptables`.

mod support;

use std::path::Path;
use std::time::Duration;

use support::dedicated::{call, capture_outbound, serve_app, subnet, wait_ready, System};
use support::mesh_yaml::{self, behind_gateway, serves};
use support::netns::{veth, KillOnDrop, Netns};

const VIP: &str = "10.96.0.10";
const WRONG_SAN_VIP: &str = "10.96.0.11";
const IMPOSTOR_VIP: &str = "10.96.0.12";
const NO_GATEWAY_VIP: &str = "10.96.0.13";

/// A workload of the mesh, on a node of its own.
fn workload(name: &str, ns: &str, sa: &str, ip: &str, network: &str, extra: &str) -> String {
    mesh_yaml::workload(
        name,
        ns,
        sa,
        ip,
        network,
        &format!("  node: node-{name}\n{extra}"),
    )
}

/// The hostname of service `name` in `default`.
fn host(name: &str) -> String {
    format!("{name}.default.svc.cluster.local")
}

/// Service `name` of `default`, its VIP `vip` on every network of the mesh.
fn service(name: &str, vip: &str, extra: &str) -> String {
    mesh_yaml::service(
        name,
        &host(name),
        vip,
        &["net1", "net2", "net3", "net4"],
        extra,
    )
}

/// The mesh: client on net1; server on net2 behind the gateway at `gw_ip`; `ghost` on net3 behind an
/// "impostor" gateway (same address, another identity); `lost` on net4 with no gateway at all.
fn mesh(client_ip: &str, gw_ip: &str, server_ip: &str, n: u8) -> String {
    let gw = |net: &str| behind_gateway(net, gw_ip);
    let mut y = String::from("workloads:\n");
    y += &workload("client", "default", "sleep", client_ip, "net1", "");
    y += &workload(
        "ew-gateway",
        "istio-system",
        "istio-eastwestgateway",
        gw_ip,
        "net2",
        "",
    );
    y += &workload(
        "server",
        "default",
        "httpbin",
        server_ip,
        "net2",
        &(gw("net2") + &serves(&[&host("echo"), &host("wrong-san")])),
    );
    y += &workload("impostor", "istio-system", "impostor", gw_ip, "net3", "");
    y += &workload(
        "ghost",
        "default",
        "httpbin",
        &format!("10.{n}.3.1"),
        "net3",
        &(gw("net3") + &serves(&[&host("ghost")])),
    );
    y += &workload(
        "lost",
        "default",
        "httpbin",
        &format!("10.{n}.4.1"),
        "net4",
        &serves(&[&host("lost")]),
    );
    y += "services:\n";
    y += &service("echo", VIP, "");
    y += &service(
        "wrong-san",
        WRONG_SAN_VIP,
        "  subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/not-httpbin\"]\n",
    );
    y += &service("ghost", IMPOSTOR_VIP, "");
    y += &service("lost", NO_GATEWAY_VIP, "");
    y
}

fn start_gateway(ns: &Netns, config: &Path, dir: &Path) -> KillOnDrop {
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    let state_dir = dir.join("state");
    let env = [
        ("NETWORK", "net2"),
        ("POD_NAMESPACE", "istio-system"),
        ("LOCAL_XDS_PATH", config.to_str().unwrap()),
        ("XDS_ADDRESS", ""),
        ("MESHNODE_STATE_DIR", state_dir.to_str().unwrap()),
        ("RUST_LOG", "info"),
    ];
    KillOnDrop(ns.spawn(env!("CARGO_BIN_EXE_meshnode"), &["gateway"], &env, log))
}

fn with_network(network: &str) -> Vec<(&'static str, String)> {
    vec![("NETWORK", network.to_string())]
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Waits up to 5 s for `needle` in log `name`.
fn wait_log(dir: &Path, name: &str, needle: &str) -> String {
    for _ in 0..50 {
        let l = log(dir, name);
        if l.contains(needle) {
            return l;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name} never said {needle:?}; it says:\n{}", log(dir, name));
}

#[test]
fn a_service_on_another_network_is_reached_through_its_gateway_with_each_hop_checking_identity() {
    if !support::root_or_skip(
        "a_service_on_another_network_is_reached_through_its_gateway_with_each_hop_checking_identity",
    ) {
        return;
    }
    let n = subnet();
    let (client_ip, gw_ip_a) = (format!("10.{n}.1.1"), format!("10.{n}.1.2"));
    let (gw_ip_b, server_ip) = (format!("10.{n}.2.2"), format!("10.{n}.2.1"));
    let client = Netns::new("mnc");
    let gateway = Netns::new("mng");
    let server = Netns::new("mns");
    let (client_dev, _) = veth(
        &client,
        &format!("{client_ip}/24"),
        &gateway,
        &format!("{gw_ip_a}/24"),
    );
    // Service VIPs route out of the pod (to be captured); the server's subnet does not.
    client.ip(&["route", "add", "10.96.0.0/16", "dev", &client_dev]);
    veth(
        &gateway,
        &format!("{gw_ip_b}/24"),
        &server,
        &format!("{server_ip}/24"),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("local.yaml");
    std::fs::write(&config, mesh(&client_ip, &gw_ip_a, &server_ip, n)).unwrap();
    serve_app(&server, "0.0.0.0:8080".parse().unwrap());
    let system = System::Meshnode {
        state_dir: dir.path().join("state"),
        ca_dir: None,
    };
    let _client_proxy = support::dedicated::start_proxy_with(
        &system,
        &client,
        "default/client/sleep",
        &config,
        dir.path(),
        "client.log",
        &with_network("net1"),
    );
    let _server_proxy = support::dedicated::start_proxy_with(
        &system,
        &server,
        "default/server/httpbin",
        &config,
        dir.path(),
        "server.log",
        &with_network("net2"),
    );
    let _gateway = start_gateway(&gateway, &config, dir.path());
    wait_ready(&client, dir.path(), "client.log");
    wait_ready(&server, dir.path(), "server.log");
    wait_ready(&gateway, dir.path(), "gateway.log");
    capture_outbound(&client);

    // The client's namespace has no route to the server's: only the gateway can get there.
    let direct = call(&client, format!("{server_ip}:8080").parse().unwrap());
    assert!(
        direct.is_err(),
        "the server must not be reachable directly: {direct:?}"
    );

    // 1. Through the gateway: the answer comes back, and every hop saw whom it should.
    let reply = call(&client, format!("{VIP}:80").parse().unwrap()).unwrap_or_else(|e| {
        panic!(
            "call through the gateway failed: {e}\nclient:\n{}\ngateway:\n{}\nserver:\n{}",
            log(dir.path(), "client.log"),
            log(dir.path(), "gateway.log"),
            log(dir.path(), "server.log")
        )
    });
    assert!(reply.starts_with("app saw "), "{reply}");
    assert!(reply.ends_with("say hello\n"), "{reply}");
    let client_id = "spiffe://cluster.local/ns/default/sa/sleep";
    let gw = wait_log(dir.path(), "gateway.log", "connection complete");
    let line = gw
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    assert!(line.contains(client_id), "gateway saw the client: {line}");
    assert!(
        line.contains("echo.default.svc.cluster.local:80"),
        "gateway routed by service: {line}"
    );
    assert!(line.contains("dst.workload=server"), "{line}");
    let srv = wait_log(dir.path(), "server.log", "connection complete");
    let line = srv
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    assert!(
        line.contains(client_id),
        "server's proxy saw the client: {line}"
    );
    let cli = wait_log(dir.path(), "client.log", "connection complete");
    let line = cli
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    assert!(
        line.contains(&format!("{gw_ip_a}:15008")),
        "client's proxy dialled the gateway: {line}"
    );
    assert!(line.contains("ew-gateway"), "{line}");

    // 2. The inner tunnel's identity check is the client's own: a service whose names the server cannot
    //    present is refused inside the gateway's tunnel.
    let wrong = call(&client, format!("{WRONG_SAN_VIP}:80").parse().unwrap());
    assert!(
        wrong.as_ref().map_or(true, |r| r.is_empty()),
        "inner identity mismatch must fail: {wrong:?}"
    );
    wait_log(dir.path(), "client.log", "inner tunnel through the gateway");

    // 3. A gateway that is not who the state says is refused at the outer tunnel.
    let ghost = call(&client, format!("{IMPOSTOR_VIP}:80").parse().unwrap());
    assert!(
        ghost.as_ref().map_or(true, |r| r.is_empty()),
        "an impostor gateway must be refused: {ghost:?}"
    );
    let cli = log(dir.path(), "client.log");
    assert!(
        cli.lines()
            .any(|l| l.contains("TLS handshake") && !l.contains("inner tunnel")),
        "{cli}"
    );

    // 4. No gateway on the endpoint's network: refused, never dialled.
    let lost = call(&client, format!("{NO_GATEWAY_VIP}:80").parse().unwrap());
    assert!(
        lost.as_ref().map_or(true, |r| r.is_empty()),
        "no gateway, no connection: {lost:?}"
    );
    wait_log(dir.path(), "client.log", "no healthy upstream");

    // And the good path still works after the refusals.
    let again = call(&client, format!("{VIP}:80").parse().unwrap()).unwrap();
    assert!(again.starts_with("app saw "), "{again}");
}
