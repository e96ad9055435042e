//! `cdp-agent`: parses arguments and runs the agent library.

fn main() {
    println!("cdp-agent {}", env!("CARGO_PKG_VERSION"));
}
