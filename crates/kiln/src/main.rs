//! The `kiln` binary: everything is in `kiln-cli`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    kiln_client::install_tls_provider();
    let code = kiln_cli::run_stdout(std::env::args().collect()).await;
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
