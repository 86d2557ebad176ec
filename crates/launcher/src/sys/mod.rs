//! Small system helpers the verbs share: forked helpers with a ready report
//! (`helper`), the console socket and pty proxy (`tty`), signal forwarding
//! (`signals`), stdio pumps (`pump`), locating sibling binaries (`bin`), sizes as users
//! write them (`size`) and bounded, sanitised reads of guest-written files
//! (`guest_text`). Nothing here knows about containers or VMs.

pub mod bin;
pub mod guest_text;
pub mod helper;
pub mod pump;
pub mod signals;
pub mod size;
pub mod tty;
