use anyhow::Result;
#[derive(clap::Args)]
pub struct BenchArgs {}
pub fn main(_: BenchArgs) -> Result<()> { Ok(()) }
