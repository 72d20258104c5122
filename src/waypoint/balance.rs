//! Load balancing (placeholder).
