//! Applying rendered rules to the kernel with `iptables-restore`.
