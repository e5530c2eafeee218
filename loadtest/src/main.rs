//! tollgate-loadtest: not built yet (see README "Status").
fn main() {
    eprintln!("tollgate-loadtest: the load-test suite is not built yet");
    std::process::exit(2);
}
