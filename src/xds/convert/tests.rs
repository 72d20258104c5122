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
        Address::Workload(w) => Ok(w),
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
        Address::Service(s) => Ok(s),
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
        ..pb_workload()
    })
    .unwrap();
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
    convert_workload(pb::Workload {
        waypoint: ok,
        ..pb_workload()
    })
    .unwrap();
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
            routing_preference: vec![pb::load_balancing::Scope::Network as i32],
            mode: pb::load_balancing::Mode::Failover as i32,
            health_policy: pb::load_balancing::HealthPolicy::AllowAll as i32,
        }),
        ..pb_service()
    })
    .unwrap();
    assert_eq!(s.key(), "default/reviews.default.svc.cluster.local");
    assert_eq!(
        s.vips,
        vec![("".to_string(), "10.96.0.10".parse().unwrap())]
    );
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
}

#[test]
fn service_vips_are_single_addresses() {
    let vip = |len| pb::NetworkAddress {
        network: "".into(),
        address: vec![10, 96, 0, 0],
        length: len,
    };
    convert_service(pb::Service {
        addresses: vec![vip(Some(32))],
        ..pb_service()
    })
    .unwrap();
    assert!(matches!(
        convert_service(pb::Service {
            addresses: vec![vip(Some(16))],
            ..pb_service()
        }),
        Err(ConvertError::CidrVip { length: 16, .. })
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
