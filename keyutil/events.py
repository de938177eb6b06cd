"""One log line per event, as text or JSON: the format of every keyutil command's stderr.

    >>> from keyutil.events import format_event
    >>> format_event("text", "info", "step", {"step": "net_up"}, ts=1.0)
    'keyutil: info: step step="net_up"'
    >>> format_event("json", "info", "step", {"step": "net_up"}, ts=1.0)
    '{"ts": 1.0, "level": "info", "event": "step", "step": "net_up"}'

Callers never pass key material.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def format_event(
    fmt: str, level: str, event: str, fields: Mapping[str, Any], *, ts: float | None = None
) -> str:
    if fmt == "json":
        stamp = round(time.time() if ts is None else ts, 3)
        record = {"ts": stamp, "level": level, "event": event, **fields}
        return json.dumps(record, default=str)
    parts = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
    return f"keyutil: {level}: {event}" + (f" {parts}" if parts else "")
