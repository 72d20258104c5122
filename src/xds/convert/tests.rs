//! Conversion of xDS resources, field group by field group: what is carried over, what defaults as in
//! ztunnel, and what is refused rather than silently changing meaning.

use std::collections::HashMap;
use std::net::IpAddr;

use super::*;
use crate::proto::security::string_match::MatchType;

const UID: &str = "Kubernetes//Pod/default/productpage-1";

fn pb_workload() -> pb::Workload {
    pb::Workload {
        uid: UID.into(),
        name: "productpage-1".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

fn convert_workload(w: pb::Workload) -> Result<Workload, ConvertError> {
    let name = w.uid.clone();
    match address(
        &name,
        pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        },
    )? {
        Address::Workload(w) => Ok(Arc::unwrap_or_clone(w)),
        Address::Service(_) => panic!("workload became a service"),
    }
}

fn pb_service() -> pb::Service {
    pb::Service {
        name: "reviews".into(),
        namespace: "default".into(),
        hostname: "reviews.default.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: "".into(),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 9080,
            app_protocol: 0,
        }],
        ..Default::default()
    }
}

fn convert_service(s: pb::Service) -> Result<Service, ConvertError> {
    let name = format!("{}/{}", s.namespace, s.hostname);
    match address(
        &name,
        pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        },
    )? {
        Address::Service(s) => Ok(Arc::unwrap_or_clone(s)),
        Address::Workload(_) => panic!("service became a workload"),
    }
}

#[test]
fn workload_without_trust_domain_account_cluster_or_capacity_gets_ztunnels_defaults() {
    let w = convert_workload(pb_workload()).unwrap();
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(w.service_account, "default");
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.capacity, 1);
    assert_eq!(w.protocol, Protocol::HBONE);
    assert_eq!(w.status, HealthStatus::Healthy);
    assert_eq!(w.workload_type, "deployment");
}

#[test]
fn workload_fields_are_carried_over() {
    let mut services = HashMap::new();
    services.insert(
        "default/reviews.default.svc.cluster.local".to_string(),
        pb::PortList {
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 9080,
                app_protocol: 0,
            }],
        },
    );
    let w = convert_workload(pb::Workload {
        trust_domain: "example.org".into(),
        service_account: "bookinfo".into(),
        cluster_id: "east".into(),
        capacity: Some(3),
        addresses: vec![
            vec![10, 0, 0, 1],
            "fd00::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec(),
        ],
        tunnel_protocol: pb::TunnelProtocol::None as i32,
        status: pb::WorkloadStatus::Unhealthy as i32,
        workload_type: pb::WorkloadType::Pod as i32,
        node: "node-1".into(),
        network: "net-a".into(),
        canonical_name: "productpage".into(),
        canonical_revision: "v1".into(),
        workload_name: "productpage-v1".into(),
        authorization_policies: vec!["default/allow-get".into()],
        services,
        locality: Some(pb::Locality {
            region: "eu-west1".into(),
            zone: "eu-west1-b".into(),
            subzone: String::new(),
        }),
        ..pb_workload()
    })
    .unwrap();
    let locality = w.locality.as_deref().unwrap();
    assert_eq!(
        (locality.region.as_str(), locality.zone.as_str()),
        ("eu-west1", "eu-west1-b")
    );
    assert!(convert_workload(pb_workload()).unwrap().locality.is_none());
    assert_eq!(
        w.identity.to_string(),
        "spiffe://example.org/ns/default/sa/bookinfo"
    );
    assert_eq!(w.cluster_id, "east");
    assert_eq!(w.capacity, 3);
    assert_eq!(
        w.ips,
        vec![
            "10.0.0.1".parse::<IpAddr>().unwrap(),
            "fd00::1".parse().unwrap()
        ]
    );
    assert_eq!(w.protocol, Protocol::TCP);
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert_eq!(w.workload_type, "pod");
    assert_eq!((w.node.as_str(), w.network.as_str()), ("node-1", "net-a"));
    assert_eq!(w.canonical_name, "productpage");
    assert_eq!(w.canonical_revision, "v1");
    assert_eq!(w.workload_name, "productpage-v1");
    assert_eq!(w.authorization_policies, vec!["default/allow-get"]);
    assert_eq!(
        w.services["default/reviews.default.svc.cluster.local"],
        HashMap::from([(80, 9080)])
    );
}

