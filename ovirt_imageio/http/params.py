"""
Validating a data request's parameters (ticket id, query values, a
PATCH's JSON message), with upstream's 400 messages.
"""

import json

from .. import tickets
from . import server


def require_id(ticket_id):
    if not ticket_id:
        raise server.Error(400, "Ticket id is required")


def choice(query, name, values, default):
    value = query.get(name, default)
    if value not in values:
        raise server.Error(
            400, f"Unsupported value {value!r} for {name!r}, expecting one "
                 f"of {values}")
    return value


def read_json(req):
    data = req.read_message()
    try:
        msg = json.loads(data)
    except RecursionError:
        raise server.Error(400, "Invalid JSON message: nested too deeply")
    except ValueError as e:
        raise server.Error(400, f"Invalid JSON message {e}")
    if not isinstance(msg, dict):
        raise server.Error(
            400, f"Invalid JSON message: expecting an object, got "
                 f"{type(msg).__name__}")
    return msg


def integer(msg, name, default=None):
    if name not in msg:
        if default is None:
            raise server.Error(400, f"Missing required value for {name!r}")
        return default
    value = msg[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise server.Error(400, f"Integer required {value!r}")
    if value < 0:
        raise server.Error(400, f"Invalid value {value} < 0")
    if value > tickets.MAX_SIZE:
        # Larger than any NBD export.
        raise server.Error(
            400, f"Invalid value {value} > {tickets.MAX_SIZE}")
    return value


def boolean(msg, name, default):
    value = msg.get(name, default)
    if not isinstance(value, bool):
        raise server.Error(400, f"Boolean required {value!r}")
    return value
