//! Pins the wire format of the generated types against hand-computed
//! encodings, where a wrong field number or type would otherwise go unnoticed
//! until talking to a real istiod or istio-cni.
//!
//! A tag byte is `field_number << 3 | wire_type` (varint 0, length-delimited
//! 2), itself varint-encoded: field 20 length-delimited is 162 = `a2 01`.

use prost::{Message, Name};

use super::ca::{IstioCertificateRequest, IstioCertificateResponse};
use super::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource, Status};
use super::security::{self, Authorization, Match, ServiceAccountMatch, StringMatch};
use super::workload::zds::{
    self, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello,
};
use super::workload::{self, Address, GatewayAddress, NetworkAddress, Port, Service, Workload};

fn encoded(msg: &impl Message) -> Vec<u8> {
    msg.encode_to_vec()
}

// ---- ZDS ----

#[test]
fn del_workload_uid_is_field_2() {
    let del = DelWorkload { uid: "a".into() };
    assert_eq!(encoded(&del), [0x12, 0x01, b'a']);
}

#[test]
fn add_and_keep_workload_uid_is_field_1() {
    assert_eq!(
        encoded(&KeepWorkload { uid: "a".into() }),
        [0x0a, 0x01, b'a']
    );
    let add = AddWorkload {
        uid: "u".into(),
        workload_info: Some(WorkloadInfo {
            name: "n".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
        }),
    };
    #[rustfmt::skip]
    let expected = [
        0x0a, 0x01, b'u',
        0x12, 0x0b,
            0x0a, 0x01, b'n',
            0x12, 0x02, b'n', b's',
            0x1a, 0x02, b's', b'a',
    ];
    assert_eq!(encoded(&add), expected);
}

#[test]
fn workload_request_payload_field_numbers() {
    use zds::workload_request::Payload;
    let req = |payload| WorkloadRequest {
        payload: Some(payload),
    };
    let keep = req(Payload::Keep(KeepWorkload { uid: "a".into() }));
    assert_eq!(
        encoded(&keep),
        [0x2a, 0x03, 0x0a, 0x01, b'a'],
        "keep is field 5"
    );
    let del = req(Payload::Del(DelWorkload { uid: "a".into() }));
    assert_eq!(
        encoded(&del),
        [0x12, 0x03, 0x12, 0x01, b'a'],
        "del is field 2"
    );
    let snapshot = req(Payload::SnapshotSent(SnapshotSent {}));
    assert_eq!(encoded(&snapshot), [0x1a, 0x00], "snapshot_sent is field 3");
    let add = req(Payload::Add(AddWorkload {
        uid: "a".into(),
        workload_info: None,
    }));
    assert_eq!(
        encoded(&add),
        [0x0a, 0x03, 0x0a, 0x01, b'a'],
        "add is field 1"
    );
}

#[test]
fn zds_hello_v1_encodes_as_version_1() {
    let hello = ZdsHello {
        version: zds::Version::V1.into(),
    };
    assert_eq!(encoded(&hello), [0x08, 0x01]);
}

#[test]
fn empty_ack_still_marks_the_payload_present() {
    use zds::workload_response::Payload;
    let ack = WorkloadResponse {
        payload: Some(Payload::Ack(zds::Ack {
            error: String::new(),
        })),
    };
    assert_eq!(encoded(&ack), [0x0a, 0x00]);
    let nack = WorkloadResponse {
        payload: Some(Payload::Ack(zds::Ack { error: "x".into() })),
    };
    assert_eq!(encoded(&nack), [0x0a, 0x03, 0x0a, 0x01, b'x']);
}

#[test]
fn workload_request_with_unknown_payload_decodes_to_none() {
    // Field 4 (a removed NoSnapshotPresent) from an older or newer peer.
    let req = WorkloadRequest::decode(&[0x22, 0x00][..]).unwrap();
    assert_eq!(req.payload, None);
}

// ---- istio.workload ----

#[test]
fn workload_uid_is_field_20() {
    let wl = Workload {
        uid: "a".into(),
        ..Default::default()
    };
    assert_eq!(encoded(&wl), [0xa2, 0x01, 0x01, b'a']);
}

#[test]
fn workload_capacity_is_a_uint32_wrapper_in_field_27() {
    let wl = Workload {
        capacity: Some(3),
        ..Default::default()
    };
    assert_eq!(encoded(&wl), [0xda, 0x01, 0x02, 0x08, 0x03]);
    // An explicit 0 differs from unset (which means 1) and must survive.
    let zero = Workload {
        capacity: Some(0),
        ..Default::default()
    };
    assert_eq!(encoded(&zero), [0xda, 0x01, 0x00]);
    assert_eq!(
        Workload::decode(&[0xda, 0x01, 0x00][..]).unwrap().capacity,
        Some(0)
    );
    assert_eq!(Workload::decode(&[][..]).unwrap().capacity, None);
}

