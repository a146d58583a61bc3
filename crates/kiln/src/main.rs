//! The `kiln` binary: everything is in `kiln-cli`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    kiln_client::install_tls_provider();
    let code = kiln_cli::run(std::env::args().collect(), Box::new(std::io::stdout())).await;
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