#[test]
fn workload_capacity_zero_is_kept_not_defaulted() {
    let w = convert_workload(pb::Workload {
        capacity: Some(0),
        ..pb_workload()
    })
    .unwrap();
    assert_eq!(w.capacity, 0);
}

#[test]
fn workload_addresses_must_be_4_or_16_bytes() {
    let err = convert_workload(pb::Workload {
        addresses: vec![vec![10, 0, 0]],
        ..pb_workload()
    })
    .unwrap_err();
    assert_eq!(
        err,
        ConvertError::AddressLength {
            field: "addresses",
            len: 3
        }
    );
}

#[test]
fn legacy_istio_mtls_workloads_are_refused() {
    let err = convert_workload(pb::Workload {
        tunnel_protocol: pb::TunnelProtocol::LegacyIstioMtls as i32,
        ..pb_workload()
    })
    .unwrap_err();
    assert_eq!(err, ConvertError::LegacyIstioMtls);
}

#[test]
fn unknown_workload_enum_values_are_refused() {
    type Set = fn(&mut pb::Workload);
    let cases: [(&str, Set); 4] = [
        ("tunnelProtocol", |w| w.tunnel_protocol = 7),
        ("status", |w| w.status = 7),
        ("workloadType", |w| w.workload_type = 7),
        ("networkMode", |w| w.network_mode = 7),
    ];
    for (field, set) in cases {
        let mut w = pb_workload();
        set(&mut w);
        assert_eq!(
            convert_workload(w).unwrap_err(),
            ConvertError::UnknownEnum { field, value: 7 }
        );
    }
}

#[test]
fn gateway_addresses_need_a_valid_destination() {
    let no_dest = Some(pb::GatewayAddress {
        destination: None,
        hbone_mtls_port: 15008,
    });
    let err = convert_workload(pb::Workload {
        waypoint: no_dest.clone(),
        ..pb_workload()
    })
    .unwrap_err();
    assert_eq!(
        err,
        ConvertError::GatewayWithoutDestination { field: "waypoint" }
    );
    let err = convert_workload(pb::Workload {
        network_gateway: no_dest,
        ..pb_workload()
    })
    .unwrap_err();
    assert_eq!(
        err,
        ConvertError::GatewayWithoutDestination {
            field: "networkGateway"
        }
    );
    let bad_ip = Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: "".into(),
                address: vec![1, 2],
                length: None,
            },
        )),
        hbone_mtls_port: 15008,
    });
    assert!(matches!(
        convert_workload(pb::Workload {
            waypoint: bad_ip,
            ..pb_workload()
        }),
        Err(ConvertError::AddressLength { .. })
    ));
    let ok = Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: "default".into(),
                hostname: "waypoint.default.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    });
    let w = convert_workload(pb::Workload {
        waypoint: ok,
        ..pb_workload()
    })
    .unwrap();
    assert_eq!(
        w.waypoint.as_deref(),
        Some(&GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "default".into(),
                hostname: "waypoint.default.svc.cluster.local".into(),
            },
            hbone_mtls_port: 15008,
        })
    );
}

fn pb_gateway_ip(last: u8, port: u32) -> Option<pb::GatewayAddress> {
    Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: "net1".into(),
                address: vec![10, 0, 0, last],
                length: None,
            },
        )),
        hbone_mtls_port: port,
    })
}

