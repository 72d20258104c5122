//! `meshnode sandbox`: a small cluster made of network namespaces on one machine, running the Istio ambient
//! tutorial (work in progress: the model only).

pub mod model;
