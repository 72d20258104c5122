//! Placeholder: being written (AWS branch-ENI probe rules).
