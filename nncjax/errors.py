"""The exception hierarchy of nncjax: every error the library raises derives from :class:`NNCError`."""

from __future__ import annotations

__all__ = ["NNCError", "InputError", "BitstreamError", "UnsupportedError", "LimitError", "UnsupportedStreamError"]


class NNCError(Exception):
    """Root of every exception raised by nncjax."""


class InputError(NNCError, ValueError):
    """An argument is invalid: wrong dtype, shape, range, non-finite values, unknown option."""


class BitstreamError(NNCError, ValueError):
    """A bitstream is malformed, truncated or inconsistent. The message names the unit and field."""


class LimitError(BitstreamError):
    """A bitstream declares more data than the caller's decoding limit allows."""


class UnsupportedError(NNCError, NotImplementedError):
    """A valid feature of the format or an option that nncjax does not implement."""


class UnsupportedStreamError(BitstreamError, UnsupportedError):
    """A bitstream uses a valid feature that nncjax cannot decode (e.g. NNR_QNT or NNR_AGG units).

    Both a :class:`BitstreamError` (so ``except BitstreamError`` catches every problem with a stream)
    and an :class:`UnsupportedError`.
    """
