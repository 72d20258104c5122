//! The CNI node agent (`meshnode cni-agent`): istio-cni's node agent role. Being written.

pub mod cluster;
pub mod kube;
pub mod procfs;
