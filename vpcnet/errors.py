"""The small exception family every layer raises, mapped to protocol answers in `transport` only, and
`shown()`, the one way a message quotes a value it was sent."""


class VpcnetError(Exception):
    """Base class: the message is shown to the user (Docker prints it), so it must name the problem."""

    http_status = 500


class InvalidRequest(VpcnetError):
    """The request is malformed or asks for something vpcnet refuses."""

    http_status = 400


class TooLarge(InvalidRequest):
    """The request body is over the size vpcnet reads (Docker's own calls are far smaller)."""

    http_status = 413


class NotFound(VpcnetError):
    """The named network, endpoint, pool or address does not exist."""

    http_status = 404


class Conflict(VpcnetError):
    """The request collides with existing state (address in use, host CIDR already used)."""

    http_status = 409


class Exhausted(VpcnetError):
    """A pool has no free address left."""

    http_status = 507


class NotReady(VpcnetError):
    """Something the request needs is not there yet (host CIDR not yet claimed)."""

    http_status = 503


class Retryable(VpcnetError):
    """A transient failure: the same call may succeed later (cloud throttling, conflicts, 5xx)."""

    http_status = 503


class Busy(Retryable):
    """The cloud is busy rather than failing: another route-table write in progress (Alibaba TaskConflict,
    OperationConflict) or throttling. Retried until a deadline long enough to cover a boot storm."""


class Fatal(VpcnetError):
    """A failure that retrying cannot fix (bad credentials, full route table)."""

    http_status = 500


class DataplaneError(VpcnetError):
    """The kernel refused a change."""

    http_status = 500


class StateError(VpcnetError):
    """The state (sqlite store) cannot be written or read: a full or failing disk, a damaged file."""

    http_status = 507


def shown(value, limit: int = 64) -> str:
    """`value` (from a request) as an error message may quote it: as given when it is short, printable
    text, else escaped and cut. A message then never carries a newline into a log line, nor kilobytes
    of someone's input back to them."""
    text = value if isinstance(value, str) else repr(value)
    if text and len(text) <= limit and text.isprintable() and " " not in text:
        return text
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
