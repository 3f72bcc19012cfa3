//! Per-volume credentials and their roles.