#[test]
fn waypoints_and_application_tunnels_are_carried_into_the_state() {
    let w = convert_workload(pb::Workload {
        waypoint: pb_gateway_ip(9, 15008),
        application_tunnel: Some(pb::ApplicationTunnel {
            protocol: pb::application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        }),
        hostname: "vm.example".into(),
        ..pb_workload()
    })
    .unwrap();
    assert_eq!(
        w.waypoint.as_deref(),
        Some(&GatewayAddress {
            destination: GatewayDestination::Address {
                network: "net1".into(),
                ip: "10.0.0.9".parse().unwrap(),
            },
            hbone_mtls_port: 15008,
        })
    );
    assert_eq!(
        w.application_tunnel,
        Some(ApplicationTunnel {
            protocol: AppTunnelProtocol::PROXY,
            port: Some(15088),
        })
    );
    assert_eq!(w.hostname, "vm.example");
    // Port 0 is proto3's "unset".
    let w = convert_workload(pb::Workload {
        application_tunnel: Some(pb::ApplicationTunnel {
            protocol: pb::application_tunnel::Protocol::None as i32,
            port: 0,
        }),
        ..pb_workload()
    })
    .unwrap();
    assert_eq!(
        w.application_tunnel,
        Some(ApplicationTunnel {
            protocol: AppTunnelProtocol::NONE,
            port: None,
        })
    );

    let s = convert_service(pb::Service {
        waypoint: pb_gateway_ip(9, 15008),
        weighted_waypoints: vec![
            pb::WeightedWaypoint {
                destination: pb_gateway_ip(9, 15008),
                weight: 80,
            },
            pb::WeightedWaypoint {
                destination: pb_gateway_ip(10, 15008),
                weight: 20,
            },
        ],
        ..pb_service()
    })
    .unwrap();
    assert_eq!(
        s.waypoint.as_deref(),
        Some(&s.weighted_waypoints[0].destination)
    );
    assert_eq!(
        s.weighted_waypoints
            .iter()
            .map(|w| w.weight)
            .collect::<Vec<_>>(),
        [80, 20]
    );
    // A weighted waypoint without a destination, or a port above 16 bits, is refused.
    let err = convert_service(pb::Service {
        weighted_waypoints: vec![pb::WeightedWaypoint {
            destination: None,
            weight: 1,
        }],
        ..pb_service()
    })
    .unwrap_err();
    assert_eq!(
        err,
        ConvertError::GatewayWithoutDestination {
            field: "weightedWaypoints"
        }
    );
    let err = convert_service(pb::Service {
        waypoint: pb_gateway_ip(9, 70000),
        ..pb_service()
    })
    .unwrap_err();
    assert_eq!(
        err,
        ConvertError::Port {
            field: "waypoint",
            value: 70000
        }
    );
}

#[test]
fn workload_resource_name_must_be_its_uid() {
    let err = address(
        "someone-else",
        pb::Address {
            r#type: Some(pb::address::Type::Workload(pb_workload())),
        },
    )
    .unwrap_err();
    assert!(matches!(err, ConvertError::NameMismatch { .. }), "{err}");
    let err = convert_workload(pb::Workload {
        uid: "".into(),
        ..pb_workload()
    })
    .unwrap_err();
    assert_eq!(err, ConvertError::Missing { field: "uid" });
}

#[test]
fn workload_service_keys_and_ports_are_checked() {
    let mut w = pb_workload();
    w.services
        .insert("reviews".into(), pb::PortList { ports: vec![] });
    assert_eq!(
        convert_workload(w).unwrap_err(),
        ConvertError::ServiceKey {
            key: "reviews".into()
        }
    );
    let mut w = pb_workload();
    w.services.insert(
        "default/reviews".into(),
        pb::PortList {
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 70000,
                app_protocol: 0,
            }],
        },
    );
    assert_eq!(
        convert_workload(w).unwrap_err(),
        ConvertError::Port {
            field: "services",
            value: 70000
        }
    );
}

