//! `sandbox apply` / `sandbox delete`: a kubectl-style manifest (Istio YAML) turned into a new sandbox
//! [`Model`], all or nothing.
//!
//! Input: the manifest text (YAML documents separated by `---`, or a `kind: List`), its name for messages,
//! the current model. Output: the new model and one kubectl-style line per object
//! (`peerauthentication.security.istio.io/default created`), or an [`ApplyError`] naming the document and
//! the field in the user's terms. Supported: every kind the control plane's mesh file takes in `istio:`
//! (AuthorizationPolicy, PeerAuthentication, Gateway, HTTPRoute, VirtualService, DestinationRule; upserted
//! by kind, namespace and name; namespace defaults to `default` as kubectl's context does), and `v1`
//! Namespace (its labels, e.g. `istio.io/dataplane-mode: ambient`, `istio.io/use-waypoint`). A waypoint
//! Gateway gets its pod as Istio's gateway controller would make it ([`Model::sync_waypoints`]). The new
//! model is validated the way the control plane validates its mesh file, so whatever is accepted here is
//! accepted there.

use serde_json::Value;

use super::model::{Labels, Model};
use crate::control_plane::objects::{IstioObject, ObjectKind};
use crate::control_plane::MeshConfig;

/// Largest manifest, and most documents in one.
pub const MAX_BYTES: usize = 1024 * 1024;
const MAX_DOCUMENTS: usize = 256;
const NAMESPACE_META_KEYS: [&str; 7] = [
    "name",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
];

/// Apply or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Create or replace.
    Apply,
    /// Remove.
    Delete,
}

/// Why a manifest was refused. Nothing of it was applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// Too big.
    #[error("{source_name}: larger than {MAX_BYTES} bytes")]
    TooLarge {
        /// The manifest's name.
        source_name: String,
    },
    /// Too many documents.
    #[error("{source_name}: more than {MAX_DOCUMENTS} documents")]
    TooManyDocuments {
        /// The manifest's name.
        source_name: String,
    },
    /// Not YAML.
    #[error("{source_name}: {reason}")]
    Yaml {
        /// The manifest's name.
        source_name: String,
        /// The parser's message (with line and column).
        reason: String,
    },
    /// A document was refused.
    #[error("{source_name}: document {index} ({what}): {field}: {reason}")]
    Document {
        /// The manifest's name.
        source_name: String,
        /// 1-based document number.
        index: usize,
        /// `Kind namespace/name`, as far as known.
        what: String,
        /// The field, in the document (`spec.rules[0].from[0].source.principals[0]`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// Nothing to do.
    #[error("{source_name}: no objects in it")]
    Empty {
        /// The manifest's name.
        source_name: String,
    },
}

/// One document, located.
struct Doc {
    index: usize,
    value: Value,
}

fn documents(text: &str, source: &str) -> Result<Vec<Doc>, ApplyError> {
    use serde::Deserialize;
    if text.len() > MAX_BYTES {
        return Err(ApplyError::TooLarge {
            source_name: source.into(),
        });
    }
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        if i >= MAX_DOCUMENTS {
            return Err(ApplyError::TooManyDocuments {
                source_name: source.into(),
            });
        }
        let value = Value::deserialize(de).map_err(|e| ApplyError::Yaml {
            source_name: source.into(),
            reason: e.to_string(),
        })?;
        match value {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                let items = m
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                out.extend(items.into_iter().map(|value| Doc {
                    index: i + 1,
                    value,
                }));
            }
            value => out.push(Doc {
                index: i + 1,
                value,
            }),
        }
    }
    if out.len() > MAX_DOCUMENTS {
        return Err(ApplyError::TooManyDocuments {
            source_name: source.into(),
        });
    }
    Ok(out)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Applies or deletes every object of the manifest on a copy of `model`; returns it with one line per
