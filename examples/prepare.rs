//! Stand-in for `lema prepare` / `lema info` until the CLI is wired:
//!
//!   cargo run --release --example prepare -- SRC OUT [f32|f16|bf16]
//!   cargo run --release --example prepare -- --info SRC
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, src] if flag == "--info" => {
            print!("{}", lema::import::inspect(std::path::Path::new(src))?);
        }
        [src, out, rest @ ..] if rest.len() <= 1 => {
            let dtype = rest.first().map(|d| d.parse()).transpose()?;
            let report = lema::import::prepare(src.as_ref(), out.as_ref(), dtype, true)?;
            print!("{report}");
        }
        _ => anyhow::bail!("usage: prepare SRC OUT [f32|f16|bf16]  |  prepare --info SRC"),
    }
    Ok(())
}
