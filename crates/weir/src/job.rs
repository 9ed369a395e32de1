//! YAML jobs.
