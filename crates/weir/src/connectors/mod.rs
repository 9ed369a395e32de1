//! Connectors: one module per external system, each holding its source and its sink. The
//! interfaces they implement are [`crate::source::Source`] and [`crate::sink::Sink`].

pub mod blackhole;
pub mod blobs;
pub mod file;
pub mod generator;
pub mod images;
pub mod memory;
