//! `nestor`: the command line users type. Parses arguments and wires the libraries together.

fn main() {
    println!("nestor {}", env!("CARGO_PKG_VERSION"));
}
