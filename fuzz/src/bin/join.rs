//! Fuzz target `join`: see `xkd_fuzz::join`.

fn main() {
    xkd_fuzz::main("join", xkd_fuzz::join);
}
