//! Fuzz target `frame`: see `xkd_fuzz::frame`.

fn main() {
    xkd_fuzz::main("frame", xkd_fuzz::frame);
}