#[test]
fn workload_fields_above_15_use_two_byte_tags() {
    let wl = Workload {
        status: workload::WorkloadStatus::Unhealthy.into(),
        cluster_id: "c".into(),
        hostname: "h".into(),
        network_mode: workload::NetworkMode::HostNetwork.into(),
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected = [
        0x88, 0x01, 0x01,       // 17 status
        0x92, 0x01, 0x01, b'c', // 18 cluster_id
        0xaa, 0x01, 0x01, b'h', // 21 hostname
        0xc8, 0x01, 0x01,       // 25 network_mode
    ];
    assert_eq!(encoded(&wl), expected);
}

#[test]
fn workload_services_map_is_field_22() {
    let wl = Workload {
        services: [(
            "ns/h".to_string(),
            workload::PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        )]
        .into(),
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected = [
        0xb2, 0x01, 0x0f,                         // 22, entry of 15 bytes
            0x0a, 0x04, b'n', b's', b'/', b'h',   // key
            0x12, 0x07,                           // value: PortList
                0x0a, 0x05,                       // ports[0]
                    0x08, 0x50,                   // service_port 80
                    0x10, 0x90, 0x3f,             // target_port 8080
    ];
    assert_eq!(encoded(&wl), expected);
}

#[test]
fn address_oneof_wraps_workload_in_field_1_and_service_in_field_2() {
    use workload::address::Type;
    let wl = Address {
        r#type: Some(Type::Workload(Workload {
            uid: "a".into(),
            ..Default::default()
        })),
    };
    assert_eq!(encoded(&wl), [0x0a, 0x04, 0xa2, 0x01, 0x01, b'a']);
    let svc = Address {
        r#type: Some(Type::Service(Service {
            name: "s".into(),
            ..Default::default()
        })),
    };
    assert_eq!(encoded(&svc), [0x12, 0x03, 0x0a, 0x01, b's']);
}

#[test]
fn service_visibility_is_field_14() {
    let svc = Service {
        visibility: workload::service::Visibility::Namespace.into(),
        ..Default::default()
    };
    assert_eq!(encoded(&svc), [0x70, 0x01]);
}

#[test]
fn network_address_length_is_optional_field_3() {
    let vip = NetworkAddress {
        network: String::new(),
        address: vec![10, 0, 0, 1],
        length: None,
    };
    assert_eq!(encoded(&vip), [0x12, 0x04, 10, 0, 0, 1]);
    // Explicit presence: a /0 prefix is still sent.
    let any = NetworkAddress {
        length: Some(0),
        ..vip
    };
    assert_eq!(encoded(&any), [0x12, 0x04, 10, 0, 0, 1, 0x18, 0x00]);
}

#[test]
fn gateway_address_port_is_field_3_after_the_destination_oneof() {
    use workload::gateway_address::Destination;
    let gw = GatewayAddress {
        destination: Some(Destination::Hostname(workload::NamespacedHostname {
            namespace: "n".into(),
            hostname: "h".into(),
        })),
        hbone_mtls_port: 15008,
    };
    #[rustfmt::skip]
    let expected = [
        0x0a, 0x06, 0x0a, 0x01, b'n', 0x12, 0x01, b'h',
        0x18, 0xa0, 0x75, // 15008
    ];
    assert_eq!(encoded(&gw), expected);
}

#[test]
fn tunnel_protocol_and_port_app_protocol_values() {
    assert_eq!(workload::TunnelProtocol::LegacyIstioMtls as i32, 2);
    let port = Port {
        service_port: 0,
        target_port: 0,
        app_protocol: workload::AppProtocol::Grpc.into(),
    };
    assert_eq!(encoded(&port), [0x18, 0x03]);
}

// ---- istio.security ----

#[test]
fn authorization_dry_run_is_field_6() {
    let policy = Authorization {
        dry_run: true,
        ..Default::default()
    };
    assert_eq!(encoded(&policy), [0x30, 0x01]);
}