/// object, or the first refusal.
pub fn change(
    model: &Model,
    text: &str,
    source: &str,
    verb: Verb,
) -> Result<(Model, Vec<String>), ApplyError> {
    let docs = documents(text, source)?;
    if docs.is_empty() {
        return Err(ApplyError::Empty {
            source_name: source.into(),
        });
    }
    let mut next = model.clone();
    let mut lines = Vec::new();
    // Where each Istio object of `next.istio` came from, to name the document in validation errors.
    let mut origin: Vec<Option<(usize, String)>> = vec![None; next.istio.len()];
    for doc in docs {
        let kind = str_at(&doc.value, &["kind"]).unwrap_or("").to_string();
        let api = str_at(&doc.value, &["apiVersion"])
            .unwrap_or("")
            .to_string();
        let name = str_at(&doc.value, &["metadata", "name"])
            .unwrap_or("")
            .to_string();
        let refuse = |what: &str, field: &str, reason: String| ApplyError::Document {
            source_name: source.into(),
            index: doc.index,
            what: what.into(),
            field: field.into(),
            reason,
        };
        if !doc.value.is_object() {
            return Err(refuse("?", "(document)", "not a YAML mapping".into()));
        }
        // The kinds the control plane's mesh file knows, in the versions it takes.
        let istio_kind = serde_json::from_value::<ObjectKind>(Value::String(kind.clone())).ok();
        if let Some(object_kind) = istio_kind {
            object_kind
                .check_api_version(&api)
                .map_err(|r| refuse(&kind, "apiVersion", r))?;
            let mut value = doc.value.clone();
            // kubectl's default context namespace.
            if str_at(&value, &["metadata", "namespace"]).is_none() {
                if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert("namespace".into(), "default".into());
                }
            }
            let ns = str_at(&value, &["metadata", "namespace"])
                .unwrap_or("")
                .to_string();
            let what = format!("{kind} {ns}/{name}");
            // The object alone against the format: serde names the field and line.
            serde_json::from_value::<IstioObject>(value.clone())
                .map_err(|e| refuse(&what, "(format)", e.to_string()))?;
            if !next.namespaces.contains_key(&ns) {
                return Err(refuse(
                    &what,
                    "metadata.namespace",
                    format!(
                        "namespace {ns:?} does not exist in the sandbox (namespaces: {})",
                        next.namespaces
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let same = |o: &Value| {
                str_at(o, &["kind"]) == Some(&kind)
                    && str_at(o, &["metadata", "namespace"]) == Some(&ns)
                    && str_at(o, &["metadata", "name"]) == Some(&name)
            };
            // The east-west gateways are the sandbox's layout (`--multi-network`): their pods, routes
            // and tokens are made with the nodes, not by a manifest.
            let east_west = |o: &Value| {
                str_at(o, &["kind"]) == Some("Gateway")
                    && str_at(o, &["spec", "gatewayClassName"])
                        == Some(crate::control_plane::topology::EAST_WEST_CLASS)
            };
            if east_west(&value) || next.istio.iter().any(|o| same(o) && east_west(o)) {
                return Err(refuse(
                    &what,
                    "spec.gatewayClassName",
                    format!(
                        "{} Gateways are part of the sandbox's layout: build it with `sandbox up --multi-network` \
                         for one per network",
                        crate::control_plane::topology::EAST_WEST_CLASS
                    ),
                ));
            }
            // kubectl's `<kind>.<group>/<name>`.
            let group = api.split('/').next().unwrap_or_default();
            let resource = format!("{}.{group}/{name}", kind.to_lowercase());
            match (verb, next.istio.iter().position(same)) {
                (Verb::Apply, Some(i)) if next.istio[i] == value => {
                    lines.push(format!("{resource} unchanged"));
                    origin[i] = Some((doc.index, what));
                }
                (Verb::Apply, Some(i)) => {
                    next.istio[i] = value;
                    origin[i] = Some((doc.index, what));
                    lines.push(format!("{resource} configured"));
                }
                (Verb::Apply, None) => {
                    next.istio.push(value);
                    origin.push(Some((doc.index, what)));
                    lines.push(format!("{resource} created"));
                }
                (Verb::Delete, Some(i)) => {
                    next.istio.remove(i);
                    origin.remove(i);
                    // kubectl's wording for a deletion.
                    lines.push(format!(
                        "{}.{group} \"{name}\" deleted",
                        kind.to_lowercase()
                    ));
                }
                (Verb::Delete, None) => {
                    return Err(refuse(&what, "metadata.name", "not found".into()));
                }
            }
        } else if kind == "Namespace" && api == "v1" {
            let what = format!("Namespace {name}");
            if verb == Verb::Delete {
                return Err(refuse(
                    &what,
                    "kind",
                    "deleting a namespace (and its pods) is not supported in the sandbox; apply it without the label to leave the mesh".into(),
                ));
            }
            let labels = namespace_labels(&doc.value).map_err(|(f, r)| refuse(&what, &f, r))?;
            let line = match next.namespaces.insert(name.clone(), labels.clone()) {
                Some(old) if old == labels => "unchanged",
                Some(_) => "configured",
                None => "created",
            };
            lines.push(format!("namespace/{name} {line}"));
        } else {
            return Err(refuse(
                &format!("{kind} {name}"),
                "kind",
                format!(
                    "{kind:?} ({api}) is not supported by the sandbox; supported: AuthorizationPolicy and PeerAuthentication (security.istio.io), Gateway of class istio-waypoint and HTTPRoute (gateway.networking.k8s.io), VirtualService, DestinationRule, ServiceEntry and WorkloadEntry (networking.istio.io), Namespace (v1, labels)"
                ),
            ));
        }
    }
    // Istio's gateway controller: a pod for each waypoint Gateway, none for those deleted.
    lines.extend(next.sync_waypoints());
    // The whole result as the control plane will read it.
    MeshConfig::parse(&next.mesh_yaml()).map_err(|e| locate(e, &origin, source))?;
    Ok((next, lines))
}

/// A Namespace document's labels, checked against Kubernetes' label syntax.
fn namespace_labels(doc: &Value) -> Result<Labels, (String, String)> {
    let name = str_at(doc, &["metadata", "name"]).unwrap_or("");
    crate::control_plane::config::check_name(name).map_err(|r| ("metadata.name".to_string(), r))?;
    if let Some(m) = doc.as_object() {
        if let Some(k) = m
            .keys()
            .find(|k| !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str()))
        {
            return Err((k.clone(), "unknown field".into()));
        }
    }
    let meta = doc.get("metadata").and_then(Value::as_object);
    if let Some(k) = meta.and_then(|m| {
        m.keys()
            .find(|k| !NAMESPACE_META_KEYS.contains(&k.as_str()))
    }) {
        return Err((format!("metadata.{k}"), "unknown field".into()));
    }
    let mut labels = Labels::new();
    let Some(raw) = meta.and_then(|m| m.get("labels")) else {
        return Ok(labels);
    };
    let Some(raw) = raw.as_object() else {
        return Err(("metadata.labels".into(), "expected a mapping".into()));
    };
    for (k, v) in raw {
        let field = format!("metadata.labels.{k}");
        let Some(v) = v.as_str() else {
            return Err((field, "label values are strings (quote them)".into()));
        };
        label_key(k).map_err(|r| (field.clone(), r))?;
        if !v.is_empty() && !label_name(v) {
            return Err((field, format!("value {v:?}: at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric")));
        }
        labels.insert(k.clone(), v.to_string());
    }
    Ok(labels)
}

fn label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

fn label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!("key prefix {p:?} must be a DNS subdomain"));
        }
    }
    if !label_name(name) {
        return Err(format!(
            "key name {name:?}: at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// Turns the control plane's `istio[i].spec...` into the user's document and field.
fn locate(
    e: crate::control_plane::config::Error,
    origin: &[Option<(usize, String)>],
    source: &str,
) -> ApplyError {
    use crate::control_plane::config::Error as E;
    let (field, reason) = match e {
        E::Invalid { field, reason } => (field, reason),
        other => (String::new(), other.to_string()),
    };
    let located = field.strip_prefix("istio[").and_then(|rest| {
        let (i, tail) = rest.split_once(']')?;
        let (index, what) = origin.get(i.parse::<usize>().ok()?)?.clone()?;
        Some((index, what, tail.trim_start_matches('.').to_string()))
    });
    match located {
        Some((index, what, field)) => ApplyError::Document {
            source_name: source.into(),
            index,
            what,
            field,
            reason,
        },
        None => ApplyError::Document {
            source_name: source.into(),
            index: 0,
            what: "the sandbox as a whole".into(),
            field: if field.is_empty() {
                "(mesh)".into()
            } else {
                field
            },
            reason,
        },
    }
}

#[cfg(test)]
mod tests;
