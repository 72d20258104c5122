//! HTTP routes (placeholder).
