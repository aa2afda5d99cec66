"""
The Content-Disposition header of a download (RFC 6266, RFC 8187).
"""

import urllib.parse


# RFC 8187 attr-char besides letters and digits: what filename* keeps
# unencoded.
_ATTR_CHARS = "!#$&+-.^_`|~"


def content_disposition(filename):
    """
    The Content-Disposition of a download (RFC 6266): a quoted ASCII
    fallback for old user agents, and the name itself as UTF-8. Headers go
    out as Latin-1, so a name outside it cannot be sent raw (upstream
    does, as UTF-8). Tickets refuse control characters in names.
    """
    if not filename:
        return "attachment"
    # Quotes and backslashes have unreliable escapes in user agents, and
    # some percent-decode the plain parameter; replace them too.
    fallback = "".join(
        c if " " <= c <= "~" and c not in '"\\%' else "_"
        for c in filename)
    encoded = urllib.parse.quote(filename, safe=_ATTR_CHARS)
    return (f"attachment; filename=\"{fallback}\"; "
            f"filename*=UTF-8''{encoded}")
