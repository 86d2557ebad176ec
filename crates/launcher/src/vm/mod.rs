//! The VM side: a microVM with its guest agent seen from the host (`sandbox`), an
//! image as a read-only disk (`disk`), a container in its own microVM or a pod's
//! (`container`) and its checkpoint and restore (`checkpoint`) and live migration (`migrate`), pods (`pod`), the plain `nestor vm run` (`plain`), warm starts from a template
//! snapshot (`template`), and the stand-in VMM of the host-side tests (`standin`).

pub mod checkpoint;
pub mod container;
pub mod disk;
pub mod migrate;
pub mod plain;
pub mod pod;
pub mod sandbox;
pub mod standin;
pub mod template;