#[test]
fn an_empty_address_resource_is_refused() {
    assert_eq!(
        address("x", pb::Address { r#type: None }).unwrap_err(),
        ConvertError::EmptyAddress
    );
}

#[test]
fn service_fields_are_carried_over() {
    let s = convert_service(pb::Service {
        subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/reviews".into()],
        canonical: true,
        load_balancing: Some(pb::LoadBalancing {
            routing_preference: vec![
                pb::load_balancing::Scope::Network as i32,
                pb::load_balancing::Scope::Zone as i32,
            ],
            mode: pb::load_balancing::Mode::Failover as i32,
            health_policy: pb::load_balancing::HealthPolicy::AllowAll as i32,
        }),
        ip_families: pb::IpFamilies::Ipv4Only as i32,
        visibility: pb::service::Visibility::Namespace as i32,
        ..pb_service()
    })
    .unwrap();
    assert_eq!(
        &*s.routing_preference,
        &[crate::state::Scope::Network, crate::state::Scope::Zone]
    );
    assert_eq!(s.ip_families, crate::state::IpFamilies::V4);
    assert!(s.namespace_only && s.visible_to("default") && !s.visible_to("other"));
    assert_eq!(s.key(), "default/reviews.default.svc.cluster.local");
    assert_eq!(s.vips, vec![("".into(), "10.96.0.10".parse().unwrap())]);
    assert_eq!(s.ports, HashMap::from([(80, 9080)]));
    assert_eq!(
        s.subject_alt_names[0].to_string(),
        "spiffe://cluster.local/ns/default/sa/reviews"
    );
    assert!(s.canonical);
    assert_eq!(s.lb_mode, LbMode::Failover);
    assert_eq!(s.health_policy, HealthPolicy::AllowAll);
    let plain = convert_service(pb_service()).unwrap();
    assert_eq!(plain.lb_mode, LbMode::Standard);
    assert_eq!(plain.health_policy, HealthPolicy::OnlyHealthy);
    assert!(plain.routing_preference.is_empty() && !plain.namespace_only);
    assert_eq!(plain.ip_families, crate::state::IpFamilies::Automatic);
}

#[test]
fn single_address_vips_and_cidr_vips_are_told_apart() {
    let vip = |len| pb::NetworkAddress {
        network: "".into(),
        address: vec![10, 96, 0, 0],
        length: len,
    };
    let one = convert_service(pb::Service {
        addresses: vec![vip(Some(32))],
        ..pb_service()
    })
    .unwrap();
    assert_eq!(one.vips.len(), 1);
    assert!(one.vip_cidrs.is_empty());
    let range = convert_service(pb::Service {
        addresses: vec![vip(Some(16))],
        ..pb_service()
    })
    .unwrap();
    assert!(range.vips.is_empty());
    assert_eq!(range.vip_cidrs[0].1.to_string(), "10.96.0.0/16");
    assert!(matches!(
        convert_service(pb::Service {
            addresses: vec![vip(Some(33))],
            ..pb_service()
        }),
        Err(ConvertError::PrefixLength { length: 33, .. })
    ));
}

#[test]
fn service_resource_name_must_be_namespace_slash_hostname() {
    let err = address(
        "default/reviews",
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb_service())),
        },
    )
    .unwrap_err();
    assert!(matches!(err, ConvertError::NameMismatch { .. }), "{err}");
}

#[test]
fn service_load_balancing_and_names_are_validated() {
    let lb = |scope, mode| {
        convert_service(pb::Service {
            load_balancing: Some(pb::LoadBalancing {
                routing_preference: vec![scope],
                mode,
                health_policy: 0,
            }),
            ..pb_service()
        })
    };
    assert_eq!(lb(0, 1).unwrap_err(), ConvertError::UnspecifiedScope);
    assert!(matches!(
        lb(9, 1),
        Err(ConvertError::UnknownEnum {
            field: "loadBalancing.routingPreference",
            ..
        })
    ));
    assert!(matches!(
        lb(1, 9),
        Err(ConvertError::UnknownEnum {
            field: "loadBalancing.mode",
            ..
        })
    ));
    assert_eq!(lb(1, 3).unwrap().lb_mode, LbMode::Passthrough);
    assert!(matches!(
        convert_service(pb::Service {
            subject_alt_names: vec!["reviews".into()],
            ..pb_service()
        }),
        Err(ConvertError::Identity { .. })
    ));
    assert!(matches!(
        convert_service(pb::Service {
            ports: vec![pb::Port {
                service_port: 65536,
                target_port: 1,
                app_protocol: 0
            }],
            ..pb_service()
        }),
        Err(ConvertError::Port { value: 65536, .. })
    ));
}

