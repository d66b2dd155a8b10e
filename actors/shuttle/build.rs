//! Compiles soloist-actors' sources (this package's only target) with `cfg(shuttle)`, so their
//! tasks, locks, yields and timers are shuttle's.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(shuttle)");
    println!("cargo::rustc-cfg=shuttle");
}
