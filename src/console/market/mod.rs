//! The public marketplace on the client listener (`GET /`).

use actix_web::web;

pub fn configure(_cfg: &mut web::ServiceConfig) {}