#[test]
fn authorization_nests_rules_then_clauses_in_field_2_then_matches() {
    let policy = Authorization {
        action: security::Action::Deny.into(),
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![Match {
                    destination_ports: vec![80],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected = [
        0x20, 0x01,                   // 4 action DENY
        0x2a, 0x07,                   // 5 rules[0]
            0x0a, 0x05,               // 1 clauses[0]
                0x12, 0x03,           // 2 matches[0]
                    0x4a, 0x01, 0x50, // 9 destination_ports [80], packed
    ];
    assert_eq!(encoded(&policy), expected);
}

#[test]
fn match_destination_ports_is_packed_field_9_and_accepts_unpacked() {
    let m = Match {
        destination_ports: vec![80, 443],
        ..Default::default()
    };
    assert_eq!(encoded(&m), [0x4a, 0x03, 0x50, 0xbb, 0x03]);
    // Proto3 parsers must also accept the unpacked form.
    let unpacked = Match::decode(&[0x48, 0x50, 0x48, 0xbb, 0x03][..]).unwrap();
    assert_eq!(unpacked, m);
}

#[test]
fn match_service_accounts_are_fields_11_and_12() {
    let sa = ServiceAccountMatch {
        namespace: "n".into(),
        service_account: "s".into(),
    };
    let m = Match {
        service_accounts: vec![sa.clone()],
        not_service_accounts: vec![sa],
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected = [
        0x5a, 0x06, 0x0a, 0x01, b'n', 0x12, 0x01, b's',
        0x62, 0x06, 0x0a, 0x01, b'n', 0x12, 0x01, b's',
    ];
    assert_eq!(encoded(&m), expected);
}

#[test]
fn string_match_presence_is_an_empty_message_in_field_4() {
    use security::string_match::MatchType;
    let presence = StringMatch {
        match_type: Some(MatchType::Presence(())),
    };
    assert_eq!(encoded(&presence), [0x22, 0x00]);
    let suffix = StringMatch {
        match_type: Some(MatchType::Suffix("x".into())),
    };
    assert_eq!(encoded(&suffix), [0x1a, 0x01, b'x']);
}

// ---- xDS envelope ----

#[test]
fn xds_resource_type_urls_match_istio() {
    assert_eq!(
        Address::type_url(),
        "type.googleapis.com/istio.workload.Address"
    );
    assert_eq!(
        Authorization::type_url(),
        "type.googleapis.com/istio.security.Authorization"
    );
}

#[test]
fn delta_request_response_nonce_is_field_6_and_error_detail_field_7() {
    let ack = DeltaDiscoveryRequest {
        response_nonce: "n".into(),
        ..Default::default()
    };
    assert_eq!(encoded(&ack), [0x32, 0x01, b'n']);
    let nack = DeltaDiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: "m".into(),
            details: vec![],
        }),
        ..Default::default()
    };
    assert_eq!(encoded(&nack), [0x3a, 0x05, 0x08, 0x03, 0x12, 0x01, b'm']);
}

#[test]
fn delta_request_subscription_fields() {
    let req = DeltaDiscoveryRequest {
        node: Some(Node {
            id: "i".into(),
            ..Default::default()
        }),
        type_url: "t".into(),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["*".into()],
        initial_resource_versions: [("k".to_string(), "v".to_string())].into(),
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected = [
        0x0a, 0x03, 0x0a, 0x01, b'i',             // 1 node { id }
        0x12, 0x01, b't',                         // 2 type_url
        0x1a, 0x01, b'*',                         // 3 subscribe
        0x22, 0x01, b'*',                         // 4 unsubscribe
        0x2a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v', // 5 map entry
    ];
    assert_eq!(encoded(&req), expected);
}

#[test]
fn node_metadata_is_a_struct_in_field_3() {
    use prost_types::{value::Kind, Struct, Value};
    let node = Node {
        metadata: Some(Struct {
            fields: [(
                "K".to_string(),
                Value {
                    kind: Some(Kind::StringValue("v".into())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected = [
        0x1a, 0x0a,                       // 3 metadata
            0x0a, 0x08,                   // Struct.fields entry
                0x0a, 0x01, b'K',         // key
                0x12, 0x03,               // Value
                    0x1a, 0x01, b'v',     // string_value (field 3)
    ];
    assert_eq!(encoded(&node), expected);
}

#[test]
fn delta_response_round_trips_an_address_resource() {
    let wl = Workload {
        uid: "cluster/pod".into(),
        ..Default::default()
    };
    let addr = Address {
        r#type: Some(workload::address::Type::Workload(wl)),
    };
    let resp = DeltaDiscoveryResponse {
        resources: vec![Resource {
            name: "cluster/pod".into(),
            version: "1".into(),
            resource: Some(prost_types::Any::from_msg(&addr).unwrap()),
            ..Default::default()
        }],
        type_url: Address::type_url(),
        nonce: "n".into(),
        removed_resources: vec!["gone".into()],
        ..Default::default()
    };
    let bytes = encoded(&resp);
    // removed_resources (6) and nonce (5) have the field numbers istiod uses.
    assert!(bytes.ends_with(&[0x2a, 0x01, b'n', 0x32, 0x04, b'g', b'o', b'n', b'e']));
    let back = DeltaDiscoveryResponse::decode(&bytes[..]).unwrap();
    let any = back.resources[0].resource.as_ref().unwrap();
    assert_eq!(any.type_url, "type.googleapis.com/istio.workload.Address");
    assert_eq!(any.to_msg::<Address>().unwrap(), addr);
}

#[test]
fn resource_name_is_field_3_and_version_field_1() {
    let r = Resource {
        name: "a".into(),
        version: "v".into(),
        ..Default::default()
    };
    assert_eq!(encoded(&r), [0x0a, 0x01, b'v', 0x1a, 0x01, b'a']);
}

// ---- CA ----

#[test]
fn certificate_request_validity_duration_is_field_3() {
    let req = IstioCertificateRequest {
        csr: "c".into(),
        validity_duration: 86_400,
        metadata: None,
    };
    // 86400 = 0x15180 -> varint 80 a3 05
    assert_eq!(encoded(&req), [0x0a, 0x01, b'c', 0x18, 0x80, 0xa3, 0x05]);
}

#[test]
fn certificate_response_cert_chain_is_repeated_field_1() {
    let resp = IstioCertificateResponse::decode(&[0x0a, 0x01, b'a', 0x0a, 0x01, b'b'][..]).unwrap();
    assert_eq!(resp.cert_chain, ["a", "b"]);
}
