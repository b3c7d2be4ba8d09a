//! The `lema` command-line tool. The binary is glue over the library: it parses
//! arguments, calls the library and prints errors (with their whole chain) in one place.
//!
//! Exit codes: 0 success, 1 error (message on stderr), 2 invalid command line, 130 (143)
//! a training run stopped by Ctrl-C (SIGTERM) after saving a checkpoint.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
