//! The enrollment decision: is this pod captured into the mesh? istio-cni's rules, in one pure function.
//!
//! Input: the agent's settings (enablement selectors, excluded namespaces), the pod and its namespace.
//! Output: [`Decision::Enroll`] or [`Decision::Skip`] with the reason. Selectors are Kubernetes label
//! selectors (`matchLabels`, `matchExpressions` with `In`, `NotIn`, `Exists`, `DoesNotExist`); a pod is
//! enrolled when ANY entry matches both its labels (`podSelector`) and its namespace's (`namespaceSelector`).

use serde::Deserialize;

use super::cluster::{Labels, NamespaceInfo, PodInfo};

/// `istio.io/dataplane-mode`, on pods and namespaces.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Set by sidecar injection; sidecar pods are never captured by the node proxy.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// A Kubernetes label selector. An empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Every key must have exactly this value.
    #[serde(default)]
    pub match_labels: Labels,
    /// Every expression must hold.
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: Operator,
    /// Values for `In` / `NotIn`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// Label selector operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Operator {
    /// The label is one of the values.
    In,
    /// The label is absent or none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    Operator::In => got.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => got.is_some(),
                    Operator::DoesNotExist => got.is_none(),
                }
            })
    }

    /// Checks what Kubernetes would refuse: `In`/`NotIn` without values, `Exists`/`DoesNotExist` with.
    pub fn validate(&self) -> Result<(), String> {
        for r in &self.match_expressions {
            match (r.operator, r.values.is_empty()) {
                (Operator::In | Operator::NotIn, true) => {
                    return Err(format!("{:?} on key {:?} needs values", r.operator, r.key))
                }
                (Operator::Exists | Operator::DoesNotExist, false) => {
                    return Err(format!(
                        "{:?} on key {:?} takes no values",
                        r.operator, r.key
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// One entry of `AMBIENT_ENABLEMENT_SELECTOR`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnablementSelector {
    /// Matched against the pod's labels.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// Matched against the namespace's labels.
    #[serde(default)]
    pub namespace_selector: LabelSelector,
}

/// istio-cni's default selectors: the pod label `ambient`, or the namespace label `ambient` unless the pod
/// says `none`.
pub fn default_selectors() -> Vec<EnablementSelector> {
    let ambient = Labels::from([(DATAPLANE_MODE.to_string(), "ambient".to_string())]);
    vec![
        EnablementSelector {
            pod_selector: LabelSelector {
                match_labels: ambient.clone(),
                match_expressions: vec![],
            },
            namespace_selector: LabelSelector::default(),
        },
        EnablementSelector {
            pod_selector: LabelSelector {
                match_labels: Labels::new(),
                match_expressions: vec![Requirement {
                    key: DATAPLANE_MODE.into(),
                    operator: Operator::NotIn,
                    values: vec!["none".into()],
                }],
            },
            namespace_selector: LabelSelector {
                match_labels: ambient,
                match_expressions: vec![],
            },
        },
    ]
}

/// Parses `AMBIENT_ENABLEMENT_SELECTOR` (YAML or JSON list of `{podSelector, namespaceSelector}`).
pub fn parse_selectors(text: &str) -> Result<Vec<EnablementSelector>, String> {
    let list: Vec<EnablementSelector> =
        serde_yaml::from_str(text).map_err(|e| format!("not a list of selectors: {e}"))?;
    for s in &list {
        s.pod_selector.validate()?;
        s.namespace_selector.validate()?;
    }
    Ok(list)
}

/// The rules the decision follows.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Enablement selectors (any match enrolls).
    pub selectors: Vec<EnablementSelector>,
    /// Namespaces never enrolled (default `kube-system`).
    pub exclude_namespaces: Vec<String>,
}

/// Whether a pod is captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Capture it.
    Enroll,
    /// Leave it alone, for this reason.
    Skip(&'static str),
}

impl Policy {
    /// Decides for `pod` in namespace `ns` (`None`: a namespace the agent does not know, with no labels).
    pub fn decide(&self, ns: Option<&NamespaceInfo>, pod: &PodInfo) -> Decision {
        if self.exclude_namespaces.contains(&pod.namespace) {
            return Decision::Skip("namespace excluded");
        }
        if pod.host_network {
            return Decision::Skip("host-network pod");
        }
        if pod.annotations.contains_key(SIDECAR_STATUS) {
            return Decision::Skip("sidecar-injected pod");
        }
        if pod.terminal {
            return Decision::Skip("pod has terminated");
        }
        let empty = Labels::new();
        let ns_labels = ns.map_or(&empty, |n| &n.labels);
        if self
            .selectors
            .iter()
            .any(|s| s.pod_selector.matches(&pod.labels) && s.namespace_selector.matches(ns_labels))
        {
            Decision::Enroll
        } else {
            Decision::Skip("not selected for ambient")
        }
    }

    /// Whether a pod with no labels of its own would be enrolled in a namespace with `ns`'s labels: the
    /// namespaces the CNI plugin must fail closed for when it cannot reach the agent.
    pub fn namespace_enrolls(&self, name: &str, ns: &NamespaceInfo) -> bool {
        let pod = PodInfo {
            namespace: name.to_string(),
            ..PodInfo::default()
        };
        self.decide(Some(ns), &pod) == Decision::Enroll
    }

    /// Whether some pod in namespace `name` (with `ns`'s labels) could be enrolled, whatever labels the pod
    /// carries: the plugin cannot see pod labels, so only namespaces where this is false may let pods start
    /// uncaptured while the agent is down. Any selector whose namespace part matches counts (its pod part
    /// is taken as satisfiable), so the answer errs towards failing closed.
    pub fn namespace_may_enroll(&self, name: &str, ns: &NamespaceInfo) -> bool {
        !self.exclude_namespaces.iter().any(|n| n == name)
            && self
                .selectors
                .iter()
                .any(|s| s.namespace_selector.matches(&ns.labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policy() -> Policy {
        Policy {
            selectors: default_selectors(),
            exclude_namespaces: vec!["kube-system".into()],
        }
    }

    fn pod(ns: &str, l: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            name: "p".into(),
            namespace: ns.into(),
            labels: labels(l),
            ..PodInfo::default()
        }
    }

    #[test]
    fn namespace_label_enrolls_its_pods_unless_a_pod_says_none() {
        let ns = NamespaceInfo {
            labels: labels(&[(DATAPLANE_MODE, "ambient")]),
        };
        let p = policy();
        assert_eq!(p.decide(Some(&ns), &pod("default", &[])), Decision::Enroll);
        assert_eq!(
            p.decide(Some(&ns), &pod("default", &[(DATAPLANE_MODE, "none")])),
            Decision::Skip("not selected for ambient")
        );
        assert!(p.namespace_enrolls("default", &ns));
        assert!(!p.namespace_enrolls("test", &NamespaceInfo::default()));
    }

    #[test]
    fn with_a_pod_label_selector_every_namespace_but_the_excluded_may_enroll_a_pod() {
        let p = policy();
        // The default selectors enroll a pod labelled ambient anywhere: no namespace is safe to pass.
        assert!(p.namespace_may_enroll("test", &NamespaceInfo::default()));
        assert!(!p.namespace_may_enroll("kube-system", &NamespaceInfo::default()));
        // Namespace-only selectors: an unlabelled namespace can enroll nobody.
        let ns_only = Policy {
            selectors: parse_selectors(
                "- namespaceSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}",
            )
            .unwrap(),
            exclude_namespaces: vec![],
        };
        assert!(!ns_only.namespace_may_enroll("test", &NamespaceInfo::default()));
        let ambient = NamespaceInfo {
            labels: labels(&[(DATAPLANE_MODE, "ambient")]),
        };
        assert!(ns_only.namespace_may_enroll("test", &ambient));
    }

    #[test]
    fn pod_label_alone_enrolls_outside_ambient_namespaces() {
        let p = policy();
        assert_eq!(
            p.decide(None, &pod("test", &[(DATAPLANE_MODE, "ambient")])),
            Decision::Enroll
        );
        assert_eq!(
            p.decide(None, &pod("test", &[])),
            Decision::Skip("not selected for ambient")
        );
    }

    #[test]
    fn excluded_namespaces_host_network_and_sidecar_pods_stay_out() {
        let ns = NamespaceInfo {
            labels: labels(&[(DATAPLANE_MODE, "ambient")]),
        };
        let p = policy();
        assert_eq!(
            p.decide(
                Some(&ns),
                &pod("kube-system", &[(DATAPLANE_MODE, "ambient")])
            ),
            Decision::Skip("namespace excluded")
        );
        let mut hn = pod("default", &[]);
        hn.host_network = true;
        assert_eq!(p.decide(Some(&ns), &hn), Decision::Skip("host-network pod"));
        let mut sc = pod("default", &[]);
        sc.annotations = labels(&[(SIDECAR_STATUS, "{}")]);
        assert_eq!(
            p.decide(Some(&ns), &sc),
            Decision::Skip("sidecar-injected pod")
        );
    }

    #[test]
    fn custom_selectors_parse_from_istio_yaml_and_bad_ones_are_refused() {
        let yaml = r#"
- podSelector:
    matchExpressions:
    - {key: team, operator: In, values: [payments]}
  namespaceSelector: {}
"#;
        let sel = parse_selectors(yaml).unwrap();
        let p = Policy {
            selectors: sel,
            exclude_namespaces: vec![],
        };
        assert_eq!(
            p.decide(None, &pod("x", &[("team", "payments")])),
            Decision::Enroll
        );
        assert!(
            parse_selectors("- podSelector: {matchExpressions: [{key: a, operator: In}]}").is_err()
        );
        assert!(
            parse_selectors("- podSelector: {matchExpressions: [{key: a, operator: Maybe}]}")
                .is_err()
        );
        assert!(parse_selectors("- podSelectr: {}").is_err());
    }
}
