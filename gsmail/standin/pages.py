# -*- test-case-name: tests.test_standin -*-
"""
The HTML the GroupServer stand-in (L{gsmail.standin}) answers with, written
as GroupServer's templates render it.

The four mail pages are C{zope.formlib} forms (C{gs.content.form.base}
C{SiteForm}, C{groupserver/gs.content.form.base} C{form.py}) whose page
templates fill the site's layout (C{groupserver/gs.content.layout}
C{browser/templates/fullpage_layout.pt}, the C{@@groupserver_site_home_layout}
macro): the C{messages} slot holds the status message provider
(C{gs.content.form.base} C{browser/templates/statusmessage.pt}), the
C{body} slot the form with the widget list (C{widgets.pt}) and the buttons.
The form templates are C{gs.group.messages.add.base}
C{browser/templates/groupexists.pt} and C{addemail.pt},
C{gs.profile.email.relay} C{browser/templates/form.pt} and
C{gs.group.member.bounce} C{browser/templates/handlebounce.pt}; their
widgets are those of the pages' schemas (C{interfaces.py} of each), rendered
as C{zope.formlib} 4.0 renders an C{ASCIILine} (C{ASCIIWidget}) and a
C{Text} (C{TextAreaWidget}): C{zopefoundation/zope.formlib}
C{src/zope/formlib/textwidgets.py}, C{widget.py} (C{renderElement}),
C{form.py} (C{render_submit_button}), C{exception.py} (a widget's error
snippet).

Also here: GroupServer's error page (C{groupserver/gs.errormesg}
C{browser/templates/error.pt}), its sign-in page (C{groupserver/gs.login}
C{browser/templates/default/login.pt}), a maintenance page and a proxy's
error pages (nginx's wording), for L{gsmail.standin.Faults}.

Whitespace follows the templates only roughly (ZPT keeps the template's
line breaks); what a client reads (ids, classes, the status text, widget
names) is as GroupServer renders it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import attrs

__all__ = [
    "FORMS",
    "FormSpec",
    "PageURL",
    "SiteInfo",
    "Widget",
    "error_page",
    "exists_json",
    "form_page",
    "login_page",
    "maintenance_page",
    "proxy_error_page",
]


@attrs.frozen
class Widget:
    """
    A form field as the page's schema declares it.

    @ivar name: the field's request name (C{form.} + the schema name).
    @ivar label: the field's title (the widget's label).
    @ivar hint: the field's description (the label's C{title}).
    @ivar area: a C{Text} field (a textarea) rather than an C{ASCIILine}.
    @ivar token: the C{gs.auth.token} C{AuthToken} field.
    """

    name: str
    label: str
    hint: str
    area: bool = False
    token: bool = False


_TOKEN = Widget("form.token", "Token", "The authentication token", token=True)


@attrs.frozen
class FormSpec:
    """
    One of the four pages: its label, its template's ids, its action, its
    widgets in schema order.
    """

    label: str
    body_id: str
    form_id: str
    action: str
    action_label: str
    widgets: tuple[Widget, ...]

    def widget(self, name: str) -> Widget | None:
        """The widget named C{name}, if the page has one."""
        for widget in self.widgets:
            if widget.name == name:
                return widget
        return None


#: The pages by their short names (C{gsmail.standin.PAGE_PATHS}). The add,
#: exists and bounce templates all reuse the group-exists ids.
FORMS: Mapping[str, FormSpec] = {
    # gs.group.messages.add.base: groupexists.py, interfaces.IGSGroupExists
    "exists": FormSpec(
        "Check if a group exists",
        "gs-group-messages-add-group-exists",
        "gs-group-messages-add-group-exists-form",
        "form.actions.check",
        "Check",
        (Widget("form.email", "Email Address", "The email address to check"), _TOKEN),
    ),
    # gs.group.messages.add.base: addemail.py, interfaces.IGSAddEmail
    "add": FormSpec(
        "Add an email",
        "gs-group-messages-add-group-exists",
        "gs-group-messages-add-group-exists-form",
        "form.actions.add",
        "Add",
        (
            Widget("form.emailMessage", "Email Message", "The email message to add", area=True),
            Widget(
                "form.groupId",
                "Group Identifier",
                "The identifier of the group to add the message to.",
            ),
            _TOKEN,
        ),
    ),
    # gs.profile.email.relay: form.py, interfaces.IRelayEmail
    "relay": FormSpec(
        "Relay an email",
        "gs-profile-email-relay",
        "gs-profile-email-relay-form",
        "form.actions.relay",
        "Relay",
        (
            Widget("form.emailMessage", "Email Message", "The email message to add", area=True),
            _TOKEN,
        ),
    ),
    # gs.group.member.bounce: handlebounce.py, interfaces.IGSBounceHandler
    "bounce": FormSpec(
        "Handle a bounce",
        "gs-group-messages-add-group-exists",
        "gs-group-messages-add-group-exists-form",
        "form.actions.handle",
        "Handle",
        (
            Widget(
                "form.userEmail",
                "User Email Address",
                "The email address of the user that is bouncing",
            ),
            Widget(
                "form.groupEmail",
                "Group Email Address",
                "The email of the of the group that received the bounce notification.",
            ),
            _TOKEN,
        ),
    ),
}


@attrs.frozen
class SiteInfo:
    """
    The site a page belongs to.

    @ivar name: the site's name (page titles, the title bar).
    @ivar support_email: the support address (the error page's link).
    """

    name: str
    support_email: str


@attrs.frozen
class PageURL:
    """
    Where a page was requested, as Zope's request has it.

    @ivar url: C{request/URL}, the page's absolute URL.
    @ivar url1: C{request/URL1}, the URL of its folder (the site).
    @ivar path: C{request/URLPATH0}, the page's path.
    @ivar path1: C{request/URLPATH1}, its folder's path (C{""} at the root).
    """

    url: str
    url1: str
    path: str
    path1: str

    @classmethod
    def from_parts(cls, scheme: str, host: str, path: str) -> PageURL:
        """From the request's scheme, C{Host} and path (no query)."""
        folder = path.rsplit("/", 1)[0]
        base = f"{scheme}://{host}"
        return cls(base + path, base + folder, path, folder)


class Echo:
    """
    A placeholder in a page for a (possibly huge) message a textarea shows
    again: the message file, base64-encoded in lines of 76 characters
    ending in CRLF, written by the stand-in as it sends the page.

    @ivar path: the decoded message.
    @ivar size: its length in bytes.
    """

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size

    def encoded_length(self) -> int:
        """How many bytes the base64 text takes."""
        lines, rest = divmod(self.size, 57)
        length = lines * 78
        if rest:
            length += 4 * ((rest + 2) // 3) + 2
        return length


#: A page: bytes, with L{Echo}s where a message is shown again.
Page = list[bytes | Echo]


def _esc(text: str) -> str:
    """C{cgi.escape} without C{quote}: what ZPT and zope.formlib use for text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _layout(
    site: SiteInfo,
    where: PageURL,
    title: str,
    messages: str,
    body: Sequence[str | Echo],
    *,
    utility_links: str | None = None,
    footer: bool = True,
    metadata: str = "",
) -> Page:
    """The page in C{fullpage_layout.pt}; C{body} may hold L{Echo}s."""
    sans_page = where.url1 + "/"
    sans_protocol = ":".join(sans_page.split(":")[1:])
    page_id = "page-" + where.path1.strip("/").replace("/", "_")
    if utility_links is None:
        came_from = quote(where.path, safe="/")
        utility_links = (
            '<ul id="utilitylinks" class="dotted-inline-list">\n'
            '  <li id="utilitylinks-log-in">\n'
            f'    <a id="utilitylinks-log-in-link" href="/login.html?came_from={came_from}" class="btn btn-small" data-icon="&#x1f512;" title="Log in here">Sign in</a>\n'
            "  </li>\n"
            "  \n"
            "</ul><!--utilitylinks-->"
        )
    footer_html = (
        '<ul id="footer-links" class="dotted-inline-list">\n'
        '          <li><a href="/help">Help</a></li>\n'
        '          <li><a href="/policies/privacy">Privacy</a></li>\n'
        '          <li><a href="/policies/aup">Acceptable use</a></li>\n'
        '          <li><a href="/policies/tos">Terms of service</a></li>\n'
        '          <li>Powered by <a href="http://groupserver.org/">GroupServer</a></li>\n'
        "        </ul>"
        if footer
        else ""
    )
    head = (
        "<!DOCTYPE html>\n"
        f'<html lang="en" xmlns="http://www.w3.org/1999/xhtml" data-skin=""'
        f" data-url={quoteattr(where.url)} data-url-sans-page={quoteattr(sans_page)}>\n"
        "  <head>\n"
        f"    <base href={quoteattr(sans_protocol)} />\n"
        '    <meta charset="utf-8" />\n'
        '    <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />\n'
        "\n"
        f"    <title>\n      {_esc(title)}:\n      {_esc(site.name)}\n    </title>\n"
        "\n"
        '    <meta name="viewport" content="width=device-width, initial-scale=1.0"/>\n'
        "    \n"
        f'    <link rel="home" href="/" title="{_esc(site.name)} Home" />\n'
        f'    <link rel="help" href="/help" title="{_esc(site.name)} Help" />\n'
        f"    {metadata}\n"
        '    <link rel="icon" type="image/png" sizes="32x32" href="/++resource++gs-site-favicon-32.png" />\n'
        '    <link rel="icon" type="image/png" sizes="16x16" href="/++resource++gs-site-favicon-16.png" />\n'
        '    <link rel="apple-touch-icon" href="/++resource++gs-site-touch-icon.png" />\n'
        "\n"
        "    <!-- styling typically covering all sites -->\n"
        '    <link rel="stylesheet" type="text/css" href="/++resource++globalstyle-20160128.css" />\n'
        "    <!-- styling just covering local customisations to sites -->\n"
        '    <link rel="stylesheet" type="text/css" href="/++resource++site-20151027.css" />\n'
        "    \n"
        "  </head>\n"
        f'  <body id="{_esc(page_id)}">\n'
        '    <div id="toparea" role="banner">\n'
        '      <div id="titlebar">\n'
        '        <a id="titlebar-home-link" href="/"><span class="logo"> </span>\n'
        f'        <span class="site">{_esc(site.name)}</span></a>\n'
        f"        {utility_links}\n"
        "      </div><!--titlebar-->\n"
        "    </div><!--toparea-->\n"
        '    <div id="gs-content-layout-body">\n'
        '      <div id="bodyblock">\n'
        '        <div id="breadcrumbs" class="muted small" role="navigation">\n'
        "           \n"
        "        </div><!--breadcrumbs-->\n"
        f"        {messages}<!--messages-->\n"
        "        \n"
        "        \n"
    )
    tail = (
        "\n"
        "      </div><!--bodyblock-->\n"
        "    </div><!--gs-content-layout-body-->\n"
        '    <div id="gs-content-layout-footer" role="contentinfo">\n'
        '      <div id="gs-content-layout-footer-content">\n'
        f"        {footer_html}\n"
        "      </div><!--gs-content-layout-footer-content-->\n"
        "    </div><!--gs-content-layout-footer-->\n"
        '    <script type="text/javascript" src="/++resource++gs-content-js-loader-min-20160125.js"> </script>\n'
        '    <script type="text/javascript" src="/++resource++jquery-1.12.0.min.js"> </script>\n'
        '    <script type="text/javascript" defer="defer" src="/++resource++bootstrap-2.3.2/js/bootstrap.min.js"> </script>\n'
        "    \n"
        '    <script type="text/javascript" src="/++resource++gs-content-js-disclosure-min-20160122.js" defer="defer"> </script>\n'
        '    <script type="text/javascript" src="/++resource++gs-content-js-required-min-20151106.js" defer="defer"> </script>\n'
        '    <script type="text/javascript" src="/++resource++gs-content-js-submit-min-20160125.js" defer="defer"> </script>\n'
        "  </body>\n"
        "</html>\n"
    )
    return _join([head, *body, tail])


def _join(parts: Iterable[str | Echo]) -> Page:
    """Text to UTF-8, adjacent pieces merged; L{Echo}s kept."""
    page: Page = []
    text: list[str] = []
    for part in parts:
        if isinstance(part, Echo):
            if text:
                page.append("".join(text).encode("utf-8"))
                text = []
            page.append(part)
        else:
            text.append(part)
    if text:
        page.append("".join(text).encode("utf-8"))
    return page


def status_message(status: str, errors: Sequence[tuple[str, str]] = ()) -> str:
    """
    The status message provider's output (C{statusmessage.pt}): nothing
    without a status; C{alert-block alert-error} with a C{<dl>} of the
    failed widgets' labels and error snippets when there are errors, else
    C{alert alert-info}.

    @param status: the view's status, markup (rendered C{structure}).
    @param errors: (label, error snippet markup) per failed widget.
    """
    if not status:
        return ""
    # tal:attributes adds the class after the tag's own attributes
    # (zopefoundation/zope.tal talgenerator.py replaceAttrs); ZPT writes each
    # start tag on one line, its attributes one space apart.
    klass = "alert-block alert-error" if errors else "alert alert-info"
    widget_errors = ""
    if errors:
        items = "".join(
            f"\n      \n        <dt>{_esc(label)}</dt>\n"
            f'        <dd class="error">{snippet}</dd>\n      \n    '
            for label, snippet in errors
        )
        widget_errors = f'\n  <dl class="dl-horizontal">\n    {items}\n  </dl>'
    return (
        f'<div id="gs-content-form-base-message" role="region" class="{klass}">\n'
        '  <button aria-hidden="true" type="button" class="close" data-dismiss="alert">&times;</button>\n'
        f'  <div class="gs-content-form-base-message-status">{status}</div>'
        "<!--gs-content-form-base-message-->\n"
        "  "
        f"{widget_errors}\n"
        "</div><!--gs-content-form-base-message-->\n"
    )


def error_snippet(message: str) -> str:
    """A widget's error as C{WidgetInputErrorView.snippet} renders it."""
    return f'<span class="error">{_esc(message)}</span>'


def _widget(widget: Widget, value: str | Echo | None, error: str | None) -> list[str | Echo]:
    """One widget in C{widgets.pt}: its label, its error paragraph, its input."""
    out: list[str | Echo] = [
        f'\n  <div class="form-widget required" id="widget-{widget.name}">\n'
        f"    <label for={quoteattr(widget.name)} title={quoteattr(widget.hint)}>"
        f"{_esc(widget.label)}</label>\n"
    ]
    if error is not None:
        out.append(
            '    <p class="form-widget-message ui-widget ui-state-error ui-corner-all">\n'
            '      <span class="ui-icon ui-icon-alert">&#160;</span>\n'
            f'      <span class="msg">{error_snippet(error)}</span>\n'
            "    </p>\n"
        )
    if widget.area:
        # renderElement: class only for a type, the other attributes sorted,
        # then a space for the empty "extra".
        out.append(f'    <textarea cols="60" id="{widget.name}" name="{widget.name}" rows="15" >')
        if isinstance(value, Echo):
            out.append(value)
        elif value:
            out.append(_esc(value))
        out.append("</textarea>\n")
    else:
        shown = "" if value is None or isinstance(value, Echo) else value
        out.append(
            f'    <input class="textType" id="{widget.name}" name="{widget.name}"'
            f' size="20" type="text" value={quoteattr(shown)}  />\n'
        )
    out.append("  </div><!--form-widget-->")
    return out


def form_page(
    page: str,
    site: SiteInfo,
    where: PageURL,
    *,
    status: str = "",
    errors: Mapping[str, str] | None = None,
    values: Mapping[str, str | Echo] | None = None,
) -> Page:
    """
    One of the four pages rendered as a form: the action did not run (no
    status), succeeded (C{status} C{Done}, no values: the form is reset), or
    failed validation (C{status} C{<p>There is an error:</p>}, C{errors}).

    @param page: C{"exists"}, C{"add"}, C{"relay"} or C{"bounce"}.
    @param status: the status message, markup; C{""} for none.
    @param errors: widget name -> error text, for the failed widgets.
    @param values: widget name -> the value the request gave (shown again:
        a failed or unsubmitted form keeps its input, the token's too).
    """
    spec = FORMS[page]
    errors = errors or {}
    values = values or {}
    failed = [(w.label, error_snippet(errors[w.name])) for w in spec.widgets if w.name in errors]
    widgets: list[str | Echo] = []
    for widget in spec.widgets:
        widgets += _widget(widget, values.get(widget.name), errors.get(widget.name))
    body: list[str | Echo] = [
        f'    <div id="{spec.body_id}">\n'
        f'      <form id="{spec.form_id}" enctype="multipart/form-data" method="post" action={quoteattr(where.url)}>\n'
        f"        <h1>{_esc(spec.label)}</h1>\n"
        "        ",
        *widgets,
        "\n\n"
        '        <div class="buttons">\n'
        "          \n"
        '            <div class="formelementbutton">\n'
        f'              <input type="submit" id="{spec.action}" name="{spec.action}"'
        f' value="{_esc(spec.action_label)}" class="button" />\n'
        "            </div>\n"
        "          \n"
        "        </div><!--buttons-->\n"
        f"      </form><!--{spec.form_id}-->\n"
        f"    </div><!--{spec.body_id}-->",
    ]
    return _layout(site, where, spec.label, status_message(status, failed), body)


def exists_json(
    email: str, site_id: str | None, group_id: str | None, site_url: str | None
) -> bytes:
    """
    The group-exists action's answer: the page's whole body is the JSON
    object C{groupexists.py} returns, as Python 2's C{json.dumps} wrote that
    dict: its keys in Python 2's dict order for these four keys, C{", "} and
    C{": "} separators, ASCII only.
    """
    ordered = {"siteURL": site_url, "siteId": site_id, "email": email, "groupId": group_id}
    return json.dumps(ordered).encode("ascii")


def error_page(site: SiteInfo, where: PageURL, issue: str) -> Page:
    """
    GroupServer's error page (C{gs.errormesg} C{error.pt}), as Zope shows it
    for an exception a page raised. C{issue} is the traceback's last line,
    e.g. C{KeyError: 'groupId'}.
    """
    message = (
        f"Hi! I saw a Server Error (500) page when I went to\n{where.url}\n\n"
        f"I want to see...\n\n--\nThis technical information may help you fix "
        f"the error:\n\n{issue}\n"
    )
    mailto = f"mailto:{site.support_email}?Subject=Unexpected%20Error&body={quote(message)}"
    body = (
        "    <div>\n"
        "      <h1>Sorry! We've had trouble producing this page.</h1>\n"
        '      <div id="todo">\n'
        "        <p>\n"
        "          Please\n"
        f'          <a href={quoteattr(mailto)} class="email">email\n'
        "          support</a>\n"
        "          and we will see what we can do to fix the problem.\n"
        "        </p>\n"
        "      </div>\n"
        '      <div id="technical">\n'
        '        <p>Technical Description:\n        <code class="error"><span class="val">500</span>\n'
        '        <span class="description">Internal Server Error</span></code>\n'
        "        </p>\n"
        "        <p>\n"
        '          <span class="detail">URL:\n'
        f'          <code class="val url">{_esc(where.url)}</code></span>\n'
        "        </p>\n"
        "        <p>Issue:\n"
        f'        <code class="message">{_esc(issue)}</code>\n'
        "        </p>\n"
        "      </div>\n"
        "    </div>"
    )
    return _layout(
        site,
        where,
        "Server Error (500)",
        "",
        [body],
        utility_links="<div>\n      <!-- All links here are supressed to make it less cluttered -->\n    </div>",
        footer=False,
        metadata=(
            '<meta name="author" content="OnlineGroups.Net" />\n'
            '      <meta name="description" content="Server error page" />'
        ),
    )


def login_page(site: SiteInfo, where: PageURL) -> Page:
    """
    GroupServer's sign-in page (C{gs.login} C{login.pt}) as a request that
    was not authorised is shown it: a form, a message div that is not the
    status message, no status message.
    """
    came_from = quoteattr(where.url)
    messages = (
        '<div id="form-message" class="alert">\n'
        '      <button type="button" class="close" data-dismiss="alert">&times;</button>\n'
        "      <p>\n"
        "        Please enter your email address and password below.\n"
        "        This is usually neccessary for one of these reasons:\n"
        "      </p>\n"
        "      <ul>\n"
        "        <li>\n"
        "          You attempted to login, but either the email address or the\n"
        "          password were incorrect,\n"
        "        </li>\n"
        "        <li>\n"
        "          You have tried to access a link inside the restricted area, but\n"
        "          you haven't yet logged in (this could have happened if you\n"
        "          clicked on a link in an email for instance),\n"
        "        </li>\n"
        "        <li>\n"
        "          Your browser does not have cookies enabled.\n"
        "        </li>\n"
        "      </ul>\n"
        "    </div><!--form-message-->"
    )
    body = (
        '    <div id="gs-login" role="main">\n'
        '      <div id="gs-login-anon">\n'
        "        <h1>Sign in</h1>\n"
        f'        <form id="login-form" class="gs-content-js-required" action="{_esc(where.url1)}/login.html">\n'
        '          <input type="hidden" id="seed" name="seed" value="6f1ed002ab5595859014ebf0951522d9"/>\n'
        '          <input type="hidden" id="ep" name="ep" value="False"/>\n'
        '          <input type="hidden" id="ph" name="ph" value=""/>\n'
        f'          <input type="hidden" id="came_from" name="came_from" value={came_from} />\n'
        '          <input type="hidden" id="failed" name="failed" value="True"/>\n'
        '          <div id="login-id-widget" class="form-widget required">\n'
        '            <label class="text" title="Enter the email address, or login name, you use with your forums on this site" for="login">Email address</label>\n'
        '            <input id="login" name="login" class="textType" type="text" value="" title="Enter your email address here" />\n'
        "          </div><!--login-->\n"
        '          <div id="gs-login-password" class="form-widget required">\n'
        '            <label class="textType" title="Enter the password that you use with this site (case-sensitive)" for="password">Password</label>\n'
        '            <input id="password" class="textType" type="password" name="password" value="" title="Enter your password"/>\n'
        "          </div><!--gs-login-password-->\n"
        '          <div id="gs-login-buttons" class="buttons">\n'
        '            <div id="gs-login-remember-me" class="form-widget not-required">\n'
        '              <input type="checkbox" title="Remember me" class="checkboxType" value="1" name="__ac_persistent" id="__ac_persistent" />\n'
        '              <label for="__ac_persistent" class="checkboxLabel" title="Select this if you want to automatically log in next time">Remember me</label>\n'
        "            </div><!--gs-login-remember-me-->\n"
        '            <div class="formelementbutton">\n'
        '              <input class="button" type="submit" name="submit" id="loginButton" value="Sign in" />\n'
        "            </div>\n"
        "          </div><!--gs-login-buttons-->\n"
        "        </form><!--login-form-->\n"
        "        <dl>\n"
        "          <dt>Can't sign in?</dt>\n"
        "          <dd>\n"
        '            <a href="/reset_password.html">Reset your\n'
        "              <strong>password</strong></a>\n"
        "          </dd>\n"
        "          <dt>Help</dt>\n"
        "          <dd>\n"
        "            Check the\n"
        '            <a href="/help/faqs.html"><strong>frequently asked\n'
        "              questions</strong></a>\n"
        "          </dd>\n"
        "        </dl>\n"
        "      </div><!--gs-login-anon-->\n"
        "      \n"
        "    </div><!--gs-login-->"
    )
    page = _layout(
        site,
        where,
        "Login",
        messages,
        [body],
        utility_links='<div id="utilitylinks">&#160;</div><!--utilitylinks-->',
    )
    return page


def maintenance_page(site: SiteInfo) -> bytes:
    """
    A maintenance page a front-end web server serves, with status 200, while
    the site is down: no form, no status message.
    """
    name = _esc(site.name)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n'
        "<head>\n"
        '  <meta charset="utf-8" />\n'
        f"  <title>{name} is down for maintenance</title>\n"
        "  <style>body { font-family: sans-serif; margin: 4em auto; max-width: 36em; }</style>\n"
        "</head>\n"
        "<body>\n"
        f"  <h1>{name} will be back soon</h1>\n"
        '  <div class="alert alert-info">\n'
        "    <p>We are upgrading the site. Your messages are safe: mail sent to\n"
        "    your groups will be delivered when we are back.</p>\n"
        "    <p>Done? Not yet. Please try again in a few minutes.</p>\n"
        "  </div>\n"
        "</body>\n"
        "</html>\n"
    ).encode()


_PROXY_REASONS: Mapping[int, str] = {
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}


def proxy_error_page(code: int) -> bytes:
    """The error page a front-end proxy (nginx) answers for C{code}."""
    reason = _PROXY_REASONS.get(code, "Error")
    return (
        "<html>\r\n"
        f"<head><title>{code} {reason}</title></head>\r\n"
        "<body>\r\n"
        f"<center><h1>{code} {reason}</h1></center>\r\n"
        "<hr><center>nginx/1.22.1</center>\r\n"
        "</body>\r\n"
        "</html>\r\n"
    ).encode("ascii")


def page_length(page: Page) -> int:
    """The length in bytes of a page once its L{Echo}s are written."""
    return sum(p.encoded_length() if isinstance(p, Echo) else len(p) for p in page)
