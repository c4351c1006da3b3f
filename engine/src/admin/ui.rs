//! The web management UI: a page, a script and a style sheet, embedded in
//! the binary and served by the admin listener at `/` (over HTTPS when the
//! admin API is), so it works offline with nothing to install or fetch.
//!
//! It is plain JavaScript with no dependencies and no build step: what a
//! maintainer reads is what the browser runs. It logs in with the broker's
//! users and then reads the same admin API as every other client, with
//! that user's credentials, so it can show nothing the API would refuse
//! the user. The assets themselves need no login (they hold no data).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::AdminState;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// The UI's paths, served without a login.
pub(super) fn is_asset(path: &str) -> bool {
    matches!(path, "/" | "/ui/app.js" | "/ui/style.css")
}

fn asset(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            // The page runs only its own script and style.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}
