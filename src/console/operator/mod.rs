//! The operator console on the admin listener (`/console`).

use actix_web::web;

pub fn configure(_cfg: &mut web::ServiceConfig) {}
