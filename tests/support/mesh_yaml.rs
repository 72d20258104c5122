//! Local-config YAML (what `LocalConfig::parse` and `LOCAL_XDS_PATH` read) for the multi-network tests:
//! entries of the `workloads:` and `services:` lists, with the fields crossing networks takes.

use std::fmt::Display;

/// A `workloads:` entry: HBONE workload `name` in namespace `ns`, service account `sa`, at `ip` on
/// `network`. `extra` is more of its fields, each a line indented by two spaces ([`serves`],
/// [`behind_gateway`]).
pub fn workload(
    name: &str,
    ns: &str,
    sa: &str,
    ip: impl Display,
    network: &str,
    extra: &str,
) -> String {
    format!(
        "- uid: cluster1//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  \
         workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  network: {network}\n{extra}"
    )
}

/// A workload's `services:` field: it serves port 80 (on 8080) of each of `hostnames`, services of the
/// `default` namespace.
pub fn serves(hostnames: &[&str]) -> String {
    let list = hostnames
        .iter()
        .map(|h| format!("\"default/{h}\": {{80: 8080}}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("  services: {{{list}}}\n")
}

/// A workload's `networkGateway:` field: behind the gateway at `gw_ip` on `network`, HBONE on 15008.
pub fn behind_gateway(network: &str, gw_ip: impl Display) -> String {
    format!("  networkGateway: {{destination: \"{network}/{gw_ip}\", hboneMtlsPort: 15008}}\n")
}

/// A `services:` entry: service `name` of the `default` namespace, at `hostname`, port 80 (to 8080), with
/// the VIP `vip` on each of `networks`. `extra` as for [`workload`].
pub fn service(
    name: &str,
    hostname: &str,
    vip: impl Display,
    networks: &[&str],
    extra: &str,
) -> String {
    let vips = networks
        .iter()
        .map(|n| format!("\"{n}/{vip}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "- name: {name}\n  namespace: default\n  hostname: \"{hostname}\"\n  vips: [{vips}]\n  \
         ports: {{80: 8080}}\n{extra}"
    )
}
