//! ZDS: handing pod network namespaces from the CNI agent to the node proxy. Being written.
