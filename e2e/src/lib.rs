//! Switchyard's local cluster for end-to-end tests and the demo.
