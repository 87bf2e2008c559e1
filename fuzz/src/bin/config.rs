//! Fuzz target `config`: see `xkd_fuzz::config`.

fn main() {
    xkd_fuzz::main("config", xkd_fuzz::config);
}
