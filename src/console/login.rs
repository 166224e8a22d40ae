//! `GET /login`'s page: the admin token form (mounted with `http.admin_token` only; the routes
//! are in [`super::actions`]).

use maud::{Markup, html};

/// The login form, after `error` (a failed attempt) if any.
pub fn render(error: Option<&str>) -> Markup {
    html! {
        @if let Some(error) = error {
            p class="bad" { (error) }
        }
        form method="post" action="/login" {
            label {
                "Admin token "
                input type="password" name="token" autocomplete="current-password" size="48"
                    autofocus;
            }
            " "
            button { "Log in" }
        }
        p {
            "The token is " code { "http.admin_token" } " (or the file of "
            code { "http.admin_token_file" } "). The browser keeps a cookie derived from it \
             (HttpOnly, SameSite=Strict) for 12 h, not the token itself."
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_posts_a_password_field_and_escapes_the_error() {
        let html = render(Some("<b>Wrong</b>")).into_string();
        assert!(
            html.starts_with("<p class=\"bad\">&lt;b&gt;Wrong&lt;/b&gt;</p>"),
            "{html}"
        );
        assert!(
            html.contains(
                "<form method=\"post\" action=\"/login\"><label>Admin token <input \
                 type=\"password\" name=\"token\" autocomplete=\"current-password\" size=\"48\" \
                 autofocus></label> <button>Log in</button></form>"
            ),
            "{html}"
        );
        assert!(!render(None).into_string().contains("class=\"bad\""));
    }
}