fn exact(v: &str) -> security::StringMatch {
    security::StringMatch {
        match_type: Some(MatchType::Exact(v.into())),
    }
}

fn pb_policy(m: security::Match) -> security::Authorization {
    security::Authorization {
        name: "allow-sleep".into(),
        namespace: "default".into(),
        scope: security::Scope::WorkloadSelector as i32,
        action: security::Action::Allow as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause { matches: vec![m] }],
        }],
        dry_run: true,
        extensions: vec![],
    }
}

#[test]
fn policies_convert_every_match_field() {
    let m = security::Match {
        namespaces: vec![exact("default")],
        not_namespaces: vec![security::StringMatch {
            match_type: Some(MatchType::Prefix("kube-".into())),
        }],
        principals: vec![security::StringMatch {
            match_type: Some(MatchType::Suffix("/sa/sleep".into())),
        }],
        not_principals: vec![security::StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        source_ips: vec![security::Address {
            address: vec![10, 0, 0, 0],
            length: 8,
        }],
        not_source_ips: vec![security::Address {
            address: "fd00::"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec(),
            length: 64,
        }],
        destination_ips: vec![security::Address {
            address: vec![10, 0, 0, 1],
            length: 32,
        }],
        not_destination_ips: vec![],
        destination_ports: vec![9080],
        not_destination_ports: vec![9999],
        service_accounts: vec![security::ServiceAccountMatch {
            namespace: "default".into(),
            service_account: "sleep".into(),
        }],
        not_service_accounts: vec![],
        extensions: vec![],
    };
    let p = policy("default/allow-sleep", pb_policy(m)).unwrap();
    assert_eq!(p.key(), "default/allow-sleep");
    assert_eq!(p.scope, Scope::WorkloadSelector);
    assert_eq!(p.action, Action::Allow);
    assert!(p.dry_run);
    let got = &p.rules[0].clauses[0].matches[0];
    let want = Match {
        namespaces: vec![authz::StringMatch::Exact("default".into())],
        not_namespaces: vec![authz::StringMatch::Prefix("kube-".into())],
        principals: vec![authz::StringMatch::Suffix("/sa/sleep".into())],
        not_principals: vec![authz::StringMatch::Presence],
        source_ips: vec!["10.0.0.0/8".parse().unwrap()],
        not_source_ips: vec!["fd00::/64".parse().unwrap()],
        destination_ips: vec!["10.0.0.1/32".parse().unwrap()],
        not_destination_ips: vec![],
        destination_ports: vec![9080],
        not_destination_ports: vec![9999],
        service_accounts: vec![ServiceAccountMatch {
            namespace: "default".into(),
            service_account: "sleep".into(),
        }],
        not_service_accounts: vec![],
    };
    assert_eq!(got, &want);
}

#[test]
fn policies_that_would_widen_access_are_refused() {
    // Empty exact string: ztunnel drops it, which can turn a narrow match into a broad one.
    let err = policy(
        "default/allow-sleep",
        pb_policy(security::Match {
            principals: vec![exact("")],
            ..Default::default()
        }),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Policy(authz::Error::EmptyStringMatch { .. })
        ),
        "{err}"
    );
    // A string match with no kind at all.
    let err = policy(
        "default/allow-sleep",
        pb_policy(security::Match {
            namespaces: vec![security::StringMatch { match_type: None }],
            ..Default::default()
        }),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::EmptyMatchKind {
                field: "namespaces",
                ..
            }
        ),
        "{err}"
    );
    // Malformed CIDRs: wrong address length, prefix longer than the address.
    for addr in [
        security::Address {
            address: vec![10, 0],
            length: 8,
        },
        security::Address {
            address: vec![10, 0, 0, 0],
            length: 33,
        },
    ] {
        let err = policy(
            "default/allow-sleep",
            pb_policy(security::Match {
                source_ips: vec![addr],
                ..Default::default()
            }),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConvertError::PolicyCidr {
                    field: "sourceIps",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("default/allow-sleep"), "{err}");
    }
    // Ports above 65535: ztunnel truncates them to another port.
    let err = policy(
        "default/allow-sleep",
        pb_policy(security::Match {
            destination_ports: vec![65536 + 80],
            ..Default::default()
        }),
    )
    .unwrap_err();
    assert!(
        matches!(err, ConvertError::PolicyPort { value: 65616, .. }),
        "{err}"
    );
    // Empty service-account parts.
    let err = policy(
        "default/allow-sleep",
        pb_policy(security::Match {
            service_accounts: vec![security::ServiceAccountMatch {
                namespace: "default".into(),
                service_account: "".into(),
            }],
            ..Default::default()
        }),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Policy(authz::Error::EmptyServiceAccountMatch { .. })
        ),
        "{err}"
    );
}

