//! Tests of the CPU backend. Every backward is checked against central finite differences
//! on the f64 backend, every forward against a naive reference written here, and the f32
//! backend against the f64 one.

mod activation;
mod agreement;
mod attention;
mod decode;
mod elementwise;
mod errors;
mod loss;
mod matmul;
mod norm;
mod optim;
mod rope;
mod util;
mod vector;
