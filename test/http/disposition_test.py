"""The Content-Disposition of a download (http/disposition.py)."""

import pytest

from ovirt_imageio.http import disposition


# RFC 6266: a quoted ASCII fallback and the UTF-8 name. A name outside
# Latin-1 made every GET close without a response.
@pytest.mark.parametrize("filename,header", [
    ("disk.raw", "attachment; filename=\"disk.raw\"; "
                 "filename*=UTF-8''disk.raw"),
    ("my disk (1).qcow2", "attachment; filename=\"my disk (1).qcow2\"; "
                          "filename*=UTF-8''my%20disk%20%281%29.qcow2"),
    ('a"b\\c%d;e.raw', "attachment; filename=\"a_b_c_d;e.raw\"; "
                       "filename*=UTF-8''a%22b%5Cc%25d%3Be.raw"),
    ("d\u00efsk.raw", "attachment; filename=\"d_sk.raw\"; "
                  "filename*=UTF-8''d%C3%AFsk.raw"),
    ("\u05d3\u05d9\u05e1\u05e7.img", "attachment; filename=\"____.img\"; "
     "filename*=UTF-8''%D7%93%D7%99%D7%A1%D7%A7.img"),
    ("\U0001f4be", "attachment; filename=\"_\"; "
               "filename*=UTF-8''%F0%9F%92%BE"),
], ids=["ascii", "space", "specials", "latin-1", "hebrew", "emoji"])
def test_content_disposition(filename, header):
    assert disposition.content_disposition(filename) == header
