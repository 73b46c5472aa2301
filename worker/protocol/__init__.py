"""The wire format: message Structs, error codes, framing. Knows nothing about MLX."""

from .errors import CODES, WorkerError, failing_as
from .framing import DEFAULT_MAX_LINE_BYTES, TooLong, decode_request, read_lines
from .messages import *  # noqa: F401,F403
from .messages import PROTOCOL_VERSION
