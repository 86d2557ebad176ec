//! Architecture-specific set-up of the guest (only x86_64 is supported).

pub mod x86_64;
