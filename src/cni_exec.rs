//! Invoking a CNI plugin chain as a container runtime does. Being written.
