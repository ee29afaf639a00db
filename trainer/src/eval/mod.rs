//! Evaluation of trained models. [`metrics`] holds the measures, pure functions on
//! embedding tensors (a judge CLIP's image and text space), each checked against a Python
//! reference; what trains the compared arms, samples them and writes a report is kept apart
//! from them.

pub mod metrics;
