//! placeholder until the server exists
#[derive(Debug)]
pub struct TestServer;
