"""
GroupServer's pages as its templates render them, with the status
message gsmail reads (L{gsmail.answers}).
"""

from __future__ import annotations

# The site's layout around a form page (navigation, the form with every
# widget and the token's input), as GroupServer's pages render it.
_LAYOUT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"/><title>Add an email: Example site</title>
<link rel="stylesheet" href="/++resource++gs-content-css/main.css"/></head>
<body><div id="gs-content-layout-header"><ul class="nav"><li><a href="/">Home</a></li>
<li><a href="/groups">Groups</a></li><li><a href="/login.html">Log in</a></li></ul></div>
<div id="gs-content"><h1>Add an email</h1>
{message}
<form enctype="multipart/form-data" method="post" action="/gs-group-messages-add-email.html"
      class="gs-content-js-required" id="gs-group-messages-add-email">
  <div class="form-widget required" id="widget-form.groupId">
    <label for="form.groupId" title="The group">Group identifier</label>
    {widget_error}
    <input class="textType" id="form.groupId" name="form.groupId" size="20" type="text" value="dev"/>
  </div>
  <div class="form-widget required" id="widget-form.token">
    <label for="form.token" title="The token">Token</label>
    <input class="textType" id="form.token" name="form.token" size="20" type="text" value=""/>
  </div>
  <div class="form-widget required" id="widget-form.emailMessage">
    <label for="form.emailMessage">Email message</label>
    <textarea cols="60" id="form.emailMessage" name="form.emailMessage" rows="15"></textarea>
  </div>
  <div class="buttons"><input type="submit" id="form.actions.add" name="form.actions.add"
       value="Add" class="button"/></div>
</form></div>
<div id="gs-content-layout-footer"><p>Powered by GroupServer</p></div></body></html>
"""


_MESSAGE = """<div id="gs-content-form-base-message"
     class="{klass}" role="region">
  <button aria-hidden="true" type="button" class="close"
          data-dismiss="alert">&times;</button>
  <div class="gs-content-form-base-message-status">{status}</div><!--gs-content-form-base-message-->
  {errors}
</div><!--gs-content-form-base-message-->"""


def page(status: str | None, klass: str = "alert alert-info", errors: str = "") -> bytes:
    message = "" if status is None else _MESSAGE.format(klass=klass, status=status, errors=errors)
    return _LAYOUT.format(message=message, widget_error="").encode("utf-8")
