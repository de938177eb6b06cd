"""What the ``http`` fuzz target (fuzz/http.py) found in the KMS's HTTP server
(mock_kms/httpd.py), each as a regression test. A test marked ``xfail(strict=True)`` is a
finding not fixed yet (none is today): it fails, and starts passing (so fails the suite, as a
reminder to drop the mark) once the server is fixed."""

from __future__ import annotations

import http.client
from typing import Any

from test_httpd import Running, _Stream, read_response, serve

__all__ = ["serve"]  # the fixture, used here by name


def test_an_answer_to_head_has_no_content_so_the_next_answer_is_read_as_sent(serve: Any) -> None:
    r: Running = serve()
    with r.connect() as sock:
        sock.sendall(
            b"HEAD /first HTTP/1.1\r\nHost: kms\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: kms\r\n\r\n"
        )
        head = http.client.HTTPResponse(_Stream(sock), method="HEAD")  # type: ignore[arg-type]
        head.begin()
        assert head.status == 200
        assert head.read() == b""
        second = read_response(sock)
        assert second.status == 200
        assert b'"path": "/second"' in second.read()