#[test]
fn policies_with_unknown_scope_or_action_or_another_name_are_refused() {
    let mut p = pb_policy(security::Match::default());
    p.action = 2; // AUDIT in some Istio versions: not enforceable here.
    assert_eq!(
        policy("default/allow-sleep", p).unwrap_err(),
        ConvertError::UnknownEnum {
            field: "action",
            value: 2
        }
    );
    let mut p = pb_policy(security::Match::default());
    p.scope = 5;
    assert_eq!(
        policy("default/allow-sleep", p).unwrap_err(),
        ConvertError::UnknownEnum {
            field: "scope",
            value: 5
        }
    );
    let err = policy("allow-sleep", pb_policy(security::Match::default())).unwrap_err();
    assert!(matches!(err, ConvertError::NameMismatch { .. }), "{err}");
}

/// The NACK reason for a policy whose only match is `m`; panics if the policy is accepted.
fn policy_refusal(m: security::Match) -> String {
    match policy("default/allow-sleep", pb_policy(m)) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e.to_string(),
    }
}

fn string_match(kind: MatchType) -> security::StringMatch {
    security::StringMatch {
        match_type: Some(kind),
    }
}

fn addr(address: Vec<u8>, length: u32) -> security::Address {
    security::Address { address, length }
}

/// Every list of a policy match, each given one bad value, is refused with a reason naming the
/// policy, the match position, the field and what is wrong.
#[test]
fn every_bad_policy_value_is_refused_with_a_reason_naming_field_and_problem() {
    type Set = fn(&mut security::Match, security::StringMatch);
    let string_fields: [(&str, Set); 4] = [
        ("namespaces", |m, s| m.namespaces.push(s)),
        ("notNamespaces", |m, s| m.not_namespaces.push(s)),
        ("principals", |m, s| m.principals.push(s)),
        ("notPrincipals", |m, s| m.not_principals.push(s)),
    ];
    type SetIp = fn(&mut security::Match, security::Address);
    let ip_fields: [(&str, SetIp); 4] = [
        ("sourceIps", |m, a| m.source_ips.push(a)),
        ("notSourceIps", |m, a| m.not_source_ips.push(a)),
        ("destinationIps", |m, a| m.destination_ips.push(a)),
        ("notDestinationIps", |m, a| m.not_destination_ips.push(a)),
    ];
    type SetPort = fn(&mut security::Match, u32);
    let port_fields: [(&str, SetPort); 2] = [
        ("destinationPorts", |m, p| m.destination_ports.push(p)),
        ("notDestinationPorts", |m, p| {
            m.not_destination_ports.push(p)
        }),
    ];

    // (match, words the reason must contain)
    let mut cases: Vec<(security::Match, Vec<String>)> = Vec::new();
    for (field, set) in string_fields {
        let bad = [
            (None, "string match with no value".to_string()),
            (
                Some(MatchType::Exact(String::new())),
                "empty Exact value".into(),
            ),
            (
                Some(MatchType::Prefix(String::new())),
                "empty Prefix value".into(),
            ),
            (
                Some(MatchType::Suffix(String::new())),
                "empty Suffix value".into(),
            ),
        ];
        for (kind, problem) in bad {
            let mut m = security::Match::default();
            set(&mut m, security::StringMatch { match_type: kind });
            cases.push((m, vec![field.to_string(), problem]));
        }
    }
    for (field, set) in ip_fields {
        let bad = [
            (addr(vec![], 0), "address of 0 bytes (want 4 or 16)"),
            (addr(vec![10, 0], 8), "address of 2 bytes (want 4 or 16)"),
            (
                addr(vec![10, 0, 0, 0, 0], 8),
                "address of 5 bytes (want 4 or 16)",
            ),
            (addr(vec![0; 17], 64), "address of 17 bytes (want 4 or 16)"),
            (
                addr(vec![10, 0, 0, 0], 33),
                "prefix length 33 is too long for 10.0.0.0",
            ),
            (addr(vec![0xfd; 16], 129), "prefix length 129 is too long"),
            (
                addr(vec![10, 0, 0, 0], 256 + 8),
                "prefix length 264 is too long",
            ),
        ];
        for (a, problem) in bad {
            let mut m = security::Match::default();
            set(&mut m, a);
            cases.push((m, vec![field.to_string(), problem.to_string()]));
        }
    }
    for (field, set) in port_fields {
        for value in [65536, 65536 + 8080, u32::MAX] {
            let mut m = security::Match::default();
            set(&mut m, value);
            cases.push((
                m,
                vec![field.to_string(), format!("port {value} is above 65535")],
            ));
        }
    }
    for (field, ns, sa) in [
        ("serviceAccounts", "", "sleep"),
        ("serviceAccounts", "default", ""),
        ("notServiceAccounts", "", "sleep"),
        ("notServiceAccounts", "default", ""),
    ] {
        let account = security::ServiceAccountMatch {
            namespace: ns.into(),
            service_account: sa.into(),
        };
        let mut m = security::Match::default();
        if field == "serviceAccounts" {
            m.service_accounts.push(account);
        } else {
            m.not_service_accounts.push(account);
        }
        cases.push((
            m,
            vec![
                field.to_string(),
                "empty namespace or serviceAccount".into(),
            ],
        ));
    }

    let mut failures = Vec::new();
    for (mut m, needles) in cases {
        // A valid entry next to the bad one: one bad value refuses the whole policy, it is not dropped.
        m.destination_ports.insert(0, 8080);
        let reason = policy_refusal(m);
        for needle in needles
            .iter()
            .map(String::as_str)
            .chain(["default/allow-sleep", "rules[0][0][0]"])
        {
            if !reason.contains(needle) {
                failures.push(format!("{reason:?} lacks {needle:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_bad_value_deep_in_a_policy_is_reported_at_its_position() {
    let good = security::Match {
        destination_ports: vec![8080],
        ..Default::default()
    };
    let bad = security::Match {
        principals: vec![string_match(MatchType::Exact("a".into())), exact("")],
        ..Default::default()
    };
    let mut p = pb_policy(good.clone());
    p.rules.push(security::Rule {
        clauses: vec![
            security::Clause {
                matches: vec![good.clone()],
            },
            security::Clause {
                matches: vec![good, bad],
            },
        ],
    });
    let reason = policy("default/allow-sleep", p).unwrap_err().to_string();
    assert!(
        reason.contains("default/allow-sleep") && reason.contains("rules[1][1][1].principals"),
        "{reason}"
    );
}

#[test]
fn unknown_or_negative_action_and_scope_values_are_refused_by_name() {
    for (action, scope, needle) in [
        (2, 0, "action: unknown value 2"),
        (3, 0, "action: unknown value 3"),
        (-1, 0, "action: unknown value -1"),
        (0, 3, "scope: unknown value 3"),
        (0, -1, "scope: unknown value -1"),
    ] {
        let mut p = pb_policy(security::Match::default());
        p.action = action;
        p.scope = scope;
        let reason = policy("default/allow-sleep", p).unwrap_err().to_string();
        assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
    }
}

#[test]
fn edge_values_that_are_valid_are_accepted_unchanged() {
    let m = security::Match {
        source_ips: vec![addr(vec![0, 0, 0, 0], 0), addr(vec![0; 16], 0)],
        destination_ips: vec![addr(vec![0xfd; 16], 128), addr(vec![10, 0, 0, 1], 32)],
        destination_ports: vec![0, 65535],
        principals: vec![string_match(MatchType::Presence(()))],
        ..Default::default()
    };
    let p = policy("default/allow-sleep", pb_policy(m)).unwrap();
    let got = &p.rules[0].clauses[0].matches[0];
    assert_eq!(
        got.source_ips,
        vec![
            "0.0.0.0/0".parse::<ipnet::IpNet>().unwrap(),
            "::/0".parse().unwrap()
        ]
    );
    assert_eq!(got.destination_ips[1], "10.0.0.1/32".parse().unwrap());
    assert_eq!(got.destination_ports, vec![0, 65535]);
    assert_eq!(got.principals, vec![authz::StringMatch::Presence]);
}

#[test]
fn an_empty_match_in_a_deny_policy_is_refused_but_is_harmless_in_an_allow() {
    let mut deny = pb_policy(security::Match::default());
    deny.action = security::Action::Deny as i32;
    let err = policy("default/allow-sleep", deny).unwrap_err().to_string();
    assert!(
        err.contains("rules[0][0][0]") && err.contains("DENY"),
        "{err}"
    );
    // In an ALLOW an empty match can only narrow access (it never matches), as in ztunnel.
    assert!(policy("default/allow-sleep", pb_policy(security::Match::default())).is_ok());
}

#[test]
fn an_unreadable_policy_stands_in_as_a_deny_all_over_its_key_namespace() {
    let p = fail_safe_policy("default/broken", None);
    assert_eq!(p.key(), "default/broken");
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (Scope::Namespace, Action::Deny, false)
    );
    assert_eq!(
        p.rules[0].clauses[0].matches,
        vec![Match::every_connection()]
    );
    // A name that is not namespace/name keeps its whole text as the name.
    assert_eq!(fail_safe_policy("broken", None).key(), "/broken");
}

#[test]
fn a_refused_policy_stands_in_under_its_resource_name_with_its_own_rules_made_safe() {
    let m = security::Match {
        principals: vec![exact("cluster.local/ns/default/sa/sleep")],
        not_principals: vec![security::StringMatch { match_type: None }],
        ..Default::default()
    };
    // Sent under another name than its own: the stand-in takes the resource name.
    let p = fail_safe_policy("default/other", Some(pb_policy(m)));
    assert_eq!(p.key(), "default/other");
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (Scope::WorkloadSelector, Action::Allow, true)
    );
    // An ALLOW whose exclusion is unusable: the match can no longer match.
    assert_eq!(p.rules[0].clauses[0].matches, vec![Match::default()]);
    p.validate().unwrap();
}

#[test]
fn a_valid_policy_and_its_fail_safe_form_are_the_same() {
    let m = security::Match {
        principals: vec![exact("cluster.local/ns/default/sa/sleep")],
        destination_ports: vec![80],
        ..Default::default()
    };
    assert_eq!(
        fail_safe_policy("default/allow-sleep", Some(pb_policy(m.clone()))),
        policy("default/allow-sleep", pb_policy(m)).unwrap()
    );
}
