//! Pure rendering of the model into `iptables-restore` input.
